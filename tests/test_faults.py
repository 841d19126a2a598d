"""Fault injection: the submission path survives whatever a test folder throws at it.

Every fault below runs through ``kernel_lib.infer.run_inference`` (what notebook 04 and the CLI
call). The submission must exist, parse, have one row per sample tomogram, and every healthy or
repairable tomogram keeps its normal prediction. The model is a fixed "darkness" detector so a
prediction is a known function of the image: a damaged copy must land where the undamaged one
does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernel_lib.config import PipelineConfig
from kernel_lib.infer import Predictor, run_inference
from kernel_lib.labels import read_submission

SPACING = 16.0
# No percentile clipping, so the dark blob keeps one clear minimum instead of a clipped plateau.
CFG = PipelineConfig(target_spacing=SPACING, assumed_test_spacing=SPACING, z_stride=1,
                     nms_radius_angstrom=160.0, percentile_low=0.0, percentile_high=100.0)
SHAPE = (40, 96, 112)
MOTOR = (24, 60, 40)


class DarknessModel(nn.Module):
    """Logits = darkness of the centre slice, pooled to the output stride."""

    input_multiple = 32

    def __init__(self, stride: int = 4) -> None:
        super().__init__()
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = x[:, x.shape[1] // 2: x.shape[1] // 2 + 1]
        return -4.0 * F.avg_pool2d(mid, self.stride)


class NanModel(DarknessModel):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        out[:, :, ::2] = float("nan")
        out[:, :, 1::4] = float("inf")
        return out


class OomOnBigBatches(DarknessModel):
    """Raises CUDA-style out-of-memory errors for batches above 2, like a small GPU would."""

    def __init__(self) -> None:
        super().__init__()
        self.failures = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            self.failures += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(x)


def _healthy_volume(seed: int, motor=MOTOR) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vol = rng.normal(150, 12, SHAPE)
    zz, yy, xx = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    d2 = (zz - motor[0]) ** 2 + (yy - motor[1]) ** 2 + (xx - motor[2]) ** 2
    vol -= 100 * np.exp(-d2 / (2 * 3.0 ** 2))  # a dark blob with one clear minimum
    return vol.clip(0, 255).astype(np.uint8)


def _write(folder: Path, volume: np.ndarray) -> None:
    folder.mkdir(parents=True)
    for z, plane in enumerate(volume):
        cv2.imwrite(str(folder / f"slice_{z:04d}.jpg"), plane, [cv2.IMWRITE_JPEG_QUALITY, 95])


def _slice(folder: Path, z: int) -> Path:
    return folder / f"slice_{z:04d}.jpg"


FAULTS = {
    "f01_corrupt_jpeg": lambda d: _slice(d, 5).write_bytes(b"\xff\xd8\xff\xe0 garbage " * 20),
    "f02_truncated_jpeg": lambda d: _slice(d, 6).write_bytes(_slice(d, 6).read_bytes()[:300]),
    "f03_zero_byte_slice": lambda d: _slice(d, 7).write_bytes(b""),
    "f04_rgb_slice": lambda d: cv2.imwrite(str(_slice(d, 8)), cv2.cvtColor(
        cv2.imread(str(_slice(d, 8)), cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2BGR)),
    "f05_16bit_png_and_stray_file": lambda d: (
        cv2.imwrite(str(d / "slice_0009.png"),
                    cv2.imread(str(_slice(d, 9)), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257),
        _slice(d, 9).unlink(), (d / "notes.txt").write_text("not a slice")),
    "f06_missing_middle_slice": lambda d: _slice(d, 10).unlink(),
    "f07_slices_of_different_sizes": lambda d: cv2.imwrite(
        str(_slice(d, 11)), cv2.imread(str(_slice(d, 11)), cv2.IMREAD_GRAYSCALE)[:80, :100]),
}
UNDAMAGED = "tomo_reference"


@pytest.fixture(scope="module")
def faulty_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    test = root / "test"
    healthy = _healthy_volume(0)
    ids = [UNDAMAGED, *FAULTS]
    _write(test / UNDAMAGED, healthy)
    for name, damage in FAULTS.items():
        _write(test / name, healthy)
        damage(test / name)
    # Tomograms that cannot be predicted normally, but must still get a row.
    (test / "f08_empty_folder").mkdir()
    _write(test / "f09_single_slice", healthy[MOTOR[0]:MOTOR[0] + 1])
    _write(test / "f10_smaller_than_input_window", healthy[20:26, 50:70, 30:50])
    _write(test / "f11_blank_tomogram", np.full(SHAPE, 128, np.uint8))
    extreme = np.where(np.random.default_rng(1).random(SHAPE) < 0.5, 0, 255).astype(np.uint8)
    _write(test / "f12_extreme_values", extreme)
    _write(test / "f13_folder_not_in_sample", healthy)
    ids += ["f08_empty_folder", "f09_single_slice", "f10_smaller_than_input_window",
            "f11_blank_tomogram", "f12_extreme_values", "f14_sample_row_without_folder"]
    pl.DataFrame({"tomo_id": ids, "Motor axis 0": 100, "Motor axis 1": 100,
                  "Motor axis 2": 100}).write_csv(root / "sample_submission.csv")
    return root


def _predictor(model: nn.Module, batch_size: int = 8) -> Predictor:
    return Predictor([model], CFG, "cpu", batch_size=batch_size)


@pytest.fixture(scope="module")
def table(faulty_root) -> pl.DataFrame:
    with pytest.warns(UserWarning):
        result = run_inference(faulty_root, None, threshold="fixed:0.0", progress=False,
                               out=faulty_root / "submission.csv",
                               predictor=_predictor(DarknessModel()))
    return result


def _row(table: pl.DataFrame, tomo_id: str) -> np.ndarray:
    row = table.filter(pl.col("tomo_id") == tomo_id)
    assert row.height == 1, tomo_id
    return row.select("Motor axis 0", "Motor axis 1", "Motor axis 2").to_numpy()[0]


def test_submission_has_one_parsable_row_per_sample_tomogram(faulty_root, table):
    sample = pl.read_csv(faulty_root / "sample_submission.csv")["tomo_id"].to_list()
    written = read_submission(faulty_root / "submission.csv")
    assert written["tomo_id"].to_list() == sample
    assert "f13_folder_not_in_sample" not in written["tomo_id"].to_list()
    assert not list(faulty_root.glob("*.tmp"))


def test_reference_prediction_is_the_motor(table):
    assert np.abs(_row(table, UNDAMAGED) - np.array(MOTOR)).max() <= 2.5


@pytest.mark.parametrize("fault", list(FAULTS))
def test_damaged_slice_tomogram_matches_its_undamaged_copy(table, fault):
    reference = _row(table, UNDAMAGED)
    got = _row(table, fault)
    assert got[0] >= 0, f"{fault} lost its motor"
    assert np.linalg.norm(got - reference) <= 2.0, (fault, got, reference)
    assert table.filter(pl.col("tomo_id") == fault)["error"][0] is None


@pytest.mark.parametrize("fault", ["f08_empty_folder", "f14_sample_row_without_folder"])
def test_unreadable_tomogram_gets_minus_one_and_an_error(table, fault):
    assert _row(table, fault).tolist() == [-1.0, -1.0, -1.0]
    assert "TomogramError" in table.filter(pl.col("tomo_id") == fault)["error"][0]


@pytest.mark.parametrize("fault", ["f09_single_slice", "f10_smaller_than_input_window",
                                   "f11_blank_tomogram", "f12_extreme_values"])
def test_degenerate_tomograms_are_predicted_without_error(table, fault):
    row = table.filter(pl.col("tomo_id") == fault)
    assert row["error"][0] is None, row["error"][0]
    coords = _row(table, fault)
    assert np.isfinite(coords).all()


def test_f15_nan_and_inf_model_output(faulty_root, tmp_path):
    out = tmp_path / "submission.csv"
    with pytest.warns(UserWarning):
        result = run_inference(faulty_root, None, threshold="fixed:0.5", progress=False,
                               out=out, predictor=_predictor(NanModel()))
    written = read_submission(out)
    assert written.height == result.height
    assert np.isfinite(written.select("Motor axis 0", "Motor axis 1", "Motor axis 2")
                       .to_numpy()).all()


def test_f16_out_of_memory_retries_smaller_batches(faulty_root, table, tmp_path):
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    shutil.copytree(faulty_root / "test" / UNDAMAGED, data / "test" / UNDAMAGED)
    pl.DataFrame({"tomo_id": [UNDAMAGED], "Motor axis 0": 1, "Motor axis 1": 1,
                  "Motor axis 2": 1}).write_csv(data / "sample_submission.csv")
    model = OomOnBigBatches()
    predictor = _predictor(model, batch_size=8)
    with pytest.warns(UserWarning, match="out of memory"):
        result = run_inference(data, None, threshold="fixed:0.0", progress=False,
                               predictor=predictor)
    assert model.failures >= 1 and predictor.batch_size <= 2
    assert result["error"][0] is None
    np.testing.assert_allclose(_row(result, UNDAMAGED), _row(table, UNDAMAGED))


def test_f16_out_of_memory_at_batch_one_on_gpu_moves_to_cpu():
    calls = {"n": 0}

    class OomOnce(DarknessModel):
        def forward(self, x):
            calls["n"] += 1
            if calls["n"] == 1:
                raise torch.OutOfMemoryError("CUDA out of memory")
            return super().forward(x)

    predictor = _predictor(OomOnce(), batch_size=1)
    predictor.device = torch.device("meta")  # stands in for a GPU that ran out of memory
    with pytest.warns(UserWarning, match="moving the models to the CPU"):
        heat = predictor.heatmap(_healthy_volume(3)[:4])
    assert predictor.device.type == "cpu" and heat.shape == (4, 24, 28)
    assert calls["n"] == 5  # one failed call, then four stacks on the CPU


def test_the_verifier_stage_survives_every_fault(faulty_root, table, tmp_path):
    """The same faulty folder with a (random) 3D verifier re-scoring the peaks: single-slice,
    tiny, blank and extreme tomograms are still predicted, and nothing new fails."""
    from kernel_lib.verify import Verifier, VerifierNet, VerifierSpec, z_step_for

    torch.manual_seed(0)
    predictor = _predictor(DarknessModel())
    predictor.verifier = Verifier([VerifierNet(VerifierSpec(z_step=z_step_for(CFG)))],
                                  amp=False)
    with pytest.warns(UserWarning):
        checked = run_inference(faulty_root, None, threshold="fixed:0.0", progress=False,
                                out=tmp_path / "submission.csv", predictor=predictor)
    assert checked["tomo_id"].to_list() == table["tomo_id"].to_list()
    assert checked["error"].to_list() == table["error"].to_list()
    ok = checked.filter(pl.col("error").is_null())
    assert np.isfinite(ok["score"].to_numpy()).all() and (ok["Motor axis 0"] >= 0).all()
    assert read_submission(tmp_path / "submission.csv").height == table.height
