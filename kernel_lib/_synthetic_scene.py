"""Geometry of one synthetic tomogram: cells, motors and distractors (plumbing for ``synthetic``).

A :class:`Scene` says *what* is in a tomogram, in the tomogram's own voxel frame: positions are
(z, y, x) voxel coordinates of the original grid, sizes are in angstroms (so a structure's size
in voxels follows the tomogram's voxel spacing). :mod:`kernel_lib._synthetic_render` turns a
scene into pixels. Every appearance parameter is drawn at random within a plausible range, so a
model trained on these tomograms cannot lean on one look.

Example:
    >>> import numpy as np
    >>> from kernel_lib._synthetic_scene import plan_scene
    >>> scene = plan_scene((96, 320, 320), 15.6, 1, np.random.default_rng(0))
    >>> len(scene.motors), len(scene.cells) >= 1
    (1, True)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# --- cells (angstroms) ------------------------------------------------------------------------
CELL_RADIUS_A = (1500.0, 4500.0)  # radius to the outer membrane
CELL_RADIUS_MIN_A = 1000.0
CELL_RADIUS_MAX_FRACTION = 0.45  # of the smaller in-plane extent, so small volumes show curvature
CELL_HALF_LENGTH_FACTOR = (0.0, 3.0)  # cylinder half-length in cell radii (0: a sphere)
CELL_AXIS_MAX_TILT_DEG = 20.0  # cells lie roughly flat in the ice
CELL_COUNT = (1, 3)
PERIPLASM_A = (90.0, 220.0)  # outer-membrane centre to inner-membrane centre
MEMBRANE_THICKNESS_A = (30.0, 50.0)
MEMBRANE_DENSITY = (0.9, 1.5)
PEPTIDOGLYCAN_DENSITY = (0.0, 0.35)
CYTOPLASM_DENSITY = (0.12, 0.4)
RIBOSOMES_PER_UM3 = (4e3, 2e4)
RIBOSOME_DENSITY = (0.25, 0.6)
P_NO_CELL = 0.05  # a motor-less tomogram of debris and ice only
CELL_GAP_A = 200.0  # minimum gap between two cells' envelopes
CELL_TRIES = 20

# --- motors (angstroms) -----------------------------------------------------------------------
MOTOR_WIDTH_A = 450.0  # outer diameter of the C-ring end
MOTOR_HEIGHT_A = (300.0, 450.0)
MOTOR_SIZE_JITTER = 0.15  # +-15 % on every motor dimension
MOTOR_WALL_A = (70.0, 110.0)
MOTOR_TOP_RATIO = (0.45, 1.0)  # radius at the outer-membrane end / radius at the C-ring end
MOTOR_DENSITY = (1.0, 1.8)
MOTOR_BELL_POWER = (1.0, 2.5)  # radius profile along the axis: 1 a cone, higher a bell
MOTOR_C_RING_BOOST = (0.0, 1.0)
MOTOR_FILL = (0.15, 0.45)  # density inside the barrel relative to the wall: hollow-ish
MOTOR_ROD_DENSITY = (0.3, 0.8)
MOTOR_PLATE_DENSITY = (0.2, 0.7)  # extra density at the wide cytoplasmic end
MOTOR_TOP_GAP_A = (-40.0, 40.0)  # barrel top relative to the outer membrane
MOTOR_MAX_NORMAL_Z = 0.6  # |z| of the membrane normal: mostly side views, as in real data
MOTOR_MIN_SEPARATION = 1.2  # in motor widths
MOTOR_EDGE_MARGIN_FRACTION = 0.3  # of the motor width, kept between its centre and the edges
P_POLAR_MOTOR = 0.4
HOST_TOLERANCE_A = 100.0  # a given motor joins a cell whose envelope is this close to right
FLAGELLUM_DIAMETER_A = (150.0, 250.0)
FLAGELLUM_LENGTH_A = (1000.0, 4000.0)
FLAGELLUM_STEP_A = 150.0
FLAGELLUM_HOOK_BEND_DEG = (0.0, 50.0)
FLAGELLUM_WOBBLE_DEG = 4.0  # random turn per step
FLAGELLUM_DENSITY = (0.5, 1.0)

# --- distractors (angstroms; counts per square micrometre of the x-y field of view) -----------
BEAD_DIAMETER_A = (100.0, 150.0)
BEAD_DENSITY = (3.0, 6.0)
BEADS_PER_UM2 = (3.0, 25.0)
P_NO_BEADS = 0.1
VESICLE_RADIUS_A = (250.0, 900.0)
VESICLE_RADIUS_MAX_FRACTION = 0.15
VESICLES_PER_UM2 = (0.0, 4.0)
GRANULE_RADIUS_A = (150.0, 450.0)
GRANULE_DENSITY = (0.6, 1.6)
GRANULES_PER_CELL = (0, 3)
DEBRIS_RADIUS_A = (100.0, 400.0)
DEBRIS_DENSITY = (0.6, 2.2)
DEBRIS_PER_UM2 = (1.0, 8.0)
P_BIG_DARK_DISTRACTOR = 0.85  # at least one blob heavier than a motor
FREE_FILAMENTS = (0, 2)
UM2_A2 = 1e8

# --- imaging ----------------------------------------------------------------------------------
BLUR_XY_VOXELS = (0.5, 1.3)
BLUR_Z_RATIO = (1.3, 3.0)  # missing wedge: more blur along z
GAIN = (25.0, 60.0)  # grey levels per unit of density
BACKGROUND = (100.0, 165.0)
NOISE_PER_GAIN = (0.25, 0.6)  # noise sigma in units of the gain
NOISE_CORRELATED_FRACTION = (0.5, 0.95)
NOISE_CORRELATION_VOXELS = (0.8, 1.8)
STREAK_FRACTION = (0.0, 0.35)
SHOT_FACTOR = (0.0, 0.35)
IMPULSE_FRACTION = (0.0, 3e-4)
GRADIENT_GREY = (0.0, 25.0)
ICE_TEXTURE = (0.05, 0.25)
JPEG_QUALITY = (70, 95)


@dataclass
class Cell:
    """A rod-shaped bacterium: a capsule with a double-membrane envelope.

    Attributes:
        centre: (z, y, x) voxel position of the capsule's centre.
        axis: unit vector (z, y, x) of the long axis.
        half_length: half-length of the cylindrical part, angstroms (0: a sphere).
        radius: outer-membrane radius, angstroms.
        periplasm: outer-membrane centre to inner-membrane centre, angstroms.
        membrane: thickness of each membrane, angstroms.
        membrane_density: density of the membranes.
        peptidoglycan_density: density of the faint layer between the membranes.
        cytoplasm_density: base density inside the inner membrane.
        ribosomes_per_um3: number density of ribosome-like dots in the cytoplasm.
        ribosome_density: peak density of one dot.
    """

    centre: np.ndarray
    axis: np.ndarray
    half_length: float
    radius: float
    periplasm: float
    membrane: float
    membrane_density: float
    peptidoglycan_density: float
    cytoplasm_density: float
    ribosomes_per_um3: float
    ribosome_density: float


@dataclass
class Filament:
    """A tube along a polyline (a flagellum or a loose filament).

    Attributes:
        points: (K, 3) voxel positions (z, y, x) along the tube.
        diameter: angstroms.
        density: density of the tube wall.
    """

    points: np.ndarray
    diameter: float
    density: float


@dataclass
class Motor:
    """A flagellar motor: a bell-shaped barrel through the envelope plus its flagellum.

    Attributes:
        centre: (z, y, x) voxel position of the barrel's centre: the label.
        normal: unit vector (z, y, x) pointing out of the cell along the motor axis.
        width: outer diameter at the C-ring (cytoplasmic) end, angstroms.
        height: barrel height along the axis, angstroms.
        wall: wall thickness, angstroms.
        top_ratio: radius at the outer end over radius at the C-ring end.
        bell_power: exponent of the radius profile along the axis (1: a cone).
        density: wall density.
        rod_density: density of the central rod (low: a hollow-looking barrel).
        plate_density: density of the MS-ring plate across the barrel.
        lumps: (amplitude, order, phase) of an angular modulation of the wall.
        c_ring: extra relative density at the wide (C-ring) end.
        fill: density inside the barrel relative to the wall (a hollow-looking centre when low).
        flagellum: the tube leaving the barrel's outer end.
    """

    centre: np.ndarray
    normal: np.ndarray
    width: float
    height: float
    wall: float
    top_ratio: float
    bell_power: float
    density: float
    rod_density: float
    plate_density: float
    lumps: tuple[float, int, float]
    c_ring: float
    fill: float
    flagellum: Filament


@dataclass
class Ball:
    """A soft dense sphere (gold bead, storage granule, piece of debris).

    Attributes:
        centre: (z, y, x) voxel position.
        radius: angstroms.
        density: peak density.
        halo: density of a light ring around it, as a fraction of ``density`` (gold beads).
        streak: relative density of its elongation along z (missing-wedge streak).
    """

    centre: np.ndarray
    radius: float
    density: float
    halo: float = 0.0
    streak: float = 0.0


@dataclass
class Vesicle:
    """A membrane sphere that is not part of a cell envelope.

    Attributes:
        centre: (z, y, x) voxel position.
        radius: angstroms.
        membrane: membrane thickness, angstroms.
        density: membrane density.
        lumen_density: density inside.
    """

    centre: np.ndarray
    radius: float
    membrane: float
    density: float
    lumen_density: float


@dataclass
class Imaging:
    """How densities become grey levels: blur, noise, gain and offset of one tomogram."""

    blur_xy: float
    blur_z: float
    gain: float
    background: float
    noise: float
    noise_correlated: float
    noise_correlation: float
    streak: float
    shot: float
    impulses: float
    gradient: np.ndarray  # grey levels across the volume along (z, y, x)
    ice_texture: float


@dataclass
class Scene:
    """Everything in one synthetic tomogram, in its voxel frame (see the module docstring)."""

    shape: tuple[int, int, int]
    voxel_spacing: float
    cells: list[Cell] = field(default_factory=list)
    motors: list[Motor] = field(default_factory=list)
    balls: list[Ball] = field(default_factory=list)
    vesicles: list[Vesicle] = field(default_factory=list)
    filaments: list[Filament] = field(default_factory=list)
    imaging: Imaging | None = None


def uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    """Draw a float uniformly from ``bounds``."""
    return float(rng.uniform(bounds[0], bounds[1]))


def random_unit(rng: np.random.Generator) -> np.ndarray:
    """A random unit vector, uniform on the sphere."""
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def perpendicular_basis(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors that, with ``n``, form an orthonormal basis."""
    helper = np.array([1.0, 0.0, 0.0]) if abs(n[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e1 = np.cross(n, helper)
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(n, e1)


def tilt(v: np.ndarray, angle_rad: float, rng: np.random.Generator) -> np.ndarray:
    """Rotate unit vector ``v`` by ``angle_rad`` towards a random perpendicular direction."""
    e1, e2 = perpendicular_basis(v)
    phi = rng.uniform(0, 2 * np.pi)
    w = np.cos(phi) * e1 + np.sin(phi) * e2
    out = np.cos(angle_rad) * v + np.sin(angle_rad) * w
    return out / np.linalg.norm(out)


def field_of_view_um2(shape: tuple[int, int, int], spacing: float) -> float:
    """The x-y area of a tomogram in square micrometres."""
    return shape[1] * shape[2] * spacing**2 / UM2_A2


def scaled_count(rng: np.random.Generator, per_um2: tuple[float, float], area_um2: float) -> int:
    """A Poisson count whose rate per square micrometre is drawn from ``per_um2``."""
    return int(rng.poisson(uniform(rng, per_um2) * area_um2))


def capsule_signed_distance(cell: Cell, points: np.ndarray, spacing: float) -> np.ndarray:
    """Signed distance in angstroms from voxel points (N, 3) to a cell's outer membrane.

    Negative inside the cell.
    """
    rel = (np.asarray(points, dtype=float) - cell.centre) * spacing
    t = np.clip(rel @ cell.axis, -cell.half_length, cell.half_length)
    return np.linalg.norm(rel - t[:, None] * cell.axis, axis=1) - cell.radius


def capsule_normal(cell: Cell, point: np.ndarray, spacing: float) -> np.ndarray:
    """Outward unit normal of the cell envelope nearest to a voxel point."""
    rel = (np.asarray(point, dtype=float) - cell.centre) * spacing
    t = np.clip(rel @ cell.axis, -cell.half_length, cell.half_length)
    radial = rel - t * cell.axis
    norm = np.linalg.norm(radial)
    if norm < 1e-6:
        return perpendicular_basis(cell.axis)[0]
    return radial / norm


def cells_overlap(a: Cell, b: Cell, spacing: float, samples: int = 16) -> bool:
    """Whether two cells come closer than ``CELL_GAP_A`` (axes sampled at ``samples`` points)."""
    s = np.linspace(-1.0, 1.0, samples)[:, None]
    pa = a.centre * spacing + s * a.half_length * a.axis
    pb = b.centre * spacing + s * b.half_length * b.axis
    gap = np.linalg.norm(pa[:, None] - pb[None], axis=-1).min()
    return bool(gap < a.radius + b.radius + CELL_GAP_A)


def fits_among(cell: Cell, others: list[Cell], spacing: float) -> bool:
    """Whether ``cell`` overlaps none of ``others``."""
    return not any(cells_overlap(cell, o, spacing) for o in others)


def draw_cell(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: float,
    centre: np.ndarray | None = None,
    axis: np.ndarray | None = None,
) -> Cell:
    """Draw a cell's size and envelope; place it across the volume unless ``centre`` is given."""
    extent = min(shape[1], shape[2]) * spacing
    radius_max = max(CELL_RADIUS_MIN_A, CELL_RADIUS_MAX_FRACTION * extent)
    radius = float(np.clip(uniform(rng, CELL_RADIUS_A), CELL_RADIUS_MIN_A, radius_max))
    if axis is None:
        phi = rng.uniform(0, 2 * np.pi)
        flat = np.array([0.0, np.sin(phi), np.cos(phi)])
        axis = _tilt_within(flat, np.deg2rad(CELL_AXIS_MAX_TILT_DEG), rng)
    if centre is None:
        z, y, x = shape
        centre = np.array(
            [rng.uniform(0.35, 0.65) * z, rng.uniform(-0.1, 1.1) * y, rng.uniform(-0.1, 1.1) * x]
        )
    membrane = uniform(rng, MEMBRANE_THICKNESS_A)
    return Cell(
        centre=np.asarray(centre, dtype=float),
        axis=axis,
        half_length=radius * uniform(rng, CELL_HALF_LENGTH_FACTOR),
        radius=radius,
        periplasm=max(uniform(rng, PERIPLASM_A), 1.6 * membrane),
        membrane=membrane,
        membrane_density=uniform(rng, MEMBRANE_DENSITY),
        peptidoglycan_density=uniform(rng, PEPTIDOGLYCAN_DENSITY),
        cytoplasm_density=uniform(rng, CYTOPLASM_DENSITY),
        ribosomes_per_um3=uniform(rng, RIBOSOMES_PER_UM3),
        ribosome_density=uniform(rng, RIBOSOME_DENSITY),
    )


def _tilt_within(v: np.ndarray, max_angle: float, rng: np.random.Generator) -> np.ndarray:
    """Tilt ``v`` by a random angle up to ``max_angle``."""
    return tilt(v, rng.uniform(0, max_angle), rng)


def cell_through(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    spacing: float,
    surface_point: np.ndarray,
    normal: np.ndarray,
) -> Cell:
    """A cell whose outer membrane passes through ``surface_point`` with outward ``normal``."""
    e1, e2 = perpendicular_basis(normal)
    # Long axis perpendicular to the normal and as flat as possible (cells lie in the ice).
    flat = np.cross(normal, np.array([1.0, 0.0, 0.0]))
    axis = flat / np.linalg.norm(flat) if np.linalg.norm(flat) > 0.3 else e1
    axis = tilt(axis, rng.uniform(0, np.deg2rad(10.0)), rng)
    axis -= (axis @ normal) * normal
    axis /= np.linalg.norm(axis)
    cell = draw_cell(rng, shape, spacing, centre=np.zeros(3), axis=axis)
    offset = rng.uniform(-cell.half_length, cell.half_length)
    cell.centre = (
        np.asarray(surface_point, dtype=float) - (cell.radius * normal + offset * axis) / spacing
    )
    return cell


def draw_motor(
    rng: np.random.Generator, surface_point: np.ndarray, normal: np.ndarray, spacing: float
) -> Motor:
    """Draw a motor sitting on the envelope at ``surface_point``, axis along ``normal``.

    The barrel's top reaches the outer membrane; its centre (the label) is rounded to a voxel.
    """
    scale = 1.0 + rng.uniform(-MOTOR_SIZE_JITTER, MOTOR_SIZE_JITTER)
    height = uniform(rng, MOTOR_HEIGHT_A) * scale
    depth = height / 2.0 - uniform(rng, MOTOR_TOP_GAP_A)
    centre = np.round(np.asarray(surface_point) - normal * depth / spacing)
    top = centre + normal * (height / 2.0) / spacing
    flagellum = draw_flagellum(rng, top, normal, spacing)
    return Motor(
        centre=centre,
        normal=normal,
        width=MOTOR_WIDTH_A * scale * (1.0 + rng.uniform(-0.05, 0.05)),
        height=height,
        wall=uniform(rng, MOTOR_WALL_A),
        top_ratio=uniform(rng, MOTOR_TOP_RATIO),
        bell_power=uniform(rng, MOTOR_BELL_POWER),
        density=uniform(rng, MOTOR_DENSITY),
        rod_density=uniform(rng, MOTOR_ROD_DENSITY),
        plate_density=uniform(rng, MOTOR_PLATE_DENSITY),
        fill=uniform(rng, MOTOR_FILL),
        lumps=(rng.uniform(0.0, 0.35), int(rng.integers(2, 6)), rng.uniform(0, 2 * np.pi)),
        c_ring=uniform(rng, MOTOR_C_RING_BOOST),
        flagellum=flagellum,
    )


def draw_flagellum(
    rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, spacing: float
) -> Filament:
    """A gently wandering tube leaving ``start`` along ``direction`` (with a bent hook)."""
    length = uniform(rng, FLAGELLUM_LENGTH_A)
    n_steps = max(2, int(length / FLAGELLUM_STEP_A))
    step = FLAGELLUM_STEP_A / spacing
    heading = tilt(direction, np.deg2rad(uniform(rng, FLAGELLUM_HOOK_BEND_DEG)), rng)
    points = [np.asarray(start, dtype=float), np.asarray(start, dtype=float) + direction * step]
    for _ in range(n_steps):
        heading = tilt(heading, abs(rng.normal(0, np.deg2rad(FLAGELLUM_WOBBLE_DEG))), rng)
        points.append(points[-1] + heading * step)
    return Filament(
        points=np.array(points),
        diameter=uniform(rng, FLAGELLUM_DIAMETER_A),
        density=uniform(rng, FLAGELLUM_DENSITY),
    )


def sample_surface(
    cell: Cell, rng: np.random.Generator, spacing: float
) -> tuple[np.ndarray, np.ndarray]:
    """A random point (voxels) on a cell's outer membrane and the outward normal there."""
    if rng.random() < P_POLAR_MOTOR:
        pole = 1.0 if rng.random() < 0.5 else -1.0
        normal = _tilt_within(pole * cell.axis, np.deg2rad(70.0), rng)
        base = cell.centre + pole * cell.half_length * cell.axis / spacing
    else:
        e1, e2 = perpendicular_basis(cell.axis)
        phi = rng.uniform(0, 2 * np.pi)
        normal = np.cos(phi) * e1 + np.sin(phi) * e2
        base = cell.centre + rng.uniform(-cell.half_length, cell.half_length) * cell.axis / spacing
    return base + cell.radius * normal / spacing, normal


def motor_fits(
    centre: np.ndarray, shape: tuple[int, int, int], spacing: float, others: list[Motor]
) -> bool:
    """Whether a motor centre is inside the volume with a margin and apart from ``others``."""
    margin = MOTOR_EDGE_MARGIN_FRACTION * MOTOR_WIDTH_A / spacing
    if np.any(centre < margin) or np.any(centre > np.asarray(shape) - 1 - margin):
        return False
    min_gap = MOTOR_MIN_SEPARATION * MOTOR_WIDTH_A / spacing
    return all(np.linalg.norm(centre - m.centre) >= min_gap for m in others)


def place_motor_on_cells(rng: np.random.Generator, scene: Scene, tries: int = 200) -> Motor | None:
    """Draw a motor on one of the scene's cells (the first preferred), or None if none fits."""
    for attempt in range(tries):
        if not scene.cells:
            return None
        cell = (
            scene.cells[0] if attempt < tries // 2 else scene.cells[rng.integers(len(scene.cells))]
        )
        point, normal = sample_surface(cell, rng, scene.voxel_spacing)
        if abs(normal[0]) > MOTOR_MAX_NORMAL_Z:
            continue
        motor = draw_motor(rng, point, normal, scene.voxel_spacing)
        if motor_fits(motor.centre, scene.shape, scene.voxel_spacing, scene.motors):
            return motor
    return None


def random_inplane_normal(rng: np.random.Generator) -> np.ndarray:
    """A membrane normal mostly in the x-y plane (|z| below ``MOTOR_MAX_NORMAL_Z``)."""
    phi = rng.uniform(0, 2 * np.pi)
    nz = rng.uniform(-MOTOR_MAX_NORMAL_Z, MOTOR_MAX_NORMAL_Z) * 0.8
    v = np.array([nz, np.sqrt(1 - nz**2) * np.sin(phi), np.sqrt(1 - nz**2) * np.cos(phi)])
    return v / np.linalg.norm(v)


def place_motor_with_new_cell(
    rng: np.random.Generator, scene: Scene, centre: np.ndarray | None = None
) -> Motor:
    """Draw a motor (at ``centre``, else at a random free spot) and a new cell that carries it."""
    spacing, shape = scene.voxel_spacing, scene.shape
    margin = MOTOR_EDGE_MARGIN_FRACTION * MOTOR_WIDTH_A / spacing
    for _ in range(0 if centre is not None else 200):
        centre = np.round([rng.uniform(margin, max(margin, s - 1 - margin)) for s in shape])
        if motor_fits(centre, shape, spacing, scene.motors):
            break
    motor = motor_at(rng, centre, spacing, random_inplane_normal(rng))
    surface = motor.centre + motor.normal * _depth(motor) / spacing
    add_cell(scene, lambda: cell_through(rng, shape, spacing, surface, motor.normal), force=True)
    return motor


def add_cell(scene: Scene, draw: Callable[[], Cell], force: bool) -> None:
    """Append a cell from ``draw()`` that overlaps no other, trying ``CELL_TRIES`` draws.

    With ``force`` the last draw is kept even if it overlaps (a motor needs its cell).
    """
    for _ in range(CELL_TRIES):
        cell = draw()
        if fits_among(cell, scene.cells, scene.voxel_spacing):
            scene.cells.append(cell)
            return
    if force:
        scene.cells.append(cell)


def _depth(motor: Motor) -> float:
    """Distance in angstroms from a motor's centre out to the outer membrane (its top, roughly)."""
    return motor.height / 2.0


def motor_at(
    rng: np.random.Generator, centre: np.ndarray, spacing: float, normal: np.ndarray
) -> Motor:
    """Draw a motor whose centre is exactly ``centre`` (voxels)."""
    motor = draw_motor(rng, np.asarray(centre, dtype=float), normal, spacing)
    shift = np.asarray(centre, dtype=float) - motor.centre
    motor.centre = np.asarray(centre, dtype=float)
    motor.flagellum.points = motor.flagellum.points + shift
    return motor


def cell_hosting(scene: Scene, centre: np.ndarray, tolerance_a: float) -> Cell | None:
    """A scene cell whose envelope sits where a motor at ``centre`` would need one, if any."""
    for cell in scene.cells:
        d = capsule_signed_distance(cell, centre[None], scene.voxel_spacing)[0]
        if abs(d + sum(MOTOR_HEIGHT_A) / 4.0) < tolerance_a:
            return cell
    return None


def draw_distractors(rng: np.random.Generator, scene: Scene, fast: bool = False) -> None:
    """Add beads, debris, granules, vesicles and loose filaments to ``scene``."""
    area = field_of_view_um2(scene.shape, scene.voxel_spacing)
    spacing, shape = scene.voxel_spacing, scene.shape
    n_beads = 0 if rng.random() < P_NO_BEADS else max(1, scaled_count(rng, BEADS_PER_UM2, area))
    for _ in range(n_beads):
        scene.balls.append(_draw_bead(rng, shape))
    n_debris = scaled_count(rng, DEBRIS_PER_UM2, area)
    big = rng.random() < P_BIG_DARK_DISTRACTOR
    for i in range(n_debris + int(big)):
        scene.balls.extend(_draw_debris(rng, shape, spacing, heavy=big and i == 0))
    if fast:
        return
    for cell in scene.cells:
        for _ in range(int(rng.integers(GRANULES_PER_CELL[0], GRANULES_PER_CELL[1] + 1))):
            granule = _draw_granule(rng, cell, shape, spacing)
            if granule is not None:
                scene.balls.append(granule)
    for _ in range(scaled_count(rng, VESICLES_PER_UM2, area)):
        vesicle = _draw_vesicle(rng, scene)
        if vesicle is not None:
            scene.vesicles.append(vesicle)
    for _ in range(int(rng.integers(FREE_FILAMENTS[0], FREE_FILAMENTS[1] + 1))):
        start = np.array(
            [rng.uniform(0.2, 0.8) * shape[0], rng.uniform(0, shape[1]), rng.uniform(0, shape[2])]
        )
        direction = random_inplane_normal(rng)
        scene.filaments.append(draw_flagellum(rng, start, direction, spacing))


def _random_position(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    return np.array([rng.uniform(0, s - 1) for s in shape])


def _draw_bead(rng: np.random.Generator, shape: tuple[int, int, int]) -> Ball:
    """A gold fiducial: most lie near the top or bottom ice surface."""
    centre = _random_position(rng, shape)
    if rng.random() < 0.6:
        near_top = rng.random() < 0.5
        centre[0] = shape[0] * (rng.uniform(0.05, 0.2) if near_top else rng.uniform(0.8, 0.95))
    return Ball(
        centre=centre,
        radius=uniform(rng, BEAD_DIAMETER_A) / 2.0,
        density=uniform(rng, BEAD_DENSITY),
        halo=rng.uniform(0.0, 0.12),
        streak=rng.uniform(0.0, 0.25),
    )


def _draw_debris(
    rng: np.random.Generator, shape: tuple[int, int, int], spacing: float, heavy: bool
) -> list[Ball]:
    """An irregular dark clump of a few overlapping soft balls (ice, contamination)."""
    centre = _random_position(rng, shape)
    radius = uniform(rng, DEBRIS_RADIUS_A) * (1.6 if heavy else 1.0)
    density = uniform(rng, DEBRIS_DENSITY) * (1.3 if heavy else 1.0)
    balls = []
    for _ in range(int(rng.integers(1, 5))):
        offset = rng.normal(0, 0.5 * radius / spacing, size=3)
        balls.append(
            Ball(centre + offset, radius * rng.uniform(0.5, 1.0), density * rng.uniform(0.6, 1.0))
        )
    return balls


def _draw_granule(
    rng: np.random.Generator, cell: Cell, shape: tuple[int, int, int], spacing: float
) -> Ball | None:
    """A dense storage granule inside a cell's cytoplasm (None if the cell is not in view)."""
    radius = uniform(rng, GRANULE_RADIUS_A)
    for _ in range(50):
        p = _random_position(rng, shape)
        if capsule_signed_distance(cell, p[None], spacing)[0] < -(cell.periplasm + radius + 100.0):
            return Ball(p, radius, uniform(rng, GRANULE_DENSITY))
    return None


def _draw_vesicle(rng: np.random.Generator, scene: Scene) -> Vesicle | None:
    """A membrane vesicle outside every cell (None if no free spot is found)."""
    spacing, shape = scene.voxel_spacing, scene.shape
    limit = VESICLE_RADIUS_MAX_FRACTION * min(shape[1], shape[2]) * spacing
    radius = min(uniform(rng, VESICLE_RADIUS_A), max(limit, VESICLE_RADIUS_A[0]))
    for _ in range(50):
        p = _random_position(rng, shape)
        if all(
            capsule_signed_distance(c, p[None], spacing)[0] > radius + 200.0 for c in scene.cells
        ):
            return Vesicle(
                centre=p,
                radius=radius,
                membrane=uniform(rng, MEMBRANE_THICKNESS_A),
                density=uniform(rng, MEMBRANE_DENSITY),
                lumen_density=rng.uniform(0.0, 0.2),
            )
    return None


def draw_imaging(rng: np.random.Generator) -> Imaging:
    """Draw the blur, noise, gain and offset of one tomogram."""
    blur_xy = uniform(rng, BLUR_XY_VOXELS)
    gain = uniform(rng, GAIN)
    return Imaging(
        blur_xy=blur_xy,
        blur_z=blur_xy * uniform(rng, BLUR_Z_RATIO),
        gain=gain,
        background=uniform(rng, BACKGROUND),
        noise=gain * uniform(rng, NOISE_PER_GAIN),
        noise_correlated=uniform(rng, NOISE_CORRELATED_FRACTION),
        noise_correlation=uniform(rng, NOISE_CORRELATION_VOXELS),
        streak=uniform(rng, STREAK_FRACTION),
        shot=uniform(rng, SHOT_FACTOR),
        impulses=uniform(rng, IMPULSE_FRACTION),
        gradient=random_unit(rng) * uniform(rng, GRADIENT_GREY),
        ice_texture=uniform(rng, ICE_TEXTURE),
    )


def plan_scene(
    shape: tuple[int, int, int],
    voxel_spacing: float,
    n_motors: int,
    rng: np.random.Generator,
    fast: bool = False,
) -> Scene:
    """Draw cells, then ``n_motors`` motors on their envelopes, then distractors and imaging.

    Args:
        shape: (z, y, x) voxels.
        voxel_spacing: angstroms per voxel.
        n_motors: motors to place (several share a cell when they can, like real tuft motors).
        rng: the tomogram's random generator.
        fast: fewer structures (a single cell, no granules, vesicles or loose filaments).

    Returns:
        The scene; ``len(scene.motors) == n_motors``.
    """
    scene = Scene(tuple(int(s) for s in shape), float(voxel_spacing))
    no_cell = n_motors == 0 and rng.random() < P_NO_CELL
    n_cells = 0 if no_cell else (1 if fast else int(rng.integers(CELL_COUNT[0], CELL_COUNT[1] + 1)))
    for _ in range(n_cells):
        add_cell(scene, lambda: draw_cell(rng, scene.shape, scene.voxel_spacing), force=False)
    for _ in range(n_motors):
        motor = place_motor_on_cells(rng, scene)
        scene.motors.append(motor if motor is not None else place_motor_with_new_cell(rng, scene))
    draw_distractors(rng, scene, fast=fast)
    scene.imaging = draw_imaging(rng)
    return scene


def scene_around_motors(
    shape: tuple[int, int, int],
    voxel_spacing: float,
    motors: list[tuple[float, float, float]],
    rng: np.random.Generator,
    fast: bool = False,
) -> Scene:
    """Build a scene with motors exactly at the given voxel centres, each on a cell envelope.

    A motor joins an existing cell whose envelope passes at the right depth; otherwise a new cell
    is drawn through it. Distractors and imaging are drawn as in :func:`plan_scene`.
    """
    scene = Scene(tuple(int(s) for s in shape), float(voxel_spacing))
    for centre in motors:
        centre = np.asarray(centre, dtype=float)
        host = cell_hosting(scene, centre, tolerance_a=HOST_TOLERANCE_A)
        if host is not None:
            normal = capsule_normal(host, centre, scene.voxel_spacing)
            scene.motors.append(motor_at(rng, centre, scene.voxel_spacing, normal))
            continue
        scene.motors.append(place_motor_with_new_cell(rng, scene, centre))
    if not scene.cells and rng.random() >= P_NO_CELL:
        scene.cells.append(draw_cell(rng, scene.shape, scene.voxel_spacing))
    draw_distractors(rng, scene, fast=fast)
    scene.imaging = draw_imaging(rng)
    return scene
