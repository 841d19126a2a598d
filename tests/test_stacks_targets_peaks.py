from __future__ import annotations

import numpy as np
import pytest
import torch

from kernel_lib.peaks import find_peaks, nms_radius_voxels
from kernel_lib.resample import heatmap_frame
from kernel_lib.stacks import iter_stack_batches, slice_stack, stack_offsets, step_in_slices
from kernel_lib.targets import gaussian_heatmap


def _ramp(depth=7, h=3, w=4):
    return np.broadcast_to(np.arange(depth, dtype=np.uint8)[:, None, None], (depth, h, w)).copy()


def test_stack_channels_and_clamping():
    vol = _ramp()
    offs = stack_offsets(2, 2)
    assert offs.tolist() == [-4, -2, 0, 2, 4]
    assert slice_stack(vol, 1, offs)[:, 0, 0].tolist() == [0, 0, 1, 3, 5]
    assert slice_stack(vol, 6, offs)[:, 0, 0].tolist() == [2, 4, 6, 6, 6]


def test_batches_cover_every_strided_centre():
    vol = _ramp(depth=11)
    seen = []
    for centres, batch in iter_stack_batches(vol, stack_offsets(1, 1), batch_size=4, z_stride=2):
        assert batch.shape == (len(centres), 3, 3, 4) and batch.dtype == np.uint8
        assert (batch[:, 1, 0, 0] == centres).all()
        seen += centres.tolist()
    assert seen == list(range(0, 11, 2))


def test_step_in_slices():
    assert step_in_slices(32.0, 16.0) == 2
    assert step_in_slices(10.0, 16.0) == 1
    with pytest.raises(ValueError):
        step_in_slices(0, 16.0)


def test_gaussian_heatmap_peak_location_and_z_scaling():
    sigma, stride = 6.0, 4
    motor = (20.0, 41.5, 25.5)  # model voxels; heatmap pixel centres are 4k + 1.5
    heat = gaussian_heatmap((64, 64), [motor], z_centre=20, sigma=sigma, stride=stride)
    iy, ix = np.unravel_index(np.argmax(heat), heat.shape)
    assert (iy, ix) == (10, 6) and heat[iy, ix] == pytest.approx(1.0)
    off = gaussian_heatmap((64, 64), [motor], z_centre=26, sigma=sigma, stride=stride)
    assert off.max() == pytest.approx(np.exp(-36 / 72), rel=1e-5)
    assert gaussian_heatmap((64, 64), [], 0, sigma, stride).max() == 0


def test_gaussian_heatmap_several_motors_max_combined():
    heat = gaussian_heatmap((64, 64), [(5, 10, 10), (5, 50, 50)], 5, 3.0, 2)
    assert heat[5, 5] > 0.9 and heat[25, 25] > 0.9
    with pytest.raises(ValueError, match="multiple of the stride"):
        gaussian_heatmap((63, 64), [], 0, 3.0, 2)


def test_peaks_nms_and_order():
    heat = torch.zeros(10, 12, 12)
    heat[3, 4, 4], heat[3, 4, 5], heat[8, 10, 10], heat[3, 9, 9] = 0.9, 0.8, 0.6, 0.3
    peaks = find_peaks(heat, (1, 1, 1), top_k=10, min_score=0.1)
    assert peaks[:, :3].tolist() == [[3, 4, 4], [8, 10, 10], [3, 9, 9]]
    assert np.allclose(peaks[:, 3], [0.9, 0.6, 0.3])
    assert len(find_peaks(heat, (1, 1, 1), top_k=1)) == 1
    assert len(find_peaks(heat, (1, 1, 1), min_score=0.95)) == 0


def test_peaks_plateau_gives_one_peak_and_nan_is_safe():
    heat = torch.zeros(5, 5, 5)
    heat[2, 2, 2:4] = 0.5
    heat[0, 0, 0] = float("nan")
    assert len(find_peaks(heat, (1, 1, 1), top_k=5, min_score=0.1)) == 1


def test_heatmap_target_decodes_back_to_motor():
    """Target heatmaps stacked over z and decoded land on the motor (model -> heatmap -> model)."""
    motor = np.array([12.0, 37.5, 22.5])
    stride, z_stride = 4, 2
    heat = np.stack([gaussian_heatmap((64, 64), [motor], z, 6.0, stride)
                     for z in range(0, 32, z_stride)])
    peak = find_peaks(heat, (2, 2, 2), top_k=1)[0]
    back = heatmap_frame(stride, z_stride).inverse().apply(peak[:3])
    assert np.abs(back - motor).max() <= stride / 2 + 1e-9


def test_nms_radius_voxels():
    assert nms_radius_voxels(600, 16, 4, 1) == (38, 10, 10)
    assert nms_radius_voxels(10, 16, 4, 2) == (1, 1, 1)


@pytest.mark.parametrize("seed", range(3))
def test_separable_filter_equals_dense_max_pool(seed):
    """find_peaks (separable max filter) finds the same peaks as a dense max_pool3d."""
    import torch.nn.functional as F

    heat = torch.rand(20, 24, 28, generator=torch.Generator().manual_seed(seed)) ** 4
    radius = (3, 2, 4)
    pooled = F.max_pool3d(heat[None, None], tuple(2 * r + 1 for r in radius), stride=1,
                          padding=radius)[0, 0]
    dense = (heat == pooled).nonzero().numpy()
    dense_scores = heat[heat == pooled].numpy()
    order = np.argsort(-dense_scores, kind="stable")[:6]
    got = find_peaks(heat, radius, top_k=6)
    np.testing.assert_array_equal(got[:, :3], dense[order])
    np.testing.assert_allclose(got[:, 3], dense_scores[order])


def test_flat_heatmap_is_cheap_and_gives_one_peak():
    heat = torch.full((200, 100, 100), 0.25)
    peaks = find_peaks(heat, (5, 5, 5), top_k=3)
    assert len(peaks) >= 1 and peaks[0, 3] == pytest.approx(0.25)
