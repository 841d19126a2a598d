"""Turn a synthetic :class:`~kernel_lib._synthetic_scene.Scene` into uint8 voxels (plumbing).

Densities are accumulated in a float32 volume (dense matter positive), each structure in its own
bounding box; the volume is blurred more along z than in-plane (missing wedge), then mapped to
grey levels as ``background + gradient - gain * density + noise`` so dense matter is dark.
``fast=True`` renders the densities on a grid 4x coarser per axis and upsamples slice by slice
with noise from a small pool: a real-size tomogram takes seconds.

Example:
    >>> import numpy as np
    >>> from kernel_lib._synthetic_scene import plan_scene
    >>> from kernel_lib._synthetic_render import render_scene
    >>> rng = np.random.default_rng(0)
    >>> volume = render_scene(plan_scene((64, 256, 256), 15.6, 1, rng), rng)
    >>> volume.shape, volume.dtype.name
    ((64, 256, 256), 'uint8')
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from kernel_lib._synthetic_scene import (
    Ball,
    Cell,
    Filament,
    Motor,
    Scene,
    Vesicle,
    capsule_signed_distance,
)

FAST_GRID_FACTOR = 4  # fast mode renders densities on a grid this much coarser per axis
COARSE_VOXEL_A = 60.0  # voxel size of the smooth texture grid (ribosomes, ice)
RIBOSOME_RADIUS_A = 125.0
RIBOSOME_SIGMA_FRACTION = 0.6  # Gaussian sigma of a ribosome dot, in radii
ICE_TEXTURE_SIGMA_COARSE = 1.5
CYTOPLASM_EDGE_A = 40.0
ENVELOPE_TABLE_STEP_A = 1.0
INNER_MEMBRANE_RELATIVE = 0.9  # inner-membrane density relative to the outer one
MOTOR_PLATE_BELOW_TOP_A = 150.0
MOTOR_ROD_RADIUS_A = 45.0
C_RING_EXTENT = 0.3  # fraction of the motor height the C-ring boost covers
BOX_MARGIN_SIGMAS = 3.0
CHUNK_SLICES = 16
STREAK_LENGTH_SLICES = (3, 10)
IMPULSE_GREY = (50.0, 110.0)
NOISE_POOL_SLICES = 4
GREY_MAX = 255.0


class _Grid:
    """Maps original voxel coordinates onto the (possibly coarser) render grid."""

    def __init__(self, shape: tuple[int, int, int], spacing: float, factor: int) -> None:
        self.factor = factor
        self.shape = tuple(math.ceil(s / factor) for s in shape)
        self.spacing = spacing * factor

    def point(self, p: np.ndarray) -> np.ndarray:
        """An original voxel position in grid voxels (voxel centres line up)."""
        return (np.asarray(p, dtype=float) + 0.5) / self.factor - 0.5

    def box(
        self, centre: np.ndarray, half_a: float
    ) -> tuple[tuple[slice, ...], tuple[np.ndarray, ...]] | None:
        """Slices of the grid within ``half_a`` angstroms of a grid point, and the offsets.

        Returns:
            ``(slices, (dz, dy, dx))`` with the offsets in angstroms shaped to broadcast over the
            box, or None when the box misses the grid.
        """
        half = half_a / self.spacing
        slices, offsets = [], []
        for axis, (c, size) in enumerate(zip(centre, self.shape)):
            lo, hi = max(0, int(math.floor(c - half))), min(size, int(math.ceil(c + half)) + 1)
            if hi <= lo:
                return None
            shape = [1, 1, 1]
            shape[axis] = hi - lo
            slices.append(slice(lo, hi))
            offsets.append(
                ((np.arange(lo, hi, dtype=np.float32) - c) * self.spacing).reshape(shape)
            )
        return tuple(slices), tuple(offsets)


def _soft_step(x: np.ndarray, width: float) -> np.ndarray:
    """1 well below 0, 0 well above, a tanh ramp of ``width`` in between."""
    return 0.5 * (1.0 - np.tanh(x / max(width, 1e-3)))


def envelope_profile(cell: Cell, step_a: float) -> tuple[np.ndarray, float]:
    """Density across a cell envelope as a lookup table over the signed distance.

    Returns:
        ``(table, start)``: ``table[i]`` is the density at signed distance ``start + i * step_a``
        angstroms from the outer membrane (negative inside); beyond the ends it is constant.
    """
    h, p = cell.membrane / 2.0, cell.periplasm
    start = -(p + 1.5 * h + 4 * CYTOPLASM_EDGE_A)
    d = np.arange(start, 4 * h, step_a)
    table = cell.membrane_density * np.exp(-((d / h) ** 2))
    table += cell.membrane_density * INNER_MEMBRANE_RELATIVE * np.exp(-(((d + p) / h) ** 2))
    table += cell.peptidoglycan_density * np.exp(-(((d + p / 2) / (p / 5)) ** 2))
    table += cell.cytoplasm_density * _soft_step(d + p + 1.5 * h, CYTOPLASM_EDGE_A)
    table[-1] = 0.0
    return table.astype(np.float32), float(start)


def draw_cell(density: np.ndarray, cell: Cell, grid: _Grid) -> None:
    """Add a cell's membranes, peptidoglycan and cytoplasm, a few slices at a time.

    The density depends only on the signed distance to the outer membrane, so it is read from a
    fine lookup table rather than evaluated per voxel.
    """
    centre = grid.point(cell.centre)
    box = grid.box(centre, cell.half_length + cell.radius + 2 * cell.membrane)
    if box is None:
        return
    slices, (dz, dy, dx) = box
    table, start_a = envelope_profile(cell, ENVELOPE_TABLE_STEP_A)
    uz, uy, ux = (np.float32(v) for v in cell.axis)
    ryx = dy * uy + dx * ux  # (1, Y, X): position along the axis, in-plane part
    r2yx = dy * dy + dx * dx
    offset = np.float32(cell.radius + start_a)
    for first in range(0, dz.shape[0], CHUNK_SLICES):
        z = dz[first : first + CHUNK_SLICES]
        along = z * uz + ryx
        t = np.minimum(along, np.float32(cell.half_length))
        np.maximum(t, np.float32(-cell.half_length), out=t)
        along *= 2
        along -= t
        along *= t  # t * (2 * along - t)
        d2 = z * z + r2yx
        d2 -= along
        np.maximum(d2, 0.0, out=d2)
        np.sqrt(d2, out=d2)
        d2 -= offset
        d2 *= np.float32(1.0 / ENVELOPE_TABLE_STEP_A)
        np.maximum(d2, 0.0, out=d2)
        np.minimum(d2, np.float32(len(table) - 1), out=d2)
        zs = slice(slices[0].start + first, slices[0].start + first + z.shape[0])
        density[zs, slices[1], slices[2]] += table.take(d2.astype(np.int32))


def draw_motor(density: np.ndarray, motor: Motor, grid: _Grid) -> None:
    """Add a motor's bell-shaped barrel, MS-ring plate and rod (its flagellum is a tube)."""
    centre = grid.point(motor.centre)
    box = grid.box(centre, max(motor.width, motor.height) / 2.0 + BOX_MARGIN_SIGMAS * motor.wall)
    if box is None:
        return
    slices, (dz, dy, dx) = box
    n = motor.normal.astype(np.float32)
    axial = dz * n[0] + dy * n[1] + dx * n[2]
    radial = np.sqrt(np.maximum(dz * dz + dy * dy + dx * dx - axial * axial, 0.0))
    half_h = motor.height / 2.0
    frac = np.clip((axial + half_h) / motor.height, 0.0, 1.0)
    r_bottom = motor.width / 2.0 - motor.wall / 2.0
    r_wall = r_bottom * (1.0 + (motor.top_ratio - 1.0) * frac**motor.bell_power)
    edge = motor.wall / 4.0
    along = _soft_step(-(axial + half_h), edge) * _soft_step(axial - half_h, edge)
    wall = np.exp(-(((radial - r_wall) / (motor.wall / 2.0)) ** 2)) * along
    wall *= 1.0 + motor.c_ring * np.exp(-((frac / C_RING_EXTENT) ** 2))
    amplitude, order, phase = motor.lumps
    if amplitude > 0:
        e1, e2 = _basis(motor.normal)
        theta = np.arctan2(
            dz * e2[0] + dy * e2[1] + dx * e2[2], dz * e1[0] + dy * e1[1] + dx * e1[2]
        )
        wall *= 1.0 + amplitude * np.cos(order * theta + phase)
    plate_at = half_h - MOTOR_PLATE_BELOW_TOP_A
    plate = np.exp(-(((axial - plate_at) / edge) ** 2)) * _soft_step(radial - r_wall, edge)
    rod = np.exp(-((radial / MOTOR_ROD_RADIUS_A) ** 2)) * _soft_step(plate_at - axial, edge) * along
    inside = motor.fill * _soft_step(radial - r_wall, edge) * along
    density[slices] += motor.density * (
        wall + inside + motor.plate_density * plate + motor.rod_density * rod
    )


def _basis(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    helper = np.array([1.0, 0.0, 0.0]) if abs(n[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(n, helper)
    e1 /= np.linalg.norm(e1)
    return e1.astype(np.float32), np.cross(n, e1).astype(np.float32)


def draw_tube(tubes: np.ndarray, filament: Filament, grid: _Grid) -> None:
    """Max-combine a filament's segments into ``tubes`` (joints do not double up)."""
    radius = filament.diameter / 2.0
    edge = max(radius / 4.0, grid.spacing / 3.0)
    points = grid.point(filament.points)
    for a, b in zip(points[:-1], points[1:]):
        mid = (a + b) / 2.0
        seg = (b - a) * grid.spacing
        length = float(np.linalg.norm(seg))
        box = grid.box(mid, length / 2.0 + radius + BOX_MARGIN_SIGMAS * edge)
        if box is None or length == 0:
            continue
        slices, (dz, dy, dx) = box
        u = (seg / length).astype(np.float32)
        along = dz * u[0] + dy * u[1] + dx * u[2]
        t = np.clip(along, -length / 2.0, length / 2.0)
        dist = np.sqrt(np.maximum(dz * dz + dy * dy + dx * dx - t * (2 * along - t), 0.0))
        profile = filament.density * _soft_step(dist - radius, edge)
        np.maximum(tubes[slices], profile, out=tubes[slices])


def draw_ball(density: np.ndarray, ball: Ball, grid: _Grid) -> None:
    """Add a soft ball, with an optional light halo and a z streak (gold beads)."""
    edge = max(0.15 * ball.radius, grid.spacing / 3.0)
    reach = ball.radius * (2.5 if ball.halo > 0 else 1.0) + BOX_MARGIN_SIGMAS * edge
    reach = max(reach, 4.0 * ball.radius if ball.streak > 0 else 0.0)
    box = grid.box(grid.point(ball.centre), reach)
    if box is None:
        return
    slices, (dz, dy, dx) = box
    r2 = dy * dy + dx * dx
    dist = np.sqrt(dz * dz + r2)
    out = _soft_step(dist - ball.radius, edge)
    if ball.halo > 0:
        out -= ball.halo * np.exp(-(((dist - 1.8 * ball.radius) / (0.5 * ball.radius)) ** 2))
    if ball.streak > 0:
        stretched = np.sqrt((dz / 4.0) ** 2 + r2)
        out += ball.streak * _soft_step(stretched - ball.radius, edge)
    density[slices] += ball.density * out


def draw_vesicle(density: np.ndarray, vesicle: Vesicle, grid: _Grid) -> None:
    """Add a membrane shell and its faint lumen."""
    h = vesicle.membrane / 2.0
    box = grid.box(grid.point(vesicle.centre), vesicle.radius + BOX_MARGIN_SIGMAS * h)
    if box is None:
        return
    slices, (dz, dy, dx) = box
    dist = np.sqrt(dz * dz + dy * dy + dx * dx)
    out = vesicle.density * np.exp(-(((dist - vesicle.radius) / h) ** 2))
    out += vesicle.lumen_density * _soft_step(dist - vesicle.radius, h)
    density[slices] += out


def coarse_texture(scene: Scene, grid: _Grid, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Ribosome-like dots inside cells plus smooth ice texture, on a coarse grid.

    Returns:
        ``(texture, factor)``: the coarse density and how many grid voxels one coarse voxel spans.
    """
    factor = max(1, round(COARSE_VOXEL_A / grid.spacing))
    shape = tuple(math.ceil(s / factor) for s in grid.shape)
    coarse_spacing = grid.spacing * factor
    sigma = RIBOSOME_SIGMA_FRACTION * RIBOSOME_RADIUS_A / coarse_spacing
    texture = np.zeros(shape, np.float32)
    volume_um3 = np.prod(scene.shape) * scene.voxel_spacing**3 / 1e12
    for cell in scene.cells:
        n = rng.poisson(cell.ribosomes_per_um3 * volume_um3)
        points = rng.uniform(0, 1, size=(n, 3)) * (np.asarray(scene.shape) - 1)
        inside = capsule_signed_distance(cell, points, scene.voxel_spacing) < -(
            cell.periplasm + cell.membrane + RIBOSOME_RADIUS_A
        )
        idx = np.floor((points[inside] + 0.5) / (grid.factor * factor)).astype(int)
        idx = np.minimum(idx, np.asarray(shape) - 1)
        weight = cell.ribosome_density * (2 * np.pi) ** 1.5 * max(sigma, 0.5) ** 3
        np.add.at(texture, tuple(idx.T), np.float32(weight))
    blur_inplace(texture, (sigma, sigma, sigma))
    ice = rng.standard_normal(shape, dtype=np.float32)
    blur_inplace(ice, (ICE_TEXTURE_SIGMA_COARSE,) * 3)
    ice *= scene.imaging.ice_texture / max(float(ice.std()), 1e-6)
    texture += ice
    return texture, factor


def upsample_add(target: np.ndarray, coarse: np.ndarray, factor: int) -> None:
    """Add ``coarse`` linearly upsampled by ``factor`` (voxel centres aligned) to ``target``."""
    for z in range(target.shape[0]):
        target[z] += upsample_slice(coarse, factor, z, target.shape[1:])


def upsample_slice(
    coarse: np.ndarray, factor: int, z: int, out_shape: tuple[int, int]
) -> np.ndarray:
    """Slice ``z`` of ``coarse`` upsampled by ``factor`` (linear in z, y and x)."""
    if factor == 1:
        return coarse[z]
    zc = (z + 0.5) / factor - 0.5
    z0 = int(np.clip(math.floor(zc), 0, coarse.shape[0] - 1))
    z1 = min(z0 + 1, coarse.shape[0] - 1)
    w = float(np.clip(zc - z0, 0.0, 1.0))
    plane = coarse[z0] if w == 0 or z1 == z0 else (1 - w) * coarse[z0] + w * coarse[z1]
    size = (coarse.shape[2] * factor, coarse.shape[1] * factor)
    big = cv2.resize(plane, size, interpolation=cv2.INTER_LINEAR)
    return big[: out_shape[0], : out_shape[1]]


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).astype(np.float32)


def blur_inplace(volume: np.ndarray, sigma_zyx: tuple[float, float, float]) -> None:
    """Separable Gaussian blur of a float32 (z, y, x) volume, in place (reflecting borders)."""
    sz, sy, sx = sigma_zyx
    if sy > 0.2 or sx > 0.2:
        ky, kx = _gaussian_kernel(max(sy, 0.2)), _gaussian_kernel(max(sx, 0.2))
        for z in range(volume.shape[0]):
            volume[z] = cv2.sepFilter2D(volume[z], -1, kx, ky, borderType=cv2.BORDER_REFLECT)
    if sz > 0.2 and volume.shape[0] > 1:
        flat = volume.reshape(volume.shape[0], -1)
        one = np.ones(1, np.float32)
        for start in range(0, flat.shape[1], 1 << 20):  # column blocks keep cv2 within limits
            block = flat[:, start : start + (1 << 20)]
            block[:] = cv2.sepFilter2D(
                block, -1, one, _gaussian_kernel(sz), borderType=cv2.BORDER_REFLECT
            )


def densities(scene: Scene, rng: np.random.Generator, factor: int) -> np.ndarray:
    """All structures of a scene as one blurred float32 density on the render grid."""
    grid = _Grid(scene.shape, scene.voxel_spacing, factor)
    density = np.zeros(grid.shape, np.float32)
    for cell in scene.cells:
        draw_cell(density, cell, grid)
    texture, coarse_factor = coarse_texture(scene, grid, rng)
    upsample_add(density, texture, coarse_factor)
    for motor in scene.motors:
        draw_motor(density, motor, grid)
    filaments = [m.flagellum for m in scene.motors] + scene.filaments
    if filaments:
        tubes = np.zeros_like(density)
        for filament in filaments:
            draw_tube(tubes, filament, grid)
        density += tubes
        del tubes
    for ball in scene.balls:
        draw_ball(density, ball, grid)
    for vesicle in scene.vesicles:
        draw_vesicle(density, vesicle, grid)
    im = scene.imaging
    blur_inplace(density, (im.blur_z / factor, im.blur_xy / factor, im.blur_xy / factor))
    return density


def _gradient(scene: Scene, z: np.ndarray) -> np.ndarray:
    """The slow linear background ramp for slices ``z`` (grey levels), shaped (len(z), Y, X)."""
    shape = scene.shape
    gz, gy, gx = scene.imaging.gradient
    ramp_yx = gy * (np.arange(shape[1], dtype=np.float32)[:, None] / shape[1] - 0.5)
    ramp_yx = ramp_yx + gx * (np.arange(shape[2], dtype=np.float32)[None, :] / shape[2] - 0.5)
    return gz * (z.astype(np.float32)[:, None, None] / shape[0] - 0.5) + ramp_yx[None]


def _streak_field(scene: Scene, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Noise that varies slowly along z (faint missing-wedge streaks), on a z-coarse grid."""
    length = int(rng.integers(*STREAK_LENGTH_SLICES))
    shape = (math.ceil(scene.shape[0] / length) + 1, scene.shape[1], scene.shape[2])
    field = rng.standard_normal(shape, dtype=np.float32)
    blur_inplace(field, (0.0, 0.7, 0.7))
    field /= max(float(field[:, ::8, ::8].std()), 1e-6)
    return field, length


def _noise_chunk(scene: Scene, rng: np.random.Generator, n_slices: int) -> np.ndarray:
    """White plus in-plane correlated Gaussian noise of unit variance, (n_slices, Y, X)."""
    im = scene.imaging
    white = rng.standard_normal((n_slices, *scene.shape[1:]), dtype=np.float32)
    corr = white.copy()
    blur_inplace(corr, (0.0, im.noise_correlation, im.noise_correlation))
    corr /= max(float(corr[:, ::4, ::4].std()), 1e-6)
    white *= np.float32(math.sqrt(1 - im.noise_correlated))
    white += np.float32(math.sqrt(im.noise_correlated)) * corr
    return white


def form_image(scene: Scene, density: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Grey levels from full-resolution densities: gain, offset, ramp, noise, impulses."""
    im = scene.imaging
    out = np.empty(scene.shape, np.uint8)
    streaks, length = _streak_field(scene, rng) if im.streak > 0 else (None, 1)
    mean = float(density[:, ::4, ::4].mean())
    spread = max(float(density[:, ::4, ::4].std()), 1e-6)
    for start in range(0, scene.shape[0], CHUNK_SLICES):
        z = np.arange(start, min(start + CHUNK_SLICES, scene.shape[0]))
        noise = _noise_chunk(scene, rng, len(z))
        if streaks is not None:
            for i, zi in enumerate(z):
                noise[i] += im.streak * _lerp_slice(streaks, zi, length)
        dens = density[z[0] : z[-1] + 1]
        if im.shot > 0:  # denser (darker) matter: fewer electrons, relatively noisier
            noise *= 1.0 + im.shot * np.tanh((dens - mean) / spread)
        grey = im.background + _gradient(scene, z) - im.gain * dens + im.noise * noise
        _add_impulses(grey, im.impulses, rng)
        out[z[0] : z[-1] + 1] = np.clip(np.rint(grey), 0, GREY_MAX)
    return out


def _lerp_slice(field: np.ndarray, z: int, length: int) -> np.ndarray:
    """Linear interpolation of a z-coarse field at slice ``z``."""
    zc = z / length
    z0 = min(int(zc), field.shape[0] - 2)
    w = np.float32(zc - z0)
    return (1 - w) * field[z0] + w * field[z0 + 1]


def _add_impulses(grey: np.ndarray, fraction: float, rng: np.random.Generator) -> None:
    """Set a few random voxels very light or very dark (shot-like outliers)."""
    n = rng.poisson(fraction * grey.size)
    if n == 0:
        return
    flat = grey.reshape(-1)
    idx = rng.integers(0, flat.size, n)
    flat[idx] += rng.choice([-1.0, 1.0], n) * rng.uniform(*IMPULSE_GREY, n)


def form_image_fast(
    scene: Scene, density: np.ndarray, factor: int, rng: np.random.Generator
) -> np.ndarray:
    """Grey levels from coarse densities: slice-wise upsampling plus pooled noise (fast mode)."""
    im = scene.imaging
    ny, nx = scene.shape[1:]
    pad = 32
    pool = rng.standard_normal((NOISE_POOL_SLICES, ny + pad, nx + pad), dtype=np.float32)
    blur_inplace(pool, (0.0, im.noise_correlation * 0.7, im.noise_correlation * 0.7))
    pool /= max(float(pool[:, ::4, ::4].std()), 1e-6)
    pool *= np.float32(im.noise)
    base = (im.background + _gradient(scene, np.zeros(1, int))[0]).astype(np.float32)
    ramp_z = im.gradient[0] / scene.shape[0]
    picks = rng.integers(0, NOISE_POOL_SLICES, scene.shape[0])
    offsets = rng.integers(0, pad, size=(scene.shape[0], 2))
    out = np.empty(scene.shape, np.uint8)
    gain = np.float32(-im.gain)
    for z in range(scene.shape[0]):
        grey = upsample_slice(density, factor, z, (ny, nx)) * gain
        grey += base
        grey += np.float32(ramp_z * z)
        oy, ox = offsets[z]
        grey += pool[picks[z], oy : oy + ny, ox : ox + nx]
        out[z] = np.clip(grey, 0, GREY_MAX)
    return out


def render_scene(scene: Scene, rng: np.random.Generator, fast: bool = False) -> np.ndarray:
    """Render a scene to a uint8 (z, y, x) tomogram (dense matter dark).

    Args:
        scene: what to draw (see :func:`kernel_lib._synthetic_scene.plan_scene`).
        rng: random generator for textures and noise.
        fast: coarse densities and pooled noise, for throughput benchmarks at real size.
    """
    factor = FAST_GRID_FACTOR if fast else 1
    density = densities(scene, rng, factor)
    if fast:
        return form_image_fast(scene, density, factor, rng)
    return form_image(scene, density, rng)
