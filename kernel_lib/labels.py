"""Read the competition's label files and write its submission files.

Three file formats, all CSV with the competition's own column names:

- ``train_labels.csv``: one row per motor (k rows for a tomogram with k motors) and one row of
  ``-1.0`` coordinates for a tomogram without a motor, plus array shape, voxel spacing and the
  reported number of motors. :func:`read_labels` turns it into two tidy frames (:class:`Labels`).
- a ``test_labels.csv``-style solution: one row per tomogram with a ``Has motor`` column.
  :func:`read_solution` returns it in the format that :mod:`kernel_lib.metric` scores.
- ``submission.csv`` / ``sample_submission.csv``: ``tomo_id`` and the three motor axes, ``-1``
  meaning "no motor". :func:`write_submission`, :func:`read_submission` and
  :func:`read_sample_submission`.

Coordinates are (z, y, x) = (axis 0, 1, 2) in the original tomogram's voxels. Every problem with
a file raises :class:`LabelError` with one message that names the file, what is wrong and what
to do.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from kernel_lib.labels import read_submission, write_submission
    >>> path = Path(tempfile.mkdtemp()) / "submission.csv"
    >>> _ = write_submission([("tomo_a", 169, 546.04, 603), ("tomo_b", -1, -1, -1)], path)
    >>> print(path.read_text(), end="")
    tomo_id,Motor axis 0,Motor axis 1,Motor axis 2
    tomo_a,169.0,546.0,603.0
    tomo_b,-1.0,-1.0,-1.0
    >>> read_submission(path).shape
    (2, 4)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kernel_lib.config import atomic_write_text

# --- the competition's column names ---------------------------------------------------------
ROW_ID = "row_id"
TOMO_ID = "tomo_id"
AXIS_COLUMNS = ("Motor axis 0", "Motor axis 1", "Motor axis 2")
SHAPE_COLUMNS = ("Array shape (axis 0)", "Array shape (axis 1)", "Array shape (axis 2)")
VOXEL_SPACING = "Voxel spacing"
N_MOTORS = "Number of motors"
HAS_MOTOR = "Has motor"
SUBMISSION_COLUMNS = (TOMO_ID, *AXIS_COLUMNS)
TRAIN_LABEL_COLUMNS = (ROW_ID, TOMO_ID, *AXIS_COLUMNS, *SHAPE_COLUMNS, VOXEL_SPACING, N_MOTORS)
SOLUTION_COLUMNS = (TOMO_ID, *AXIS_COLUMNS, VOXEL_SPACING, HAS_MOTOR)

# ``row_id`` carries no information, so a labels file may leave it out.
REQUIRED_LABEL_COLUMNS = tuple(c for c in TRAIN_LABEL_COLUMNS if c != ROW_ID)

# --- our own column names (tidy frames) -----------------------------------------------------
COORD_COLUMNS = ("z", "y", "x")
SHAPE_FIELDS = ("shape_z", "shape_y", "shape_x")
SPACING_FIELD = "voxel_spacing"
N_MOTORS_FIELD = "n_motors"
N_REPORTED_FIELD = "n_motors_reported"
HAS_MOTOR_FIELD = "has_motor"

# --- values -------------------------------------------------------------------------------
NO_MOTOR = -1.0
"""The coordinate value that means "no motor" (in every axis of a labels row; in any axis of a
submission row, as the metric reads it)."""
SUBMISSION_DECIMALS = 1
MAX_LISTED = 5
"""How many offending values an error message lists before it says "and N more"."""
HEADER_LINES = 1
TRUE_WORDS = frozenset({"1", "1.0", "true"})
FALSE_WORDS = frozenset({"0", "0.0", "false"})
FORBIDDEN_ID_CHARS = (",", '"', "\n", "\r")

_LINE = "__line__"

_LABELS_FIX = "compare it with the competition's train_labels.csv"
_SOLUTION_FIX = ("compare it with a test_labels.csv-style file (tomo_id, Motor axis 0..2, "
                 "Voxel spacing, Has motor)")
_SUBMISSION_FIX = "write it with kernel_lib.labels.write_submission"

PathLike = str | os.PathLike


class LabelError(ValueError):
    """A labels, solution or submission file that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Labels:
    """The contents of a ``train_labels.csv``, as two tidy frames in original voxels.

    Attributes:
        motors: one row per labelled motor, sorted by ``tomo_id`` (file order within a
            tomogram). Columns ``tomo_id`` (str), ``z, y, x`` (Float64), ``voxel_spacing``
            (Float64, angstroms per voxel), ``shape_z, shape_y, shape_x`` (Int64).
        tomograms: one row per tomogram, sorted by ``tomo_id``. Columns ``tomo_id``,
            ``shape_z, shape_y, shape_x`` (Int64), ``voxel_spacing`` (Float64), ``n_motors``
            (Int64, rows with real coordinates), ``n_motors_reported`` (Int64, the file's
            "Number of motors", which can be larger), ``has_motor`` (Boolean, ``n_motors > 0``).
    """

    motors: pl.DataFrame
    tomograms: pl.DataFrame

    @property
    def tomo_ids(self) -> list[str]:
        """All tomogram ids, sorted."""
        return self.tomograms[TOMO_ID].to_list()


# --- file plumbing --------------------------------------------------------------------------

def _error(path: PathLike, problem: str, fix: str) -> LabelError:
    return LabelError(f"{path}: {problem}; {fix}")


def _listed(values: Sequence[Any]) -> str:
    shown = ", ".join(str(v) for v in values[:MAX_LISTED])
    more = len(values) - MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def _require_file(path: PathLike, fix: str) -> Path:
    """Fail unless ``path`` is an existing, non-empty file."""
    path = Path(path)
    if not path.exists():
        raise _error(path, "no such file", f"check the path; {fix}")
    if not path.is_file():
        raise _error(path, "is not a file", f"point at the CSV file itself; {fix}")
    if path.stat().st_size == 0:
        raise _error(path, "the file is empty (not even a header)", fix)
    return path


def read_columns(path: PathLike) -> list[str]:
    """The header of a CSV file, e.g. to tell a ``train_labels.csv`` from a solution file.

    Args:
        path: the CSV file.

    Returns:
        The column names in file order.
    """
    path = _require_file(path, "point at a CSV file with a header row")
    try:
        return pl.read_csv(path, n_rows=0, infer_schema=False).columns
    except pl.exceptions.PolarsError as exc:
        raise _error(path, f"cannot be read as CSV ({exc})",
                     "check that it is a CSV file") from None


def _read_strings(path: PathLike, fix: str) -> pl.DataFrame:
    """Read a CSV with every cell as a string, blank lines dropped and a ``__line__`` column."""
    path = _require_file(path, fix)
    try:
        raw = pl.read_csv(path, infer_schema=False)
    except pl.exceptions.PolarsError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _error(path, f"cannot be parsed as CSV ({first})", fix) from None
    raw = raw.with_row_index(_LINE, offset=HEADER_LINES + 1)
    data_columns = [c for c in raw.columns if c != _LINE]
    if data_columns:
        raw = raw.filter(~pl.all_horizontal(pl.col(data_columns).is_null()))
    if raw.height == 0:
        raise _error(path, "has a header but no data rows", fix)
    return raw


def _check_columns(raw: pl.DataFrame, path: PathLike, required: Sequence[str], fix: str) -> None:
    found = [c for c in raw.columns if c != _LINE]
    missing = [c for c in required if c not in found]
    if missing:
        raise _error(path, f"missing columns {missing} (expected {list(required)}, found {found})",
                     fix)


def _check_exact_columns(raw: pl.DataFrame, path: PathLike, expected: Sequence[str],
                         fix: str) -> None:
    found = [c for c in raw.columns if c != _LINE]
    if found != list(expected):
        raise _error(path, f"wrong header {found} (expected exactly {list(expected)})", fix)


def _check_ids(raw: pl.DataFrame, path: PathLike, fix: str) -> None:
    """Every row needs a non-empty tomo_id."""
    ids = raw[TOMO_ID].str.strip_chars()
    bad = raw.filter(ids.is_null() | (ids == ""))
    if bad.height:
        raise _error(path, f"empty {TOMO_ID} on line {bad[_LINE][0]}", fix)


def _check_unique_ids(raw: pl.DataFrame, path: PathLike, fix: str) -> None:
    duplicated = raw.filter(pl.col(TOMO_ID).is_duplicated())[TOMO_ID].unique(maintain_order=True)
    if duplicated.len():
        raise _error(path, f"{duplicated.len()} {TOMO_ID}s appear on more than one row "
                           f"({_listed(duplicated.to_list())})",
                     f"keep one row per tomogram; {fix}")


def _to_floats(raw: pl.DataFrame, path: PathLike, columns: Sequence[str],
               fix: str) -> pl.DataFrame:
    """Cast string columns to finite Float64, naming the first cell that is not a number."""
    parsed = raw.with_columns(
        pl.col(c).str.strip_chars().cast(pl.Float64, strict=False) for c in columns)
    for column in columns:
        bad = parsed.filter(~pl.col(column).is_finite() | pl.col(column).is_null())
        if bad.height:
            line = bad[_LINE][0]
            value = raw.filter(pl.col(_LINE) == line)[column][0]
            shown = "an empty cell" if value is None else f"{value!r}"
            raise _error(path, f"column {column!r} has {shown} on line {line} where a finite "
                               f"number is needed ({bad.height} such cells)",
                         f"correct that cell; {fix}")
    return parsed


def _check_whole(frame: pl.DataFrame, path: PathLike, column: str, minimum: int,
                 fix: str) -> None:
    bad = frame.filter((pl.col(column) != pl.col(column).round(0)) | (pl.col(column) < minimum))
    if bad.height:
        raise _error(path, f"column {column!r} must hold whole numbers >= {minimum}; line "
                           f"{bad[_LINE][0]} has {bad[column][0]}", fix)


def _check_positive(frame: pl.DataFrame, path: PathLike, column: str, fix: str) -> None:
    bad = frame.filter(pl.col(column) <= 0)
    if bad.height:
        raise _error(path, f"column {column!r} must be > 0 (angstroms per voxel); line "
                           f"{bad[_LINE][0]} ({bad[TOMO_ID][0]}) has {bad[column][0]}", fix)


def _no_motor_expr(columns: Sequence[str]) -> pl.Expr:
    """True for a labels row whose three coordinates are all the "no motor" value."""
    return pl.all_horizontal(pl.col(c) == NO_MOTOR for c in columns)


def _check_in_bounds(frame: pl.DataFrame, path: PathLike, coords: Sequence[str],
                     shapes: Sequence[str], fix: str) -> None:
    """Motor coordinates must lie in [0, shape) on every axis."""
    outside = pl.any_horizontal(
        (pl.col(c) < 0) | (pl.col(c) >= pl.col(s)) for c, s in zip(coords, shapes))
    bad = frame.filter(outside)
    if bad.height:
        row = bad.row(0, named=True)
        point = tuple(row[c] for c in coords)
        shape = tuple(row[s] for s in shapes)
        raise _error(path, f"{row[TOMO_ID]} (line {row[_LINE]}) has a motor at (z, y, x) = "
                           f"{point} outside its array shape {shape} ({bad.height} such rows; "
                           f"-1 in all three axes means no motor)",
                     f"fix the coordinates or the shape; {fix}")


def _check_constant_per_tomogram(frame: pl.DataFrame, path: PathLike, columns: Sequence[str],
                                 fix: str) -> None:
    counts = frame.group_by(TOMO_ID).agg(pl.col(c).n_unique() for c in columns)
    for column in columns:
        bad = counts.filter(pl.col(column) > 1)[TOMO_ID].sort()
        if bad.len():
            raise _error(path, f"column {column!r} differs between rows of the same tomogram "
                               f"({_listed(bad.to_list())})",
                         f"give each tomogram one value; {fix}")


# --- train_labels.csv -----------------------------------------------------------------------

def read_labels(path: PathLike) -> Labels:
    """Read and validate a ``train_labels.csv`` (the real one or a synthetic one).

    Args:
        path: the labels file, with the columns of :data:`TRAIN_LABEL_COLUMNS` (``row_id`` may
            be left out; extra columns are ignored).

    Returns:
        The motors and tomograms frames described in :class:`Labels`. A ``-1`` row of a
        tomogram that also lists real motors is ignored.

    Raises:
        LabelError: the file is missing, empty or not CSV; columns are missing; a cell is not a
            number; a shape, spacing or motor count is invalid or differs between rows of one
            tomogram; a motor lies outside its array shape.
    """
    fix = _LABELS_FIX
    raw = _read_strings(path, fix)
    _check_columns(raw, path, REQUIRED_LABEL_COLUMNS, fix)
    _check_ids(raw, path, fix)
    numeric = (*AXIS_COLUMNS, *SHAPE_COLUMNS, VOXEL_SPACING, N_MOTORS)
    frame = _to_floats(raw.with_columns(pl.col(TOMO_ID).str.strip_chars()), path, numeric, fix)
    for column in SHAPE_COLUMNS:
        _check_whole(frame, path, column, 1, fix)
    _check_whole(frame, path, N_MOTORS, 0, fix)
    _check_positive(frame, path, VOXEL_SPACING, fix)
    _check_constant_per_tomogram(frame, path, (*SHAPE_COLUMNS, VOXEL_SPACING, N_MOTORS), fix)

    frame = frame.select(
        _LINE,
        TOMO_ID,
        *(pl.col(a).alias(c) for a, c in zip(AXIS_COLUMNS, COORD_COLUMNS)),
        *(pl.col(s).cast(pl.Int64).alias(f) for s, f in zip(SHAPE_COLUMNS, SHAPE_FIELDS)),
        pl.col(VOXEL_SPACING).alias(SPACING_FIELD),
        pl.col(N_MOTORS).cast(pl.Int64).alias(N_REPORTED_FIELD),
    ).with_columns(_no_motor_expr(COORD_COLUMNS).alias("_none"))
    _check_in_bounds(frame.filter(~pl.col("_none")), path, COORD_COLUMNS, SHAPE_FIELDS, fix)
    return Labels(motors=_motors_frame(frame), tomograms=_tomograms_frame(frame))


def _motors_frame(frame: pl.DataFrame) -> pl.DataFrame:
    return (frame.filter(~pl.col("_none"))
            .select(TOMO_ID, *COORD_COLUMNS, SPACING_FIELD, *SHAPE_FIELDS)
            .sort(TOMO_ID, maintain_order=True))


def _tomograms_frame(frame: pl.DataFrame) -> pl.DataFrame:
    return (frame.group_by(TOMO_ID)
            .agg(*(pl.col(f).first() for f in SHAPE_FIELDS),
                 pl.col(SPACING_FIELD).first(),
                 (~pl.col("_none")).sum().cast(pl.Int64).alias(N_MOTORS_FIELD),
                 pl.col(N_REPORTED_FIELD).first())
            .with_columns((pl.col(N_MOTORS_FIELD) > 0).alias(HAS_MOTOR_FIELD))
            .sort(TOMO_ID))


# --- test_labels.csv-style solution ---------------------------------------------------------

def read_solution(path: PathLike) -> pl.DataFrame:
    """Read a ``test_labels.csv``-style solution (one row per tomogram, a ``Has motor`` column).

    Args:
        path: the solution file with the columns of :data:`SOLUTION_COLUMNS`, optionally with the
            three shape columns (then motor coordinates are checked against them).

    Returns:
        The metric's solution frame in file order: ``tomo_id`` (str), ``Motor axis 0..2``
        (Float64, ``-1.0`` where there is no motor), ``Voxel spacing`` (Float64) and
        ``Has motor`` (Boolean).

    Raises:
        LabelError: the file is missing, empty or not CSV; columns are missing; ids repeat; a
            cell is not a number; ``Has motor`` is not 0/1; a spacing is not positive; a motor
            row has ``-1`` coordinates or lies outside its shape.
    """
    fix = _SOLUTION_FIX
    raw = _read_strings(path, fix)
    _check_columns(raw, path, SOLUTION_COLUMNS, fix)
    _check_ids(raw, path, fix)
    raw = raw.with_columns(pl.col(TOMO_ID).str.strip_chars())
    _check_unique_ids(raw, path, fix)
    with_shape = all(c in raw.columns for c in SHAPE_COLUMNS)
    numeric = (*AXIS_COLUMNS, VOXEL_SPACING, *(SHAPE_COLUMNS if with_shape else ()))
    frame = _to_floats(raw, path, numeric, fix)
    frame = frame.with_columns(_parse_has_motor(raw, path, fix))
    if with_shape:
        for column in SHAPE_COLUMNS:
            _check_whole(frame, path, column, 1, fix)
        frame = frame.with_columns(pl.col(c).cast(pl.Int64) for c in SHAPE_COLUMNS)
    _check_positive(frame, path, VOXEL_SPACING, fix)
    motors = frame.filter(pl.col(HAS_MOTOR))
    _check_motor_rows_located(motors, path, fix)
    if with_shape:
        _check_in_bounds(motors, path, AXIS_COLUMNS, SHAPE_COLUMNS, fix)
    return frame.select(
        TOMO_ID,
        *(pl.when(pl.col(HAS_MOTOR)).then(pl.col(a)).otherwise(NO_MOTOR).alias(a)
          for a in AXIS_COLUMNS),
        VOXEL_SPACING,
        HAS_MOTOR,
    )


def _check_motor_rows_located(motors: pl.DataFrame, path: PathLike, fix: str) -> None:
    """A row that says it has a motor needs real (non-negative) coordinates."""
    bad = motors.filter(pl.any_horizontal(pl.col(a) < 0 for a in AXIS_COLUMNS))
    if bad.height:
        row = bad.row(0, named=True)
        point = tuple(row[a] for a in AXIS_COLUMNS)
        raise _error(path, f"{row[TOMO_ID]} (line {row[_LINE]}) says {HAS_MOTOR} but its motor is "
                           f"at {point} ({bad.height} such rows)",
                     f"give the motor's coordinates or set {HAS_MOTOR} to 0; {fix}")


def _parse_has_motor(raw: pl.DataFrame, path: PathLike, fix: str) -> pl.Series:
    words = raw[HAS_MOTOR].str.strip_chars().str.to_lowercase()
    known = words.is_in(list(TRUE_WORDS | FALSE_WORDS))
    if not known.all():
        bad = raw.filter(~known.fill_null(False))
        raise _error(path, f"column {HAS_MOTOR!r} must be 0/1 or true/false; line "
                           f"{bad[_LINE][0]} has {bad[HAS_MOTOR][0]!r}", fix)
    return words.is_in(list(TRUE_WORDS)).alias(HAS_MOTOR)


# --- submissions ----------------------------------------------------------------------------

def read_sample_submission(path: PathLike) -> list[str]:
    """The test tomogram ids of a ``sample_submission.csv``, in file order.

    Args:
        path: the sample submission; its header must be exactly :data:`SUBMISSION_COLUMNS`.

    Raises:
        LabelError: the file is missing or empty, the header is wrong, or an id is empty or
            repeated.
    """
    fix = "use the competition's sample_submission.csv"
    raw = _read_strings(path, fix)
    _check_exact_columns(raw, path, SUBMISSION_COLUMNS, fix)
    _check_ids(raw, path, fix)
    raw = raw.with_columns(pl.col(TOMO_ID).str.strip_chars())
    _check_unique_ids(raw, path, fix)
    return raw[TOMO_ID].to_list()


def submission_from_calls(points: pl.DataFrame, positive: np.ndarray | Sequence[bool],
                          ) -> pl.DataFrame:
    """Submission rows from each tomogram's best point and its motor / no-motor call.

    Args:
        points: ``tomo_id, z, y, x`` (original voxels), one row per tomogram.
        positive: "has motor" per row; a negative row gets ``-1`` coordinates.
    """
    keep = pl.Series(np.asarray(positive, dtype=bool))
    return points.select(TOMO_ID, *[pl.when(keep).then(pl.col(coord)).otherwise(NO_MOTOR)
                                    .alias(axis) for coord, axis in zip(COORD_COLUMNS,
                                                                        AXIS_COLUMNS)])


def read_submission(path: PathLike) -> pl.DataFrame:
    """Read and validate a submission file.

    Args:
        path: the submission; its header must be exactly :data:`SUBMISSION_COLUMNS`.

    Returns:
        ``tomo_id`` (str) and ``Motor axis 0..2`` (Float64) in file order.

    Raises:
        LabelError: the file is missing or empty, the header is wrong, an id is empty or
            repeated, or a coordinate is not a finite number.
    """
    fix = _SUBMISSION_FIX
    raw = _read_strings(path, fix)
    _check_exact_columns(raw, path, SUBMISSION_COLUMNS, fix)
    _check_ids(raw, path, fix)
    raw = raw.with_columns(pl.col(TOMO_ID).str.strip_chars())
    _check_unique_ids(raw, path, fix)
    return _to_floats(raw, path, AXIS_COLUMNS, fix).select(SUBMISSION_COLUMNS)


SubmissionRows = pl.DataFrame | Iterable[Sequence[Any]]


def write_submission(rows: SubmissionRows, path: PathLike,
                     decimals: int = SUBMISSION_DECIMALS) -> Path:
    """Write a submission file atomically (a temporary file beside it, then a rename).

    A row with a missing, NaN or infinite coordinate, or with ``-1`` in any axis, is written as
    ``-1.0,-1.0,-1.0`` ("no motor"). Other negative coordinates are clipped to 0 so that
    rounding can never turn a real prediction into the ``-1`` marker.

    Args:
        rows: a frame with the columns :data:`SUBMISSION_COLUMNS` (or ``tomo_id, z, y, x``), or
            an iterable of ``(tomo_id, z, y, x)`` in original voxels; written in this order.
        path: where to write, e.g. ``submission.csv``.
        decimals: digits after the point (at least 1, so coordinates read as floats).

    Returns:
        The path written.

    Raises:
        LabelError: the rows are malformed, an id is empty, repeated or contains a comma or
            quote; the target is then left untouched.
    """
    if decimals < 1:
        raise ValueError(f"decimals must be >= 1 so coordinates are written as floats "
                         f"(got {decimals})")
    ids, coords = _submission_arrays(rows, path)
    _check_submission_ids(ids, path)
    coords = _normalise_coordinates(coords, decimals)
    lines = [",".join(SUBMISSION_COLUMNS)]
    lines += [f"{tomo},{z:.{decimals}f},{y:.{decimals}f},{x:.{decimals}f}"
              for tomo, (z, y, x) in zip(ids, coords.tolist())]
    path = Path(path)
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _submission_arrays(rows: SubmissionRows, path: PathLike) -> tuple[list[str], np.ndarray]:
    """Ids and an (N, 3) float array (NaN where a coordinate is missing)."""
    if isinstance(rows, pl.DataFrame):
        axes = next((cols for cols in (AXIS_COLUMNS, COORD_COLUMNS)
                     if all(c in rows.columns for c in cols)), None)
        if TOMO_ID not in rows.columns or axes is None:
            raise _error(path, f"cannot write a frame with columns {rows.columns}",
                         f"pass columns {list(SUBMISSION_COLUMNS)} or {[TOMO_ID, *COORD_COLUMNS]}")
        ids = rows[TOMO_ID].cast(pl.String).to_list()
        coords = rows.select(pl.col(c).cast(pl.Float64) for c in axes).to_numpy()
        return ids, coords.reshape(-1, 3).astype(np.float64)
    ids, values = [], []
    for number, row in enumerate(rows):
        row = tuple(row)
        if len(row) != 1 + len(AXIS_COLUMNS):
            raise _error(path, f"row {number} {row!r} has {len(row)} items",
                         "pass (tomo_id, z, y, x) tuples")
        ids.append(row[0])
        values.append([np.nan if v is None else float(v) for v in row[1:]])
    return ids, np.asarray(values, dtype=np.float64).reshape(-1, 3)


def _check_submission_ids(ids: Sequence[Any], path: PathLike) -> None:
    fix = "give every row a plain, unique tomo_id; nothing was written"
    for tomo in ids:
        if not isinstance(tomo, str) or not tomo.strip():
            raise _error(path, f"invalid {TOMO_ID} {tomo!r}", fix)
        if any(ch in tomo for ch in FORBIDDEN_ID_CHARS):
            raise _error(path, f"{TOMO_ID} {tomo!r} contains a comma, quote or line break", fix)
    counts = pl.Series(TOMO_ID, ids, dtype=pl.String).value_counts()
    repeated = counts.filter(pl.col("count") > 1)[TOMO_ID].sort().to_list()
    if repeated:
        raise _error(path, f"{len(repeated)} repeated {TOMO_ID}s ({_listed(repeated)})", fix)


def _normalise_coordinates(coords: np.ndarray, decimals: int) -> np.ndarray:
    """Round; rows without a usable point become -1 in all axes; clip other negatives to 0."""
    none = ~np.isfinite(coords).all(axis=1) | (coords == NO_MOTOR).any(axis=1)
    clean = np.round(np.where(np.isfinite(coords), np.maximum(coords, 0.0), 0.0), decimals)
    clean = clean + 0.0  # turn -0.0 into 0.0
    clean[none] = NO_MOTOR
    return clean
