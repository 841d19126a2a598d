"""Small plotting helpers: tomogram slices with motors marked, image montages, the README picture.

Figures are built with :class:`matplotlib.figure.Figure` on the Agg canvas, never through
``pyplot``'s global state, so they work headless (no display needed) and show inline in a
notebook when returned from a cell.

Command line (writes the README picture from freshly generated synthetic tomograms)::

    python -m kernel_lib.viz --demo docs/synthetic_slices.png

Example:
    >>> import numpy as np
    >>> from kernel_lib.viz import plot_slices_with_motors
    >>> volume = np.random.default_rng(0).integers(0, 255, (20, 64, 64), dtype=np.uint8)
    >>> fig = plot_slices_with_motors(volume, [(10, 32, 32)], title="noise")
    >>> len(fig.axes)
    1
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle

PERCENTILES = (2.0, 98.0)
NEAR_SLICES = 3  # a motor is marked on slices within this many slices of its centre
MOTOR_MARK_RADIUS_A = 350.0  # circle radius when the voxel spacing is known
MOTOR_MARK_RADIUS_PX = 14.0  # circle radius otherwise
MARK_COLOUR = "#ff2a00"
PANEL_INCHES = 3.0
DEMO_DPI = 80
DEMO_SEED = 3
DEMO_CROP_A = 1100.0  # side of the zoomed crops around a motor
DEMO_MAX_BYTES = 300_000


def percentile_normalize(
    image: np.ndarray, percentiles: tuple[float, float] = PERCENTILES
) -> np.ndarray:
    """Clip to the given percentiles and scale to [0, 1] (float32)."""
    lo, hi = np.percentile(image, percentiles)
    scaled = (np.asarray(image, dtype=np.float32) - lo) / max(float(hi - lo), 1e-6)
    return np.clip(scaled, 0.0, 1.0)


def _grid(n: int, ncols: int | None) -> tuple[int, int]:
    cols = ncols or min(n, 3)
    return math.ceil(n / cols), cols


def new_figure(
    rows: int, cols: int, panel_inches: float = PANEL_INCHES
) -> tuple[Figure, np.ndarray]:
    """A headless figure with a ``rows x cols`` array of axes (ticks off)."""
    fig = Figure(figsize=(cols * panel_inches, rows * panel_inches), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).reshape(rows, cols)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def montage(
    images: Sequence[np.ndarray],
    titles: Sequence[str] | None = None,
    ncols: int | None = None,
    normalize: bool = True,
    panel_inches: float = PANEL_INCHES,
) -> Figure:
    """Show 2D images side by side in grey (each percentile-normalised unless told otherwise).

    Args:
        images: 2D arrays.
        titles: one per image.
        ncols: panels per row (default up to 3).
        normalize: clip each image to its 2-98 % percentiles.
        panel_inches: size of one panel.
    """
    rows, cols = _grid(len(images), ncols)
    fig, axes = new_figure(rows, cols, panel_inches)
    for i, (ax, image) in enumerate(zip(axes.flat, images)):
        shown = percentile_normalize(image) if normalize else image
        ax.imshow(shown, cmap="gray", vmin=0 if normalize else None, vmax=1 if normalize else None)
        if titles is not None:
            ax.set_title(titles[i], fontsize=9)
    return fig


def mark_motors(
    ax, motors: Sequence[Sequence[float]], z: int, radius_px: float, near: int = NEAR_SLICES
) -> int:
    """Circle the motors within ``near`` slices of slice ``z``; returns how many were circled."""
    marked = 0
    for mz, my, mx in motors:
        if abs(mz - z) <= near:
            ax.add_patch(Circle((mx, my), radius_px, fill=False, lw=2.0, ec=MARK_COLOUR))
            marked += 1
    return marked


def plot_slices_with_motors(
    volume: np.ndarray,
    motors: Sequence[Sequence[float]],
    z_indices: Sequence[int] | None = None,
    ax_grid: tuple[int, int] | np.ndarray | None = None,
    title: str | None = None,
    voxel_spacing: float | None = None,
    near: int = NEAR_SLICES,
) -> Figure:
    """A montage of z slices (2-98 % normalised) with motors circled.

    Args:
        volume: (z, y, x) tomogram.
        motors: (z, y, x) voxel centres (may be empty); a motor is circled on every shown slice
            within ``near`` slices of its centre.
        z_indices: slices to show; default the slices through the motors, or three evenly
            spaced slices when there is none.
        ax_grid: ``(rows, cols)`` of the montage, or an array of existing axes to draw into.
        title: figure title.
        voxel_spacing: angstroms per voxel, to size the circles physically.
        near: see ``motors``.

    Returns:
        The figure.
    """
    if z_indices is None:
        z_indices = sorted({int(round(m[0])) for m in motors}) or [
            int(v) for v in np.linspace(0, volume.shape[0] - 1, 5)[1:-1]
        ]
    radius = MOTOR_MARK_RADIUS_A / voxel_spacing if voxel_spacing else MOTOR_MARK_RADIUS_PX
    if isinstance(ax_grid, np.ndarray):
        axes, fig = ax_grid, ax_grid.flat[0].figure
    else:
        rows, cols = ax_grid or _grid(len(z_indices), None)
        fig, axes = new_figure(rows, cols)
    for ax, z in zip(np.ravel(axes), z_indices):
        ax.imshow(percentile_normalize(volume[z]), cmap="gray", vmin=0, vmax=1)
        n = mark_motors(ax, motors, z, radius, near)
        ax.set_title(f"z = {z}" + (f", {n} motor{'s' * (n > 1)}" if n else ""), fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return fig


def save_figure(
    fig: Figure, path: str | Path, dpi: int = DEMO_DPI, max_colours: int | None = 256
) -> int:
    """Save a figure as PNG, palette-quantised to ``max_colours`` (small files); bytes written."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    data = buffer.getvalue()
    if max_colours:
        from PIL import Image

        image = Image.open(io.BytesIO(data)).convert("RGB").quantize(max_colours)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        data = buffer.getvalue()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


def _crop(image: np.ndarray, centre: Sequence[float], half: int) -> np.ndarray:
    y, x = int(centre[1]), int(centre[2])
    return image[max(0, y - half) : y + half, max(0, x - half) : x + half]


def demo_figure(seed: int = DEMO_SEED) -> Figure:
    """Three synthetic train slices through motors, zooms on two of them, one slice without.

    Tomograms are rendered in memory (nothing written) with the same code as
    :func:`kernel_lib.synthetic.generate_dataset`.
    """
    from kernel_lib._synthetic_render import render_scene
    from kernel_lib._synthetic_scene import plan_scene
    from kernel_lib.synthetic import draw_shape_and_spacing

    rng = np.random.default_rng(seed)
    tomograms = []
    for n_motors in (1, 1, 1, 0):
        shape, spacing = draw_shape_and_spacing(rng, "small")
        tomo_rng = np.random.default_rng(rng.integers(2**32))
        scene = plan_scene(shape, spacing, n_motors, tomo_rng)
        tomograms.append((render_scene(scene, tomo_rng), scene))
    fig, axes = new_figure(2, 3, PANEL_INCHES)
    for i, (ax, (volume, scene)) in enumerate(zip([*axes[0], axes[1, 2]], tomograms)):
        motors = [m.centre for m in scene.motors]
        z = int(motors[0][0]) if motors else scene.shape[0] // 2
        plot_slices_with_motors(
            volume, motors, [z], np.array([ax]), voxel_spacing=scene.voxel_spacing
        )
        label = f"({'abc'[i]}) motor" if motors else "no motor"
        ax.set_title(f"{label}, {scene.voxel_spacing:g} A/voxel, z = {z}", fontsize=9)
    for ax, (volume, scene), name in zip(axes[1, :2], tomograms[:2], "ab"):
        motor = scene.motors[0].centre
        half = int(DEMO_CROP_A / 2 / scene.voxel_spacing)
        ax.imshow(
            percentile_normalize(_crop(volume[int(motor[0])], motor, half)),
            cmap="gray",
            vmin=0,
            vmax=1,
        )
        ax.set_title(f"zoom on ({name}): motor at the centre", fontsize=9)
    fig.suptitle(
        "Synthetic BYU-format tomograms: 2-98 % normalised slices, labelled motors circled",
        fontsize=10,
    )
    return fig


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kernel_lib.viz --demo OUT.png``: write the README picture."""
    parser = argparse.ArgumentParser(
        prog="python -m kernel_lib.viz", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--demo",
        type=Path,
        required=True,
        metavar="OUT.png",
        help="write a picture of synthetic slices with motors marked",
    )
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="random seed of the tomograms")
    args = parser.parse_args(argv)
    size = save_figure(demo_figure(args.seed), args.demo)
    print(f"wrote {args.demo} ({size / 1000:.0f} kB)")
    if size > DEMO_MAX_BYTES:
        print(f"note: larger than {DEMO_MAX_BYTES / 1000:.0f} kB; lower DEMO_DPI", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
