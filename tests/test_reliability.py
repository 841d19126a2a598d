"""Nothing lost, and clear errors: resume after a kill, NaN loss, the users' mistakes at the CLIs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

import kernel_lib.train as train_module
from kernel_lib.config import CONFIG_VERSION, PipelineConfig
from kernel_lib.model import build_model, save_checkpoint
from kernel_lib.synthetic import generate_dataset
from kernel_lib.train import TrainConfig, TrainError, train

ROOT = Path(__file__).resolve().parents[1]
CFG = PipelineConfig(decoder_channels=(16, 8))


def _tcfg(cache: Path, **changes) -> TrainConfig:
    base = dict(fold=-1, epochs=2, steps_per_epoch=2, batch_size=2, crop=64, seed=9,
                cache_dir=str(cache), verifier_steps=0)
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reliability") / "data"
    generate_dataset(root, n_train=3, n_test=1, seed=21, size="tiny", progress=False)
    return root


def _state(run: Path) -> dict:
    return torch.load(run / "last.pt", weights_only=False)


def test_killed_run_resumes_to_the_same_result(tiny, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    train(tiny, tmp_path / "straight", CFG, _tcfg(cache), progress=False)

    original = train_module.StackSampler.batch
    calls = {"n": 0}

    def killed_in_epoch_two(self, rng, size):
        calls["n"] += 1
        if calls["n"] == 4:  # epoch 2, second step: the process dies here
            raise KeyboardInterrupt
        return original(self, rng, size)

    monkeypatch.setattr(train_module.StackSampler, "batch", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(tiny, tmp_path / "killed", CFG, _tcfg(cache), progress=False)
    assert _state(tmp_path / "killed")["epoch"] == 1  # the epoch-1 checkpoint survived
    assert not list((tmp_path / "killed").glob(".*.tmp"))
    monkeypatch.setattr(train_module.StackSampler, "batch", original)
    train(tiny, tmp_path / "killed", CFG, _tcfg(cache), progress=False)

    straight, resumed = _state(tmp_path / "straight"), _state(tmp_path / "killed")
    assert resumed["epoch"] == straight["epoch"] == 2
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert pl.read_csv(tmp_path / "killed" / "metrics.csv")["train_loss"].to_list() == \
        pl.read_csv(tmp_path / "straight" / "metrics.csv")["train_loss"].to_list()


def test_nan_loss_stops_with_the_step_and_last_checkpoint(tiny, tmp_path, monkeypatch):
    real_loss = train_module.heatmap_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(train_module, "heatmap_loss", poisoned)
    with pytest.raises(TrainError, match=r"loss became nan at epoch 2, step 2.*last\.pt"):
        train(tiny, tmp_path / "run", CFG, _tcfg(tmp_path / "cache"), progress=False)
    assert _state(tmp_path / "run")["epoch"] == 1


def test_changed_settings_refuse_to_resume(tiny, tmp_path):
    cache = tmp_path / "cache"
    train(tiny, tmp_path / "run", CFG, _tcfg(cache, epochs=1), progress=False)
    with pytest.raises(TrainError, match="other settings"):
        train(tiny, tmp_path / "run", CFG.replace(stack_half=CFG.stack_half + 1),
              _tcfg(cache, epochs=2), progress=False)


def test_another_seed_or_fold_refuses_to_resume(tiny, tmp_path):
    # Training a second seed into the first one's folder must not quietly continue the first.
    cache = tmp_path / "cache"
    train(tiny, tmp_path / "run", CFG, _tcfg(cache, epochs=1), progress=False)
    assert _state(tmp_path / "run")["run"] == {"seed": 9, "fold": -1, "n_folds": 5}
    for change in ({"seed": 10}, {"fold": 0, "n_folds": 3}):
        with pytest.raises(TrainError, match=r"belongs to a run with .*'seed': 9.*new --out"):
            train(tiny, tmp_path / "run", CFG, _tcfg(cache, epochs=2, **change), progress=False)
    resumed = train(tiny, tmp_path / "run", CFG, _tcfg(cache, epochs=2), progress=False)
    assert resumed.epochs_done == 2  # the same run still resumes


# ---------------------------------------------------------------- the users' mistakes, CLIs


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def _assert_clear(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-1500:])
    assert "Traceback" not in done.stderr, done.stderr[-1500:]
    for needle in needles:
        assert needle in done.stderr, (needle, done.stderr[-1500:])


def _labels_copy(tiny: Path, tmp_path: Path, transform) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    (root / "train").symlink_to(tiny / "train")
    frame = pl.read_csv(tiny / "train_labels.csv")
    transform(frame).write_csv(root / "train_labels.csv")
    return root


def test_train_missing_data_root(tmp_path):
    _assert_clear(_cli("kernel_lib.train", "--data-root", str(tmp_path / "absent"), "--out",
                       str(tmp_path / "run")), "absent", "does not exist")


def test_train_renamed_label_column(tiny, tmp_path):
    root = _labels_copy(tiny, tmp_path, lambda f: f.rename({"Motor axis 1": "motor_y"}))
    _assert_clear(_cli("kernel_lib.train", "--data-root", str(root), "--out",
                       str(tmp_path / "run")), "Motor axis 1", "train_labels.csv")


def test_train_label_outside_array_shape(tiny, tmp_path):
    def push_out(frame: pl.DataFrame) -> pl.DataFrame:
        first = frame["tomo_id"][0]
        return frame.with_columns(pl.when(pl.col("tomo_id") == first).then(99999.0)
                                  .otherwise(pl.col("Motor axis 2")).alias("Motor axis 2"))

    root = _labels_copy(tiny, tmp_path, push_out)
    first = pl.read_csv(tiny / "train_labels.csv")["tomo_id"][0]
    _assert_clear(_cli("kernel_lib.train", "--data-root", str(root), "--out",
                       str(tmp_path / "run")), first)


def test_train_unknown_timm_model(tiny, tmp_path):
    _assert_clear(_cli("kernel_lib.train", "--data-root", str(tiny), "--out",
                       str(tmp_path / "run"), "--encoder", "resnet_of_dreams", "--epochs", "1",
                       "--steps-per-epoch", "1", "--cache-dir", str(tmp_path / "cache")),
                  "resnet_of_dreams", "unknown timm model")


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--crop", "100"),
                                        ("--loss", "mse"), ("--fold", "seven")])
def test_train_bad_flags(tmp_path, flag, value):
    done = _cli("kernel_lib.train", "--data-root", str(tmp_path), "--out", str(tmp_path / "r"),
                flag, value)
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_infer_weights_without_config(tiny, tmp_path):
    (tmp_path / "run").mkdir()
    _assert_clear(_cli("kernel_lib.infer", "--data-root", str(tiny), "--weights",
                       str(tmp_path / "run")), "config.json", str(tmp_path / "run"))


def test_infer_config_from_an_incompatible_version(tiny, tmp_path):
    run = tmp_path / "run"
    save_checkpoint(build_model(CFG), CFG.replace(assumed_test_spacing=15.6), run)
    data = json.loads((run / "config.json").read_text())
    data["version"] = CONFIG_VERSION + 1
    (run / "config.json").write_text(json.dumps(data))
    _assert_clear(_cli("kernel_lib.infer", "--data-root", str(tiny), "--weights", str(run)),
                  "version")


def test_infer_missing_data_root_and_bad_threshold(tiny, tmp_path):
    run = tmp_path / "run"
    save_checkpoint(build_model(CFG), CFG.replace(assumed_test_spacing=15.6), run)
    _assert_clear(_cli("kernel_lib.infer", "--data-root", str(tmp_path / "nowhere"),
                       "--weights", str(run)), "nowhere")
    _assert_clear(_cli("kernel_lib.infer", "--data-root", str(tiny), "--weights", str(run),
                       "--threshold", "best:0.3"), "best:0.3")
