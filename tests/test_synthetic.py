"""The synthetic BYU-format generator: layout, CSV conventions, determinism, motor positions."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
from scipy import ndimage as ndi

from kernel_lib import synthetic, viz
from kernel_lib._synthetic_scene import MOTOR_WIDTH_A
from kernel_lib.synthetic import (
    MOTORS_PER_TOMOGRAM,
    REAL_TOMOGRAMS,
    SyntheticDataError,
    calibration_from_labels,
    draw_specs,
    generate_dataset,
    real_spacings,
    render_tomogram,
    write_tomogram,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN_HEADER = (
    "row_id,tomo_id,Motor axis 0,Motor axis 1,Motor axis 2,Array shape (axis 0),"
    "Array shape (axis 1),Array shape (axis 2),Voxel spacing,Number of motors"
)
TEST_HEADER = (
    "tomo_id,Motor axis 0,Motor axis 1,Motor axis 2,Voxel spacing,Has motor,"
    "Array shape (axis 0),Array shape (axis 1),Array shape (axis 2)"
)
SUBMISSION_HEADER = "tomo_id,Motor axis 0,Motor axis 1,Motor axis 2"
FLOAT_CELL = re.compile(r"^-?\d+\.\d+$")
SLICE_NAME = re.compile(r"^slice_\d{4}\.jpg$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """Eight tiny train tomograms with 0, 1 and 3 motors, four test tomograms (two processes)."""
    out = tmp_path_factory.mktemp("synthetic")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(synthetic, "MOTORS_PER_TOMOGRAM", {0: 1, 1: 1, 3: 1})
        generate_dataset(out, n_train=8, n_test=4, seed=5, size="tiny", workers=2, progress=False)
    return out


def read_volume(folder: Path) -> np.ndarray:
    slices = sorted(folder.glob("slice_*.jpg"))
    return np.stack([cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in slices])


def csv_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


# --- layout and CSV conventions ---------------------------------------------------------------


def test_layout_and_exact_headers(dataset):
    names = sorted(p.name for p in dataset.iterdir())
    assert names == [
        "sample_submission.csv",
        "synthetic.json",
        "test",
        "test_labels.csv",
        "train",
        "train_labels.csv",
    ]
    assert csv_lines(dataset / "train_labels.csv")[0] == TRAIN_HEADER
    assert csv_lines(dataset / "test_labels.csv")[0] == TEST_HEADER
    assert csv_lines(dataset / "sample_submission.csv")[0] == SUBMISSION_HEADER
    marker = json.loads((dataset / "synthetic.json").read_text())
    assert (
        marker["seed"] == 5
        and marker["n_train"] == 8
        and marker["version"] == synthetic.GENERATOR_VERSION
    )
    assert len(list((dataset / "train").iterdir())) == 8
    assert len(list((dataset / "test").iterdir())) == 4


def test_train_labels_conventions(dataset):
    lines = csv_lines(dataset / "train_labels.csv")[1:]
    for line in lines:
        cells = line.split(",")
        assert all(FLOAT_CELL.match(c) for c in cells[2:5]), line  # 169.0, -1.0
        assert all(c.isdigit() for c in cells[5:8] + [cells[9]]), line
    labels = pl.read_csv(dataset / "train_labels.csv")
    assert labels["row_id"].to_list() == list(range(len(labels)))
    assert labels["tomo_id"].to_list() == sorted(labels["tomo_id"].to_list())
    per_tomo = labels.group_by("tomo_id").agg(
        pl.len().alias("rows"),
        pl.first("Number of motors"),
        pl.col("Motor axis 0").min().alias("min_z"),
    )
    counts = sorted(per_tomo["Number of motors"].to_list())
    assert 0 in counts and 3 in counts  # the fixture forces a multi-motor tomogram
    for row in per_tomo.iter_rows(named=True):
        if row["Number of motors"] == 0:
            assert row["rows"] == 1 and row["min_z"] == -1.0
        else:
            assert row["rows"] == row["Number of motors"] and row["min_z"] >= 0


def test_shapes_match_the_slices(dataset):
    labels = pl.read_csv(dataset / "train_labels.csv").unique("tomo_id")
    for row in labels.iter_rows(named=True):
        volume = read_volume(dataset / "train" / row["tomo_id"])
        assert volume.shape == tuple(row[c] for c in synthetic.SHAPES)
        assert volume.dtype == np.uint8 and volume.ndim == 3  # grayscale JPEGs


def test_test_folders_hold_only_jpeg_slices(dataset):
    for folder in (dataset / "test").iterdir():
        names = sorted(p.name for p in folder.iterdir())
        assert names and all(SLICE_NAME.match(n) for n in names), folder
        assert names == [f"slice_{i:04d}.jpg" for i in range(len(names))]
        assert all(p.is_file() for p in folder.iterdir())


def test_test_labels_and_sample_submission(dataset):
    key = pl.read_csv(dataset / "test_labels.csv")
    sub = pl.read_csv(dataset / "sample_submission.csv")
    folders = sorted(p.name for p in (dataset / "test").iterdir())
    assert key["tomo_id"].to_list() == folders == sub["tomo_id"].to_list()
    assert set(key["Has motor"].to_list()) <= {0, 1}
    for row in key.iter_rows(named=True):
        coords = [row[a] for a in synthetic.AXES]
        assert (coords == [-1.0] * 3) == (row["Has motor"] == 0)
    assert (sub.select(synthetic.AXES).to_numpy() == synthetic.DUMMY_SUBMISSION_VALUE).all()
    assert all(re.fullmatch(r"tomo_[0-9a-f]{6}", t) for t in key["tomo_id"].to_list())


def test_labels_lie_inside_the_arrays(dataset):
    frames = [pl.read_csv(dataset / "train_labels.csv"), pl.read_csv(dataset / "test_labels.csv")]
    for frame in frames:
        located = frame.filter(pl.col("Motor axis 0") >= 0)
        assert located.height > 0
        for axis, shape in zip(synthetic.AXES, synthetic.SHAPES):
            assert (located[axis] <= located[shape] - 1).all()
            assert (located[axis] >= 0).all()


def test_existing_tomo_ids_are_unique(dataset):
    ids = [p.name for p in (dataset / "train").iterdir()] + [
        p.name for p in (dataset / "test").iterdir()
    ]
    assert len(ids) == len(set(ids))


# --- the pictures carry the labels -------------------------------------------------------------


def motor_contrast(volume: np.ndarray, centre, spacing: float) -> float:
    """Mean of a shell around the centre minus mean of a ball at it (normalised, smoothed)."""
    width = MOTOR_WIDTH_A / spacing
    lo, hi = np.percentile(volume, (2, 98))
    smooth = ndi.gaussian_filter(np.clip((volume - lo) / (hi - lo), 0, 1), 0.2 * width)
    zz, yy, xx = np.ogrid[: volume.shape[0], : volume.shape[1], : volume.shape[2]]
    r = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
    return float(
        smooth[(r >= 0.8 * width) & (r <= 1.3 * width)].mean() - smooth[r <= 0.3 * width].mean()
    )


def located_motors(dataset: Path) -> pl.DataFrame:
    """Every labelled motor of the train and test sets: split, tomo_id, axes, spacing."""
    columns = ["tomo_id", *synthetic.AXES, "Voxel spacing"]
    frames = [
        pl.read_csv(dataset / f"{split}_labels.csv")
        .select(columns)
        .with_columns(split=pl.lit(split))
        for split in ("train", "test")
    ]
    return pl.concat(frames).filter(pl.col("Motor axis 0") >= 0)


def test_every_labelled_motor_is_darker_than_its_surroundings(dataset):
    labels = located_motors(dataset)
    assert labels.height >= 6
    for (split, tomo_id), rows in labels.group_by("split", "tomo_id"):
        volume = read_volume(dataset / split / tomo_id).astype(np.float32)
        for row in rows.iter_rows(named=True):
            centre = [row[a] for a in synthetic.AXES]
            assert motor_contrast(volume, centre, row["Voxel spacing"]) > 0.05, (
                split,
                tomo_id,
                centre,
            )


def test_darkest_blob_does_not_find_the_motors(dataset):
    """Beads, granules and debris outweigh motors: smoothing then argmin must not be a detector."""
    hits = []
    for (split, tomo_id), rows in located_motors(dataset).group_by("split", "tomo_id"):
        volume = read_volume(dataset / split / tomo_id).astype(np.float32)
        width = MOTOR_WIDTH_A / rows["Voxel spacing"][0]
        smooth = ndi.gaussian_filter(volume, 0.3 * width)
        darkest = np.array(np.unravel_index(np.argmin(smooth), smooth.shape))
        motors = rows.select(synthetic.AXES).to_numpy()
        hits.append(np.linalg.norm(motors - darkest, axis=1).min() < width)
    assert len(hits) >= 4 and np.mean(hits) <= 0.5


def test_render_tomogram_puts_motors_where_asked():
    shape, spacing = (48, 176, 176), 15.6
    motors = [(24.0, 60.0, 70.0), (26.0, 120.0, 110.0)]
    volume = render_tomogram(shape, spacing, motors, np.random.default_rng(1))
    assert volume.shape == shape and volume.dtype == np.uint8
    for centre in motors:
        assert motor_contrast(volume.astype(np.float32), centre, spacing) > 0.05
    empty = render_tomogram(shape, spacing, [], np.random.default_rng(2), fast=True)
    assert empty.shape == shape and empty.dtype == np.uint8 and empty.std() > 1


def test_render_tomogram_rejects_a_motor_outside():
    with pytest.raises(SyntheticDataError, match="not a"):
        render_tomogram((10, 20, 20), 15.6, [(10, 5, 5)], np.random.default_rng(0))


# --- determinism, calibration, sizes -----------------------------------------------------------


def test_same_seed_same_bytes_and_pixels(tmp_path):
    a = generate_dataset(
        tmp_path / "a", n_train=2, n_test=1, seed=3, workers=1, size="tiny", progress=False
    )
    generate_dataset(
        tmp_path / "b", n_train=2, n_test=1, seed=3, workers=2, size="tiny", progress=False
    )
    generate_dataset(
        tmp_path / "c", n_train=2, n_test=1, seed=4, workers=1, size="tiny", progress=False
    )
    for name in ("train_labels.csv", "test_labels.csv", "sample_submission.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / "train_labels.csv").read_bytes() != (
        tmp_path / "c" / "train_labels.csv"
    ).read_bytes()
    for split in ("train", "test"):
        for folder in (tmp_path / "a" / split).iterdir():
            np.testing.assert_array_equal(
                read_volume(folder), read_volume(tmp_path / "b" / split / folder.name)
            )
    assert a["n_train"] == 2 and a["n_test"] == 1


def test_regenerating_replaces_a_previous_set(tmp_path):
    generate_dataset(tmp_path, n_train=2, n_test=1, seed=0, workers=1, size="tiny", progress=False)
    generate_dataset(tmp_path, n_train=1, n_test=1, seed=1, workers=1, size="tiny", progress=False)
    assert len(list((tmp_path / "train").iterdir())) == 1
    assert pl.read_csv(tmp_path / "train_labels.csv")["tomo_id"].n_unique() == 1


def test_embedded_calibration_matches_the_real_labels(real_labels_path):
    tomograms, motors = calibration_from_labels(real_labels_path)
    assert tomograms == REAL_TOMOGRAMS
    assert motors == MOTORS_PER_TOMOGRAM
    assert sum(r[4] for r in REAL_TOMOGRAMS) == 648


def test_drawn_spacings_shapes_and_counts_follow_the_real_table():
    spacings = set(real_spacings())
    real_shapes = {r[:3] for r in REAL_TOMOGRAMS}
    for size in synthetic.SIZE_NAMES:
        specs = draw_specs(300, 100, seed=1, size=size)
        assert {s.voxel_spacing for s in specs} <= spacings
        if size == "real":
            assert {s.shape for s in specs} <= real_shapes
        else:
            z, yx = synthetic.SIZES[size]["z"], synthetic.SIZES[size]["yx"]
            assert all(
                z[0] <= s.shape[0] <= z[1] and all(yx[0] <= v <= yx[1] for v in s.shape[1:])
                for s in specs
            )
    specs = draw_specs(600, 400, seed=2, size="small")
    train = [s.n_motors for s in specs if s.split == "train"]
    test = [s.n_motors for s in specs if s.split == "test"]
    assert set(test) == {0, 1} and 0.38 < test.count(0) / len(test) < 0.52
    assert set(train) <= set(MOTORS_PER_TOMOGRAM) and 0.38 < train.count(0) / len(train) < 0.5
    assert len({s.tomo_id for s in specs}) == len(specs)


def test_write_tomogram_widens_names_past_9999(tmp_path):
    volume = np.zeros((10001, 2, 2), np.uint8)
    quality = write_tomogram(volume, tmp_path, np.random.default_rng(0))
    assert 70 <= quality <= 95
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "slice_00000.jpg" and names[-1] == "slice_10000.jpg" and len(names) == 10001


# --- command line ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--n-train", "-1"],
        ["--n-test", "-3"],
        ["--size", "huge"],
        ["--workers", "0"],
        ["--n-train", "0", "--n-test", "0"],
    ],
)
def test_cli_bad_flags_exit_2(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main([str(tmp_path / "out"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = subprocess.run(
        [sys.executable, "-m", "kernel_lib.synthetic", str(tmp_path), "--quiet"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "not a previous synthetic set" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_cli_prints_a_summary(tmp_path, capsys):
    argv = [str(tmp_path), "--n-train", "1", "--n-test", "1", "--size", "tiny", "--workers", "1"]
    assert synthetic.main([*argv, "--quiet", "--fast"]) == 0
    out = capsys.readouterr().out
    assert "1 train + 1 test" in out and "voxel spacings" in out


# --- viz ---------------------------------------------------------------------------------------


def test_plot_slices_marks_motors_near_the_shown_slice():
    volume = np.random.default_rng(0).integers(0, 255, (30, 40, 40), dtype=np.uint8)
    motors = [(10, 20, 20), (12, 5, 5), (25, 30, 30)]
    fig = viz.plot_slices_with_motors(volume, motors, z_indices=[10, 20], title="t")
    circles = [len(ax.patches) for ax in fig.axes]
    assert circles == [2, 0]  # z=10 sees the motors at 10 and 12; z=20 is 5 slices from 25
    assert len(viz.montage([volume[0], volume[1], volume[2], volume[3]], ncols=2).axes) == 4


def test_save_figure_writes_a_small_png(tmp_path):
    fig = viz.montage([np.random.default_rng(1).random((64, 64))])
    size = viz.save_figure(fig, tmp_path / "m.png")
    data = (tmp_path / "m.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and size == len(data) < viz.DEMO_MAX_BYTES
