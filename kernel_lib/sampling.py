"""Training samples: 2.5D stacks cut from cached model-frame volumes, with their heatmaps.

One affine warp per channel does the crop and every geometric augmentation at once (zoom,
rotation, flip), and the same map moves the motors, so labels always follow the image:

    source (y, x) = R(angle) F (p_out - c_out) / zoom + c_src

where ``F`` is an optional flip. The stack's channels are taken ``offset / zoom`` slices from
the centre, and a motor's z distance is multiplied by ``zoom`` too: a zoom of 1.5 looks like a
tomogram whose true voxel spacing is 1.5 times finer than assumed, which is exactly the error an
unknown test spacing makes.

Example:
    >>> import numpy as np
    >>> vol = np.zeros((20, 64, 64), np.uint8); vol[10, 30:34, 30:34] = 255
    >>> spec = SampleSpec(crop=32, sigma=3.0, stride=4, offsets=np.array([-1, 0, 1]))
    >>> x, heat = cut_sample(vol, np.array([[10.0, 31.5, 31.5]]), (10.0, 31.5, 31.5), spec)
    >>> x.shape, heat.shape, np.unravel_index(heat.argmax(), heat.shape)
    ((3, 32, 32), (8, 8), (np.int64(3), np.int64(3)))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .peaks import find_peaks
from .targets import gaussian_heatmap


@dataclass
class SampleSpec:
    """Geometry of a training sample.

    Attributes:
        crop: side of the square crop in model voxels (a multiple of 32).
        sigma: target Gaussian sigma in model voxels.
        stride: model voxels per heatmap pixel.
        offsets: channel offsets in model slices (from :func:`~kernel_lib.stacks.stack_offsets`).
    """

    crop: int
    sigma: float
    stride: int
    offsets: np.ndarray


@dataclass
class Augment:
    """Random geometric and intensity augmentation settings.

    Attributes:
        zoom_range: log-uniform zoom (apparent size multiplier), e.g. (0.75, 1.5).
        rotate: random rotation by any angle (else multiples of 90 degrees only).
        flip: random mirror.
        contrast: multiplicative intensity range (around the mean).
        brightness: additive intensity range in [0, 255] units.
        noise: maximum Gaussian noise sigma in [0, 255] units.
    """

    zoom_range: tuple[float, float] = (0.75, 1.5)
    rotate: bool = True
    flip: bool = True
    contrast: tuple[float, float] = (0.75, 1.3)
    brightness: float = 20.0
    noise: float = 12.0


@dataclass
class Pose:
    """One draw of the geometric augmentation."""

    zoom: float = 1.0
    angle: float = 0.0  # radians
    flip: bool = False


def draw_pose(rng: np.random.Generator, augment: Augment | None) -> Pose:
    if augment is None:
        return Pose()
    lo, hi = augment.zoom_range
    zoom = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    if augment.rotate:
        angle = float(rng.uniform(0, 2 * math.pi))
    else:
        angle = float(rng.integers(4)) * math.pi / 2
    return Pose(zoom, angle, bool(augment.flip and rng.random() < 0.5))


def _inverse_map(pose: Pose, centre_yx: tuple[float, float], crop: int) -> np.ndarray:
    """2x3 matrix mapping output (x, y) to source (x, y) for ``cv2.warpAffine``."""
    c, s = math.cos(pose.angle), math.sin(pose.angle)
    rot = np.array([[c, -s], [s, c]])  # acts on (x, y)
    flip = np.diag([-1.0, 1.0]) if pose.flip else np.eye(2)
    linear = rot @ flip / pose.zoom
    c_out = (crop - 1) / 2.0
    c_src = np.array([centre_yx[1], centre_yx[0]])
    offset = c_src - linear @ np.array([c_out, c_out])
    return np.hstack([linear, offset[:, None]])


def motors_in_crop(motors: np.ndarray, centre: tuple[float, float, float], pose: Pose,
                   crop: int) -> np.ndarray:
    """Motors ``(k, 3)`` in model voxels -> ``(dz, y, x)`` in the crop's (apparent) voxels."""
    if len(motors) == 0:
        return np.zeros((0, 3))
    matrix = _inverse_map(pose, centre[1:], crop)
    forward = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    xy = np.stack([motors[:, 2], motors[:, 1], np.ones(len(motors))])
    out_x, out_y = forward @ xy
    dz = (motors[:, 0] - centre[0]) * pose.zoom
    return np.stack([dz, out_y, out_x], axis=1)


def cut_sample(volume: np.ndarray, motors: np.ndarray, centre: tuple[float, float, float],
               spec: SampleSpec, pose: Pose | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cut one 2.5D stack and its heatmap.

    Args:
        volume: ``uint8`` ``(z, y, x)`` model-frame volume (a memory map is fine).
        motors: this tomogram's motors ``(k, 3)`` in model voxels.
        centre: ``(z, y, x)`` the crop is centred on, in model voxels.
        spec: crop geometry.
        pose: geometric augmentation (identity when None).

    Returns:
        ``uint8`` stack ``(C, crop, crop)`` and ``float32`` heatmap ``(crop/s, crop/s)``.
    """
    pose = pose or Pose()
    matrix = _inverse_map(pose, centre[1:], spec.crop)
    depth = volume.shape[0]
    channels = []
    for offset in spec.offsets:
        z = int(np.clip(round(centre[0] + offset / pose.zoom), 0, depth - 1))
        channels.append(cv2.warpAffine(np.ascontiguousarray(volume[z]), matrix,
                                       (spec.crop, spec.crop),
                                       flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                       borderMode=cv2.BORDER_REFLECT_101))
    local = motors_in_crop(np.asarray(motors, dtype=np.float64).reshape(-1, 3), centre, pose,
                           spec.crop)
    heat = gaussian_heatmap((spec.crop, spec.crop), local, 0.0, spec.sigma, spec.stride)
    return np.stack(channels), heat


def augment_intensity(stack: np.ndarray, rng: np.random.Generator,
                      augment: Augment | None) -> np.ndarray:
    """Random contrast, brightness and noise on a ``uint8`` stack (returns ``uint8``)."""
    if augment is None:
        return stack
    x = stack.astype(np.float32)
    mean = float(x.mean())
    x = (x - mean) * rng.uniform(*augment.contrast) + mean
    x += rng.uniform(-augment.brightness, augment.brightness)
    if augment.noise > 0:
        x += rng.normal(0.0, rng.uniform(0, augment.noise), x.shape).astype(np.float32)
    return np.clip(x, 0, 255).astype(np.uint8)


def dark_spots(volume: np.ndarray, sigma: float, count: int,
               avoid: np.ndarray | None = None, avoid_radius: float = 0.0) -> np.ndarray:
    """The ``count`` darkest blob centres of a volume, as hard-negative candidates.

    Dense objects (debris, storage granules, gold beads, vesicle walls and, in a real tomogram,
    anything else that is not a motor) are dark in cryo-ET slices, and those are what a
    detector trained on random background crops confuses with motors. The volume is shrunk
    (area average) so the smoothing works on a few voxels per blob whatever the spacing, blurred
    with a Gaussian of ``sigma`` model voxels, and its local minima are ranked by darkness.

    Args:
        volume: ``uint8`` ``(z, y, x)`` model-frame volume (a memory map is fine).
        sigma: blob scale in model voxels (about a motor's radius).
        count: at most this many centres.
        avoid: ``(k, 3)`` points (motors) whose neighbourhood holds no candidate.
        avoid_radius: that neighbourhood's radius in model voxels.

    Returns:
        ``float64`` ``(n <= count, 3)`` centres in model voxels, darkest first.
    """
    if volume.ndim != 3 or min(volume.shape) == 0:
        raise ValueError(f"dark_spots needs a (z, y, x) volume (got shape {volume.shape})")
    factor = max(1, int(sigma // 2))
    depth, height, width = volume.shape
    small_hw = (max(1, height // factor), max(1, width // factor))
    planes = [cv2.resize(np.ascontiguousarray(volume[z]), small_hw[::-1],
                         interpolation=cv2.INTER_AREA) for z in range(depth)]
    zf = min(factor, depth)  # slices averaged per small slice
    z_blocks = depth // zf
    small = np.stack(planes)[:z_blocks * zf].astype(np.float32)
    small = small.reshape(z_blocks, zf, *small_hw).mean(axis=1)
    s = max(sigma / factor, 0.5)
    smooth = np.stack([cv2.GaussianBlur(p, (0, 0), s) for p in small])
    if z_blocks > 1:
        flat = smooth.reshape(z_blocks, -1)
        smooth = cv2.GaussianBlur(flat, (1, 0), 0, sigmaY=s).reshape(smooth.shape)
    darkness = (smooth.max() - smooth) + 1e-3  # > 0, so find_peaks keeps every minimum
    radius = max(1, math.ceil(2 * s))
    peaks = find_peaks(darkness, (radius, radius, radius), top_k=4 * count + 4)
    scale = np.array([zf, height / small_hw[0], width / small_hw[1]])
    centres = (peaks[:, :3] + 0.5) * scale - 0.5  # small voxel centre -> model voxels
    if avoid is not None:
        centres = far_from(centres, avoid, avoid_radius)
    return centres[:count]


def far_from(centres: np.ndarray, points: np.ndarray, radius: float) -> np.ndarray:
    """The ``centres`` ``(n, 3)`` farther than ``radius`` from every one of ``points``."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if len(points) == 0 or len(centres) == 0 or radius <= 0:
        return centres
    gap = np.linalg.norm(centres[:, None, :] - points[None], axis=2)
    return centres[(gap > radius).all(axis=1)]


class StackSampler:
    """Draws training batches: positives around motors, negatives anywhere or on hard spots.

    Args:
        volumes: ``{tomo_id: uint8 volume}`` in the model frame (memory maps are fine).
        motors: ``{tomo_id: (k, 3) motors in model voxels}`` (empty arrays for none).
        spec: crop geometry.
        augment: augmentation settings (None for none).
        positive_fraction: share of samples centred near a motor.
        hard_negatives: ``{tomo_id: (k, 3) centres}`` of motor-free look-alikes (for example
            :func:`dark_spots`), in model voxels.
        hard_fraction: share of the negative samples placed near a hard-negative centre (the
            rest are uniform over the volume).
    """

    def __init__(self, volumes: dict[str, np.ndarray], motors: dict[str, np.ndarray],
                 spec: SampleSpec, augment: Augment | None = None,
                 positive_fraction: float = 0.5,
                 hard_negatives: dict[str, np.ndarray] | None = None,
                 hard_fraction: float = 0.0) -> None:
        if not volumes:
            raise ValueError("no training tomograms to sample from")
        self.volumes, self.spec, self.augment = volumes, spec, augment
        self.motors = {k: np.asarray(motors.get(k, np.zeros((0, 3))), np.float64).reshape(-1, 3)
                       for k in volumes}
        self.ids = sorted(volumes)
        self.positives = [(tomo_id, i) for tomo_id in self.ids
                          for i in range(len(self.motors[tomo_id]))]
        self.positive_fraction = positive_fraction if self.positives else 0.0
        self.requested_hard_fraction = hard_fraction
        self.set_hard_negatives(hard_negatives or {})

    def set_hard_negatives(self, hard_negatives: dict[str, np.ndarray]) -> None:
        """Replace the hard-negative centres (``{tomo_id: (k, 3)}`` in model voxels)."""
        self.hard = [(tomo_id, np.asarray(c, np.float64).reshape(3))
                     for tomo_id in self.ids
                     for c in np.asarray(hard_negatives.get(tomo_id, np.zeros((0, 3)))
                                         ).reshape(-1, 3)]
        self.hard_fraction = self.requested_hard_fraction if self.hard else 0.0

    def draw(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, bool]:
        """One ``(stack, heatmap, is_positive)``."""
        pose = draw_pose(rng, self.augment)
        if rng.random() < self.positive_fraction:
            tomo_id, index = self.positives[int(rng.integers(len(self.positives)))]
            motor = self.motors[tomo_id][index]
            reach = 0.35 * self.spec.crop / pose.zoom  # keep the motor well inside the crop
            centre = (motor[0] + rng.normal(0, 0.5 * self.spec.sigma),
                      motor[1] + rng.uniform(-reach, reach), motor[2] + rng.uniform(-reach, reach))
            positive = True
        elif self.hard_fraction > 0 and rng.random() < self.hard_fraction:
            tomo_id, spot = self.hard[int(rng.integers(len(self.hard)))]
            reach = 0.35 * self.spec.crop / pose.zoom  # the look-alike anywhere in the crop
            centre = (spot[0], spot[1] + rng.uniform(-reach, reach),
                      spot[2] + rng.uniform(-reach, reach))
            positive = False
        else:
            tomo_id = self.ids[int(rng.integers(len(self.ids)))]
            shape = self.volumes[tomo_id].shape
            centre = tuple(float(rng.uniform(0, n - 1)) for n in shape)
            positive = False
        stack, heat = cut_sample(self.volumes[tomo_id], self.motors[tomo_id], centre, self.spec,
                                 pose)
        return augment_intensity(stack, rng, self.augment), heat, positive

    def batch(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``uint8`` stacks ``(B, C, crop, crop)`` and heatmaps ``(B, 1, crop/s, crop/s)``."""
        draws = [self.draw(rng) for _ in range(size)]
        return (np.stack([d[0] for d in draws]), np.stack([d[1] for d in draws])[:, None])
