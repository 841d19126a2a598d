"""Training samples: positives contain the motor's Gaussian; labels move with the image."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernel_lib.sampling import (Augment, Pose, SampleSpec, StackSampler, cut_sample,
                                 motors_in_crop)
from kernel_lib.stacks import stack_offsets


def _volume_with_dot(shape=(40, 160, 160), motor=(20, 70, 90)):
    vol = np.full(shape, 40, np.uint8)
    z, y, x = motor
    vol[z - 1:z + 2, y - 2:y + 3, x - 2:x + 3] = 250
    return vol, np.array([motor], dtype=np.float64)


SPEC = SampleSpec(crop=64, sigma=3.0, stride=4, offsets=stack_offsets(1, 2))


@pytest.mark.parametrize("pose", [Pose(), Pose(zoom=1.5), Pose(zoom=0.8, flip=True),
                                  Pose(angle=math.pi / 2), Pose(zoom=1.2, angle=1.0, flip=True)])
def test_labels_move_with_the_image(pose):
    """The bright dot in the warped stack sits at the heatmap's peak for any pose."""
    vol, motors = _volume_with_dot()
    centre = (20.0, 75.0, 80.0)
    stack, heat = cut_sample(vol, motors, centre, SPEC, pose)
    mid = stack[1].astype(float)
    bright = np.argwhere(mid > 150)
    assert len(bright), "the dot left the crop"
    dot_yx = bright.mean(axis=0)
    local = motors_in_crop(motors, centre, pose, SPEC.crop)[0]
    assert np.abs(dot_yx - local[1:]).max() < 1.0
    peak = np.array(np.unravel_index(heat.argmax(), heat.shape))
    assert np.abs((peak + 0.5) * SPEC.stride - 0.5 - local[1:]).max() <= SPEC.stride
    assert heat.max() > 0.6  # the motor may sit between heatmap pixel centres


def test_zoom_scales_z_distance():
    vol, motors = _volume_with_dot()
    centre = (23.0, 70.0, 90.0)
    _, flat = cut_sample(vol, motors, centre, SPEC, Pose(zoom=1.0))
    _, zoomed = cut_sample(vol, motors, centre, SPEC, Pose(zoom=2.0))
    # Same in-plane position (the crop centre), so only the z factor differs: dz 3 vs 6 voxels.
    assert zoomed.max() / flat.max() == pytest.approx(math.exp(-(36 - 9) / (2 * 9)), rel=1e-3)


def test_positive_samples_contain_the_motor_gaussian_and_negatives_are_random():
    vol, motors = _volume_with_dot()
    sampler = StackSampler({"a": vol, "b": np.full((30, 100, 100), 40, np.uint8)},
                           {"a": motors}, SPEC, Augment(), positive_fraction=0.5)
    rng = np.random.default_rng(0)
    n_pos = 0
    for _ in range(60):
        stack, heat, positive = sampler.draw(rng)
        assert stack.shape == (3, 64, 64) and stack.dtype == np.uint8
        assert heat.shape == (16, 16)
        if positive:
            n_pos += 1
            assert heat.max() > 0.3, "a positive sample must contain the motor's Gaussian"
    assert 15 < n_pos < 45
    stacks, heats = sampler.batch(rng, 4)
    assert stacks.shape == (4, 3, 64, 64) and heats.shape == (4, 1, 16, 16)


def test_sampler_is_deterministic_for_a_seed():
    vol, motors = _volume_with_dot()
    sampler = StackSampler({"a": vol}, {"a": motors}, SPEC, Augment())
    a = sampler.batch(np.random.default_rng(5), 3)
    b = sampler.batch(np.random.default_rng(5), 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_no_motor_anywhere_means_negatives_only():
    sampler = StackSampler({"a": np.zeros((10, 64, 64), np.uint8)}, {}, SPEC, None, 0.9)
    for _ in range(5):
        _, heat, positive = sampler.draw(np.random.default_rng(1))
        assert not positive and heat.max() == 0
    with pytest.raises(ValueError, match="no training tomograms"):
        StackSampler({}, {}, SPEC)
