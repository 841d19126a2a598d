"""Training samples: positives contain the motor's Gaussian; labels move with the image."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kernel_lib.sampling import (Augment, Pose, SampleSpec, StackSampler, cut_sample,
                                 dark_spots, motors_in_crop)
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


def _noisy_volume_with_balls(centres, shape=(60, 200, 220), radius=6, seed=0):
    rng = np.random.default_rng(seed)
    vol = rng.normal(170, 20, shape).clip(0, 255).astype(np.uint8)
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    for c in centres:
        vol[((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) < radius ** 2] = 30
    return vol


def test_dark_spots_find_dense_blobs_and_skip_the_motors():
    balls = [(20, 50, 60), (40, 150, 170), (30, 100, 40)]
    vol = _noisy_volume_with_balls(balls)
    spots = dark_spots(vol, sigma=7.0, count=5)
    assert spots.shape == (5, 3)
    for ball in balls:  # each ball is one of the three darkest spots, within 2 voxels
        assert np.linalg.norm(spots[:3] - ball, axis=1).min() < 2.0, ball
    motor = np.array([balls[1]], dtype=float)
    kept = dark_spots(vol, sigma=7.0, count=5, avoid=motor, avoid_radius=15.0)
    assert np.linalg.norm(kept - motor, axis=1).min() > 15.0
    for ball in (balls[0], balls[2]):
        assert np.linalg.norm(kept[:2] - ball, axis=1).min() < 2.0, ball
    thin = dark_spots(vol[:3], sigma=7.0, count=2)  # fewer slices than the shrink factor
    assert thin.shape == (2, 3) and np.all(thin[:, 0] == 1.0)
    with pytest.raises(ValueError, match="dark_spots needs"):
        dark_spots(vol[0], sigma=7.0, count=2)


def test_hard_negative_draws_put_the_look_alike_in_the_crop():
    ball = (30, 100, 110)
    vol = _noisy_volume_with_balls([ball])
    spots = {"a": dark_spots(vol, sigma=7.0, count=1)}
    sampler = StackSampler({"a": vol}, {}, SPEC, None, positive_fraction=0.0,
                           hard_negatives=spots, hard_fraction=1.0)
    rng = np.random.default_rng(2)
    for _ in range(20):
        stack, heat, positive = sampler.draw(rng)
        assert not positive and heat.max() == 0
        assert stack[1].min() < 60, "the dark blob must be inside a hard-negative crop"
    uniform = StackSampler({"a": vol}, {}, SPEC, None, positive_fraction=0.0)
    hits = sum(uniform.draw(rng)[0][1].min() < 60 for _ in range(20))
    assert hits < 5  # uniform negatives mostly miss it: the hard draws are not luck
    ignored = StackSampler({"a": vol}, {}, SPEC, None, 0.0, hard_negatives={}, hard_fraction=1.0)
    assert ignored.hard_fraction == 0.0  # no candidates: plain negatives
