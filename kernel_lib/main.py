"""The main job: synthetic data -> notebooks 01 to 04 headless -> a scored ``submission.csv``.

``python -m kernel_lib.main`` (what ``make run`` runs):

1. generates a small synthetic data set in the competition's layout under
   ``WORKDIR/data/synthetic/`` (reused when it was already generated with the same sizes and
   seed; other sizes get their own folder);
2. executes ``notebooks/01_eda`` -> ``02_preprocess`` -> ``03_train`` -> ``04_submission`` in
   order, each in a fresh Jupyter kernel, with parameters pointing at that data and at a new run
   folder ``WORKDIR/runs/<timestamp>/``;
3. saves the executed notebooks under ``runs/<timestamp>/notebooks/``, the trained run under
   ``runs/<timestamp>/model/`` and the submission as ``runs/<timestamp>/submission.csv``, and
   prints the F2 of that submission against the synthetic answer key (``test_labels.csv``).

The defaults take 6-7 minutes on a 2-core CPU, the first time included (about a minute of data
generation; training is capped by ``--max-minutes``); ``--quick`` runs everything tiny in about
a minute (a smoke test, F2 meaningless).

Example:
    >>> build_parser().parse_args(["--quick"]).quick
    True
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from . import notebooks as nb

NOTEBOOK_DIR = "notebooks"


@dataclass
class Budget:
    """Data sizes and the training budget of one main run."""

    n_train: int
    n_test: int
    epochs: int
    steps_per_epoch: int
    batch_size: int
    crop: int
    max_minutes: float
    n_folds: int
    target_spacing: float
    z_stride: int
    pos_weight: float
    verifier_steps: int


# 32 A per model voxel and every 6th slice (the library defaults) keep CPU training and
# inference of small synthetic tomograms to seconds. A BCE positive weight of 2 instead of 10
# keeps the peak scores of a few hundred steps from saturating near 1, so the threshold can
# separate tomograms.
DEFAULT = Budget(n_train=nb.LOCAL_SYNTHETIC["n_train"], n_test=nb.LOCAL_SYNTHETIC["n_test"],
                 epochs=6, steps_per_epoch=150, batch_size=8, crop=96, max_minutes=6.0,
                 n_folds=5, target_spacing=32.0, z_stride=6, pos_weight=2.0,
                 verifier_steps=400)
QUICK = Budget(n_train=6, n_test=2, epochs=1, steps_per_epoch=2, batch_size=2, crop=64,
               max_minutes=1.0, n_folds=2, target_spacing=32.0, z_stride=6, pos_weight=2.0,
               verifier_steps=3)
SIZE = nb.LOCAL_SYNTHETIC["size"]


class MainError(RuntimeError):
    """The main job cannot start or finish; the message says what to do."""


def build_parser() -> argparse.ArgumentParser:
    """Command-line flags (every default fits the ten-minute target on a 2-core CPU)."""
    parser = argparse.ArgumentParser(
        prog="python -m kernel_lib.main",
        description="Generate synthetic data, run notebooks 01-04 headless and score the "
                    "submission.")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="folder for data/ and runs/ (default: the project root)")
    parser.add_argument("--n-train", type=int, default=None,
                        help=f"synthetic training tomograms (default {DEFAULT.n_train})")
    parser.add_argument("--n-test", type=int, default=None,
                        help=f"synthetic test tomograms (default {DEFAULT.n_test})")
    parser.add_argument("--seed", type=int, default=nb.LOCAL_SYNTHETIC["seed"],
                        help="seed of the synthetic data and of training (default 0)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default {DEFAULT.epochs})")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help=f"optimiser steps per epoch (default {DEFAULT.steps_per_epoch})")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help=f"training wall-time cap in minutes (default {DEFAULT.max_minutes:g}; "
                             f"0: no cap)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny everything: a smoke test in about a minute")
    parser.add_argument("--cell-timeout", type=int, default=1800,
                        help="seconds any one notebook cell may run (default 1800)")
    parser.add_argument("--quiet", action="store_true",
                        help="print only the cells as they start, not progress bars")
    return parser


def resolve_budget(args: argparse.Namespace) -> Budget:
    """The budget from ``--quick`` or the defaults, with explicit flags on top."""
    base = QUICK if args.quick else DEFAULT
    budget = Budget(**asdict(base))
    for name in ("n_train", "n_test", "epochs", "steps_per_epoch", "max_minutes"):
        value = getattr(args, name)
        if value is not None:
            setattr(budget, name, value)
    return budget


def check_args(args: argparse.Namespace, budget: Budget) -> str | None:
    """The first problem with the flags, or None."""
    if budget.n_train < 2:
        return f"--n-train must be >= 2 (one to train on, one to validate), got {budget.n_train}"
    if budget.n_train < budget.n_folds:
        return (f"--n-train {budget.n_train} is smaller than the {budget.n_folds} folds: use at "
                f"least {budget.n_folds}")
    if budget.n_test < 1:
        return f"--n-test must be >= 1, got {budget.n_test}"
    if args.seed < 0:
        return f"--seed must be >= 0, got {args.seed}"
    if budget.epochs < 1 or budget.steps_per_epoch < 1:
        return "--epochs and --steps-per-epoch must be >= 1"
    if budget.max_minutes < 0:
        return f"--max-minutes must be >= 0, got {budget.max_minutes:g}"
    if args.cell_timeout < 10:
        return f"--cell-timeout must be >= 10 seconds, got {args.cell_timeout}"
    if args.workdir is not None and args.workdir.exists() and not args.workdir.is_dir():
        return f"--workdir {args.workdir} is a file: give a folder"
    return None


def synthetic_dir(workdir: Path, n_train: int, n_test: int, seed: int) -> Path:
    """``data/synthetic`` for the default set (the notebooks' own default), else a named one."""
    if (n_train, n_test, seed) == (DEFAULT.n_train, DEFAULT.n_test, nb.LOCAL_SYNTHETIC["seed"]):
        return workdir / nb.LOCAL_DATA
    return workdir / "data" / f"synthetic-{n_train}x{n_test}-seed{seed}"


def ensure_synthetic(folder: Path, n_train: int, n_test: int, seed: int,
                     progress: bool = True) -> bool:
    """Generate the synthetic set in ``folder`` unless it already holds this exact set.

    Returns:
        True when an existing set was reused.

    Raises:
        MainError: the folder holds something else, or generation failed.
    """
    from .synthetic import MARKER_NAME, SyntheticDataError, format_summary, generate_dataset

    wanted = {"n_train": n_train, "n_test": n_test, "seed": seed, "size": SIZE, "fast": False}
    marker = folder / MARKER_NAME
    if marker.is_file() and (folder / "test_labels.csv").is_file():
        try:
            found = json.loads(marker.read_text())
        except json.JSONDecodeError:
            found = {}
        if all(found.get(k) == v for k, v in wanted.items()):
            print(f"reusing the synthetic set in {folder} ({n_train} train + {n_test} test, "
                  f"seed {seed})", flush=True)
            return True
    print(f"generating {n_train} train + {n_test} test synthetic tomograms in {folder}",
          flush=True)
    try:
        summary = generate_dataset(folder, n_train, n_test, seed, SIZE, progress=progress)
    except SyntheticDataError as exc:
        raise MainError(str(exc)) from None
    print(format_summary(summary), flush=True)
    return False


def notebook_parameters(data_root: Path, run_root: Path, cache_dir: Path, budget: Budget,
                        seed: int) -> dict[str, dict[str, Any]]:
    """The parameters injected into each notebook."""
    model_dir = run_root / "model"
    return {
        "01_eda.ipynb": {"data_root": data_root},
        "02_preprocess.ipynb": {"data_root": data_root, "cache_dir": cache_dir,
                                "target_spacing": budget.target_spacing},
        "03_train.ipynb": {
            "data_root": data_root, "cache_dir": cache_dir, "run_dir": model_dir, "fold": 0,
            "n_folds": budget.n_folds, "epochs": budget.epochs,
            "steps_per_epoch": budget.steps_per_epoch, "batch_size": budget.batch_size,
            "crop": budget.crop, "max_minutes": budget.max_minutes, "seed": seed,
            "target_spacing": budget.target_spacing, "z_stride": budget.z_stride,
            "verifier_steps": budget.verifier_steps,
            "train_options": {"pos_weight": budget.pos_weight}},
        "04_submission.ipynb": {"data_root": data_root, "weights": [model_dir],
                                "out": run_root / "submission.csv"},
    }


def run(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    """Everything after the flags are checked; returns the run summary."""
    root = nb.project_root()
    notebook_dir = root / NOTEBOOK_DIR
    missing = [n for n in nb.NOTEBOOKS if not (notebook_dir / n).is_file()]
    if missing:
        raise MainError(f"{notebook_dir} lacks {missing}: run from a checkout of the project "
                        f"(the notebooks are not part of the installed package)")
    workdir = (args.workdir or root).resolve()
    started = time.perf_counter()
    data_root = synthetic_dir(workdir, budget.n_train, budget.n_test, args.seed)
    reused = ensure_synthetic(data_root, budget.n_train, budget.n_test, args.seed,
                              progress=not args.quiet)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    run_root = workdir / nb.LOCAL_RUNS / stamp
    out_dir = run_root / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir = nb.default_cache_dir(data_root, on_kaggle=False)
    parameters = notebook_parameters(data_root, run_root, cache_dir, budget, args.seed)
    timings: dict[str, float] = {}
    for name in nb.NOTEBOOKS:
        print(f"\n=== {name} -> {out_dir / name}", flush=True)
        t0 = time.perf_counter()
        nb.execute_notebook(notebook_dir / name, out_dir / name, parameters[name], cwd=run_root,
                            timeout=args.cell_timeout, echo="cells" if args.quiet else "stderr")
        timings[name] = round(time.perf_counter() - t0, 1)
        print(f"=== {name} done in {timings[name]:.0f} s", flush=True)
    submission = run_root / "submission.csv"
    scored = nb.score_submission(submission, data_root / "test_labels.csv")
    summary = {
        "run_root": str(run_root), "notebooks": str(out_dir), "submission": str(submission),
        "data_root": str(data_root), "data_reused": reused, "budget": asdict(budget),
        "seed": args.seed, "seconds": round(time.perf_counter() - started, 1),
        "notebook_seconds": timings, "score": scored,
    }
    (run_root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def report(summary: dict[str, Any]) -> str:
    """The lines printed at the end of a run."""
    scored = summary["score"] or {}
    f2 = f"{scored['f2']:.4f}" if scored else "n/a"
    counts = (f" (TP {scored['tp']:.0f}, FP {scored['fp']:.0f}, FN {scored['fn']:.0f}, "
              f"TN {scored['tn']:.0f})") if scored else ""
    return "\n".join([
        "",
        f"executed notebooks: {summary['notebooks']}",
        f"submission:         {summary['submission']}",
        f"F2 against {Path(summary['data_root']) / 'test_labels.csv'}: {f2}{counts}",
        f"total time:         {summary['seconds'] / 60:.1f} min "
        f"({', '.join(f'{k[:2]} {v:.0f} s' for k, v in summary['notebook_seconds'].items())})",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the main job; exit status 0 on success, 1 when a step failed, 2 for bad flags."""
    parser = build_parser()
    args = parser.parse_args(argv)
    budget = resolve_budget(args)
    problem = check_args(args, budget)
    if problem:
        parser.error(problem)
    try:
        summary = run(args, budget)
    except (MainError, nb.NotebookError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
