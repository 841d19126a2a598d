"""The competition metric: each rule on its own, the worked example, the helpers and the CLI."""

from __future__ import annotations

import doctest
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from kernel_lib import metric
from kernel_lib.labels import AXIS_COLUMNS, read_labels
from kernel_lib.metric import (MetricError, confusion, fbeta, score, solution_for_submission,
                               tomogram_outcomes)

REPO = Path(__file__).resolve().parents[1]
NONE = (-1.0, -1.0, -1.0)
WORKED_EXAMPLE_SCORE = 0.35714285714285715


def make_solution(rows: list[tuple[str, tuple[float, float, float] | None, float]]) -> pl.DataFrame:
    """Rows of (tomo_id, (z, y, x) or None, voxel spacing)."""
    points = [p if p is not None else NONE for _, p, _ in rows]
    return pl.DataFrame({
        "tomo_id": [r[0] for r in rows],
        **{axis: [float(p[i]) for p in points] for i, axis in enumerate(AXIS_COLUMNS)},
        "Voxel spacing": [float(r[2]) for r in rows],
        "Has motor": [r[1] is not None for r in rows],
    })


def make_submission(rows: list[tuple[str, tuple[float, float, float]]]) -> pl.DataFrame:
    return pl.DataFrame({
        "tomo_id": [r[0] for r in rows],
        **{axis: [float(r[1][i]) for r in rows] for i, axis in enumerate(AXIS_COLUMNS)},
    })


def one_tomogram(truth, pred, spacing: float = 10.0) -> tuple[pl.DataFrame, pl.DataFrame]:
    return make_solution([("t", truth, spacing)]), make_submission([("t", pred)])


def counts(solution, submission, **kwargs) -> tuple[int, int, int, int]:
    c = confusion(solution, submission, **kwargs)
    return c["tp"], c["fp"], c["fn"], c["tn"]


@pytest.fixture
def worked_example() -> tuple[pl.DataFrame, pl.DataFrame]:
    solution = make_solution([
        ("tomo_a", None, 10.0),
        ("tomo_b", (250, 250, 250), 10.0),
        ("tomo_c", (100, 100, 100), 10.0),
        ("tomo_d", (200, 200, 200), 10.0),
    ])
    submission = make_submission([
        ("tomo_a", (100, 100, 100)),
        ("tomo_b", (251, 251, 251)),
        ("tomo_c", (600, 600, 600)),
        ("tomo_d", NONE),
    ])
    return solution, submission


# --- the worked example ---------------------------------------------------------------------

def test_worked_example_is_exact(worked_example):
    assert score(*worked_example) == WORKED_EXAMPLE_SCORE


def test_worked_example_counts(worked_example):
    c = confusion(*worked_example)
    assert (c["tp"], c["fp"], c["fn"], c["tn"]) == (1, 1, 2, 0)
    assert c["precision"] == 0.5
    assert c["recall"] == 1 / 3


def test_row_order_does_not_matter(worked_example):
    solution, submission = worked_example
    assert score(solution.reverse(), submission) == WORKED_EXAMPLE_SCORE


def test_module_example_runs():
    result = doctest.testmod(metric)
    assert result.attempted > 0 and result.failed == 0


# --- each rule -----------------------------------------------------------------------------

def test_distance_exactly_at_radius_is_true_positive():
    # spacing 10 -> radius 100 voxels; offset (60, 80, 0) is exactly 100 voxels away
    solution, submission = one_tomogram((200, 200, 200), (260, 280, 200), spacing=10.0)
    assert counts(solution, submission) == (1, 0, 0, 0)
    assert score(solution, submission) == 1.0


def test_distance_at_radius_with_fractional_spacing():
    # spacing 12.5 -> radius exactly 80 voxels
    solution, submission = one_tomogram((100, 300, 300), (100, 380, 300), spacing=12.5)
    assert counts(solution, submission) == (1, 0, 0, 0)


def test_just_beyond_radius_is_false_negative_only():
    solution, submission = one_tomogram((200, 200, 200), (260, 280, 200.01), spacing=10.0)
    assert counts(solution, submission) == (0, 0, 1, 0)
    assert score(solution, submission) == 0.0


def test_radius_scales_with_voxel_spacing():
    offset = (100, 190, 100)  # 90 voxels from (100, 100, 100)
    near = one_tomogram((100, 100, 100), offset, spacing=10.0)  # radius 100
    far = one_tomogram((100, 100, 100), offset, spacing=12.5)  # radius 80
    assert counts(*near)[0] == 1
    assert counts(*far)[2] == 1


def test_min_radius_parameter():
    solution, submission = one_tomogram((100, 100, 100), (100, 150, 100), spacing=10.0)
    assert counts(solution, submission, min_radius=500.0) == (1, 0, 0, 0)
    assert counts(solution, submission, min_radius=499.0) == (0, 0, 1, 0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_minus_one_in_any_single_axis_means_no_motor(axis):
    pred = [100.0, 100.0, 100.0]
    pred[axis] = -1.0
    # truth has a motor 1 voxel from the prediction: if -1 were a coordinate this would be a TP
    truth = tuple(0.0 if i == axis else 100.0 for i in range(3))
    assert counts(*one_tomogram(truth, tuple(pred))) == (0, 0, 1, 0)
    # truth has none: a "no motor" prediction is a true negative, not a false positive
    assert counts(*one_tomogram(None, tuple(pred))) == (0, 0, 0, 1)


def test_prediction_without_truth_is_false_positive():
    assert counts(*one_tomogram(None, (5, 5, 5))) == (0, 1, 0, 0)


def test_missing_prediction_is_false_negative():
    assert counts(*one_tomogram((5, 5, 5), NONE)) == (0, 0, 1, 0)


def test_zero_denominator_gives_zero():
    solution = make_solution([("a", None, 10.0), ("b", None, 15.0)])
    submission = make_submission([("a", NONE), ("b", NONE)])
    assert counts(solution, submission) == (0, 0, 0, 2)
    assert score(solution, submission) == 0.0
    assert fbeta(0, 0, 0) == 0.0


def test_beta_changes_the_result(worked_example):
    # TP 1, FP 1, FN 2: precision 1/2, recall 1/3
    precision, recall = 0.5, 1 / 3
    for beta in (0.5, 1.0, 2.0, 3.0):
        expected = (1 + beta**2) * precision * recall / (beta**2 * precision + recall)
        assert score(*worked_example, beta=beta) == pytest.approx(expected, rel=1e-12)
    assert score(*worked_example, beta=1.0) == pytest.approx(0.4, rel=1e-12)
    # recall is lower than precision here, so weighting recall more lowers the score
    assert score(*worked_example, beta=3.0) < score(*worked_example, beta=2.0) < score(
        *worked_example, beta=1.0)


def test_fbeta_weights_false_negatives_by_beta_squared():
    assert fbeta(1, 4, 0, beta=2.0) == 5 / 9
    assert fbeta(1, 0, 1, beta=2.0) == 5 / 9
    assert fbeta(1, 0, 1, beta=1.0) == 2 / 3


def test_has_motor_may_be_zero_one():
    solution = make_solution([("a", (1, 1, 1), 10.0), ("b", None, 10.0)])
    solution = solution.with_columns(pl.col("Has motor").cast(pl.Int64))
    submission = make_submission([("a", (1, 1, 1)), ("b", (1, 1, 1))])
    assert counts(solution, submission) == (1, 1, 0, 0)


def test_integer_submission_coordinates_are_accepted():
    solution, submission = one_tomogram((100, 100, 100), (100, 100, 100))
    submission = submission.with_columns(pl.col(a).cast(pl.Int64) for a in AXIS_COLUMNS)
    assert score(solution, submission) == 1.0


def test_outcomes_frame():
    solution = make_solution([("b", (0, 0, 0), 10.0), ("a", None, 20.0)])
    submission = make_submission([("a", NONE), ("b", (0, 30, 40))])
    out = tomogram_outcomes(solution, submission)
    assert out.columns == list(metric.OUTCOME_COLUMNS)
    assert out["tomo_id"].to_list() == ["a", "b"]
    assert out["outcome"].to_list() == ["tn", "tp"]
    assert out["distance"].to_list() == [None, 50.0]
    assert out["radius"].to_list() == [50.0, 100.0]


# --- errors ----------------------------------------------------------------------------------

def test_id_mismatch_names_missing_and_extra_ids():
    solution = make_solution([("tomo_a", None, 10.0), ("tomo_gone", None, 10.0)])
    submission = make_submission([("tomo_a", NONE), ("tomo_new", NONE)])
    with pytest.raises(MetricError) as info:
        score(solution, submission)
    message = str(info.value)
    assert "tomo_gone" in message and "tomo_new" in message
    assert "1 missing" in message and "1 extra" in message


def test_id_mismatch_lists_at_most_five_and_counts_all():
    solution = make_solution([(f"tomo_{i:02d}", None, 10.0) for i in range(9)])
    submission = make_submission([("tomo_00", NONE)])
    with pytest.raises(MetricError) as info:
        score(solution, submission)
    message = str(info.value)
    assert "8 missing" in message and "0 extra" in message
    assert "tomo_05" in message and "tomo_06" not in message and "3 more" in message


def test_duplicate_submission_ids_raise():
    solution = make_solution([("a", None, 10.0)])
    submission = make_submission([("a", NONE), ("a", (1, 1, 1))])
    with pytest.raises(MetricError, match="more than one row"):
        score(solution, submission)


def test_missing_columns_raise():
    solution, submission = one_tomogram(None, NONE)
    with pytest.raises(MetricError, match="Voxel spacing"):
        score(solution.drop("Voxel spacing"), submission)
    with pytest.raises(MetricError, match="Motor axis 2"):
        score(solution, submission.drop("Motor axis 2"))


def test_nan_prediction_raises():
    solution, submission = one_tomogram((1, 1, 1), (1.0, math.nan, 1.0))
    with pytest.raises(MetricError, match="non-finite"):
        score(solution, submission)


def test_non_positive_spacing_raises():
    with pytest.raises(MetricError, match="non-positive"):
        score(*one_tomogram((1, 1, 1), (1, 1, 1), spacing=0.0))


def test_metric_errors_are_value_errors():
    assert issubclass(MetricError, ValueError)


# --- vectorised implementation vs a plain loop ------------------------------------------------

def reference_counts(truth, has, spacing, pred, min_radius=1000.0):
    """The rules written out one tomogram at a time."""
    tp = fp = fn = tn = 0
    for t, h, s, p in zip(truth, has, spacing, pred):
        predicted = all(v != -1 for v in p)
        if h and predicted:
            if math.dist(t, p) <= min_radius / s:
                tp += 1
            else:
                fn += 1
        elif h:
            fn += 1
        elif predicted:
            fp += 1
        else:
            tn += 1
    return tp, fp, fn, tn


def test_matches_reference_loop_on_random_data():
    rng = np.random.default_rng(0)
    n = 600
    has = rng.random(n) < 0.55
    truth = np.where(has[:, None], rng.uniform(0, 900, (n, 3)).round(), -1.0)
    spacing = rng.uniform(6.5, 19.7, n).round(1)
    pred = truth + rng.normal(0, 60, (n, 3)).round()
    pred[~has] = rng.uniform(0, 900, (int((~has).sum()), 3)).round()
    pred[rng.random(n) < 0.3, rng.integers(0, 3)] = -1.0
    ids = [f"tomo_{i:04d}" for i in range(n)]
    solution = pl.DataFrame({"tomo_id": ids, **{a: truth[:, i] for i, a in enumerate(AXIS_COLUMNS)},
                             "Voxel spacing": spacing, "Has motor": has})
    submission = pl.DataFrame({"tomo_id": ids[::-1],
                               **{a: pred[::-1, i] for i, a in enumerate(AXIS_COLUMNS)}})
    expected = reference_counts(truth.tolist(), has, spacing, pred.tolist())
    assert counts(solution, submission) == expected
    assert all(expected), "the random data should exercise all four outcomes"


# --- nearest-motor solutions for training tomograms ------------------------------------------

@pytest.fixture
def multi_motor_labels(tmp_path) -> Path:
    path = tmp_path / "train_labels.csv"
    path.write_text(
        "row_id,tomo_id,Motor axis 0,Motor axis 1,Motor axis 2,Array shape (axis 0),"
        "Array shape (axis 1),Array shape (axis 2),Voxel spacing,Number of motors\n"
        "0,tomo_many,10.0,10.0,10.0,300,1000,1000,10.0,3\n"
        "1,tomo_many,100.0,500.0,500.0,300,1000,1000,10.0,3\n"
        "2,tomo_many,200.0,900.0,900.0,300,1000,1000,10.0,3\n"
        "3,tomo_none,-1.0,-1.0,-1.0,300,1000,1000,15.0,0\n"
        "4,tomo_one,150.0,150.0,150.0,300,1000,1000,20.0,1\n")
    return path


def test_nearest_motor_becomes_the_truth(multi_motor_labels):
    labels = read_labels(multi_motor_labels)
    submission = make_submission([("tomo_many", (110, 520, 490)), ("tomo_none", NONE),
                                  ("tomo_one", (150, 150, 150))])
    solution = solution_for_submission(labels.motors, labels.tomograms, submission)
    assert solution.columns == ["tomo_id", *AXIS_COLUMNS, "Voxel spacing", "Has motor"]
    assert solution["tomo_id"].to_list() == ["tomo_many", "tomo_none", "tomo_one"]
    assert solution.row(0) == ("tomo_many", 100.0, 500.0, 500.0, 10.0, True)
    assert solution.row(1) == ("tomo_none", -1.0, -1.0, -1.0, 15.0, False)
    assert counts(solution, submission) == (2, 0, 0, 1)


def test_nearest_motor_far_or_missing_prediction_is_false_negative(multi_motor_labels):
    labels = read_labels(multi_motor_labels)
    far = make_submission([("tomo_many", (200, 500, 0)), ("tomo_none", (1, 1, 1)),
                           ("tomo_one", NONE)])
    solution = solution_for_submission(labels.motors, labels.tomograms, far)
    assert counts(solution, far) == (0, 1, 2, 0)
    assert solution.row(0)[:4] == ("tomo_many", 100.0, 500.0, 500.0)  # nearest of the three
    assert solution.row(2)[:4] == ("tomo_one", 150.0, 150.0, 150.0)


# --- command line ---------------------------------------------------------------------------

def write_csv(frame: pl.DataFrame, path: Path) -> Path:
    frame.write_csv(path)
    return path


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    python_path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path}
    return subprocess.run([sys.executable, "-m", "kernel_lib.metric", *map(str, args)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)


def main_stdout(*args: str | Path) -> str:
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def example_files(tmp_path, worked_example) -> tuple[Path, Path]:
    solution, submission = worked_example
    solution = solution.with_columns(pl.col("Has motor").cast(pl.Int64))  # as Kaggle writes it
    return (write_csv(solution, tmp_path / "test_labels.csv"),
            write_csv(submission, tmp_path / "submission.csv"))


def test_cli_scores_the_worked_example(example_files):
    result = run_cli(*example_files)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"score {WORKED_EXAMPLE_SCORE!r} ")
    assert lines[1] == "tp 1 fp 1 fn 2 tn 0"
    assert lines[2] == "precision 0.500000 recall 0.333333"


def test_cli_beta_and_radius_options(example_files):
    assert main_stdout(*example_files, "--beta", "1").startswith("score 0.4 ")
    # with a 5 A radius even the 1.7-voxel miss of tomo_b is too far
    assert "tp 0 fp 1 fn 3" in main_stdout(*example_files, "--min-radius", "5")


def test_cli_id_mismatch_exits_2_with_one_line(tmp_path, example_files):
    solution_path, _ = example_files
    wrong = write_csv(make_submission([("tomo_a", NONE), ("tomo_zzz", NONE)]), tmp_path / "s.csv")
    result = run_cli(solution_path, wrong)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "tomo_zzz" in result.stderr and "tomo_b" in result.stderr


def test_cli_missing_file_exits_2(tmp_path, example_files):
    solution_path, _ = example_files
    result = run_cli(solution_path, tmp_path / "nope.csv")
    assert result.returncode == 2
    assert "nope.csv" in result.stderr and "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_wrong_columns_exits_2(tmp_path, example_files):
    _, submission_path = example_files
    bad = tmp_path / "bad_solution.csv"
    bad.write_text("tomo_id,z,y,x\ntomo_a,1,2,3\n")
    result = run_cli(bad, submission_path)
    assert result.returncode == 2
    assert "bad_solution.csv" in result.stderr and "Traceback" not in result.stderr


def test_cli_accepts_train_labels(multi_motor_labels, tmp_path):
    submission = write_csv(make_submission([("tomo_many", (195, 880, 910)), ("tomo_none", NONE),
                                            ("tomo_one", NONE)]), tmp_path / "submission.csv")
    assert metric.main([str(multi_motor_labels), str(submission)]) == 0
    result = run_cli(multi_motor_labels, submission)
    assert result.returncode == 0, result.stderr
    assert "tp 1 fp 0 fn 1 tn 1" in result.stdout


def test_main_only_submitted_scores_a_fold(multi_motor_labels, tmp_path, capsys):
    fold = write_csv(make_submission([("tomo_one", (150, 150, 150))]), tmp_path / "fold.csv")
    assert metric.main([str(multi_motor_labels), str(fold)]) == 2
    assert "2 missing" in capsys.readouterr().err
    assert metric.main([str(multi_motor_labels), str(fold), "--only-submitted"]) == 0
    assert capsys.readouterr().out.startswith("score 1.0 ")


def test_main_usage_error_returns_2(capsys):
    assert metric.main([]) == 2
    assert metric.main(["a.csv", "b.csv", "--beta", "0"]) == 2


REAL_LABELS = REPO.parent / "shared" / "data" / "byu" / "train_labels.csv"


@pytest.mark.skipif(not REAL_LABELS.is_file(), reason="real train_labels.csv not available")
def test_real_labels_any_listed_motor_scores_perfectly():
    labels = read_labels(REAL_LABELS)
    last_motor = labels.motors.unique("tomo_id", keep="last", maintain_order=True)
    submission = (labels.tomograms.select("tomo_id")
                  .join(last_motor, on="tomo_id", how="left")
                  .select("tomo_id", *(pl.col(c).fill_null(-1.0).alias(a)
                                       for c, a in zip("zyx", AXIS_COLUMNS))))
    solution = solution_for_submission(labels.motors, labels.tomograms, submission)
    assert counts(solution, submission) == (362, 0, 0, 286)
    assert score(solution, submission) == 1.0
