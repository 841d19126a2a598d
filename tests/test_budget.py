"""The time budget: deadlines, the rate tracker, and inference that stays on time."""

from __future__ import annotations

import datetime as dt
import time

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kernel_lib.budget import EPOCH_CUTOFF, Budget, BudgetError, Deadline, FakeClock
from kernel_lib.config import PipelineConfig
from kernel_lib.infer import Predictor, main, parse_deadline, run_inference
from kernel_lib.labels import read_submission
from kernel_lib.model import build_model, save_checkpoint
from kernel_lib.synthetic import generate_dataset

N_TEST = 6


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    generate_dataset(root, n_train=1, n_test=N_TEST, seed=5, size="tiny", progress=False,
                     workers=1)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A valid run directory with a randomly initialised model (no training)."""
    cfg = PipelineConfig(target_spacing=32.0, assumed_test_spacing=15.6)
    path = tmp_path_factory.mktemp("run")
    save_checkpoint(build_model(cfg), cfg, path)
    return path


def _sample_ids(root) -> list[str]:
    return pl.read_csv(root / "sample_submission.csv")["tomo_id"].to_list()


# --- deadlines ------------------------------------------------------------------------------

def test_deadline_from_seconds_epoch_and_datetime():
    clock = FakeClock(2_000_000_000.0)
    assert Deadline.coerce(90, clock).remaining() == pytest.approx(90)
    assert Deadline.coerce(-5.0, clock).passed()
    assert Deadline.coerce(2_000_000_600, clock).remaining() == pytest.approx(600)
    when = dt.datetime.fromtimestamp(2_000_000_060)
    assert Deadline.coerce(when, clock).remaining() == pytest.approx(60)
    assert Deadline.coerce(None) is None
    with pytest.raises(BudgetError, match="seconds from now nor a Unix time"):
        Deadline.coerce("soon")
    with pytest.raises(BudgetError, match="finite"):
        Deadline.in_seconds(float("nan"))


def test_cli_deadline_parsing():
    assert parse_deadline(str(EPOCH_CUTOFF + 5)).at == pytest.approx(EPOCH_CUTOFF + 5)
    iso = parse_deadline("2031-01-02T03:04:05+00:00")
    assert iso.at == dt.datetime(2031, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc).timestamp()
    with pytest.raises(BudgetError, match="--deadline-minutes"):
        parse_deadline("3600")
    with pytest.raises(BudgetError, match="ISO"):
        parse_deadline("tomorrow")


# --- the rate tracker ----------------------------------------------------------------------

def test_budget_projects_steps_down_and_stops():
    clock = FakeClock()
    budget = Budget(Deadline.in_seconds(100, clock), reserve_seconds=10, safety=1.5)
    assert budget.can_start_next() and not budget.should_drop_optional(50)  # nothing measured
    budget.start()
    clock.advance(20)
    assert budget.finished() == 20
    assert budget.available() == pytest.approx(70)
    assert not budget.should_drop_optional(3) and budget.should_drop_optional(4)
    assert budget.is_late(4) and not budget.is_late(3)
    budget.stepped_down()
    assert not budget.measured and not budget.should_drop_optional(100)  # wait for a new rate
    assert budget.seconds_per_item == 20  # the old rate is the estimate meanwhile
    clock.advance(5)
    budget.finished()
    assert budget.seconds_per_item == 5 and budget.measured  # old level forgotten
    clock.advance(62)  # 3 s left after the reserve; the next item needs 5 * 1.5
    assert not budget.can_start_next()
    with pytest.raises(BudgetError):
        Budget(Deadline.in_seconds(1), safety=0.5)


# --- inference on time ----------------------------------------------------------------------

def test_passed_deadline_writes_minus_one_rows_for_every_sample_tomogram(tiny_data, run_dir,
                                                                        tmp_path):
    out = tmp_path / "submission.csv"
    started = time.perf_counter()
    with pytest.warns(UserWarning, match=f"no time left for {N_TEST} of {N_TEST} tomogram"):
        table = run_inference(tiny_data, [run_dir], out=out, progress=False, deadline=-1.0,
                              reserve_seconds=0)
    assert time.perf_counter() - started < 10  # nothing was read or predicted
    written = read_submission(out)
    assert written["tomo_id"].to_list() == _sample_ids(tiny_data)
    assert (written.select("Motor axis 0", "Motor axis 1", "Motor axis 2").to_numpy() == -1).all()
    assert table["error"].str.contains("deadline").all()


def test_cli_deadline_minutes_always_writes_the_submission(tiny_data, run_dir, tmp_path, capsys):
    out = tmp_path / "submission.csv"
    with pytest.warns(UserWarning, match="no time left"):
        code = main(["--data-root", str(tiny_data), "--weights", str(run_dir), "--out",
                     str(out), "--deadline-minutes", "-1", "--no-progress"])
    assert code == 0 and read_submission(out).height == N_TEST
    assert f"{N_TEST} failed" in capsys.readouterr().out


def test_generous_deadline_predicts_everything(tiny_data, run_dir, tmp_path):
    table = run_inference(tiny_data, [run_dir], out=tmp_path / "s.csv", progress=False,
                          deadline=3600, threshold="fixed:0.0")
    assert table["error"].is_null().all() and (table["Motor axis 0"] >= 0).all()


class _DarkSpot(nn.Module):
    """A cheap stand-in model: logits = darkness of the centre slice."""

    input_multiple = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -F.avg_pool2d(x[:, x.shape[1] // 2:x.shape[1] // 2 + 1], 4)


class _TimedPredictor(Predictor):
    """Advances a fake clock by the work each tomogram would cost and logs the mode it ran in:
    1 + 2 units per model and flip (TTA with two models: 13, no TTA: 5, one model: 3)."""

    def __init__(self, clock: FakeClock, cfg: PipelineConfig) -> None:
        super().__init__([_DarkSpot(), _DarkSpot()], cfg, "cpu", batch_size=4, tta=True)
        self.clock, self.log = clock, []

    def heatmap(self, volume, z_stride=None, model_slices=None):
        self.log.append((self.tta, len(self.models)))
        self.clock.advance(1 + 2 * len(self.models) * (3 if self.tta else 1))
        return super().heatmap(volume, z_stride, model_slices)


@pytest.mark.parametrize("prefetch", [0, 1])
def test_tight_budget_drops_tta_then_members_then_writes_minus_one(tiny_data, tmp_path,
                                                                    prefetch):
    clock = FakeClock()
    cfg = PipelineConfig(target_spacing=32.0, assumed_test_spacing=15.6)
    predictor = _TimedPredictor(clock, cfg)
    out = tmp_path / "submission.csv"
    # 29.5 units: 13 (full) -> drop TTA -> 5 -> drop the second model -> 3, 3, 3 -> 2.5 left,
    # less than one more tomogram (3 x 1.2 safety): the sixth gets a -1 row.
    with pytest.warns(UserWarning) as caught:
        table = run_inference(tiny_data, None, out=out, progress=False, predictor=predictor,
                              threshold="fixed:0.0", reserve_seconds=0, prefetch=prefetch,
                              deadline=Deadline.in_seconds(29.5, clock))
    messages = [str(w.message) for w in caught]
    assert predictor.log == [(True, 2), (False, 2), (False, 1), (False, 1), (False, 1)]
    assert any("dropping flip TTA" in m for m in messages)
    assert any("dropping 1 extra ensemble member" in m for m in messages)
    assert any("no time left for 1 of 6" in m for m in messages)
    written = read_submission(out)
    assert written["tomo_id"].to_list() == _sample_ids(tiny_data)
    coords = written.select("Motor axis 0", "Motor axis 1", "Motor axis 2").to_numpy()
    assert (coords[:5] >= 0).all() and (coords[5] == -1).all()
    assert table["error"][5].startswith("skipped") and table["error"][:5].is_null().all()
