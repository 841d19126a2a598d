"""The competition metric: F-beta over tomograms with a distance gate, exactly as specified.

Rules (``docs/design.md``, "The metric"):

- solution and submission rows are matched by ``tomo_id``; the two id sets must be equal;
- a submitted row means "no motor" when any of its three coordinates equals -1;
- truth has a motor and so does the prediction: a Euclidean distance in voxel index space of at
  most ``min_radius / voxel_spacing`` is a true positive, a larger one a false negative only;
- truth none, prediction one: false positive; truth one, prediction none: false negative;
- F-beta = (1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP), and 0 when the denominator is 0.

Command line: ``python -m kernel_lib.metric SOLUTION.csv SUBMISSION.csv [--min-radius 1000]
[--beta 2]``, where SOLUTION.csv is a ``test_labels.csv``-style file or a ``train_labels.csv``
(then each tomogram's truth is its motor nearest to the submitted point).

Example:
    >>> import polars as pl
    >>> from kernel_lib.metric import confusion, score
    >>> axes = ["Motor axis 0", "Motor axis 1", "Motor axis 2"]
    >>> solution = pl.DataFrame({
    ...     "tomo_id": ["a", "b", "c", "d"],
    ...     **{axis: [-1.0, 250.0, 100.0, 200.0] for axis in axes},
    ...     "Voxel spacing": [10.0] * 4,
    ...     "Has motor": [False, True, True, True],
    ... })
    >>> submission = pl.DataFrame({
    ...     "tomo_id": ["a", "b", "c", "d"],
    ...     **{axis: [100.0, 251.0, 600.0, -1.0] for axis in axes},
    ... })
    >>> score(solution, submission)
    0.35714285714285715
    >>> {k: confusion(solution, submission)[k] for k in ("tp", "fp", "fn", "tn")}
    {'tp': 1, 'fp': 1, 'fn': 2, 'tn': 0}
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from kernel_lib import labels as lb
from kernel_lib.labels import (AXIS_COLUMNS, COORD_COLUMNS, HAS_MOTOR, SOLUTION_COLUMNS,
                               SUBMISSION_COLUMNS, TOMO_ID, VOXEL_SPACING, LabelError)

MIN_RADIUS_ANGSTROM = 1000.0
BETA = 2.0
NO_MOTOR = lb.NO_MOTOR
MAX_LISTED = lb.MAX_LISTED
EXIT_OK = 0
EXIT_USAGE = 2

OUTCOME_COLUMNS = ("tomo_id", "truth_has_motor", "pred_has_motor", "distance", "radius",
                   "outcome")
TP, FP, FN, TN = "tp", "fp", "fn", "tn"

_PRED = ("_pred_z", "_pred_y", "_pred_x")


class MetricError(ValueError):
    """A solution/submission pair that cannot be scored; the message says what to fix."""


# --- input checks ---------------------------------------------------------------------------

def _listed(values: Sequence[Any]) -> str:
    shown = ", ".join(str(v) for v in values[:MAX_LISTED])
    more = len(values) - MAX_LISTED
    return shown + (f", ... ({more} more)" if more > 0 else "")


def _check_columns(frame: pl.DataFrame, required: Sequence[str], name: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise MetricError(f"{name} lacks columns {missing} (needs {list(required)}, has "
                          f"{frame.columns})")


def _check_unique(frame: pl.DataFrame, name: str) -> None:
    ids = frame[TOMO_ID]
    if ids.null_count():
        raise MetricError(f"{name} has {ids.null_count()} rows without a {TOMO_ID}")
    repeated = frame.filter(ids.is_duplicated())[TOMO_ID].unique().sort().to_list()
    if repeated:
        raise MetricError(f"{name} has {len(repeated)} {TOMO_ID}s on more than one row "
                          f"({_listed(repeated)}): keep one row per tomogram")


def _check_same_ids(solution: pl.DataFrame, submission: pl.DataFrame) -> None:
    truth_ids = set(solution[TOMO_ID].to_list())
    sub_ids = set(submission[TOMO_ID].to_list())
    missing = sorted(truth_ids - sub_ids)
    extra = sorted(sub_ids - truth_ids)
    if missing or extra:
        raise MetricError(
            f"submission and solution tomo_ids differ: {len(missing)} missing from the "
            f"submission ({_listed(missing) or 'none'}), {len(extra)} extra in the submission "
            f"({_listed(extra) or 'none'}); submit exactly one row per solution tomogram")


def _as_floats(frame: pl.DataFrame, columns: Sequence[str], name: str) -> pl.DataFrame:
    """Cast columns to Float64, failing clearly on text."""
    try:
        return frame.with_columns(pl.col(c).cast(pl.Float64) for c in columns)
    except pl.exceptions.PolarsError:
        kinds = {c: str(frame.schema[c]) for c in columns}
        raise MetricError(f"{name} columns {kinds} must be numeric") from None


def _check_finite(frame: pl.DataFrame, columns: Sequence[str], name: str) -> None:
    for column in columns:
        bad = frame.filter(~pl.col(column).is_finite() | pl.col(column).is_null())
        if bad.height:
            raise MetricError(f"{name} column {column!r} has {bad.height} missing or non-finite "
                              f"values (first: {bad[TOMO_ID][0]}); use -1 in all three axes "
                              f"for 'no motor'")


def _truth_flags(solution: pl.DataFrame) -> pl.Series:
    """``Has motor`` as Boolean, from a Boolean or 0/1 column."""
    flags = solution[HAS_MOTOR]
    if flags.dtype == pl.Boolean and not flags.null_count():
        return flags
    if flags.dtype.is_numeric() and set(flags.unique().to_list()) <= {0, 1}:
        return flags == 1
    raise MetricError(f"solution column {HAS_MOTOR!r} must be Boolean or 0/1 without gaps "
                      f"(got {flags.dtype} with values {_listed(flags.unique().sort().to_list())})")


def _aligned(solution: pl.DataFrame, submission: pl.DataFrame) -> pl.DataFrame:
    """Validate both frames and join them on tomo_id (sorted by tomo_id)."""
    _check_columns(solution, SOLUTION_COLUMNS, "solution")
    _check_columns(submission, SUBMISSION_COLUMNS, "submission")
    _check_unique(solution, "solution")
    _check_unique(submission, "submission")
    _check_same_ids(solution, submission)
    truth = _as_floats(solution.select(TOMO_ID, *AXIS_COLUMNS, VOXEL_SPACING),
                       (*AXIS_COLUMNS, VOXEL_SPACING), "solution")
    truth = truth.with_columns(_truth_flags(solution).alias(HAS_MOTOR))
    _check_finite(truth, [VOXEL_SPACING], "solution")
    bad_spacing = truth.filter(pl.col(VOXEL_SPACING) <= 0)
    if bad_spacing.height:
        raise MetricError(f"solution has non-positive {VOXEL_SPACING!r} for "
                          f"{_listed(bad_spacing[TOMO_ID].to_list())}")
    _check_finite(truth.filter(pl.col(HAS_MOTOR)), AXIS_COLUMNS, "solution (rows with a motor)")
    pred = _as_floats(submission.select(SUBMISSION_COLUMNS), AXIS_COLUMNS, "submission")
    _check_finite(pred, AXIS_COLUMNS, "submission")
    pred = pred.rename(dict(zip(AXIS_COLUMNS, _PRED)))
    return truth.join(pred, on=TOMO_ID, how="inner").sort(TOMO_ID)


# --- the metric -------------------------------------------------------------------------------

def tomogram_outcomes(solution: pl.DataFrame, submission: pl.DataFrame,
                      min_radius: float = MIN_RADIUS_ANGSTROM) -> pl.DataFrame:
    """Classify every tomogram as tp, fp, fn or tn (the one implementation behind the scores).

    Args:
        solution: ``tomo_id``, ``Motor axis 0..2``, ``Voxel spacing``, ``Has motor`` (Boolean or
            0/1); one row per tomogram.
        submission: ``tomo_id`` and ``Motor axis 0..2``; one row per tomogram, -1 in any axis
            meaning "no motor".
        min_radius: the match radius in angstroms; divided by each tomogram's voxel spacing.

    Returns:
        One row per tomogram sorted by ``tomo_id``: ``tomo_id``, ``truth_has_motor``,
        ``pred_has_motor`` (Boolean), ``distance`` (Float64 voxels, null unless both have a
        motor), ``radius`` (Float64 voxels), ``outcome`` (``"tp"``, ``"fp"``, ``"fn"``, ``"tn"``).

    Raises:
        MetricError: columns missing, ids repeated or not the same set, values missing or
            non-numeric, a spacing not positive.
    """
    if not min_radius > 0:
        raise MetricError(f"min_radius must be > 0 angstroms (got {min_radius})")
    joined = _aligned(solution, submission)
    truth_xyz = joined.select(AXIS_COLUMNS).to_numpy().astype(np.float64, copy=False)
    pred_xyz = joined.select(_PRED).to_numpy().astype(np.float64, copy=False)
    truth_has = joined[HAS_MOTOR].to_numpy().astype(bool)
    pred_has = ~(pred_xyz == NO_MOTOR).any(axis=1)
    radius = min_radius / joined[VOXEL_SPACING].to_numpy()
    distance = np.sqrt(((pred_xyz - truth_xyz) ** 2).sum(axis=1))
    both = truth_has & pred_has
    near = both & (distance <= radius)
    outcome = np.where(near, TP, np.where(truth_has, FN, np.where(pred_has, FP, TN)))
    return pl.DataFrame({
        "tomo_id": joined[TOMO_ID],
        "truth_has_motor": truth_has,
        "pred_has_motor": pred_has,
        "distance": pl.Series(np.where(both, distance, np.nan)).fill_nan(None),
        "radius": radius,
        "outcome": outcome.astype(str),
    })


def fbeta(tp: int, fp: int, fn: int, beta: float = BETA) -> float:
    """F-beta from counts: (1 + b^2) TP / ((1 + b^2) TP + b^2 FN + FP), 0 if that is 0/0.

    Args:
        tp: true positives.
        fp: false positives.
        fn: false negatives.
        beta: recall is weighted beta times as much as precision.
    """
    weight = beta * beta
    denominator = (1 + weight) * tp + weight * fn + fp
    if denominator == 0:
        return 0.0
    return (1 + weight) * tp / denominator


def confusion(solution: pl.DataFrame, submission: pl.DataFrame,
              min_radius: float = MIN_RADIUS_ANGSTROM) -> dict[str, float]:
    """Counts and rates of :func:`tomogram_outcomes`.

    Args:
        solution: as in :func:`tomogram_outcomes`.
        submission: as in :func:`tomogram_outcomes`.
        min_radius: the match radius in angstroms.

    Returns:
        ``tp, fp, fn, tn`` (ints), ``precision = tp / (tp + fp)`` and
        ``recall = tp / (tp + fn)`` (floats, 0 when undefined). A far prediction counts as a
        false negative only, so it lowers recall but not precision.
    """
    outcome = tomogram_outcomes(solution, submission, min_radius)["outcome"]
    counts = {key: int((outcome == key).sum()) for key in (TP, FP, FN, TN)}
    tp, fp, fn = counts[TP], counts[FP], counts[FN]
    counts["precision"] = tp / (tp + fp) if tp + fp else 0.0
    counts["recall"] = tp / (tp + fn) if tp + fn else 0.0
    return counts


def score(solution: pl.DataFrame, submission: pl.DataFrame,
          min_radius: float = MIN_RADIUS_ANGSTROM, beta: float = BETA) -> float:
    """The competition score: F-beta over tomograms.

    Args:
        solution: as in :func:`tomogram_outcomes`.
        submission: as in :func:`tomogram_outcomes`.
        min_radius: the match radius in angstroms.
        beta: 2 in the competition.

    Raises:
        MetricError: as in :func:`tomogram_outcomes`.
    """
    counts = confusion(solution, submission, min_radius)
    return fbeta(counts[TP], counts[FP], counts[FN], beta)


# --- solutions for training tomograms with several motors -------------------------------------

def solution_for_submission(motors: pl.DataFrame, tomograms: pl.DataFrame,
                            submission: pl.DataFrame) -> pl.DataFrame:
    """A one-row-per-tomogram solution whose truth is the motor nearest to the submitted point.

    A training tomogram can hold several motors while the metric compares one point with one
    truth; taking the nearest motor makes a prediction near any of them count. Where the
    submission has no point (or no row) for a tomogram, its first motor is used (the outcome is
    a false negative either way).

    Args:
        motors: ``tomo_id, z, y, x`` per motor, as :func:`kernel_lib.labels.read_labels` returns.
        tomograms: ``tomo_id, voxel_spacing`` per tomogram (same source); one solution row each.
        submission: ``tomo_id`` and ``Motor axis 0..2``.

    Returns:
        The solution frame (:data:`kernel_lib.labels.SOLUTION_COLUMNS`, ``Has motor`` Boolean,
        -1 coordinates without a motor), sorted by ``tomo_id``.
    """
    _check_columns(motors, (TOMO_ID, *COORD_COLUMNS), "motors")
    _check_columns(tomograms, (TOMO_ID, lb.SPACING_FIELD), "tomograms")
    _check_columns(submission, SUBMISSION_COLUMNS, "submission")
    pred = submission.select(
        TOMO_ID, *(pl.col(a).cast(pl.Float64).alias(p) for a, p in zip(AXIS_COLUMNS, _PRED)))
    has_point = ~pl.any_horizontal((pl.col(p) == NO_MOTOR) | pl.col(p).is_null() for p in _PRED)
    squared = pl.sum_horizontal((pl.col(c) - pl.col(p)) ** 2 for c, p in zip(COORD_COLUMNS, _PRED))
    nearest = (
        motors.select(TOMO_ID, *(pl.col(c).cast(pl.Float64) for c in COORD_COLUMNS))
        .with_row_index("_order")
        .join(pred.unique(TOMO_ID, keep="first"), on=TOMO_ID, how="left")
        .with_columns(pl.when(has_point).then(squared).otherwise(0.0).alias("_d2"))
        .sort([TOMO_ID, "_d2", "_order"])
        .unique(TOMO_ID, keep="first", maintain_order=True)
        .select(TOMO_ID, *COORD_COLUMNS)
    )
    return (
        tomograms.select(TOMO_ID, pl.col(lb.SPACING_FIELD).cast(pl.Float64).alias(VOXEL_SPACING))
        .join(nearest, on=TOMO_ID, how="left")
        .select(
            TOMO_ID,
            *(pl.col(c).fill_null(NO_MOTOR).alias(a) for c, a in zip(COORD_COLUMNS, AXIS_COLUMNS)),
            VOXEL_SPACING,
            pl.col(COORD_COLUMNS[0]).is_not_null().alias(HAS_MOTOR),
        )
        .sort(TOMO_ID)
    )


def load_solution(path: lb.PathLike, submission: pl.DataFrame,
                  only_submitted: bool = False) -> pl.DataFrame:
    """Read a solution file in either format, ready to score ``submission`` against.

    Args:
        path: a ``test_labels.csv``-style file (has ``Has motor``) or a ``train_labels.csv``
            (has ``Number of motors``; the nearest-motor rule of
            :func:`solution_for_submission` applies).
        submission: the submission that will be scored.
        only_submitted: keep only the solution's tomograms that the submission names (to score
            one validation fold against the full labels file).

    Raises:
        LabelError: the file is missing or malformed, or in neither format.
    """
    columns = lb.read_columns(path)
    if HAS_MOTOR in columns:
        solution = lb.read_solution(path)
    elif lb.N_MOTORS in columns:
        found = lb.read_labels(path)
        solution = solution_for_submission(found.motors, found.tomograms, submission)
    else:
        raise LabelError(f"{path}: neither a solution (no {HAS_MOTOR!r} column) nor a labels "
                         f"file (no {lb.N_MOTORS!r} column), found columns {columns}; pass a "
                         f"test_labels.csv-style solution or a train_labels.csv")
    if only_submitted:
        solution = solution.filter(pl.col(TOMO_ID).is_in(submission[TOMO_ID].implode()))
    return solution


# --- command line -------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m kernel_lib.metric",
        description="Score a submission.csv with the competition metric (F-beta over tomograms).")
    parser.add_argument("solution", help="test_labels.csv-style solution or train_labels.csv")
    parser.add_argument("submission", help="submission.csv (tomo_id, Motor axis 0..2)")
    parser.add_argument("--min-radius", type=float, default=MIN_RADIUS_ANGSTROM,
                        help="match radius in angstroms (default %(default)s)")
    parser.add_argument("--beta", type=float, default=BETA,
                        help="F-beta's beta (default %(default)s)")
    parser.add_argument("--only-submitted", action="store_true",
                        help="score only the solution tomograms named in the submission "
                             "(a validation fold against the full labels file)")
    return parser


def _report(counts: dict[str, float], value: float, args: argparse.Namespace) -> str:
    n = sum(int(counts[k]) for k in (TP, FP, FN, TN))
    return "\n".join([
        f"score {value!r} (F-beta, beta {args.beta:g}, min_radius {args.min_radius:g} A, "
        f"{n} tomograms)",
        f"tp {counts[TP]} fp {counts[FP]} fn {counts[FN]} tn {counts[TN]}",
        f"precision {counts['precision']:.6f} recall {counts['recall']:.6f}",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 scored, 2 unusable input).

    Args:
        argv: the arguments after the program name (``sys.argv[1:]`` when None).
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help or a usage error, already printed by argparse
        return int(exc.code or 0)
    try:
        if not args.beta > 0:
            raise MetricError(f"--beta must be > 0 (got {args.beta})")
        submission = lb.read_submission(args.submission)
        solution = load_solution(args.solution, submission, args.only_submitted)
        counts = confusion(solution, submission, args.min_radius)
    except (LabelError, MetricError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    value = fbeta(counts[TP], counts[FP], counts[FN], args.beta)
    print(_report(counts, value, args))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
