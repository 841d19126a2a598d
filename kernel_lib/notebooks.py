"""What the numbered notebooks need besides plots: default paths, small tables, headless runs.

The notebooks under ``notebooks/`` stay thin: every step they take is one call into
``kernel_lib``. This module holds the non-plotting part (plots are in :mod:`kernel_lib.plots`):

- **Paths.** :func:`notebook_paths` resolves every default location in one call: the competition
  data on Kaggle (``/kaggle/input/<slug>/`` or ``/kaggle/input/competitions/<slug>/``), the local
  synthetic set elsewhere (``data/synthetic/``, generated on first use), and where the cache, the
  run directory and ``submission.csv`` go. :func:`find_weights` finds the run directories that
  the submission notebook loads.
- **Tables.** Label statistics for the EDA notebook (:func:`label_tables`), one tomogram with its
  motors (:func:`load_example`), the cache report (:func:`build_training_cache`) and the
  submission's summary and score (:func:`describe_submission`).
- **Headless execution.** :func:`execute_notebook` runs a notebook with ``nbclient`` after the
  papermill convention: the cell tagged ``parameters`` holds the defaults, and a cell tagged
  ``injected-parameters`` with the overrides is inserted right after it. A failing cell raises
  :class:`NotebookError` naming the notebook, the cell and the error, and the partly executed
  copy is still written. :func:`notebook_problems` checks the committed form (no outputs, no
  execution counts, a markdown cell first, a ``parameters`` cell, no ``def`` or ``class``).

Command line::

    python -m kernel_lib.notebooks run notebooks/01_eda.ipynb runs/01_eda.ipynb -p data_root=data/x
    python -m kernel_lib.notebooks check notebooks/*.ipynb
    python -m kernel_lib.notebooks strip notebooks/*.ipynb

Example:
    >>> import nbformat
    >>> nb = nbformat.v4.new_notebook(cells=[
    ...     nbformat.v4.new_code_cell("epochs = 1", metadata={"tags": ["parameters"]})])
    >>> nb = inject_parameters(nb, {"epochs": 3})
    >>> nb.cells[1].source
    '# Parameters\\nepochs = 3'
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from .kaggle_env import (CHECKPOINT_NAME, KAGGLE_WORKING, WEIGHTS_DATASET, find_competition_root,
                         is_kaggle, resolve_input_root)
from .config import CONFIG_NAME

PARAMETERS_TAG = "parameters"
INJECTED_TAG = "injected-parameters"
DEFAULT_KERNEL = "python3"
DEFAULT_CELL_TIMEOUT = 1800  # seconds one cell may run before the run is stopped
SYNTHETIC_MARKER = "synthetic.json"
LOCAL_DATA = Path("data") / "synthetic"  # relative to the project root
LOCAL_RUNS = Path("runs")  # relative to the project root
LOCAL_SYNTHETIC = {"n_train": 32, "n_test": 16, "seed": 0, "size": "small"}
"""What the notebooks (and ``python -m kernel_lib.main``) generate when no data is found."""
NOTEBOOKS = ("01_eda.ipynb", "02_preprocess.ipynb", "03_train.ipynb", "04_submission.ipynb")
WEIGHT_GLOBS = ("*", "*/*", "datasets/*/*", "datasets/*/*/*")  # run dirs under the input root


class NotebookError(RuntimeError):
    """A notebook could not run, or a notebook helper got unusable input; says what to do."""


# ============================================================================ paths


def project_root() -> Path:
    """The checkout this ``kernel_lib`` was imported from, else the current folder.

    An editable install (``pip install -e .``) imports from the checkout, so local defaults land
    in its ``data/`` and ``runs/``; an installed wheel (Kaggle) has no checkout.
    """
    here = Path(__file__).resolve().parent.parent
    if (here / "pyproject.toml").is_file() and (here / "kernel_lib").is_dir():
        return here
    return Path.cwd()


@dataclass
class NotebookPaths:
    """Every location a notebook reads or writes, resolved once.

    Attributes:
        data_root: competition layout (``train/``, ``test/``, ``train_labels.csv``, ...).
        source: where ``data_root`` came from: ``"kaggle"``, ``"synthetic"`` or ``"given"``.
        on_kaggle: running inside a Kaggle kernel.
        cache_dir: root of the preprocessing cache (the engine adds a settings-specific folder).
        run_dir: the training run directory (weights, config, metrics).
        submission: where ``submission.csv`` is written.
        shown: the locations this notebook uses (printed with ``data_root``).
    """

    data_root: Path
    source: str
    on_kaggle: bool
    cache_dir: Path
    run_dir: Path
    submission: Path
    shown: tuple[str, ...] = ("cache_dir", "run_dir", "submission")

    @property
    def labels(self) -> Path:
        """``train_labels.csv`` of the data root."""
        return self.data_root / "train_labels.csv"

    @property
    def answer_key(self) -> Path | None:
        """``test_labels.csv`` when the data root has one (synthetic data), else None."""
        path = self.data_root / "test_labels.csv"
        return path if path.is_file() else None

    def __str__(self) -> str:
        where = "Kaggle" if self.on_kaggle else "local"
        lines = [f"data_root  {self.data_root}  ({self.source} data, {where})"]
        lines += [f"{name:<10} {getattr(self, name)}" for name in self.shown]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


def resolve_data_root(data_root: str | os.PathLike | None = None, generate: bool = True,
                      ) -> tuple[Path, str]:
    """The data folder a notebook should read, and where it came from.

    Order: ``data_root`` when given; the competition data when attached (Kaggle); the local
    synthetic set ``<project>/data/synthetic/``, generated with :data:`LOCAL_SYNTHETIC` when it
    is missing and ``generate`` is true.

    Raises:
        NotebookError: the given folder does not exist; on Kaggle without the competition data;
            no local data and ``generate`` is false.
    """
    if data_root is not None and str(data_root) != "":
        path = Path(data_root).expanduser()
        if not path.is_dir():
            raise NotebookError(f"data_root {path} does not exist: point it at a folder with the "
                                f"competition layout (train/, test/, train_labels.csv), or set "
                                f"data_root = None to use the defaults")
        return path, "given"
    found = find_competition_root()
    if found is not None:
        return found, "kaggle"
    if is_kaggle():
        raise NotebookError(
            f"the competition data is not attached: no {resolve_input_root()}/<slug>/ or "
            f"{resolve_input_root()}/competitions/<slug>/ with test/ or sample_submission.csv. "
            f"Add the competition to the notebook (Add Input), or set data_root")
    local = project_root() / LOCAL_DATA
    if (local / "train_labels.csv").is_file():
        return local, "synthetic"
    if not generate:
        raise NotebookError(f"no data at {local}: run `python -m kernel_lib.synthetic {local}` "
                            f"or set data_root")
    from .synthetic import format_summary, generate_dataset

    print(f"no competition data here: generating a synthetic set into {local} "
          f"({LOCAL_SYNTHETIC['n_train']} train + {LOCAL_SYNTHETIC['n_test']} test tomograms, "
          f"about a minute)", flush=True)
    print(format_summary(generate_dataset(local, **LOCAL_SYNTHETIC)), flush=True)
    return local, "synthetic"


def dataset_key(data_root: Path) -> str | None:
    """Short hash of a synthetic set's marker file, or None for other data.

    The cache is keyed by it: a regenerated synthetic set may reuse tomogram ids with new
    pixels, and must never read the previous set's cached volumes.
    """
    marker = data_root / SYNTHETIC_MARKER
    if not marker.is_file():
        return None
    return hashlib.sha1(marker.read_bytes()).hexdigest()[:8]


def default_cache_dir(data_root: Path, on_kaggle: bool) -> Path:
    """Kaggle: ``/kaggle/working/cache``; else ``DATA_ROOT/../cache`` (per synthetic set)."""
    if on_kaggle:
        return KAGGLE_WORKING / "cache"
    key = dataset_key(data_root)
    return data_root.parent / "cache" / (f"{data_root.name}-{key}" if key else "")


_UNUSED: Any = type("Unused", (), {"__repr__": lambda self: "<unused>"})()


def notebook_paths(data_root: str | os.PathLike | None = None, *,
                   cache_dir: str | os.PathLike | None = _UNUSED,
                   run_dir: str | os.PathLike | None = _UNUSED,
                   submission: str | os.PathLike | None = _UNUSED,
                   run_name: str = "train", generate: bool = True) -> NotebookPaths:
    """Resolve a notebook's paths from its parameters (None means "the default").

    Every location is resolved; the ones passed (even as None) are the ones the notebook uses
    and the only ones printed.

    Args:
        data_root: see :func:`resolve_data_root`.
        cache_dir: preprocessing cache root; default :func:`default_cache_dir`.
        run_dir: training run directory; default ``/kaggle/working/run-<run_name>`` on Kaggle,
            else a new ``<project>/runs/<timestamp>-<run_name>/``.
        submission: default ``/kaggle/working/submission.csv`` on Kaggle, else
            ``<project>/runs/submission.csv``.
        run_name: suffix of the default run directory (e.g. ``"fold0"``).
        generate: allow generating the local synthetic set.

    Example:
        >>> paths = notebook_paths("/tmp", run_dir="/tmp/run", cache_dir="/tmp/cache")
        >>> paths.source, paths.run_dir.name
        ('given', 'run')
    """
    root, source = resolve_data_root(data_root, generate)
    given = {"cache_dir": cache_dir, "run_dir": run_dir, "submission": submission}
    shown = tuple(name for name, value in given.items() if value is not _UNUSED)
    cache_dir, run_dir, submission = (None if v is _UNUSED else v for v in given.values())
    on_kaggle = is_kaggle() and KAGGLE_WORKING.is_dir()
    local = project_root() / LOCAL_RUNS
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    default_run = (KAGGLE_WORKING / f"run-{run_name}" if on_kaggle
                   else local / f"{stamp}-{run_name}")
    default_submission = (KAGGLE_WORKING if on_kaggle else local) / "submission.csv"
    return NotebookPaths(
        data_root=root, source=source, on_kaggle=on_kaggle,
        cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(root, on_kaggle),
        run_dir=Path(run_dir) if run_dir else default_run,
        submission=Path(submission) if submission else default_submission, shown=shown)


def is_run_dir(folder: Path) -> bool:
    """A folder holding ``config.json`` and ``model.pt`` (what inference loads)."""
    return (folder / CONFIG_NAME).is_file() and (folder / CHECKPOINT_NAME).is_file()


def find_weights(weights: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 runs_root: str | os.PathLike | None = None) -> list[Path]:
    """The run directories to load for inference.

    Args:
        weights: one run directory or a list (an ensemble). None: every attached dataset folder
            under the Kaggle input root that holds ``config.json`` + ``model.pt`` (the
            ``byu-motor-weights`` dataset first), or, off Kaggle, the newest run under
            ``runs_root``.
        runs_root: where local runs are (default ``<project>/runs``).

    Raises:
        NotebookError: a given folder is not a run directory, or none was found.
    """
    if weights is not None and not isinstance(weights, (list, tuple)):
        weights = [weights]
    if weights:
        folders = [Path(w).expanduser() for w in weights]
        bad = [str(f) for f in folders if not is_run_dir(f)]
        if bad:
            raise NotebookError(f"not a run directory (needs {CONFIG_NAME} and {CHECKPOINT_NAME}): "
                                f"{', '.join(bad)}; train one with 03_train.ipynb or "
                                f"`python -m kernel_lib.train`")
        return folders
    input_root = resolve_input_root()
    if input_root.is_dir():
        found: list[Path] = []
        for pattern in WEIGHT_GLOBS:
            found += [p for p in sorted(input_root.glob(pattern))
                      if p.is_dir() and is_run_dir(p) and p not in found]
        found.sort(key=lambda p: WEIGHTS_DATASET not in str(p))  # the weights dataset first
        if found:
            return found
        if is_kaggle():
            raise NotebookError(
                f"no folder with {CONFIG_NAME} + {CHECKPOINT_NAME} under {input_root}: attach "
                f"the weights dataset ({WEIGHTS_DATASET}, see the README) or set weights")
    root = Path(runs_root) if runs_root else project_root() / LOCAL_RUNS
    runs = [p.parent for p in root.glob(f"**/{CHECKPOINT_NAME}") if is_run_dir(p.parent)]
    if not runs:
        raise NotebookError(f"no trained run under {root}: run notebooks/03_train.ipynb (or "
                            f"`python -m kernel_lib.train`) first, or set weights = [RUN_DIR]")
    return [max(runs, key=lambda p: (p / CHECKPOINT_NAME).stat().st_mtime)]


def fold_index(fold: int | str) -> int:
    """``0..k-1`` as is; ``"all"`` (train on everything, no validation) as -1."""
    if isinstance(fold, str) and fold.strip().lower() == "all":
        return -1
    try:
        return int(fold)
    except (TypeError, ValueError):
        raise NotebookError(f"fold must be an integer or 'all' (got {fold!r})") from None


# ============================================================================ tables (EDA)


def label_tables(labels: Any) -> dict[str, pl.DataFrame]:
    """Label statistics of a ``read_labels`` result, one small frame each.

    Returns:
        ``motors_per_tomogram`` (n_motors, tomograms, share), ``voxel_spacing`` (per spacing:
        tomograms, with_motor, positive_rate: the label shortcut), ``shapes`` (z, y, x,
        tomograms) and ``summary`` (statistic, value: totals and the spacing range).
    """
    tomos = labels.tomograms
    n = max(tomos.height, 1)
    per_count = (tomos.group_by("n_motors").len("tomograms").sort("n_motors")
                 .with_columns((pl.col("tomograms") / n).round(3).alias("share")))
    per_spacing = (tomos.group_by("voxel_spacing")
                   .agg(pl.len().alias("tomograms"), pl.col("has_motor").sum().alias("with_motor"))
                   .with_columns((pl.col("with_motor") / pl.col("tomograms")).round(3)
                                 .alias("positive_rate"))
                   .sort("voxel_spacing"))
    shapes = (tomos.group_by("shape_z", "shape_y", "shape_x").len("tomograms")
              .sort("tomograms", "shape_z", descending=[True, False]))
    summary = pl.DataFrame({
        "statistic": ["tomograms", "motors", "tomograms with a motor", "positive rate",
                      "under-reported (rows < motors)", "voxel spacing min (A)",
                      "voxel spacing median (A)", "voxel spacing max (A)"],
        "value": [float(tomos.height), float(labels.motors.height),
                  float(tomos["has_motor"].sum()), round(float(tomos["has_motor"].mean() or 0), 3),
                  float((tomos["n_motors_reported"] > tomos["n_motors"]).sum()),
                  tomos["voxel_spacing"].min(), tomos["voxel_spacing"].median(),
                  tomos["voxel_spacing"].max()],
    })
    return {"summary": summary, "motors_per_tomogram": per_count, "voxel_spacing": per_spacing,
            "shapes": shapes}


def example_ids(labels: Any, n: int = 2, with_motor: bool = True) -> list[str]:
    """Up to ``n`` tomogram ids, those with a motor (or without) first, then the rest."""
    tomos = labels.tomograms.sort(["has_motor", "tomo_id"], descending=[with_motor, False])
    return tomos["tomo_id"].head(n).to_list()


@dataclass
class Example:
    """One training tomogram with its labels, in original voxels.

    Attributes:
        tomo_id: the tomogram's id.
        volume: ``uint8`` ``(z, y, x)`` as stored.
        motors: ``(k, 3)`` motor centres ``(z, y, x)``.
        voxel_spacing: angstroms per voxel.
    """

    tomo_id: str
    volume: np.ndarray
    motors: np.ndarray
    voxel_spacing: float

    @property
    def z(self) -> int:
        """The slice through the first motor, or the middle slice without one."""
        if len(self.motors):
            return int(round(self.motors[0][0]))
        return self.volume.shape[0] // 2

    def __repr__(self) -> str:
        return (f"Example({self.tomo_id}: shape {self.volume.shape}, {len(self.motors)} motor(s), "
                f"{self.voxel_spacing:g} A/voxel)")


def load_example(data_root: str | os.PathLike, labels: Any, tomo_id: str,
                 split: str = "train") -> Example:
    """Read one labelled tomogram and its motors.

    Raises:
        NotebookError: ``tomo_id`` is not in the labels.
    """
    from .tomogram import read_tomogram

    rows = labels.tomograms.filter(pl.col("tomo_id") == tomo_id)
    if rows.height == 0:
        raise NotebookError(f"{tomo_id} is not in the labels; pick one of "
                            f"{labels.tomograms['tomo_id'].head(5).to_list()}")
    motors = labels.motors.filter(pl.col("tomo_id") == tomo_id).select("z", "y", "x").to_numpy()
    volume = read_tomogram(Path(data_root) / split / tomo_id)
    return Example(tomo_id, volume, motors.astype(np.float64), float(rows["voxel_spacing"][0]))


def motor_stack(example: Example, cfg: Any, motor: int = 0) -> tuple[np.ndarray, list[int]]:
    """The 2.5D stack the model would see around a motor (or the middle slice), original voxels.

    Channels are ``cfg.stack_step_angstrom`` apart, converted to this tomogram's slices.

    Returns:
        ``(stack (2n+1, y, x), slice indices)``.
    """
    from .stacks import slice_stack, stack_indices, stack_offsets, step_in_slices

    z = (int(round(example.motors[motor][0])) if len(example.motors) > motor
         else example.volume.shape[0] // 2)
    offsets = stack_offsets(cfg.stack_half, step_in_slices(cfg.stack_step_angstrom,
                                                           example.voxel_spacing))
    indices = stack_indices([z], example.volume.shape[0], offsets)[0].tolist()
    return slice_stack(example.volume, z, offsets), indices


# ============================================================================ cache, run, score


def training_folders(data_root: str | os.PathLike, labels: Any,
                     max_tomograms: int | None = None) -> list[tuple[str, Path, float]]:
    """``(tomo_id, folder, labelled spacing)`` of the labelled training tomograms on disk."""
    root = Path(data_root) / "train"
    rows = [(t, root / t, float(s)) for t, s in zip(labels.tomograms["tomo_id"],
                                                   labels.tomograms["voxel_spacing"])
            if (root / t).is_dir()]
    if not rows:
        raise NotebookError(f"none of the {labels.tomograms.height} labelled tomograms has a "
                            f"folder in {root}: check data_root")
    return rows[:max_tomograms] if max_tomograms else rows


@dataclass
class CacheReport:
    """What :func:`build_training_cache` did."""

    cache_dir: Path
    entries: dict = field(repr=False)
    seconds: float
    size_bytes: int
    settings: dict

    def __str__(self) -> str:
        shapes = [e.shape for e in self.entries.values()]
        volume_mb = self.size_bytes / 1e6
        lines = [f"cache {self.cache_dir}: {len(self.entries)} tomograms, {volume_mb:.1f} MB, "
                 f"{self.seconds:.1f} s"]
        if shapes:
            lines.append(f"model-frame shapes: z {min(s[0] for s in shapes)}-"
                         f"{max(s[0] for s in shapes)}, y/x {min(min(s[1:]) for s in shapes)}-"
                         f"{max(max(s[1:]) for s in shapes)}")
        lines.append("settings: " + ", ".join(f"{k}={v}" for k, v in self.settings.items()))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


def build_training_cache(data_root: str | os.PathLike, cache_root: str | os.PathLike, cfg: Any,
                         max_tomograms: int | None = None, progress: bool = True) -> CacheReport:
    """Preprocess every labelled training tomogram at its labelled spacing into the cache.

    Training reads exactly these volumes; it adds copies of its validation fold at the assumed
    test spacing itself. Volumes already cached are reused.
    """
    from .labels import read_labels
    from .preprocess import MANIFEST_NAME, build_cache, cache_dir_for, cache_size_bytes

    labels = read_labels(Path(data_root) / "train_labels.csv")
    folders = training_folders(data_root, labels, max_tomograms)
    started = time.perf_counter()
    entries = build_cache(folders, cfg, cache_root, progress=progress)
    seconds = time.perf_counter() - started
    cache = cache_dir_for(cache_root, cfg)
    settings = json.loads((cache / MANIFEST_NAME).read_text()).get("settings", {})
    return CacheReport(cache, entries, seconds, cache_size_bytes(entries.values()), settings)


def describe_run(result: Any) -> str:
    """One paragraph about a :class:`~kernel_lib.train.TrainResult`."""
    from .config import PipelineConfig

    best = "n/a (no validation fold)" if result.best_f2 is None else f"{result.best_f2:.3f}"
    cfg = PipelineConfig.load(result.run_dir)
    files = sorted(p.name for p in Path(result.run_dir).iterdir() if p.is_file())
    lines = [
        f"run {result.run_dir}: {result.epochs_done} epoch(s), stopped by {result.stopped_by}",
        f"best validation F2 {best}; threshold {cfg.threshold}; "
        f"assumed test spacing {cfg.assumed_test_spacing:g} A",
    ]
    info = getattr(result, "verifier", None)
    if info:
        scored = (f"; validation F2 {info['val_f2']:.3f} with it, "
                  f"{info['val_f2_heatmap']:.3f} with the heatmap alone"
                  if "val_f2" in info else "")
        lines.append(f"verifier: {info['steps']} steps on {info['positives']} motor and "
                     f"{info['negatives']} look-alike examples{scored}")
    return "\n".join(lines + [f"files: {', '.join(files)}"])


def score_submission(submission: str | os.PathLike, answer_key: str | os.PathLike | None,
                     ) -> dict[str, float] | None:
    """Competition F2 and counts of a submission file against an answer key, or None.

    Args:
        submission: the written ``submission.csv``.
        answer_key: ``test_labels.csv`` (synthetic data) or ``train_labels.csv``; None or a
            missing file (the real test set has no answer key) gives None.
    """
    if answer_key is None or not Path(answer_key).is_file():
        return None
    from .labels import read_submission
    from .metric import confusion, fbeta, load_solution

    table = read_submission(submission)
    counts = confusion(load_solution(answer_key, table), table)
    return {"f2": fbeta(counts["tp"], counts["fp"], counts["fn"]),
            **{k: float(v) for k, v in counts.items()}}


def describe_submission(table: pl.DataFrame, path: str | os.PathLike,
                        answer_key: str | os.PathLike | None = None) -> str:
    """Rows, motors found, failures and (with an answer key) the F2 of a written submission."""
    n_pos = int((table["Motor axis 0"] >= 0).sum())
    failed = table.filter(pl.col("error").is_not_null()) if "error" in table.columns else table[:0]
    lines = [f"wrote {path}: {table.height} tomograms, {n_pos} with a motor, "
             f"{table.height - n_pos} without, {failed.height} failed"]
    for row in failed.head(5).iter_rows(named=True):
        lines.append(f"  failed {row['tomo_id']}: {row['error']}")
    scored = score_submission(path, answer_key)
    if scored is not None:
        lines.append(f"F2 against {answer_key}: {scored['f2']:.4f} (TP {scored['tp']:.0f}, "
                     f"FP {scored['fp']:.0f}, FN {scored['fn']:.0f})")
    elif answer_key is None:
        lines.append("no answer key here (the real test labels are hidden): not scored")
    return "\n".join(lines)


# ============================================================================ headless execution


def _source(cell: Any) -> str:
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _tags(cell: Any) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def parameters_cell_index(nb: Any) -> int | None:
    """Index of the cell tagged ``parameters``, or None."""
    for index, cell in enumerate(nb.cells):
        if PARAMETERS_TAG in _tags(cell):
            return index
    return None


def parameter_names(nb: Any) -> list[str]:
    """Names assigned in the ``parameters`` cell, in order."""
    index = parameters_cell_index(nb)
    if index is None:
        return []
    names: list[str] = []
    for node in ast.parse(_source(nb.cells[index])).body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        names += [t.id for t in targets if isinstance(t, ast.Name) and t.id not in names]
    return names


def python_literal(value: Any) -> str:
    """Python source for a parameter value (str, number, bool, None, path, list, tuple, dict)."""
    if isinstance(value, os.PathLike):
        return repr(os.fspath(value))
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    if isinstance(value, (list, tuple)):
        items = ", ".join(python_literal(v) for v in value)
        return f"[{items}]" if isinstance(value, list) else f"({items}{',' * (len(value) == 1)})"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{python_literal(k)}: {python_literal(v)}"
                               for k, v in value.items()) + "}"
    if value is None or isinstance(value, (str, int, float, bool)):
        return repr(value)
    raise NotebookError(f"parameter value {value!r} ({type(value).__name__}) cannot be written as "
                        f"a Python literal: pass a str, number, bool, None, path, list or dict")


def inject_parameters(nb: Any, parameters: Mapping[str, Any] | None, strict: bool = True) -> Any:
    """Insert (or replace) the ``injected-parameters`` cell after the ``parameters`` cell.

    Args:
        nb: an ``nbformat`` notebook (changed in place and returned).
        parameters: name -> value overrides; empty or None leaves the notebook as it is.
        strict: refuse names that the ``parameters`` cell does not define (typos).

    Raises:
        NotebookError: no ``parameters`` cell, an unknown name (strict) or a value with no
            literal form.
    """
    import nbformat

    if not parameters:
        return nb
    index = parameters_cell_index(nb)
    if index is None:
        raise NotebookError(f"the notebook has no cell tagged {PARAMETERS_TAG!r}: tag the cell "
                            f"that holds the defaults")
    known = parameter_names(nb)
    unknown = [name for name in parameters if name not in known]
    if strict and unknown:
        raise NotebookError(f"unknown parameter(s) {unknown}: this notebook's parameters are "
                            f"{known}")
    lines = ["# Parameters"] + [f"{name} = {python_literal(value)}"
                                for name, value in parameters.items()]
    cell = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": [INJECTED_TAG]})
    nb.cells = [c for c in nb.cells if INJECTED_TAG not in _tags(c)]
    index = parameters_cell_index(nb)
    nb.cells.insert(index + 1, cell)
    return nb


def _first_line(cell: Any) -> str:
    lines = [line for line in _source(cell).splitlines() if line.strip()]
    text = lines[0].strip() if lines else "(empty)"
    return text if len(text) <= 70 else text[:67] + "..."


def _error_output(cell: Any) -> tuple[str, str] | None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return output.get("ename", "Error"), output.get("evalue", "")
    return None


def _make_client(nb: Any, name: str, echo: str, **kwargs: Any) -> Any:
    """An ``nbclient.NotebookClient`` that echoes progress (and streams) to this terminal."""
    from nbclient import NotebookClient

    streams = {"all": ("stdout", "stderr"), "stderr": ("stderr",)}.get(echo, ())
    state = {"line_open": False}  # the last echoed text did not end a line (progress bars)

    class EchoingClient(NotebookClient):
        """Prints each code cell as it starts and, per ``echo``, its stream output."""

        current_cell: int | None = None

        def output(self, outs, msg, display_id, cell_index):  # noqa: ANN001, ANN201
            content = msg["content"]
            if msg["msg_type"] == "stream" and content.get("name") in streams:
                target = sys.stderr if content.get("name") == "stderr" else sys.stdout
                text = content.get("text", "")
                target.write(text)
                target.flush()
                state["line_open"] = bool(text) and not text.endswith("\n")
            return super().output(outs, msg, display_id, cell_index)

    def on_cell_start(cell: Any, cell_index: int) -> None:
        client.current_cell = cell_index
        if echo != "none" and cell.cell_type == "code":
            if state["line_open"]:
                print(file=sys.stderr, flush=True)
                state["line_open"] = False
            print(f"[{name}] cell {cell_index + 1}/{len(nb.cells)}: {_first_line(cell)}",
                  flush=True)

    client = EchoingClient(nb, on_cell_start=on_cell_start, **kwargs)
    return client


def _kernel_config(folder: str) -> Any:
    """Kernel over local sockets in ``folder`` (no TCP ports, no plain-text warning) on POSIX."""
    from traitlets.config import Config

    config = Config()
    if os.name == "posix":
        config.KernelManager.transport = "ipc"
        config.KernelManager.ip = os.path.join(folder, "kernel")
    return config


def execute_notebook(notebook: str | os.PathLike, output: str | os.PathLike | None = None,
                     parameters: Mapping[str, Any] | None = None, *,
                     cwd: str | os.PathLike | None = None,
                     timeout: int = DEFAULT_CELL_TIMEOUT, kernel_name: str = DEFAULT_KERNEL,
                     echo: str = "none", env: Mapping[str, str] | None = None) -> Any:
    """Run a notebook top to bottom in a fresh kernel, papermill style.

    The kernel is the ``python3`` kernelspec, which Jupyter starts with the interpreter running
    this function (``sys.executable``), so it imports the same ``kernel_lib``. Figures are
    captured inline; progress bars update at most every 5 s; OpenMP threads wait passively
    unless ``OMP_WAIT_POLICY`` is set.

    Args:
        notebook: the ``.ipynb`` to run (not modified).
        output: where to write the executed copy (also written when a cell fails).
        parameters: overrides injected after the ``parameters`` cell.
        cwd: the kernel's working folder (default: the notebook's folder).
        timeout: seconds one cell may run.
        kernel_name: Jupyter kernel to use.
        echo: ``"none"``; ``"cells"`` (each cell as it starts); ``"stderr"`` (also its stderr:
            progress bars, warnings); ``"all"`` (also its stdout).
        env: extra environment variables for the kernel.

    Returns:
        The executed notebook (``nbformat`` node).

    Raises:
        NotebookError: the notebook is missing, a parameter is bad, or a cell failed, timed out
            or killed the kernel; the message names the notebook, the cell and the error.
    """
    import nbformat
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    if echo not in ("none", "cells", "stderr", "all"):
        raise NotebookError(f"echo must be 'none', 'cells', 'stderr' or 'all' (got {echo!r})")
    path = Path(notebook)
    if not path.is_file():
        raise NotebookError(f"notebook {path} not found")
    name = path.name
    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, parameters)
    # PASSIVE: idle OpenMP threads sleep instead of spinning; on a CPU shared with other work,
    # spinning torch threads made training steps 5-20x slower (measured on 2 cores).
    kernel_env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "TQDM_MININTERVAL": "5",
                  "PYTHONWARNINGS": "ignore:IProgress:Warning",  # tqdm without ipywidgets
                  "MPLBACKEND": "module://matplotlib_inline.backend_inline", **(env or {})}
    workdir = Path(cwd) if cwd else path.parent.resolve()
    started = time.perf_counter()
    failure: str | None = None
    with tempfile.TemporaryDirectory(prefix="byu-kernel-") as sockets:
        client = _make_client(nb, name, echo, timeout=timeout, kernel_name=kernel_name,
                              coalesce_streams=True, config=_kernel_config(sockets),
                              resources={"metadata": {"path": str(workdir)}})
        try:
            client.execute(env=kernel_env)
        except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
            index = client.current_cell
            cell = nb.cells[index] if index is not None else None
            where = (f"cell {index + 1}/{len(nb.cells)} (`{_first_line(cell)}`)"
                     if cell is not None else "kernel start")
            if isinstance(exc, CellTimeoutError):
                what = (f"timed out after {timeout} s: raise the timeout or lower the notebook's "
                        f"sizes")
            elif isinstance(exc, DeadKernelError):
                what = "killed the kernel (out of memory?): lower the notebook's sizes"
            else:
                ename, evalue = _error_output(cell) or (getattr(exc, "ename", "Error"),
                                                        getattr(exc, "evalue", str(exc)))
                what = f"raised {ename}: {evalue}"
            failure = f"{name}: {where} {what}"
        finally:
            if output is not None:
                Path(output).parent.mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, str(output))
    if failure is not None:
        seen = f" (executed copy with the traceback: {output})" if output else ""
        raise NotebookError(failure + seen)
    nb.metadata["byu_run"] = {"seconds": round(time.perf_counter() - started, 1),
                              "parameters": {k: python_literal(v)
                                             for k, v in (parameters or {}).items()}}
    if output is not None:
        nbformat.write(nb, str(output))
    return nb


# ============================================================================ committed form


def notebook_problems(path: str | os.PathLike) -> list[str]:
    """What keeps a notebook from its committed form; empty when it is clean and thin."""
    import nbformat

    nb = nbformat.read(Path(path), as_version=4)
    problems = []
    if not nb.cells or nb.cells[0].cell_type != "markdown":
        problems.append("the first cell is not a markdown cell (goal, inputs, outputs, run time)")
    if parameters_cell_index(nb) is None:
        problems.append(f"no cell tagged {PARAMETERS_TAG!r}")
    for index, cell in enumerate(nb.cells):
        if INJECTED_TAG in _tags(cell):
            problems.append(f"cell {index} is an injected-parameters cell: remove it")
        if cell.cell_type != "code":
            continue
        if cell.get("outputs"):
            problems.append(f"cell {index} has outputs: strip them")
        if cell.get("execution_count") is not None:
            problems.append(f"cell {index} has an execution count: strip it")
        for line in _source(cell).splitlines():
            if line.lstrip().startswith(("def ", "class ", "async def ")):
                problems.append(f"cell {index} defines `{line.strip()}`: move it to kernel_lib")
    return problems


def strip_notebook(path: str | os.PathLike) -> bool:
    """Remove outputs, execution counts and run metadata in place; True if the file changed."""
    import nbformat

    path = Path(path)
    before = path.read_text()
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if INJECTED_TAG not in _tags(c)]
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    for key in ("byu_run", "widgets"):
        nb.metadata.pop(key, None)
    nbformat.validate(nb)
    after = nbformat.writes(nb) + "\n"
    if after != before:
        path.write_text(after)
    return after != before


# ============================================================================ command line


def parse_assignment(text: str) -> tuple[str, Any]:
    """``name=value`` with ``value`` a Python literal, or else a plain string."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip().isidentifier():
        raise NotebookError(f"parameter {text!r} must look like name=value")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return name.strip(), value


def main(argv: Sequence[str] | None = None) -> int:
    """``run``, ``check`` and ``strip`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m kernel_lib.notebooks",
                                     description="Run, check or strip the project's notebooks.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="execute a notebook headless with parameters")
    run.add_argument("notebook", type=Path)
    run.add_argument("output", type=Path, help="where to write the executed copy")
    run.add_argument("-p", "--parameter", action="append", default=[], metavar="NAME=VALUE",
                     help="override a parameter (value is a Python literal or a string)")
    run.add_argument("--timeout", type=int, default=DEFAULT_CELL_TIMEOUT,
                     help="seconds per cell")
    run.add_argument("--quiet", action="store_true", help="do not echo cells and output")
    check = sub.add_parser("check", help="fail if a notebook is not in its committed form")
    check.add_argument("notebooks", nargs="+", type=Path)
    strip = sub.add_parser("strip", help="remove outputs and execution counts in place")
    strip.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            parameters = dict(parse_assignment(p) for p in args.parameter)
            execute_notebook(args.notebook, args.output, parameters, timeout=args.timeout,
                             echo="none" if args.quiet else "all")
            print(f"wrote {args.output}")
            return 0
        if args.command == "check":
            bad = 0
            for path in args.notebooks:
                for problem in notebook_problems(path):
                    print(f"{path}: {problem}")
                    bad += 1
            return 1 if bad else 0
        for path in args.notebooks:
            print(f"{path}: {'stripped' if strip_notebook(path) else 'already clean'}")
        return 0
    except NotebookError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
