"""Reading label files and writing submissions: the real files, synthetic ones, every error."""

from __future__ import annotations

import doctest
import math
from pathlib import Path

import polars as pl
import pytest

import kernel_lib.config
from kernel_lib import labels
from kernel_lib.labels import (AXIS_COLUMNS, SUBMISSION_COLUMNS, TRAIN_LABEL_COLUMNS, LabelError,
                               read_columns, read_labels, read_sample_submission, read_solution,
                               read_submission, write_submission)

# the shared checkout sits beside the repository: ../shared/data/byu
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "byu"
REAL_LABELS = REAL_DATA / "train_labels.csv"
REAL_SAMPLE = REAL_DATA / "sample_submission.csv"
HEADER = ",".join(TRAIN_LABEL_COLUMNS)
SUBMISSION_HEADER = "tomo_id,Motor axis 0,Motor axis 1,Motor axis 2"

SYNTHETIC_ROWS = [
    "0,tomo_b,10.0,20.0,30.0,300,400,500,15.6,2",
    "1,tomo_b,299.0,399.0,499.0,300,400,500,15.6,2",
    "2,tomo_a,-1.0,-1.0,-1.0,500,924,956,6.5,0",
    "3,tomo_c,0.0,0.0,0.0,800,1912,1847,19.7,2",
]


def write_labels(tmp_path: Path, rows: list[str], header: str = HEADER,
                 name: str = "train_labels.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def replace_cell(row: str, column: str, value: str) -> str:
    cells = row.split(",")
    cells[TRAIN_LABEL_COLUMNS.index(column)] = value
    return ",".join(cells)


def test_module_example_runs():
    result = doctest.testmod(labels)
    assert result.attempted > 0 and result.failed == 0


def test_column_constants():
    assert TRAIN_LABEL_COLUMNS == (
        "row_id", "tomo_id", "Motor axis 0", "Motor axis 1", "Motor axis 2",
        "Array shape (axis 0)", "Array shape (axis 1)", "Array shape (axis 2)", "Voxel spacing",
        "Number of motors")
    assert ",".join(SUBMISSION_COLUMNS) == SUBMISSION_HEADER


# --- the real files --------------------------------------------------------------------------

@pytest.mark.skipif(not REAL_LABELS.is_file(), reason="real train_labels.csv not available")
def test_real_train_labels():
    found = read_labels(REAL_LABELS)
    tomograms, motors = found.tomograms, found.motors
    assert read_columns(REAL_LABELS) == list(TRAIN_LABEL_COLUMNS)
    assert tomograms.height == 648
    assert pl.read_csv(REAL_LABELS).height == 737
    no_motor = tomograms.filter(~pl.col("has_motor")).height
    assert no_motor == 286
    # every -1 row is a tomogram without motors; every other row a motor
    assert motors.height == 737 - no_motor
    assert tomograms["n_motors"].sum() == motors.height
    assert tomograms["n_motors"].max() == 10
    differs = tomograms.filter(pl.col("n_motors") != pl.col("n_motors_reported"))
    assert sorted(differs["tomo_id"].to_list()) == [
        "tomo_2b3cdf", "tomo_62eea8", "tomo_c84b8e", "tomo_e6f7f7"]
    assert differs["n_motors"].to_list() == [1] * 4
    assert differs["n_motors_reported"].to_list() == [2] * 4
    assert tomograms["tomo_id"].is_sorted() and tomograms["tomo_id"].is_unique().all()
    assert (tomograms["voxel_spacing"].min(), tomograms["voxel_spacing"].max()) == (6.5, 19.7)
    assert set(tomograms["shape_z"].unique().to_list()) >= {300, 500, 800}
    assert found.tomo_ids == tomograms["tomo_id"].to_list()


@pytest.mark.skipif(not REAL_SAMPLE.is_file(), reason="real sample_submission.csv not available")
def test_real_sample_submission():
    assert read_sample_submission(REAL_SAMPLE) == ["tomo_003acc", "tomo_00e047", "tomo_01a877"]


# --- synthetic labels ------------------------------------------------------------------------

def test_synthetic_labels_frames(tmp_path):
    found = read_labels(write_labels(tmp_path, SYNTHETIC_ROWS))
    assert found.motors.schema == pl.Schema({
        "tomo_id": pl.String, "z": pl.Float64, "y": pl.Float64, "x": pl.Float64,
        "voxel_spacing": pl.Float64, "shape_z": pl.Int64, "shape_y": pl.Int64,
        "shape_x": pl.Int64})
    assert found.motors.rows() == [
        ("tomo_b", 10.0, 20.0, 30.0, 15.6, 300, 400, 500),
        ("tomo_b", 299.0, 399.0, 499.0, 15.6, 300, 400, 500),
        ("tomo_c", 0.0, 0.0, 0.0, 19.7, 800, 1912, 1847),
    ]
    assert found.tomograms.schema == pl.Schema({
        "tomo_id": pl.String, "shape_z": pl.Int64, "shape_y": pl.Int64, "shape_x": pl.Int64,
        "voxel_spacing": pl.Float64, "n_motors": pl.Int64, "n_motors_reported": pl.Int64,
        "has_motor": pl.Boolean})
    assert found.tomograms.rows() == [
        ("tomo_a", 500, 924, 956, 6.5, 0, 0, False),
        ("tomo_b", 300, 400, 500, 15.6, 2, 2, True),
        ("tomo_c", 800, 1912, 1847, 19.7, 1, 2, True),
    ]


def test_labels_without_row_id_and_with_blank_lines(tmp_path):
    header = HEADER.removeprefix("row_id,")
    rows = [r.split(",", 1)[1] for r in SYNTHETIC_ROWS]
    path = write_labels(tmp_path, [rows[0], "", rows[1], rows[2], rows[3], ""], header=header)
    assert read_labels(path).tomograms.height == 3


# --- label errors ----------------------------------------------------------------------------

def assert_label_error(path: Path, *fragments: str) -> str:
    with pytest.raises(LabelError) as info:
        read_labels(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert "\n" not in message
    return message


def test_missing_path(tmp_path):
    assert_label_error(tmp_path / "nowhere.csv", "no such file", "check the path")


def test_directory_instead_of_file(tmp_path):
    assert_label_error(tmp_path, "not a file")


def test_empty_file(tmp_path):
    path = tmp_path / "train_labels.csv"
    path.write_text("")
    assert_label_error(path, "empty", "train_labels.csv")


def test_header_only(tmp_path):
    assert_label_error(write_labels(tmp_path, []), "no data rows")


def test_missing_column_lists_expected_and_found(tmp_path):
    header = HEADER.replace(",Voxel spacing", "")
    rows = [r.rsplit(",", 2)[0] + "," + r.rsplit(",", 1)[1] for r in SYNTHETIC_ROWS]
    message = assert_label_error(write_labels(tmp_path, rows, header=header),
                                 "missing columns ['Voxel spacing']", "expected", "found")
    assert "'Number of motors'" in message


def test_renamed_column(tmp_path):
    header = HEADER.replace("Motor axis 1", "motor_axis_1")
    assert_label_error(write_labels(tmp_path, SYNTHETIC_ROWS, header=header),
                       "missing columns ['Motor axis 1']", "motor_axis_1")


def test_non_numeric_cell(tmp_path):
    rows = [*SYNTHETIC_ROWS[:2], replace_cell(SYNTHETIC_ROWS[2], "Voxel spacing", "abc"),
            SYNTHETIC_ROWS[3]]
    assert_label_error(write_labels(tmp_path, rows), "'Voxel spacing'", "'abc'", "line 4")


def test_empty_cell(tmp_path):
    rows = [replace_cell(SYNTHETIC_ROWS[0], "Motor axis 2", ""), *SYNTHETIC_ROWS[1:]]
    assert_label_error(write_labels(tmp_path, rows), "'Motor axis 2'", "empty cell", "line 2")


def test_nan_coordinate(tmp_path):
    rows = [replace_cell(SYNTHETIC_ROWS[0], "Motor axis 0", "nan"), *SYNTHETIC_ROWS[1:]]
    assert_label_error(write_labels(tmp_path, rows), "'Motor axis 0'", "'nan'")


@pytest.mark.parametrize("column, value", [
    ("Motor axis 0", "300.0"),  # == shape: outside [0, shape)
    ("Motor axis 1", "400.5"),
    ("Motor axis 2", "-3.0"),
])
def test_coordinate_outside_shape(tmp_path, column, value):
    rows = [replace_cell(SYNTHETIC_ROWS[0], column, value), *SYNTHETIC_ROWS[1:]]
    assert_label_error(write_labels(tmp_path, rows), "tomo_b", "outside its array shape",
                       "(300, 400, 500)", value)


def test_partial_minus_one_row_is_outside(tmp_path):
    rows = [replace_cell(SYNTHETIC_ROWS[0], "Motor axis 1", "-1.0"), *SYNTHETIC_ROWS[1:]]
    assert_label_error(write_labels(tmp_path, rows), "tomo_b", "-1 in all three axes")


@pytest.mark.parametrize("spacing", ["0", "-15.6"])
def test_non_positive_spacing(tmp_path, spacing):
    rows = [replace_cell(r, "Voxel spacing", spacing) if "tomo_b" in r else r
            for r in SYNTHETIC_ROWS]
    assert_label_error(write_labels(tmp_path, rows), "'Voxel spacing'", "must be > 0", "tomo_b")


def test_fractional_shape(tmp_path):
    rows = [*SYNTHETIC_ROWS[:2], replace_cell(SYNTHETIC_ROWS[2], "Array shape (axis 1)", "92.5"),
            SYNTHETIC_ROWS[3]]
    assert_label_error(write_labels(tmp_path, rows), "whole numbers", "92.5")


def test_spacing_differs_within_a_tomogram(tmp_path):
    rows = [SYNTHETIC_ROWS[0], replace_cell(SYNTHETIC_ROWS[1], "Voxel spacing", "10.0"),
            *SYNTHETIC_ROWS[2:]]
    assert_label_error(write_labels(tmp_path, rows), "differs between rows", "tomo_b")


def test_ragged_csv(tmp_path):
    assert_label_error(write_labels(tmp_path, [SYNTHETIC_ROWS[0] + ",7,8"]), "cannot be parsed")


def test_label_error_is_value_error():
    assert issubclass(LabelError, ValueError)


# --- test_labels.csv-style solutions ---------------------------------------------------------

SOLUTION_HEADER = "tomo_id,Motor axis 0,Motor axis 1,Motor axis 2,Voxel spacing,Has motor"


def test_read_solution(tmp_path):
    path = tmp_path / "test_labels.csv"
    path.write_text(f"{SOLUTION_HEADER}\ntomo_x,10,20,30,13.1,1\ntomo_y,-1,-1,-1,15.6,0\n"
                    "tomo_z,5,5,5,10,False\n")
    solution = read_solution(path)
    assert solution.columns == list(labels.SOLUTION_COLUMNS)
    assert solution.rows() == [
        ("tomo_x", 10.0, 20.0, 30.0, 13.1, True),
        ("tomo_y", -1.0, -1.0, -1.0, 15.6, False),
        ("tomo_z", -1.0, -1.0, -1.0, 10.0, False),
    ]


def test_read_solution_with_shape_checks_bounds(tmp_path):
    path = tmp_path / "test_labels.csv"
    path.write_text(f"{SOLUTION_HEADER},Array shape (axis 0),Array shape (axis 1),"
                    "Array shape (axis 2)\ntomo_x,300,20,30,13.1,1,300,400,400\n")
    with pytest.raises(LabelError, match=r"tomo_x .*outside its array shape \(300, 400, 400\)"):
        read_solution(path)


@pytest.mark.parametrize("body, fragment", [
    ("tomo_x,1,2,3,13.1,yes\n", "'Has motor' must be 0/1"),
    ("tomo_x,1,2,3,13.1,1\ntomo_x,1,2,3,13.1,1\n", "more than one row"),
    ("tomo_x,-1,-1,-1,13.1,1\n", "says Has motor"),
    ("tomo_x,1,2,3,0,1\n", "must be > 0"),
])
def test_read_solution_errors(tmp_path, body, fragment):
    path = tmp_path / "test_labels.csv"
    path.write_text(f"{SOLUTION_HEADER}\n{body}")
    with pytest.raises(LabelError, match=fragment):
        read_solution(path)


# --- submissions -----------------------------------------------------------------------------

def test_write_submission_formats_floats_and_none_rows(tmp_path):
    path = tmp_path / "submission.csv"
    returned = write_submission([
        ("tomo_a", 169, 546, 603),
        ("tomo_b", -1, -1, -1),
        ("tomo_c", 12.345, 0.04, 99.96),
        ("tomo_d", math.nan, 5, 5),
        ("tomo_e", 5, math.inf, 5),
        ("tomo_f", 5, 5, None),
        ("tomo_g", 7, -1, 7),
        ("tomo_h", -0.3, -0.96, 4),
    ], path)
    assert returned == path
    assert path.read_text().splitlines() == [
        SUBMISSION_HEADER,
        "tomo_a,169.0,546.0,603.0",
        "tomo_b,-1.0,-1.0,-1.0",
        "tomo_c,12.3,0.0,100.0",
        "tomo_d,-1.0,-1.0,-1.0",
        "tomo_e,-1.0,-1.0,-1.0",
        "tomo_f,-1.0,-1.0,-1.0",
        "tomo_g,-1.0,-1.0,-1.0",
        "tomo_h,0.0,0.0,4.0",
    ]


def test_submission_round_trip_from_frame(tmp_path):
    frame = pl.DataFrame({"tomo_id": ["tomo_b", "tomo_a"], "Motor axis 0": [1.5, -1.0],
                          "Motor axis 1": [2.0, -1.0], "Motor axis 2": [3.25, -1.0]})
    path = write_submission(frame, tmp_path / "submission.csv")
    back = read_submission(path)
    assert back.schema == pl.Schema({"tomo_id": pl.String, **{a: pl.Float64 for a in AXIS_COLUMNS}})
    assert back.rows() == [("tomo_b", 1.5, 2.0, 3.2), ("tomo_a", -1.0, -1.0, -1.0)]


def test_write_submission_accepts_zyx_frame(tmp_path):
    frame = pl.DataFrame({"tomo_id": ["t"], "z": [1], "y": [2], "x": [3]})
    path = write_submission(frame, tmp_path / "s.csv")
    assert path.read_text() == f"{SUBMISSION_HEADER}\nt,1.0,2.0,3.0\n"


def test_write_submission_leaves_no_temp_file(tmp_path):
    write_submission([("t", 1, 2, 3)], tmp_path / "submission.csv")
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


def test_failed_write_leaves_target_untouched(tmp_path, monkeypatch):
    path = tmp_path / "submission.csv"
    path.write_text("old contents\n")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(kernel_lib.config.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_submission([("t", 1, 2, 3)], path)
    assert path.read_text() == "old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["submission.csv"]


@pytest.mark.parametrize("rows, fragment", [
    ([("t", 1, 2, 3), ("t", 4, 5, 6)], "repeated"),
    ([("", 1, 2, 3)], "invalid tomo_id"),
    ([("a,b", 1, 2, 3)], "comma"),
    ([("t", 1, 2)], "has 3 items"),
])
def test_invalid_rows_are_rejected_before_writing(tmp_path, rows, fragment):
    path = tmp_path / "submission.csv"
    path.write_text("old contents\n")
    with pytest.raises(LabelError, match=fragment):
        write_submission(rows, path)
    assert path.read_text() == "old contents\n"


def test_write_submission_rejects_wrong_frame_columns(tmp_path):
    with pytest.raises(LabelError, match="columns"):
        write_submission(pl.DataFrame({"tomo_id": ["t"], "a": [1]}), tmp_path / "s.csv")


@pytest.mark.parametrize("text, fragment", [
    ("tomo_id,z,y,x\nt,1,2,3\n", "wrong header"),
    (f"{SUBMISSION_HEADER}\nt,1,2,3\nt,4,5,6\n", "more than one row"),
    (f"{SUBMISSION_HEADER}\nt,1,two,3\n", "'two'"),
    (f"{SUBMISSION_HEADER}\nt,1,nan,3\n", "'nan'"),
    (f"{SUBMISSION_HEADER}\n", "no data rows"),
])
def test_read_submission_errors(tmp_path, text, fragment):
    path = tmp_path / "submission.csv"
    path.write_text(text)
    with pytest.raises(LabelError, match=fragment) as info:
        read_submission(path)
    assert str(path) in str(info.value)


def test_sample_submission_wrong_header(tmp_path):
    path = tmp_path / "sample_submission.csv"
    path.write_text("tomo_id,Motor axis 0,Motor axis 1\ntomo_a,1,2\n")
    with pytest.raises(LabelError, match="wrong header"):
        read_sample_submission(path)


def test_sample_submission_order_kept(tmp_path):
    path = tmp_path / "sample_submission.csv"
    path.write_text(f"{SUBMISSION_HEADER}\ntomo_z,1,1,1\ntomo_a,1,1,1\n")
    assert read_sample_submission(path) == ["tomo_z", "tomo_a"]


def test_submission_from_calls_keeps_points_of_positives_only():
    from kernel_lib.labels import submission_from_calls

    points = pl.DataFrame({"tomo_id": ["a", "b"], "z": [1.0, 4.0], "y": [2.0, 5.0],
                           "x": [3.0, 6.0]})
    sub = submission_from_calls(points, [True, False])
    assert sub.columns == ["tomo_id", "Motor axis 0", "Motor axis 1", "Motor axis 2"]
    assert sub.row(0) == ("a", 1.0, 2.0, 3.0)
    assert sub.row(1) == ("b", -1.0, -1.0, -1.0)
