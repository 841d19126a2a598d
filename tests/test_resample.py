"""Coordinate frames: round trips and agreement with the actual resampling."""

from __future__ import annotations

import numpy as np
import pytest

from kernel_lib.resample import (Frame, decode_frame, heatmap_frame, resample_to_spacing,
                                 resize_volume, target_shape)


def _points(n=50, seed=0, high=(300, 900, 900)):
    return np.random.default_rng(seed).uniform(0, 1, (n, 3)) * np.asarray(high)


@pytest.mark.parametrize("src,dst", [((300, 959, 928), (292, 935, 905)),
                                     ((500, 1912, 1847), (203, 777, 750)),
                                     ((64, 256, 300), (160, 640, 750))])
def test_resize_frame_round_trip(src, dst):
    frame = Frame.resize(src, dst)
    pts = _points(high=src)
    np.testing.assert_allclose(frame.inverse().apply(frame.apply(pts)), pts, atol=1e-9)


def test_composed_chain_round_trip():
    chain = (decode_frame(2).then(Frame.resize((300, 480, 464), (292, 468, 452)))
             .then(heatmap_frame(output_stride=4, z_stride=2)))
    pts = _points()
    np.testing.assert_allclose(chain.inverse().apply(chain.apply(pts)), pts, atol=1e-9)
    back = Frame.from_dict(chain.to_dict())
    assert back == chain


def test_then_is_sequential_application():
    a, b = Frame((2.0, 0.5, 1.0), (1.0, -1.0, 0.0)), Frame.centered((0.25, 3.0, 1.0))
    pts = _points(5)
    np.testing.assert_allclose(a.then(b).apply(pts), b.apply(a.apply(pts)))


def test_frame_agrees_with_actual_resampling():
    """A bright dot at a known original voxel lands where the frame says after resampling."""
    src_shape, spacing, target = (40, 120, 150), 10.0, 16.0
    vol = np.zeros(src_shape, np.float32)
    z, y, x = 20, 61, 77
    vol[z - 2:z + 3, y - 2:y + 3, x - 2:x + 3] = 1.0  # a 5-voxel cube centred on (20, 61, 77)
    out, frame = resample_to_spacing(vol, spacing, target)
    assert out.shape == target_shape(src_shape, spacing, target)
    grid = np.indices(out.shape).reshape(3, -1).T
    weights = out.reshape(-1)
    centroid = (grid * weights[:, None]).sum(0) / weights.sum()
    np.testing.assert_allclose(centroid, frame.apply([z, y, x]), atol=0.15)


def test_heatmap_frame_pixel_centres():
    frame = heatmap_frame(output_stride=4, z_stride=3)
    # heatmap pixel 0 spans model pixels 0..3, centre 1.5; heatmap slice 2 is model slice 6.
    np.testing.assert_allclose(frame.inverse().apply([[2, 0, 1]]), [[6, 1.5, 5.5]])


def test_resize_keeps_dtype_and_handles_wide_z():
    vol = np.random.default_rng(0).integers(0, 255, (10, 200, 200)).astype(np.uint8)
    out = resize_volume(vol, (5, 200, 200))  # 40000 columns: more than one cv2 chunk
    assert out.dtype == np.uint8 and out.shape == (5, 200, 200)
    np.testing.assert_allclose(out[0].astype(float), vol[:2].mean(0), atol=1.0)


def test_bad_spacing():
    with pytest.raises(ValueError, match="spacings must be > 0"):
        target_shape((3, 4, 5), 0.0, 16.0)
