"""Synthetic tomograms in the exact on-disk format of the BYU flagellar-motor competition.

No real tomogram images ship with this project, so tests, notebooks and benchmarks run on data
made here. Each tomogram holds bacterial cells (double-membrane envelope, textured cytoplasm),
0..10 flagellar motors sitting on the envelope with a flagellum leaving them, and distractors (gold
beads, debris, storage granules, vesicles, loose filaments), rendered dark on light with z-blur,
noise, gain, offset and per-tomogram JPEG quality. Every appearance parameter is random within a
plausible range, so a model has to learn motors rather than this generator's quirks. Voxel
spacings, shapes (``size="real"``) and motor counts follow the real ``train_labels.csv``
(embedded below, see :data:`REAL_TOMOGRAMS`); physical sizes are in angstroms, so structures
shrink or grow in voxels with the spacing.

Layout written under ``OUT_DIR`` (as the competition's, plus scoring files and a marker)::

    train/<tomo_id>/slice_0000.jpg ...   8-bit grayscale JPEG slices along axis 0 (z)
    test/<tomo_id>/slice_0000.jpg ...    JPEG slices only: no voxel spacing anywhere
    train_labels.csv     row_id,tomo_id,Motor axis 0..2,Array shape (axis 0..2),Voxel spacing,
                         Number of motors (k rows for k motors; one -1.0 row for none)
    sample_submission.csv  tomo_id,Motor axis 0..2 (dummy 100s), one row per test tomogram
    test_labels.csv      tomo_id,Motor axis 0..2,Voxel spacing,Has motor,Array shape (axis 0..2):
                         the answer key, one row per test tomogram, Has motor written as 1/0
    synthetic.json       generator version, seed and arguments (marks a folder as synthetic)

Command line::

    python -m kernel_lib.synthetic data/synthetic --n-train 40 --n-test 30 --seed 0

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from kernel_lib.synthetic import generate_dataset
    >>> out = tempfile.mkdtemp()
    >>> summary = generate_dataset(out, n_train=2, n_test=1, seed=0, progress=False)
    >>> summary["n_train"], summary["n_test"]
    (2, 1)
    >>> sorted(p.name for p in Path(out).iterdir())[:3]
    ['sample_submission.csv', 'synthetic.json', 'test']
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import cv2
import numpy as np
import polars as pl
from tqdm.auto import tqdm

from kernel_lib._synthetic_render import render_scene
from kernel_lib.labels import (AXIS_COLUMNS, NO_MOTOR, SHAPE_COLUMNS, SOLUTION_COLUMNS,
                               SUBMISSION_COLUMNS, TRAIN_LABEL_COLUMNS)
from kernel_lib._synthetic_scene import JPEG_QUALITY, plan_scene, scene_around_motors

GENERATOR_VERSION = 1
MARKER_NAME = "synthetic.json"
SLICE_DIGITS = 4  # slice_0000.jpg; wider when a tomogram has more than 9999 slices

# --- calibration from the real train_labels.csv (648 tomograms) -------------------------------
# (z, y, x, voxel spacing in angstroms, number of tomograms); recompute with
# ``calibration_from_labels`` (tests/test_synthetic.py checks this copy against the real file).
REAL_TOMOGRAMS: tuple[tuple[int, int, int, float, int], ...] = (
    (300, 924, 956, 19.7, 1),
    (300, 928, 928, 13.1, 24),
    (300, 928, 928, 13.2, 1),
    (300, 928, 928, 15.6, 19),
    (300, 928, 928, 16.8, 12),
    (300, 956, 924, 16.1, 1),
    (300, 959, 928, 15.6, 70),
    (300, 960, 928, 13.1, 145),
    (300, 960, 928, 15.6, 80),
    (300, 960, 928, 16.1, 1),
    (300, 960, 928, 16.8, 67),
    (300, 960, 928, 19.2, 7),
    (400, 960, 928, 15.6, 1),
    (494, 1912, 1847, 6.5, 1),
    (500, 924, 956, 16.1, 16),
    (500, 924, 956, 19.7, 48),
    (500, 927, 959, 13.1, 1),
    (500, 928, 928, 16.8, 1),
    (500, 928, 928, 19.3, 1),
    (500, 928, 960, 13.1, 21),
    (500, 960, 928, 16.8, 5),
    (500, 1024, 1440, 13.3, 18),
    (500, 1912, 1847, 6.5, 2),
    (600, 928, 928, 19.3, 1),
    (600, 928, 960, 16.1, 1),
    (600, 960, 928, 15.6, 1),
    (800, 927, 959, 13.1, 10),
    (800, 928, 928, 13.1, 3),
    (800, 928, 928, 13.2, 1),
    (800, 928, 928, 19.3, 8),
    (800, 928, 960, 13.1, 59),
    (800, 928, 960, 16.1, 21),
)
# Number of motors a tomogram reports -> number of tomograms (44 % none, 48 % one, 8 % more).
MOTORS_PER_TOMOGRAM: dict[int, int] = {0: 286, 1: 313, 2: 30, 3: 6, 4: 9, 6: 3, 10: 1}
TEST_P_NO_MOTOR = 0.45  # the hidden test set: 0 or 1 motor per tomogram

# --- sizes -------------------------------------------------------------------------------------
# Shape ranges in voxels; small and medium also keep a minimum physical extent so a cell envelope
# and a whole motor (about 45 nm) fit at any voxel spacing.
SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "tiny": {"z": (40, 64), "yx": (128, 192)},  # smoke tests only: a motor may touch the edges
    "small": {"z": (64, 160), "yx": (256, 512)},
    "medium": {"z": (128, 320), "yx": (512, 1024)},
}
SIZE_NAMES = ("tiny", "small", "medium", "real")
MIN_THICKNESS_A = 1000.0  # z extent of small/medium tomograms, when the z range allows
MIN_WIDTH_A = 4000.0  # y and x extent of small/medium tomograms, when the range allows
YX_ASPECT_JITTER = 0.15  # x differs from y by up to this fraction

# --- CSV columns (the competition's names, defined once in kernel_lib.labels) -----------------
AXES = AXIS_COLUMNS
SHAPES = SHAPE_COLUMNS
TRAIN_COLUMNS = TRAIN_LABEL_COLUMNS
TEST_LABEL_COLUMNS = (*SOLUTION_COLUMNS, *SHAPE_COLUMNS)
DUMMY_SUBMISSION_VALUE = 100  # what the real sample_submission.csv holds


class SyntheticDataError(ValueError):
    """A request the generator cannot serve; the message says what to change."""


@dataclass(frozen=True)
class TomogramSpec:
    """What to generate for one tomogram (drawn up front, so ids and labels follow the seed).

    Attributes:
        tomo_id: e.g. ``tomo_3f9a1c``.
        split: ``"train"`` or ``"test"``.
        shape: (z, y, x) voxels.
        voxel_spacing: angstroms per voxel.
        n_motors: motors to place.
        seed: the tomogram's own random stream.
    """

    tomo_id: str
    split: str
    shape: tuple[int, int, int]
    voxel_spacing: float
    n_motors: int
    seed: np.random.SeedSequence


def calibration_from_labels(path: str | os.PathLike) -> tuple[tuple, dict[int, int]]:
    """Recompute :data:`REAL_TOMOGRAMS` and :data:`MOTORS_PER_TOMOGRAM` from a train_labels.csv.

    Args:
        path: the real competition ``train_labels.csv``.

    Returns:
        ``(tomograms, motors_per_tomogram)`` in the embedded tables' format.
    """
    per_tomo = (
        pl.read_csv(path)
        .group_by("tomo_id")
        .agg(
            pl.first(SHAPES[0]),
            pl.first(SHAPES[1]),
            pl.first(SHAPES[2]),
            pl.first("Voxel spacing"),
            pl.first("Number of motors"),
        )
    )
    shapes = per_tomo.group_by(*SHAPES, "Voxel spacing").len().sort(*SHAPES, "Voxel spacing")
    tomograms = tuple(
        (int(a), int(b), int(c), float(s), int(n)) for a, b, c, s, n in shapes.iter_rows()
    )
    counts = per_tomo.group_by("Number of motors").len().sort("Number of motors")
    return tomograms, {int(k): int(n) for k, n in counts.iter_rows()}


def real_spacings() -> list[float]:
    """The distinct voxel spacings of the real training tomograms, in angstroms."""
    return sorted({row[3] for row in REAL_TOMOGRAMS})


def _weights(counts: Iterable[int]) -> np.ndarray:
    w = np.asarray(list(counts), dtype=float)
    return w / w.sum()


def draw_spacing(rng: np.random.Generator) -> float:
    """A voxel spacing drawn from the real per-tomogram distribution."""
    row = REAL_TOMOGRAMS[rng.choice(len(REAL_TOMOGRAMS), p=_weights(r[4] for r in REAL_TOMOGRAMS))]
    return row[3]


def draw_shape_and_spacing(
    rng: np.random.Generator, size: str
) -> tuple[tuple[int, int, int], float]:
    """A tomogram shape and voxel spacing for ``size`` (one of :data:`SIZE_NAMES`)."""
    if size == "real":
        row = REAL_TOMOGRAMS[
            rng.choice(len(REAL_TOMOGRAMS), p=_weights(r[4] for r in REAL_TOMOGRAMS))
        ]
        return (row[0], row[1], row[2]), row[3]
    if size not in SIZES:
        raise SyntheticDataError(f"size {size!r} is unknown: use one of {', '.join(SIZE_NAMES)}")
    spacing = draw_spacing(rng)
    z_range, yx_range = SIZES[size]["z"], SIZES[size]["yx"]
    z = _at_least(rng, z_range, MIN_THICKNESS_A / spacing)
    y = _at_least(rng, yx_range, MIN_WIDTH_A / spacing)
    x = int(np.clip(round(y * (1 + rng.uniform(-YX_ASPECT_JITTER, YX_ASPECT_JITTER))), *yx_range))
    return (z, y, x), spacing


def _at_least(rng: np.random.Generator, bounds: tuple[int, int], minimum: float) -> int:
    """An integer drawn from ``bounds`` but not below ``minimum`` (itself clipped to the bounds)."""
    low = int(np.clip(math.ceil(minimum), bounds[0], bounds[1]))
    return int(rng.integers(low, bounds[1] + 1))


def draw_motor_count(rng: np.random.Generator, split: str) -> int:
    """Motors in one tomogram: the real distribution for train, 0 or 1 (45 % none) for test."""
    if split == "test":
        return int(rng.random() >= TEST_P_NO_MOTOR)
    counts = list(MOTORS_PER_TOMOGRAM)
    return int(counts[rng.choice(len(counts), p=_weights(MOTORS_PER_TOMOGRAM.values()))])


def draw_specs(n_train: int, n_test: int, seed: int, size: str) -> list[TomogramSpec]:
    """Ids, shapes, spacings and motor counts of every tomogram, from ``seed`` alone."""
    root = np.random.SeedSequence(seed)
    meta_seed, *tomo_seeds = root.spawn(1 + n_train + n_test)
    rng = np.random.default_rng(meta_seed)
    ids: set[str] = set()
    specs = []
    for i, child in enumerate(tomo_seeds):
        split = "train" if i < n_train else "test"
        tomo_id = f"tomo_{int(rng.integers(0, 16**6)):06x}"
        while tomo_id in ids:
            tomo_id = f"tomo_{int(rng.integers(0, 16**6)):06x}"
        ids.add(tomo_id)
        shape, spacing = draw_shape_and_spacing(rng, size)
        specs.append(
            TomogramSpec(tomo_id, split, shape, spacing, draw_motor_count(rng, split), child)
        )
    return specs


def render_tomogram(
    shape: Sequence[int],
    voxel_spacing: float,
    motors: Sequence[Sequence[float]],
    rng: np.random.Generator,
    fast: bool = False,
) -> np.ndarray:
    """Render one tomogram with motors centred at the given voxel positions.

    Each motor gets a cell envelope through it (motors close to the same envelope share a cell),
    a flagellum, and the usual distractors and imaging noise around them.

    Args:
        shape: (z, y, x) voxels.
        voxel_spacing: angstroms per voxel; every structure has a physical size.
        motors: (z, y, x) voxel centres of the motors, possibly empty.
        rng: random generator (the result is a function of its state).
        fast: a quick mode for throughput benchmarks at real size (coarse structures, cheap
            blur, pooled noise): about a second for 300 x 928 x 960.

    Returns:
        uint8 volume (z, y, x); dense matter is dark.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> volume = render_tomogram((64, 256, 256), 15.6, [(32, 128, 128)], rng)
        >>> volume.shape, volume.dtype.name
        ((64, 256, 256), 'uint8')
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise SyntheticDataError(f"shape must be three positive sizes (z, y, x), got {shape}")
    if voxel_spacing <= 0:
        raise SyntheticDataError(f"voxel spacing must be positive, got {voxel_spacing}")
    for m in motors:
        if len(m) != 3 or not all(0 <= c <= s - 1 for c, s in zip(m, shape)):
            raise SyntheticDataError(f"motor {tuple(m)} is not a (z, y, x) point inside {shape}")
    scene = scene_around_motors(
        shape, voxel_spacing, [tuple(map(float, m)) for m in motors], rng, fast
    )
    return render_scene(scene, rng, fast=fast)


def write_tomogram(
    volume: np.ndarray, folder: str | os.PathLike, rng_or_quality: np.random.Generator | int
) -> int:
    """Write a uint8 (z, y, x) volume as ``slice_0000.jpg ...`` grayscale JPEGs.

    Args:
        volume: uint8 array (z, y, x).
        folder: created if needed; existing slice files are overwritten.
        rng_or_quality: a JPEG quality (1-100) or a generator to draw one from
            :data:`~kernel_lib._synthetic_scene.JPEG_QUALITY` (real-looking artefacts).

    Returns:
        The JPEG quality used.
    """
    if volume.ndim != 3 or volume.dtype != np.uint8:
        raise SyntheticDataError(
            f"expected a uint8 (z, y, x) volume, got {volume.dtype} {volume.shape}"
        )
    if isinstance(rng_or_quality, np.random.Generator):
        quality = int(rng_or_quality.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1))
    else:
        quality = int(rng_or_quality)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = max(SLICE_DIGITS, len(str(volume.shape[0] - 1)))
    params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    for z, plane in enumerate(volume):
        path = folder / f"slice_{z:0{digits}d}.jpg"
        if not cv2.imwrite(str(path), np.ascontiguousarray(plane), params):
            raise OSError(f"could not write {path}: check the folder is writable and has space")
    return quality


def make_tomogram(
    spec: TomogramSpec, out_dir: str | os.PathLike, fast: bool = False
) -> list[tuple]:
    """Plan, render and write one tomogram; returns its motor centres (z, y, x) in voxels."""
    rng = np.random.default_rng(spec.seed)
    scene = plan_scene(spec.shape, spec.voxel_spacing, spec.n_motors, rng, fast=fast)
    volume = render_scene(scene, rng, fast=fast)
    write_tomogram(volume, Path(out_dir) / spec.split / spec.tomo_id, rng)
    return [tuple(float(c) for c in m.centre) for m in scene.motors]


def _make_one(args: tuple[TomogramSpec, str, bool]) -> list[tuple]:
    return make_tomogram(*args)


def train_labels_frame(
    specs: Sequence[TomogramSpec], motors: Sequence[list[tuple]]
) -> pl.DataFrame:
    """``train_labels.csv`` rows: k rows for k motors, one ``-1.0`` row for none, by tomo_id."""
    rows = []
    for spec, centres in sorted(zip(specs, motors), key=lambda pair: pair[0].tomo_id):
        for centre in centres or [(NO_MOTOR,) * 3]:
            rows.append(
                (spec.tomo_id, *map(float, centre), *spec.shape, spec.voxel_spacing, len(centres))
            )
    frame = pl.DataFrame(
        rows,
        schema=[
            ("tomo_id", pl.String),
            *((a, pl.Float64) for a in AXES),
            *((s, pl.Int64) for s in SHAPES),
            ("Voxel spacing", pl.Float64),
            ("Number of motors", pl.Int64),
        ],
        orient="row",
    )
    return (
        frame.with_row_index("row_id")
        .with_columns(pl.col("row_id").cast(pl.Int64))
        .select(TRAIN_COLUMNS)
    )


def answer_key_frame(specs: Sequence[TomogramSpec], motors: Sequence[list[tuple]]) -> pl.DataFrame:
    """``test_labels.csv`` rows (the answer key): one per tomogram, ``Has motor`` as 1/0."""
    rows = []
    for spec, centres in sorted(zip(specs, motors), key=lambda pair: pair[0].tomo_id):
        centre = centres[0] if centres else (NO_MOTOR,) * 3
        rows.append(
            (spec.tomo_id, *map(float, centre), spec.voxel_spacing, int(bool(centres)), *spec.shape)
        )
    return pl.DataFrame(
        rows,
        schema=[
            ("tomo_id", pl.String),
            *((a, pl.Float64) for a in AXES),
            ("Voxel spacing", pl.Float64),
            ("Has motor", pl.Int64),
            *((s, pl.Int64) for s in SHAPES),
        ],
        orient="row",
    )


def sample_submission_frame(specs: Sequence[TomogramSpec]) -> pl.DataFrame:
    """``sample_submission.csv``: every test tomogram with dummy coordinates, like the real one."""
    ids = sorted(s.tomo_id for s in specs)
    return pl.DataFrame({"tomo_id": ids, **{a: [DUMMY_SUBMISSION_VALUE] * len(ids) for a in AXES}})


def prepare_out_dir(out_dir: Path) -> None:
    """Make ``out_dir`` ready: create it, or clear a previous synthetic set in it.

    Raises:
        SyntheticDataError: it is a file, or a non-empty folder without a ``synthetic.json``.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise SyntheticDataError(f"{out_dir} is a file: give a folder path for the synthetic data")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / MARKER_NAME).is_file():
            raise SyntheticDataError(
                f"{out_dir} is not empty and holds no {MARKER_NAME}, so it is not a previous "
                f"synthetic set: choose a new or empty folder (nothing was written)"
            )
        for name in ("train", "test"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _check_request(n_train: int, n_test: int, seed: int, size: str, workers: int | None) -> None:
    if n_train < 0 or n_test < 0:
        raise SyntheticDataError(
            f"tomogram counts must be >= 0, got n_train={n_train}, n_test={n_test}"
        )
    if n_train + n_test == 0:
        raise SyntheticDataError("nothing to generate: ask for at least one train or test tomogram")
    if seed < 0:
        raise SyntheticDataError(f"seed must be >= 0, got {seed}")
    if size not in SIZE_NAMES:
        raise SyntheticDataError(f"size {size!r} is unknown: use one of {', '.join(SIZE_NAMES)}")
    if workers is not None and workers < 1:
        raise SyntheticDataError(f"workers must be >= 1, got {workers}")


def _single_threaded() -> None:
    """Pool initializer: one OpenCV thread per process (the pool already uses every core)."""
    cv2.setNumThreads(1)


def _render_all(
    specs: list[TomogramSpec], out_dir: Path, fast: bool, workers: int, progress: bool
) -> list:
    """Render and write every tomogram (in a process pool when ``workers > 1``), in spec order."""
    jobs = [(spec, str(out_dir), fast) for spec in specs]
    bar = tqdm(total=len(jobs), desc="synthetic tomograms", unit="tomo", disable=not progress)
    try:
        if workers == 1:
            results = []
            for job in jobs:
                results.append(_make_one(job))
                bar.update()
            return results
        # "spawn", not fork: a parent that already runs threads (torch, OpenMP, a notebook
        # kernel) can hand a forked child a lock that nobody will ever release.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_single_threaded) as pool:
            futures = [pool.submit(_make_one, job) for job in jobs]
            for _ in as_completed(futures):
                bar.update()
            return [f.result() for f in futures]
    finally:
        bar.close()


def generate_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 8,
    n_test: int = 4,
    seed: int = 0,
    size: str = "small",
    fast: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a synthetic BYU-format data set (layout in the module docstring).

    The same arguments give the same CSV bytes and the same slice pixels, whatever ``workers``.

    Args:
        out_dir: target folder: new, empty, or a previous synthetic set (replaced).
        n_train: tomograms under ``train/`` (motor counts as in the real train set).
        n_test: tomograms under ``test/`` (0 or 1 motor, about 45 % none).
        seed: the one seed everything is drawn from.
        size: ``small`` (z 64-160, y/x 256-512), ``medium`` (about 2x), ``real`` (real shapes)
            or ``tiny`` (z 40-64, y/x 128-192; for smoke tests).
        fast: quick rendering for throughput benchmarks (see :func:`render_tomogram`).
        workers: processes to render with (default: CPU count, at most the tomogram count).
        progress: show a progress bar.

    Returns:
        A summary: counts, shapes, spacings, motors, seconds taken and the written paths.

    Raises:
        SyntheticDataError: a bad count, seed, size or worker number, or an ``out_dir`` that is
            a file or a non-empty folder that is not a previous synthetic set.
    """
    _check_request(n_train, n_test, seed, size, workers)
    out_dir = Path(out_dir)
    prepare_out_dir(out_dir)
    start = time.perf_counter()
    specs = draw_specs(n_train, n_test, seed, size)
    workers = workers or min(os.cpu_count() or 1, len(specs))
    motors = _render_all(specs, out_dir, fast, min(workers, len(specs)), progress)
    train = [(s, m) for s, m in zip(specs, motors) if s.split == "train"]
    test = [(s, m) for s, m in zip(specs, motors) if s.split == "test"]
    train_labels_frame(*_unzip(train)).write_csv(out_dir / "train_labels.csv")
    answer_key_frame(*_unzip(test)).write_csv(out_dir / "test_labels.csv")
    sample_submission_frame([s for s, _ in test]).write_csv(out_dir / "sample_submission.csv")
    arguments = {"n_train": n_train, "n_test": n_test, "seed": seed, "size": size, "fast": fast}
    marker = {"generator": "kernel_lib.synthetic", "version": GENERATOR_VERSION, **arguments}
    (out_dir / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    return _summary(out_dir, specs, motors, time.perf_counter() - start)


def _unzip(pairs: list[tuple]) -> tuple[list, list]:
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _summary(
    out_dir: Path, specs: list[TomogramSpec], motors: list[list], seconds: float
) -> dict[str, Any]:
    train = [(s, m) for s, m in zip(specs, motors) if s.split == "train"]
    test = [(s, m) for s, m in zip(specs, motors) if s.split == "test"]
    return {
        "out_dir": str(out_dir),
        "n_train": len(train),
        "n_test": len(test),
        "train_motors": sum(len(m) for _, m in train),
        "train_without_motor": sum(not m for _, m in train),
        "test_with_motor": sum(bool(m) for _, m in test),
        "shapes": sorted({s.shape for s in specs}),
        "voxel_spacings": sorted({s.voxel_spacing for s in specs}),
        "seconds": round(seconds, 2),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A few readable lines about a generated set."""
    shapes = summary["shapes"]
    z = [s[0] for s in shapes]
    yx = [v for s in shapes for v in s[1:]]
    return "\n".join(
        [
            f"wrote {summary['n_train']} train + {summary['n_test']} test tomograms to "
            f"{summary['out_dir']} in {summary['seconds']:.1f} s",
            f"  shapes: z {min(z)}-{max(z)}, y/x {min(yx)}-{max(yx)} ({len(shapes)} distinct)",
            f"  voxel spacings (A): {', '.join(f'{v:g}' for v in summary['voxel_spacings'])}",
            f"  train: {summary['train_motors']} motors, "
            f"{summary['train_without_motor']} tomograms without; "
            f"test: {summary['test_with_motor']} of {summary['n_test']} with a motor",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface of ``python -m kernel_lib.synthetic``."""
    parser = argparse.ArgumentParser(
        prog="python -m kernel_lib.synthetic",
        description="Write synthetic cryo-ET tomograms in the BYU competition's format.",
    )
    parser.add_argument("out_dir", type=Path, help="new/empty folder, or a previous synthetic set")
    parser.add_argument("--n-train", type=int, default=8, help="train tomograms (default 8)")
    parser.add_argument("--n-test", type=int, default=4, help="test tomograms (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--size",
        choices=SIZE_NAMES,
        default="small",
        help="small (z 64-160, y/x 256-512), medium (about 2x), real shapes, or tiny "
        "(z 40-64, y/x 128-192, smoke tests)",
    )
    parser.add_argument("--fast", action="store_true", help="quick rendering for benchmarks")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: CPUs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; bad arguments exit with status 2 and one message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = generate_dataset(
            args.out_dir,
            args.n_train,
            args.n_test,
            args.seed,
            args.size,
            args.fast,
            args.workers,
            progress=not args.quiet,
        )
    except SyntheticDataError as exc:
        parser.error(str(exc))
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
