from __future__ import annotations

import numpy as np
import pytest
import torch

from kernel_lib.normalize import (histogram_uint8, normalize, normalize_torch, percentile_bounds,
                                  percentiles_from_histogram)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("q", [(2.0, 98.0), (0.0, 100.0), (0.5, 99.5), (37.3, 50.0)])
def test_histogram_percentile_equals_numpy(seed, q):
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 5000))
    x = rng.normal(rng.uniform(40, 200), rng.uniform(1, 60), size).clip(0, 255).astype(np.uint8)
    got = percentiles_from_histogram(histogram_uint8(x[None, None]), q)
    np.testing.assert_allclose(got, np.percentile(x, q), rtol=0, atol=1e-9)


def test_per_slice_percentiles_equal_numpy():
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 256, (6, 17, 23)).astype(np.uint8)
    vol[2] = 77  # constant slice
    lo, hi = percentile_bounds(vol, 2, 98, per_slice=True)
    ref = np.percentile(vol.reshape(6, -1), (2, 98), axis=1)
    np.testing.assert_allclose(lo, ref[0])
    np.testing.assert_allclose(hi, ref[1])


@pytest.mark.parametrize("per_slice", [False, True])
def test_uint8_lut_path_equals_float_path(per_slice):
    rng = np.random.default_rng(2)
    vol = rng.normal(120, 30, (5, 32, 32)).clip(0, 255).astype(np.uint8)
    lut = normalize(vol, per_slice=per_slice)
    ref = normalize(vol.astype(np.float32), per_slice=per_slice)
    np.testing.assert_allclose(lut, ref, atol=1e-6)
    assert lut.min() == 0.0 and lut.max() == 1.0
    as_u8 = normalize(vol, per_slice=per_slice, out="uint8")
    assert as_u8.dtype == np.uint8 and as_u8.min() == 0 and as_u8.max() == 255


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_constant_volume_does_not_divide_by_zero(dtype):
    vol = np.full((3, 8, 8), 90, dtype=dtype)
    with np.errstate(all="raise"):
        out = normalize(vol, per_slice=True)
    assert np.isfinite(out).all() and (out == 0).all()


@pytest.mark.parametrize("per_slice", [False, True])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_torch_matches_numpy(per_slice, dtype):
    rng = np.random.default_rng(3)
    vol = rng.normal(100, 25, (4, 20, 24)).clip(0, 255).astype(np.uint8)
    ref = normalize(vol.astype(np.float32), per_slice=per_slice)
    got = normalize_torch(torch.from_numpy(vol).to(dtype), per_slice=per_slice).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-5)
    u8 = normalize_torch(torch.from_numpy(vol), per_slice=per_slice, out="uint8")
    assert u8.dtype == torch.uint8


def test_bad_arguments():
    with pytest.raises(ValueError, match="out must be"):
        normalize(np.zeros((2, 2), np.uint8), out="int")
    with pytest.raises(ValueError, match="3D"):
        normalize(np.zeros((2, 2), np.uint8), per_slice=True)
