"""End to end through the real CLIs: synthetic -> train -> infer -> metric, plus failure paths."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from kernel_lib.config import PipelineConfig
from kernel_lib.infer import InferenceError, run_inference
from kernel_lib.labels import read_sample_submission, read_submission
from kernel_lib.synthetic import generate_dataset
from kernel_lib.train import TrainConfig, TrainError, train

ROOT = Path(__file__).resolve().parents[1]
TRAIN_ARGS = ["--epochs", "2", "--steps-per-epoch", "3", "--batch-size", "2", "--crop", "64",
              "--verifier-steps", "2",
              "--n-folds", "3", "--no-progress", "--seed", "3"]


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("engine") / "data"
    generate_dataset(root, n_train=5, n_test=3, seed=11, size="tiny", progress=False)
    return root


@pytest.mark.slow
def test_train_infer_metric_through_the_clis(tiny, tmp_path):
    run_dir = tmp_path / "run"
    cache = tmp_path / "cache"
    done = _run("kernel_lib.train", "--data-root", str(tiny), "--out", str(run_dir),
                "--cache-dir", str(cache), *TRAIN_ARGS)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("model.pt", "config.json", "last.pt", "metrics.csv", "threshold_sweep.csv",
                 "val_predictions.csv", "folds.csv", "train_config.json", "verifier.pt",
                 "verifier.json", "val_predictions_heatmap.csv"):
        assert (run_dir / name).is_file(), name
    cfg = PipelineConfig.load(run_dir)
    assert cfg.assumed_test_spacing is not None and cfg.assumed_test_spacing > 0
    metrics = pl.read_csv(run_dir / "metrics.csv")
    assert metrics["epoch"].to_list() == [1, 2]
    assert {"train_loss", "val_f2", "val_f2_fixed", "val_f2_quantile", "threshold"} <= set(
        metrics.columns)
    manifest = json.loads(next(cache.glob("prep_*/manifest.json")).read_text())
    assert len(manifest["entries"]) == 5  # train tomograms (true spacing) + validation (assumed)

    out = tmp_path / "submission.csv"
    done = _run("kernel_lib.infer", "--data-root", str(tiny), "--weights", str(run_dir),
                "--out", str(out), "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    submission = read_submission(out)
    assert submission["tomo_id"].to_list() == read_sample_submission(
        tiny / "sample_submission.csv")

    done = _run("kernel_lib.metric", str(tiny / "test_labels.csv"), str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("score ")

    # Resume: rerunning the finished run does not train again and keeps the metrics and the
    # verifier (the file is not rewritten).
    verifier_written = (run_dir / "verifier.pt").stat().st_mtime_ns
    done = _run("kernel_lib.train", "--data-root", str(tiny), "--out", str(run_dir),
                "--cache-dir", str(cache), *TRAIN_ARGS)
    assert done.returncode == 0 and "resuming" in done.stderr
    assert pl.read_csv(run_dir / "metrics.csv").height == 2
    assert (run_dir / "verifier.pt").stat().st_mtime_ns == verifier_written


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    train(tiny, run_dir, PipelineConfig(decoder_channels=(32, 16)),
          TrainConfig(epochs=1, steps_per_epoch=2, batch_size=2, crop=64, n_folds=3, seed=1,
                      verifier_steps=0, cache_dir=str(run_dir.parent / "cache")),
          progress=False)
    return run_dir


@pytest.mark.slow
def test_corrupt_tomogram_gets_its_minus_one_row(tiny, trained, tmp_path):
    broken = tmp_path / "data"
    (broken / "test").mkdir(parents=True)
    ids = read_sample_submission(tiny / "sample_submission.csv")
    for tomo_id in ids:
        (broken / "test" / tomo_id).symlink_to(tiny / "test" / tomo_id)
    (broken / "sample_submission.csv").write_bytes((tiny / "sample_submission.csv").read_bytes())
    bad = broken / "test" / ids[0]
    bad.unlink()
    bad.mkdir()
    (bad / "slice_0000.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.warns(UserWarning, match=ids[0]):
        table = run_inference(broken, [trained], threshold="quantile:1.0", progress=False,
                              out=tmp_path / "sub.csv")
    assert table["tomo_id"].to_list() == ids
    row = table.filter(pl.col("tomo_id") == ids[0])
    assert row["Motor axis 0"][0] == -1.0 and row["error"][0] is not None
    healthy = table.filter(pl.col("tomo_id") != ids[0])
    assert (healthy["Motor axis 0"] >= 0).all() and healthy["error"].is_null().all()
    assert read_submission(tmp_path / "sub.csv").height == len(ids)


@pytest.mark.slow
def test_missing_folder_and_known_spacing(tiny, trained, tmp_path):
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    ids = read_sample_submission(tiny / "sample_submission.csv")
    (data / "test" / ids[1]).symlink_to(tiny / "test" / ids[1])
    (data / "sample_submission.csv").write_bytes((tiny / "sample_submission.csv").read_bytes())
    with pytest.warns(UserWarning):
        table = run_inference(data, [trained, trained], threshold="fixed:0.0", progress=False)
    assert table.height == len(ids)
    assert table.filter(pl.col("error").is_not_null())["tomo_id"].to_list() == [ids[0], ids[2]]


def test_cli_errors_exit_2(tmp_path):
    done = _run("kernel_lib.train", "--data-root", str(tmp_path / "nope"), "--out",
                str(tmp_path / "run"))
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    done = _run("kernel_lib.train", "--data-root", str(tmp_path), "--out", str(tmp_path / "r"),
                "--fold", "x")
    assert done.returncode == 2 and "--fold" in done.stderr
    done = _run("kernel_lib.infer", "--data-root", str(tmp_path), "--weights",
                str(tmp_path / "missing_run"))
    assert done.returncode == 2 and "missing_run" in done.stderr
    assert "Traceback" not in done.stderr
    done = _run("kernel_lib.train", "--data-root", str(tmp_path), "--out", str(tmp_path / "r"),
                "--crop", "50")
    assert done.returncode == 2
    done = _run("kernel_lib.train", "--data-root", str(tmp_path), "--out", str(tmp_path / "r"),
                "--z-sampling", "cubic")
    assert done.returncode == 2 and "--z-sampling" in done.stderr and "nearest" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("other", ["nearest", "box"])
def test_the_other_z_sampling_trains_caches_apart_and_predicts(tiny, trained, tmp_path, other):
    from kernel_lib.train import build_parser

    assert PipelineConfig().z_sampling == "area" != other
    args = build_parser().parse_args(["--data-root", "d", "--out", "o", "--z-sampling", other])
    assert args.z_sampling == other
    run_dir = tmp_path / "run"
    cache = trained.parent / "cache"  # shared with the default run: must not be reused
    train(tiny, run_dir, PipelineConfig(decoder_channels=(32, 16), z_sampling=other),
          TrainConfig(epochs=1, steps_per_epoch=2, batch_size=2, crop=64, n_folds=3, seed=1,
                      verifier_steps=0, cache_dir=str(cache)), progress=False)
    assert PipelineConfig.load(run_dir).z_sampling == other
    settings = {json.loads(m.read_text())["settings"]["z_sampling"]
                for m in cache.glob("prep_*/manifest.json")}
    assert {"area", other} <= settings  # one cache per setting, next to each other
    table = run_inference(tiny, [run_dir], threshold="fixed:0.0", progress=False)
    assert table["error"].is_null().all() and (table["Motor axis 0"] >= 0).all()
    with pytest.raises(InferenceError, match="z_sampling"):  # an ensemble must preprocess alike
        run_inference(tiny, [run_dir, trained], progress=False)


@pytest.mark.slow
def test_an_ensemble_of_runs_with_different_assumed_spacings_says_how_to_fix_it(tiny, trained,
                                                                                tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained, other)
    cfg = PipelineConfig.load(other)
    cfg.assumed_test_spacing = cfg.assumed_test_spacing + 1.0
    cfg.save(other)
    with pytest.raises(InferenceError, match=r"assumed_test_spacing.*--assumed-test-spacing"):
        run_inference(tiny, [trained, other], progress=False)


@pytest.mark.slow
def test_runs_of_other_folds_and_seeds_assume_the_same_test_spacing_and_ensemble(tiny, trained,
                                                                                 tmp_path):
    other = tmp_path / "other"
    train(tiny, other, PipelineConfig(decoder_channels=(32, 16)),
          TrainConfig(epochs=1, steps_per_epoch=1, batch_size=2, crop=64, n_folds=3, fold=2,
                      seed=7, verifier_steps=0, cache_dir=str(trained.parent / "cache")),
          progress=False)
    spacings = pl.read_csv(tiny / "train_labels.csv").unique("tomo_id")["Voxel spacing"]
    assert (PipelineConfig.load(other).assumed_test_spacing
            == PipelineConfig.load(trained).assumed_test_spacing == float(spacings.median()))
    table = run_inference(tiny, [trained, other], threshold="fixed:0.0", progress=False)
    assert table["error"].is_null().all() and table.height == 3


def test_train_is_deterministic_on_cpu(tiny, tmp_path):
    cfg = PipelineConfig(decoder_channels=(16, 8))
    results = []
    for name in ("a", "b"):
        run = tmp_path / name
        train(tiny, run, cfg, TrainConfig(fold=-1, epochs=1, steps_per_epoch=2, batch_size=2,
                                           crop=64, verifier_steps=0, seed=5, ema_decay=0.0,
                                           cache_dir=str(tmp_path / "cache")), progress=False)
        results.append(torch.load(run / "model.pt", weights_only=True)["state_dict"])
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
    assert np.isfinite(pl.read_csv(tmp_path / "a" / "metrics.csv")["train_loss"][0])


def test_lr_schedule_warms_up_decays_and_follows_the_time_limit():
    from kernel_lib.train import lr_factor

    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    steps = [lr_factor(s, 100, 10) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))  # monotone decay after warm-up
    assert steps[-1] == pytest.approx(0.01)
    # A time-boxed run whose clock is at 50% decays as if half-way, even at an early step...
    assert lr_factor(20, 10_000, 10, time_fraction=0.5) == pytest.approx(0.01 + 0.99 * 0.5)
    # ...ends at the floor when the time is up, and the step count still wins when it is ahead.
    assert lr_factor(20, 10_000, 10, time_fraction=1.0) == pytest.approx(0.01)
    assert lr_factor(100, 100, 10, time_fraction=0.1) == pytest.approx(0.01)
    assert lr_factor(5, 100, 10, time_fraction=0.9) == pytest.approx(0.6)  # warm-up untouched


class _BrightSpotModel(torch.nn.Module):
    """Heatmap logits = the middle channel's brightness, pooled to the output stride."""

    input_multiple = 4

    def forward(self, x):
        return torch.nn.functional.avg_pool2d(x[:, 1:2], 4) * 4.0 - 2.0


def test_mined_false_peaks_are_in_model_voxels_and_skip_the_motors():
    from kernel_lib.train import mine_false_peaks

    cfg = PipelineConfig(target_spacing=32.0, z_stride=1)
    volume = np.zeros((24, 96, 96), np.uint8)
    volume[9:12, 16:20, 16:20] = 255  # the motor (aligned with the 4-pixel output stride)
    volume[14:17, 68:72, 56:60] = 255  # a look-alike: the false peak to mine
    motors = {"a": np.array([[10.0, 17.5, 17.5]])}
    found = mine_false_peaks(_BrightSpotModel(), cfg, {"a": volume}, motors, torch.device("cpu"),
                             count=4, min_score=0.5)
    assert set(found) == {"a"}
    assert len(found["a"]) >= 1
    assert np.abs(found["a"][0] - [15.0, 69.5, 57.5]).max() <= 1.0  # best false peak first
    assert np.linalg.norm(found["a"] - motors["a"], axis=1).min() > 600.0 / 32.0
    none = mine_false_peaks(_BrightSpotModel(), cfg, {"b": np.zeros((8, 32, 32), np.uint8)}, {},
                            torch.device("cpu"), min_score=0.5)
    assert none["b"].shape == (0, 3)


def test_checkpoint_choice_prefers_later_epochs_within_noise():
    from kernel_lib.train import replaces_saved

    assert replaces_saved(0.5, None, 8)  # the first epoch is always saved
    assert replaces_saved(0.93, 0.96, 8)  # 8 tomograms: 0.03 is less than half a flip
    assert not replaces_saved(0.85, 0.96, 8)  # a real drop keeps the earlier checkpoint
    assert not replaces_saved(0.93, 0.96, 130)  # 130 tomograms: 0.03 is four flips
    assert replaces_saved(0.96, 0.96, 130)  # ties go to the later epoch


def test_autocast_dtype_follows_the_device(monkeypatch):
    import kernel_lib.infer as infer

    assert infer.autocast_dtype("cuda") == torch.float16  # T4: fp16, with loss scaling
    monkeypatch.setattr(infer, "_cpu_has_bf16", lambda: True)
    assert infer.autocast_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(infer, "_cpu_has_bf16", lambda: False)
    assert infer.autocast_dtype(torch.device("cpu")) is None  # emulated bf16 would be slower
    assert infer.autocast_dtype("meta") is None


def test_a_failing_bf16_probe_means_float32(monkeypatch):
    import kernel_lib.infer as infer

    def broken():
        raise RuntimeError("probe failed")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", broken, raising=False)
    assert infer._cpu_has_bf16() is False
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert infer._cpu_has_bf16() is True


@pytest.mark.parametrize("amp", [True, False])
def test_training_runs_in_the_devices_fast_precision(tiny, tmp_path, monkeypatch, amp):
    import kernel_lib.infer as infer
    import kernel_lib.train as train_module

    for module in (train_module, infer):  # as on a CPU with native bf16
        monkeypatch.setattr(module, "autocast_dtype", lambda device: torch.bfloat16)
    seen: list[torch.dtype] = []
    real_build = train_module.build_model

    def build(cfg, weights=None):
        model = real_build(cfg, weights)
        first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
        return model

    monkeypatch.setattr(train_module, "build_model", build)
    train(tiny, tmp_path / "run", PipelineConfig(decoder_channels=(16, 8)),
          TrainConfig(fold=-1, epochs=1, steps_per_epoch=2, batch_size=2, crop=64, seed=5,
                      verifier_steps=0, ema_decay=0.0, mine_per_epoch=1, amp=amp,
                      cache_dir=str(tmp_path / "cache")),
          progress=False)
    assert len(seen) > 2  # two training steps, then the mining pass over one tomogram
    assert set(seen) == {torch.bfloat16 if amp else torch.float32}
    assert np.isfinite(pl.read_csv(tmp_path / "run" / "metrics.csv")["train_loss"][0])


@pytest.mark.parametrize("flag, expected", [([], True), (["--no-amp"], False)])
def test_infer_cli_passes_the_precision_choice_to_the_predictor(tiny, trained, tmp_path,
                                                                 monkeypatch, flag, expected):
    import kernel_lib.infer as infer

    seen = []
    real_init = infer.Predictor.__init__

    def init(self, *args, **kwargs):
        seen.append(kwargs.get("amp", True))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(infer.Predictor, "__init__", init)
    code = infer.main(["--data-root", str(tiny), "--weights", str(trained), "--out",
                       str(tmp_path / "sub.csv"), "--no-progress", "--device", "cpu", *flag])
    assert code == 0 and seen == [expected]
    assert read_submission(tmp_path / "sub.csv").height == len(
        read_sample_submission(tiny / "sample_submission.csv"))


class _LeftRamp(torch.nn.Module):
    """Logits that rise from left to right whatever the input: not mirror-symmetric, so flip TTA
    shows whether each mirrored prediction was mirrored back."""

    input_multiple = 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ramp = torch.linspace(-3.0, 3.0, w // 4)
        return ramp.expand(n, 1, h // 4, w // 4) + 0.0 * x[:, :1, ::4, ::4]


@pytest.mark.parametrize("cfg_tta, override, expected", [
    (False, None, False), (True, None, True), (True, False, False), (False, True, True)])
def test_flip_tta_follows_the_config_unless_overridden(cfg_tta, override, expected):
    from kernel_lib.infer import Predictor

    cfg = PipelineConfig(tta=cfg_tta, z_stride=1)
    predictor = Predictor([_LeftRamp()], cfg, "cpu", tta=override, amp=False)
    assert predictor.tta is expected
    heat = predictor.heatmap(np.zeros((2, 64, 64), dtype=np.uint8))[0, 0].numpy()
    ramp = torch.sigmoid(torch.linspace(-3.0, 3.0, 16)).numpy()
    # The x-mirror's prediction, mirrored back, is the reversed ramp; the y-mirror changes
    # nothing here: with TTA the heatmap is (2 ramp + reversed ramp) / 3.
    want = (2 * ramp + ramp[::-1]) / 3 if expected else ramp
    np.testing.assert_allclose(heat, want, atol=1e-6)


def test_tta_run_validates_with_it_saves_it_and_inference_follows(tiny, tmp_path, monkeypatch):
    """--tta: validation chooses the rule on flip-TTA scores, mining stays single-pass, the
    setting is saved with the weights and inference uses it unless told --no-tta."""
    import kernel_lib.infer as infer
    import kernel_lib.train as train_module

    made: list[tuple[str, bool]] = []  # (function that built a Predictor, its tta)
    real_init = infer.Predictor.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append((sys._getframe(1).f_code.co_name, self.tta))

    monkeypatch.setattr(infer.Predictor, "__init__", init)
    run_dir = tmp_path / "run"
    code = train_module.main(["--data-root", str(tiny), "--out", str(run_dir), "--cache-dir",
                              str(tmp_path / "cache"), "--epochs", "1", "--steps-per-epoch", "1",
                              "--verifier-steps", "0",
                              "--batch-size", "2", "--crop", "64", "--n-folds", "3",
                              "--mine-per-epoch", "1", "--no-progress", "--tta",
                              "--stack-half", "2", "--stack-step", "64"])
    assert code == 0
    saved = PipelineConfig.load(run_dir)
    assert saved.tta is True and (saved.in_chans, saved.stack_step_slices) == (5, 2)
    assert ("validate", True) in made and ("top_peaks", False) in made  # mining: one pass
    assert {tta for caller, tta in made if caller == "validate"} == {True}

    for flag, expected in (([], True), (["--no-tta"], False)):
        made.clear()
        code = infer.main(["--data-root", str(tiny), "--weights", str(run_dir), "--out",
                           str(tmp_path / "sub.csv"), "--no-progress", "--device", "cpu", *flag])
        assert code == 0 and [tta for _, tta in made] == [expected]


def test_peak_loss_adds_the_bce_of_each_crops_top_logit():
    from kernel_lib.train import heatmap_loss

    torch.manual_seed(0)
    logits = torch.randn(3, 1, 6, 6, requires_grad=True)
    target = torch.zeros(3, 1, 6, 6)
    target[0, 0, 2, 3], target[0, 0, 2, 4] = 1.0, 0.6  # a motor in crop 0 only
    target[2, 0, 5, 5] = 0.3  # a motor a few slices away from crop 2's centre slice
    pixel = heatmap_loss(logits, target, "bce", 2.0)
    assert torch.equal(heatmap_loss(logits, target, "bce", 2.0, peak_weight=0.0), pixel)
    with_peak = heatmap_loss(logits, target, "bce", 2.0, peak_weight=0.5)
    top = logits.detach().flatten(1).amax(1)
    p, t = torch.sigmoid(top), torch.tensor([1.0, 0.0, 0.3])
    by_hand = -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()
    torch.testing.assert_close(with_peak - pixel, 0.5 * by_hand)
    # Its gradient reaches only each crop's top pixel.
    (grad_pixel,) = torch.autograd.grad(pixel, logits, retain_graph=True)
    (grad_both,) = torch.autograd.grad(with_peak, logits)
    extra = (grad_both - grad_pixel).flatten(1)
    assert (extra.abs() > 1e-9).sum(1).tolist() == [1, 1, 1]
    assert torch.equal(extra.abs().argmax(1), logits.detach().flatten(1).argmax(1))


def test_peak_weight_reaches_the_loss_and_is_checked(tiny, tmp_path, monkeypatch):
    import kernel_lib.train as train_module

    seen = []
    real = train_module.heatmap_loss
    monkeypatch.setattr(train_module, "heatmap_loss",
                        lambda *a, **k: seen.append(a[4] if len(a) > 4 else k.get("peak_weight"))
                        or real(*a, **k))
    args = ["--data-root", str(tiny), "--out", str(tmp_path / "run"), "--cache-dir",
            str(tmp_path / "cache"), "--epochs", "1", "--steps-per-epoch", "2", "--verifier-steps",
            "0", "--batch-size",
            "2", "--crop", "64", "--n-folds", "3", "--mine-per-epoch", "0", "--no-progress"]
    assert train_module.main(args + ["--peak-weight", "0.5"]) == 0
    assert seen == [0.5, 0.5]
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["peak_weight"] == 0.5
    with pytest.raises(TrainError, match="peak_weight must be >= 0 \\(got -1"):
        TrainConfig(peak_weight=-1)
