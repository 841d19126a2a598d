"""Plots for the numbered notebooks: labels, slices, intensities, stacks, training, predictions.

Every function returns a :class:`matplotlib.figure.Figure` built on the Agg canvas (no
``pyplot`` state, no display needed), except :func:`slice_viewer`, which returns a slider
widget when ``ipywidgets`` is installed. Importing this module inside a Jupyter kernel registers
a PNG formatter for figures, so a figure returned from a cell shows inline, also when the
notebook runs headless. Slice montages and motor circles come from :mod:`kernel_lib.viz`.

Example:
    >>> import numpy as np
    >>> from kernel_lib.config import PipelineConfig
    >>> volume = np.random.default_rng(0).integers(0, 255, (8, 32, 32), dtype=np.uint8)
    >>> fig = plot_intensity_histograms(volume, PipelineConfig())
    >>> len(fig.axes)
    4
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Circle

from .viz import (MARK_COLOUR, mark_motors, montage, new_figure, percentile_normalize,
                  plot_slices_with_motors)

PANEL = (3.6, 2.8)  # inches of one chart panel
PREDICTION_COLOUR = "#00c8ff"
STATIC_SLICES = 6  # slices in the static montage of the slice viewer
MARK_RADIUS_A = 350.0  # motor circle radius
MATCH_RADIUS_A = 1000.0  # the metric's match radius, drawn around a prediction
NEAR_SLICES = 3


def figure(rows: int = 1, cols: int = 1, panel: tuple[float, float] = PANEL,
           ) -> tuple[Figure, np.ndarray]:
    """A headless figure with a ``rows x cols`` array of chart axes."""
    fig = Figure(figsize=(cols * panel[0], rows * panel[1]), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, np.atleast_1d(fig.subplots(rows, cols, squeeze=False))


def figure_png(fig: Figure, dpi: int = 80) -> bytes:
    """PNG bytes of a figure."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _register_inline() -> bool:
    """Show :class:`Figure` results as PNG in a running IPython kernel; False outside one."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False
    shell.display_formatter.formatters["image/png"].for_type(Figure, figure_png)
    return True


INLINE = _register_inline()


def message_figure(text: str) -> Figure:
    """A small figure that only says ``text`` (when there is nothing to plot)."""
    fig, axes = figure(1, 1, (6.0, 1.2))
    axes[0, 0].set_axis_off()
    axes[0, 0].text(0.5, 0.5, text, ha="center", va="center", wrap=True)
    return fig


# ============================================================================ labels (EDA)


def plot_label_overview(labels: Any) -> Figure:
    """Motors per tomogram, voxel spacings by label, positive rate per spacing, slice counts."""
    tomos = labels.tomograms
    fig, axes = figure(2, 2)
    counts = tomos.group_by("n_motors").len().sort("n_motors")
    ax = axes[0, 0]
    ax.bar([str(v) for v in counts["n_motors"]], counts["len"], color="#4c72b0")
    ax.set(title="motors per tomogram", xlabel="motors", ylabel="tomograms")

    per = (tomos.group_by("voxel_spacing")
           .agg(pl.len().alias("n"), pl.col("has_motor").sum().alias("pos"))
           .sort("voxel_spacing"))
    labels_x = [f"{v:g}" for v in per["voxel_spacing"]]
    ax = axes[0, 1]
    ax.bar(labels_x, per["pos"], color="#dd8452", label="with motor")
    ax.bar(labels_x, per["n"] - per["pos"], bottom=per["pos"], color="#8c8c8c",
           label="without")
    ax.set(title="tomograms per voxel spacing", xlabel="spacing (A)", ylabel="tomograms")
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.legend(fontsize=7)

    ax = axes[1, 0]
    rate = (per["pos"] / per["n"]).to_numpy()
    ax.bar(labels_x, rate, color="#55a868")
    overall = float(tomos["has_motor"].mean() or 0.0)
    ax.axhline(overall, color="k", ls="--", lw=1, label=f"all: {overall:.2f}")
    for i, (r, n) in enumerate(zip(rate, per["n"])):
        ax.text(i, r + 0.02, str(n), ha="center", fontsize=6)
    ax.set(title="positive rate per spacing (n above bars)", xlabel="spacing (A)",
           ylabel="share with a motor", ylim=(0, 1.1))
    ax.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax.legend(fontsize=7)

    ax = axes[1, 1]
    ax.scatter(tomos["shape_x"], tomos["shape_z"], c=tomos["has_motor"].cast(pl.Int8),
               cmap="coolwarm", s=14, alpha=0.7)
    ax.set(title="shape (red: with motor)", xlabel="x (voxels)", ylabel="z (slices)")
    return fig


# ============================================================================ slices


def _viewer_slices(volume: np.ndarray, motors: np.ndarray, n: int) -> list[int]:
    """Slices through the motors first, then evenly spaced ones away from those (n at most)."""
    depth = volume.shape[0]
    n = max(1, min(n, depth))
    chosen = sorted({int(round(m[0])) for m in motors})[:n]
    for points in (n + 2, 4 * n + 2, depth + 2):  # coarse to fine until n slices are found
        for z in (int(v) for v in np.linspace(0, depth - 1, points)[1:-1]):
            if len(chosen) < n and all(abs(z - c) > NEAR_SLICES for c in chosen):
                chosen.append(z)
    for z in range(depth):  # a thin volume: take any slice not shown yet
        if len(chosen) < n and z not in chosen:
            chosen.append(z)
    return sorted(chosen)


def slice_viewer(example: Any, n_static: int = STATIC_SLICES, force_static: bool = False) -> Any:
    """Browse a tomogram's slices with its motors circled.

    With ``ipywidgets`` installed, a slider over z (returns the widget); otherwise a static
    montage of the slices through the motors plus evenly spaced ones (returns a figure).

    Args:
        example: a :class:`kernel_lib.notebooks.Example`.
        n_static: slices in the static montage.
        force_static: skip the slider even when ``ipywidgets`` is installed.
    """
    try:
        if force_static:
            raise ImportError("static montage requested")
        import ipywidgets
        from IPython.display import display
    except ImportError:
        zs = _viewer_slices(example.volume, example.motors, n_static)
        grid = (int(np.ceil(len(zs) / 3)), min(3, len(zs)))
        return plot_slices_with_motors(
            example.volume, example.motors, zs, ax_grid=grid,
            title=f"{example.tomo_id} ({example.voxel_spacing:g} A/voxel; install ipywidgets "
                  f"for a z slider)", voxel_spacing=example.voxel_spacing)
    output = ipywidgets.Output()
    first = example.z

    def show(z: int) -> None:
        fig = plot_slices_with_motors(example.volume, example.motors, [z], ax_grid=(1, 1),
                                      voxel_spacing=example.voxel_spacing)
        output.clear_output(wait=True)
        with output:
            display(fig)

    slider = ipywidgets.IntSlider(value=first, min=0, max=example.volume.shape[0] - 1,
                                  description="z", continuous_update=False)
    slider.observe(lambda change: show(change["new"]), names="value")
    show(first)
    return ipywidgets.VBox([slider, output])


def plot_intensity_histograms(volume: np.ndarray, cfg: Any, z: int | None = None) -> Figure:
    """A slice and the grey-level histogram before and after percentile normalisation.

    Args:
        volume: ``uint8`` ``(z, y, x)`` as stored.
        cfg: a :class:`~kernel_lib.config.PipelineConfig` (percentiles, per-volume or per-slice).
        z: the slice shown (default: the middle one).
    """
    from .normalize import histogram_uint8, normalize, percentile_bounds

    z = volume.shape[0] // 2 if z is None else int(z)
    per_slice = cfg.normalize_per == "slice"
    normalised = normalize(volume, cfg.percentile_low, cfg.percentile_high, per_slice=per_slice,
                           out="uint8")
    lows, highs = percentile_bounds(volume, cfg.percentile_low, cfg.percentile_high, per_slice)
    lo = float(np.ravel(lows)[z if per_slice else 0])
    hi = float(np.ravel(highs)[z if per_slice else 0])
    fig, axes = figure(2, 2)
    for col, (image, title) in enumerate([(volume, "raw"), (normalised, "normalised")]):
        axes[0, col].imshow(image[z], cmap="gray", vmin=0, vmax=255)
        axes[0, col].set_title(f"{title}, z = {z}", fontsize=9)
        axes[0, col].set_axis_off()
        hist = histogram_uint8(image)
        axes[1, col].bar(np.arange(256), hist / hist.sum(), width=1.0, color="#4c72b0")
        axes[1, col].set(xlabel="grey level", ylabel="share of voxels", xlim=(0, 255),
                         title=f"{title} histogram")
    axes[1, 0].axvline(lo, color=MARK_COLOUR, lw=1, label=f"p{cfg.percentile_low:g} = {lo:.0f}")
    axes[1, 0].axvline(hi, color=MARK_COLOUR, lw=1, ls="--",
                       label=f"p{cfg.percentile_high:g} = {hi:.0f}")
    axes[1, 0].legend(fontsize=7)
    return fig


def plot_stack(stack: np.ndarray, indices: Sequence[int], example: Any) -> Figure:
    """The channels of a 2.5D stack side by side, motors circled on each."""
    radius = MARK_RADIUS_A / example.voxel_spacing
    centre = indices[len(indices) // 2]
    titles = [f"channel {i}: z = {z}" + (" (centre)" if z == centre and i == len(indices) // 2
                                         else "") for i, z in enumerate(indices)]
    fig = montage(list(stack), titles, ncols=len(stack))
    for ax, z in zip(fig.axes, indices):
        mark_motors(ax, example.motors, z, radius)
    step = indices[1] - indices[0] if len(indices) > 1 else 0
    fig.suptitle(f"2.5D stack of {example.tomo_id}: {len(indices)} slices, {step} apart "
                 f"({step * example.voxel_spacing:.0f} A)", fontsize=10)
    return fig


def plot_cache_preview(entries: dict, labels: Any, n: int = 3) -> Figure:
    """Cached (model-frame) volumes through their first motor, motors mapped into that frame."""
    ids = [t for t in labels.tomograms.filter(pl.col("has_motor"))["tomo_id"] if t in entries][:n]
    ids += [t for t in sorted(entries) if t not in ids][:max(0, n - len(ids))]
    if not ids:
        return message_figure("the cache is empty")
    fig, axes = new_figure(1, len(ids))
    for ax, tomo_id in zip(axes.flat, ids):
        entry = entries[tomo_id]
        volume = entry.load()
        motors = labels.motors.filter(pl.col("tomo_id") == tomo_id).select("z", "y", "x")
        model_motors = entry.frame.apply(motors.to_numpy()) if motors.height else np.zeros((0, 3))
        z = int(round(model_motors[0][0])) if len(model_motors) else volume.shape[0] // 2
        z = min(max(z, 0), volume.shape[0] - 1)
        ax.imshow(volume[z], cmap="gray", vmin=0, vmax=255)
        spacing = entry.source_spacing / entry.frame.scale[1]
        mark_motors(ax, model_motors, z, MARK_RADIUS_A / spacing)
        ax.set_title(f"{tomo_id} {tuple(volume.shape)}, z = {z}", fontsize=8)
    fig.suptitle("cached volumes as the model sees them (uint8, model frame)", fontsize=10)
    return fig


# ============================================================================ training


def _read_csv(path: Path) -> pl.DataFrame | None:
    return pl.read_csv(path) if path.is_file() else None


def plot_training_curves(run_dir: str | os.PathLike) -> Figure:
    """Training loss and validation F2 (best rule, fixed, quantile) per epoch."""
    metrics = _read_csv(Path(run_dir) / "metrics.csv")
    if metrics is None or metrics.height == 0:
        return message_figure(f"no metrics.csv in {run_dir} yet")
    fig, axes = figure(1, 2)
    epochs = metrics["epoch"].to_numpy()
    axes[0, 0].plot(epochs, metrics["train_loss"], marker="o")
    axes[0, 0].set(title="training loss", xlabel="epoch", ylabel="loss")
    ax = axes[0, 1]
    if "val_f2" in metrics.columns:
        for column, style in (("val_f2", "-o"), ("val_f2_fixed", "--"), ("val_f2_quantile", ":")):
            if column in metrics.columns:
                ax.plot(epochs, metrics[column].cast(pl.Float64), style, label=column)
        ax.set(title="validation F2", xlabel="epoch", ylabel="F2", ylim=(-0.02, 1.02))
        ax.legend(fontsize=7)
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no validation fold (fold = 'all')", ha="center", va="center")
    for axis in (axes[0, 0], ax):
        axis.set_xticks(epochs)
    return fig


def plot_threshold_sweep(run_dir: str | os.PathLike) -> Figure:
    """Validation F2 of every fixed threshold and every quantile; the chosen rule marked."""
    from .config import PipelineConfig

    run_dir = Path(run_dir)
    sweep = _read_csv(run_dir / "threshold_sweep.csv")
    if sweep is None or sweep.height == 0:
        return message_figure("no threshold_sweep.csv: the run had no validation fold")
    rule = PipelineConfig.load(run_dir).threshold
    fig, axes = figure(1, 2)
    for ax, kind, xlabel in ((axes[0, 0], "fixed", "score threshold"),
                             (axes[0, 1], "quantile", "fraction called positive")):
        part = sweep.filter(pl.col("kind") == kind).sort("value")
        ax.plot(part["value"], part["f2"], "-", marker="." if part.height < 40 else None)
        if rule.kind == kind:
            ax.axvline(rule.value, color=MARK_COLOUR, ls="--", lw=1, label=f"chosen {rule}")
            ax.legend(fontsize=7)
        ax.set(title=f"{kind} threshold sweep", xlabel=xlabel, ylabel="validation F2",
               ylim=(-0.02, 1.02))
    return fig


def plot_verifier_effect(data_root: str | os.PathLike, run_dir: str | os.PathLike) -> Figure:
    """Each validation tomogram's score by the heatmap alone and with the 3D verifier, joined by
    a line (red: has a motor, gray: none), with each rule's cut-off: a good verifier lifts the
    red lines and drops the gray ones apart."""
    from .config import ThresholdRule
    from .labels import read_labels
    from .threshold import apply_threshold

    run_dir = Path(run_dir)
    alone = _read_csv(run_dir / "val_predictions_heatmap.csv")
    both = _read_csv(run_dir / "val_predictions.csv")
    info_path = run_dir / "verifier.json"
    if alone is None or both is None or not info_path.is_file():
        return message_figure("no verifier validation: the run has no verifier (verifier_steps "
                              "0) or no validation fold")
    import json

    info = json.loads(info_path.read_text())
    has = read_labels(Path(data_root) / "train_labels.csv").tomograms.select(
        "tomo_id", "has_motor")
    table = (alone.select("tomo_id", before="score").join(both.select("tomo_id", after="score"),
                                                           on="tomo_id").join(has, on="tomo_id"))
    fig, axes = figure(1, 1, panel=(4.6, 3.6))
    ax = axes[0, 0]
    for before, after, motor in table.select("before", "after", "has_motor").iter_rows():
        ax.plot([0, 1], [before, after], "-o", ms=3, lw=1,
                color=MARK_COLOUR if motor else "0.6", alpha=0.9)
    for x, column, key in ((0, "before", "threshold_heatmap"), (1, "after", "threshold")):
        scores = table[column].to_numpy()
        called = apply_threshold(scores, ThresholdRule.parse(info[key]))
        if called.any() and not called.all():  # the cut-off between the calls and the rest
            cut = (scores[called].min() + scores[~called].max()) / 2
            ax.plot([x - 0.08, x + 0.08], [cut, cut], "k--", lw=1)
    ax.set_xticks([0, 1], [f"heatmap alone\nF2 {info['val_f2_heatmap']:.2f}",
                           f"with verifier\nF2 {info['val_f2']:.2f}"])
    ax.set(xlim=(-0.3, 1.3), ylim=(-0.02, 1.02), ylabel="top peak score",
           title="validation: red has a motor, gray none; dashes: each rule's cut")
    ax.title.set_fontsize(8)
    return fig


def plot_validation_predictions(data_root: str | os.PathLike, run_dir: str | os.PathLike,
                                n: int = 4) -> Figure:
    """Validation slices: truth circled in red, the prediction in blue with its match radius.

    Tomograms with a motor come first. The slice shown is the truth's (or the prediction's when
    the tomogram has none); coordinates are original voxels.
    """
    from .labels import read_labels
    from .tomogram import read_tomogram

    run_dir, data_root = Path(run_dir), Path(data_root)
    predictions = _read_csv(run_dir / "val_predictions.csv")
    if predictions is None or predictions.height == 0:
        return message_figure("no val_predictions.csv: the run had no validation fold")
    labels = read_labels(data_root / "train_labels.csv")
    tomos = labels.tomograms.join(predictions, on="tomo_id").sort(
        ["has_motor", "score"], descending=[True, True], nulls_last=True).head(n)
    cols = min(n, tomos.height)
    fig, axes = new_figure(1, cols, 3.4)
    for ax, row in zip(axes.flat, tomos.iter_rows(named=True)):
        volume = read_tomogram(data_root / "train" / row["tomo_id"])
        truth = labels.motors.filter(pl.col("tomo_id") == row["tomo_id"]).select(
            "z", "y", "x").to_numpy()
        predicted = np.array([[row["z"], row["y"], row["x"]]]) if row["z"] >= 0 else np.zeros(
            (0, 3))
        anchor = truth[0] if len(truth) else (predicted[0] if len(predicted) else None)
        z = int(round(anchor[0])) if anchor is not None else volume.shape[0] // 2
        spacing = row["voxel_spacing"]
        ax.imshow(percentile_normalize(volume[z]), cmap="gray", vmin=0, vmax=1)
        mark_motors(ax, truth, z, MARK_RADIUS_A / spacing, near=volume.shape[0])
        for pz, py, px in predicted:
            ax.plot(px, py, "+", color=PREDICTION_COLOUR, ms=12, mew=2)
            ax.add_patch(Circle((px, py), MATCH_RADIUS_A / spacing, fill=False,
                                ec=PREDICTION_COLOUR, lw=0.8, ls="--"))
        call = "motor" if row["positive"] else "no motor"
        score = row["score"] if row["score"] is not None else float("nan")
        ax.set_title(f"{row['tomo_id']} z={z}\ntruth {len(truth)} motor(s); called {call} "
                     f"(score {score:.2f})", fontsize=8)
    fig.suptitle("validation: truth (red), prediction (blue +, dashed: match radius)",
                 fontsize=10)
    return fig


def plot_submission_scores(table: pl.DataFrame, answer_key: str | os.PathLike | None = None,
                           ) -> Figure:
    """Histogram of each test tomogram's top score, split by truth when an answer key exists."""
    scores = table["score"].cast(pl.Float64).fill_nan(None).drop_nulls().to_numpy()
    fig, axes = figure(1, 1, (5.0, 3.0))
    ax = axes[0, 0]
    low, high = (float(scores.min()), float(scores.max())) if len(scores) else (0.0, 1.0)
    bins = np.linspace(low, high, 21) if high > low else np.linspace(low - 0.01, high + 0.01, 3)
    if answer_key is not None and Path(answer_key).is_file():
        truth = pl.read_csv(answer_key).select("tomo_id", pl.col("Has motor").cast(pl.Boolean))
        joined = table.join(truth, on="tomo_id", how="left").filter(pl.col("score").is_not_nan())
        for has, colour, name in ((True, "#dd8452", "has motor"), (False, "#8c8c8c", "no motor")):
            part = joined.filter(pl.col("Has motor") == has)["score"].to_numpy()
            ax.hist(part, bins=bins, alpha=0.7, color=colour, label=f"{name} ({len(part)})")
    else:
        ax.hist(scores, bins=bins, color="#4c72b0", label=f"test tomograms ({len(scores)})")
    called = table.filter(pl.col("Motor axis 0") >= 0)["score"]
    if called.len():
        ax.axvline(float(called.min()), color=MARK_COLOUR, ls="--", lw=1,
                   label="lowest score called positive")
    ax.legend(fontsize=7)
    ax.set(title="top peak score per test tomogram", xlabel="score", ylabel="tomograms")
    return fig
