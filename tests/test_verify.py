"""The second-stage verifier: crops, scores, training, files, and its place in train / infer."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from kernel_lib.config import PipelineConfig, ThresholdRule
from kernel_lib.resample import Frame
from kernel_lib.verify import (VERIFIER_NAME, Verifier, VerifierError, VerifierExamples,
                               VerifierNet, VerifierSpec, augmented_crop, collect_examples,
                               combine_scores, crop_input, cut_crops, load_verifier,
                               save_verifier, train_verifier)

SMALL = VerifierSpec(depth=5, size=16, z_step=1, width=4)


def _index_volume(depth: int = 30, size: int = 40) -> np.ndarray:
    """Each voxel holds its slice index, so a crop shows which slices it read."""
    return np.broadcast_to(np.arange(depth, dtype=np.uint8)[:, None, None],
                           (depth, size, size)).copy()


# ---------------------------------------------------------------------------- crops


def test_crops_are_centred_and_step_through_z():
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, (30, 50, 60), dtype=np.uint8)
    spec = VerifierSpec(depth=5, size=10, z_step=2)
    crop = cut_crops(volume, np.array([[15.0, 20.0, 30.0]]), spec)[0]
    assert crop.shape == (5, 10, 10) and crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, volume[11:20:2, 15:25, 25:35])
    assert crop[2, 5, 5] == volume[15, 20, 30]


def test_crops_repeat_the_edge_outside_the_volume():
    volume = np.random.default_rng(1).integers(0, 256, (8, 12, 12), dtype=np.uint8)
    crop = cut_crops(volume, np.array([[0.0, 0.0, 11.0]]), VerifierSpec(depth=3, size=8,
                                                                         z_step=1))[0]
    np.testing.assert_array_equal(crop[0], crop[1])  # z -1 is slice 0 again
    np.testing.assert_array_equal(crop[1, :4, 4:], np.broadcast_to(volume[0, 0, 11], (4, 4)))
    np.testing.assert_array_equal(crop[1, 4, :5], volume[0, 0, 7:12])


def test_crops_read_only_the_prepared_slices():
    volume = _index_volume()
    prepared = np.arange(0, 30, 2)
    spec = VerifierSpec(depth=5, size=8, z_step=2)
    for z in np.linspace(0, 29, 40):
        crop = cut_crops(volume, np.array([[z, 20.0, 20.0]]), spec, prepared)[0]
        read = crop[:, 0, 0]
        assert np.all(read % 2 == 0), (z, read)
        assert abs(int(read[2]) - z) <= 1.0  # the centre snapped to its nearest prepared slice
        # inside the volume the slices stay z_step apart
        if 4 <= z <= 25:
            assert np.all(np.diff(read.astype(int)) == 2), (z, read)
    # garbling every unprepared slice changes no crop
    garbled = volume.copy()
    garbled[1::2] = 255
    centres = np.array([[3.0, 10.0, 10.0], [17.4, 30.0, 5.0], [28.9, 20.0, 39.0]])
    np.testing.assert_array_equal(cut_crops(garbled, centres, spec, prepared),
                                  cut_crops(volume, centres, spec, prepared))


@pytest.mark.parametrize("z_stride, step_angstrom, expected", [(2, 64.0, 2), (4, 64.0, 2),
                                                               (1, 64.0, 1), (3, 64.0, 1),
                                                               (4, 128.0, 4), (2, 32.0, 1)])
def test_the_crop_z_step_follows_the_prepared_lattice(z_stride, step_angstrom, expected):
    from kernel_lib.stacks import slices_read
    from kernel_lib.verify import z_step_for

    cfg = PipelineConfig(z_stride=z_stride, stack_step_angstrom=step_angstrom)
    assert z_step_for(cfg) == expected
    prepared = slices_read(200, cfg.stack_offsets, z_stride)
    inner = prepared[(prepared > 20) & (prepared < 180)]
    assert np.all(np.diff(inner) == expected)  # the crops' lattice is the prepared one


def test_crops_refuse_slices_outside_the_volume():
    with pytest.raises(VerifierError, match="model_slices"):
        cut_crops(_index_volume(10), np.zeros((1, 3)), SMALL, np.array([0, 12]))


@pytest.mark.parametrize("bad", [dict(depth=4), dict(depth=0), dict(size=4), dict(z_step=0),
                                 dict(width=0)])
def test_bad_specs_are_refused(bad):
    with pytest.raises(VerifierError):
        VerifierSpec(**bad)


# ---------------------------------------------------------------------------- scores


def test_combined_score_is_a_weighted_mean_of_the_logits():
    s = np.array([0.1, 0.5, 0.9, 0.99])
    np.testing.assert_allclose(combine_scores(s, s), s, atol=1e-9)
    for weight in (1 / 3, 0.5):
        np.testing.assert_allclose(combine_scores(s, np.full(4, 0.5), weight),
                                   1 / (1 + np.exp(-(1 - weight) * np.log(s / (1 - s)))),
                                   atol=1e-9)
    np.testing.assert_allclose(combine_scores(s, s[::-1], 0.5), combine_scores(s[::-1], s, 0.5))
    np.testing.assert_allclose(combine_scores(s, s[::-1], 0.0), s, atol=1e-9)
    np.testing.assert_allclose(combine_scores(s, s[::-1], 1.0), s[::-1], atol=1e-9)
    grid = np.linspace(0, 1, 21)
    both = combine_scores(grid[:, None], grid[None, :])
    assert np.all(np.diff(both, axis=0) > 0) and np.all(np.diff(both, axis=1) > 0)
    assert np.all((both > 0) & (both < 1))


class _Fixed(Verifier):
    """Probabilities given per candidate, whatever the crop."""

    def __init__(self, probs):
        self.probs = np.asarray(probs, dtype=np.float64)

    def probabilities(self, volume, centres, model_slices=None):
        assert len(centres) == len(self.probs)
        return self.probs


def test_rescore_reorders_the_peaks_by_the_combined_score():
    peaks = np.array([[1.0, 2.0, 3.0, 0.9], [4.0, 5.0, 6.0, 0.8], [7.0, 8.0, 9.0, 0.3]])
    rescored = _Fixed([0.1, 0.95, 0.99]).rescore(peaks, np.zeros((4, 4, 4), np.uint8),
                                                  Frame.identity())
    np.testing.assert_array_equal(rescored[:, :3], peaks[[1, 2, 0], :3])
    np.testing.assert_allclose(rescored[:, 3], combine_scores(peaks[[1, 2, 0], 3],
                                                              np.array([0.95, 0.99, 0.1])))
    assert _Fixed([]).rescore(np.zeros((0, 4)), np.zeros((4, 4, 4), np.uint8),
                              Frame.identity()).shape == (0, 4)


def test_rescore_crops_where_the_peaks_are_in_the_model_frame():
    """Peaks come in original voxels; the crops must be cut at the same place in the model
    volume (original -> model through the tomogram's frame, and back for the answer)."""
    seen = []

    class Recording(_Fixed):
        def probabilities(self, volume, centres, model_slices=None):
            seen.append(np.array(centres))
            return np.full(len(centres), 0.5)

    frame = Frame.centered((0.5, 0.48, 0.52))  # e.g. 15.6 A -> 32 A, a little anisotropic
    in_model = np.array([[10.0, 40.0, 22.0], [3.0, 7.5, 60.0]])
    original = frame.inverse().apply(in_model)
    peaks = np.column_stack([original, [0.9, 0.4]])
    rescored = Recording([]).rescore(peaks, np.zeros((20, 80, 80), np.uint8), frame)
    np.testing.assert_allclose(seen[0], in_model, atol=1e-9)
    np.testing.assert_allclose(frame.apply(rescored[:, :3]), in_model, atol=1e-9)


def test_probabilities_average_the_flips_and_the_nets():
    torch.manual_seed(0)
    nets = [VerifierNet(SMALL).eval(), VerifierNet(SMALL).eval()]
    volume = np.random.default_rng(2).integers(0, 256, (12, 30, 30), dtype=np.uint8)
    centres = np.array([[6.0, 15.0, 15.0], [3.0, 8.0, 20.0]])
    got = Verifier(nets, amp=False).probabilities(volume, centres)
    x = crop_input(cut_crops(volume, centres, SMALL))
    with torch.no_grad():
        expected = np.mean([torch.sigmoid(net(v)).numpy() for net in nets
                            for v in (x, torch.flip(x, (-2,)), torch.flip(x, (-1,)))], axis=0)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    plain = Verifier(nets[:1], amp=False, flips=False).probabilities(volume, centres)
    with torch.no_grad():
        np.testing.assert_allclose(plain, torch.sigmoid(nets[0](x)).numpy(), atol=1e-5)
    with pytest.raises(VerifierError, match="geometry"):
        Verifier([nets[0], VerifierNet(VerifierSpec(depth=3, size=16, z_step=1, width=4))])


@pytest.mark.parametrize("spec", [VerifierSpec(depth=1, size=8, z_step=1, width=2), SMALL,
                                  VerifierSpec()])
def test_the_net_takes_any_valid_geometry(spec):
    net = VerifierNet(spec)
    out = net(torch.zeros(2, 1, spec.depth, spec.size, spec.size))
    assert out.shape == (2,)


# ---------------------------------------------------------------------------- training


def test_examples_label_motors_near_peaks_and_far_peaks():
    motors = {"a": np.array([[10.0, 10.0, 10.0]]), "b": np.zeros((0, 3))}
    candidates = {"a": np.array([[10.0, 12.0, 10.0], [10.0, 20.0, 10.0], [10.0, 50.0, 10.0]]),
                  "b": np.array([[5.0, 5.0, 5.0]])}
    ex = collect_examples(candidates, motors, positive_radius=4.0, negative_radius=30.0)
    rows = sorted(zip(ex.ids, map(tuple, ex.centres), ex.labels))
    assert rows == [("a", (10.0, 10.0, 10.0), 1.0),  # the motor itself
                    ("a", (10.0, 12.0, 10.0), 1.0),  # a peak on it
                    ("a", (10.0, 50.0, 10.0), 0.0),  # a peak far from it
                    ("b", (5.0, 5.0, 5.0), 0.0)]     # 10 voxels off: neither, left out
    assert ex.n_positive == 2 and ex.n_negative == 2


def test_augmented_crops_keep_the_object_at_the_centre():
    volume = np.zeros((20, 40, 40), np.uint8)
    volume[10, 20, 20] = 250
    rng = np.random.default_rng(3)
    spec = VerifierSpec(depth=5, size=12, z_step=2)
    for _ in range(30):
        crop = augmented_crop(volume, np.array([10.0, 20.0, 20.0]), spec, rng, jitter=(0, 0))
        assert crop.dtype == np.uint8
        z, y, x = np.unravel_index(np.argmax(crop), crop.shape)
        assert z == 2 and {y, x} <= {5, 6}, (z, y, x)  # mirrored about the centre voxel
    for _ in range(30):
        crop = augmented_crop(volume, np.array([10.0, 20.0, 20.0]), spec, rng, jitter=(1, 2))
        z, y, x = np.unravel_index(np.argmax(crop), crop.shape)
        assert abs(z - 2) <= 1 and abs(y - 6) <= 3 and abs(x - 6) <= 3


def _shells_and_balls(rng, n: int) -> tuple[dict, VerifierExamples]:
    """Dark hollow shells (motor-like barrels) against dark solid balls of the same size."""
    zz, yy, xx = np.mgrid[-6:7, -6:7, -6:7]
    r = np.sqrt(zz ** 2 + yy ** 2 + xx ** 2)
    volumes, ids, centres, labels = {}, [], [], []
    for i in range(n):
        volume = rng.normal(150, 12, (24, 40, 40)).clip(0, 255)
        hollow = i % 2 == 0
        mask = (r >= 3) & (r <= 5) if hollow else r <= 4
        volume[6:19, 14:27, 14:27][mask] -= 70
        volumes[f"t{i}"] = volume.astype(np.uint8)
        ids.append(f"t{i}"), centres.append([12.0, 20.0, 20.0]), labels.append(float(hollow))
    return volumes, VerifierExamples(ids, np.array(centres), np.array(labels))


def test_the_verifier_learns_a_shell_from_a_ball():
    volumes, examples = _shells_and_balls(np.random.default_rng(4), 16)
    fitted = train_verifier(volumes, examples, SMALL, steps=60, batch_size=8, seed=0,
                            amp=False, progress=False)
    assert fitted.steps == 60 and fitted.skipped == 0
    assert np.mean(fitted.losses[-10:]) < np.mean(fitted.losses[:10])
    held, held_examples = _shells_and_balls(np.random.default_rng(5), 12)
    verifier = Verifier([fitted.net], amp=False)
    probs = np.array([verifier.probabilities(held[t], c[None])[0]
                      for t, c in zip(held_examples.ids, held_examples.centres)])
    shells = held_examples.labels == 1
    assert probs[shells].min() > probs[~shells].max(), probs


def test_training_needs_both_kinds_and_sane_settings():
    volumes, examples = _shells_and_balls(np.random.default_rng(6), 4)
    only_shells = VerifierExamples(examples.ids[::2], examples.centres[::2],
                                   examples.labels[::2])
    with pytest.raises(VerifierError, match="positives and negatives"):
        train_verifier(volumes, only_shells, SMALL, steps=2, progress=False)
    with pytest.raises(VerifierError, match="steps"):
        train_verifier(volumes, examples, SMALL, steps=0, progress=False)


def test_training_stops_at_its_time_limit():
    volumes, examples = _shells_and_balls(np.random.default_rng(7), 4)
    fitted = train_verifier(volumes, examples, SMALL, steps=500, batch_size=4, amp=False,
                            max_seconds=0.0, progress=False)
    assert fitted.steps == 1


# ---------------------------------------------------------------------------- files


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(1)
    net = VerifierNet(SMALL).eval()
    save_verifier(net, tmp_path, ThresholdRule("quantile", 0.6), {"steps": 3})
    loaded, rule = load_verifier(tmp_path)
    assert loaded.spec == SMALL and rule == ThresholdRule("quantile", 0.6)
    x = torch.randn(2, 1, SMALL.depth, SMALL.size, SMALL.size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))
    info = json.loads((tmp_path / "verifier.json").read_text())
    assert info["steps"] == 3 and info["spec"]["depth"] == SMALL.depth
    assert load_verifier(tmp_path / "elsewhere") is None


def test_a_corrupt_verifier_file_names_itself(tmp_path):
    (tmp_path / VERIFIER_NAME).write_bytes(b"not a torch file")
    with pytest.raises(VerifierError, match="verifier.pt.*delete it"):
        load_verifier(tmp_path)


# ---------------------------------------------------------------------------- train and infer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kernel_lib.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("verify") / "data"
    generate_dataset(root, n_train=5, n_test=3, seed=11, size="tiny", progress=False)
    return root


@pytest.fixture(scope="module")
def verified(tiny, tmp_path_factory):
    from kernel_lib.train import TrainConfig, train

    run_dir = tmp_path_factory.mktemp("verified") / "run"
    result = train(tiny, run_dir, PipelineConfig(decoder_channels=(32, 16)),
                   TrainConfig(epochs=1, steps_per_epoch=2, batch_size=2, crop=64, n_folds=3,
                               seed=1, verifier_steps=3,
                               cache_dir=str(run_dir.parent / "cache")), progress=False)
    return run_dir, result


@pytest.mark.slow
def test_training_fits_a_verifier_and_rechooses_the_rule(verified):
    run_dir, result = verified
    info = json.loads((run_dir / "verifier.json").read_text())
    assert result.verifier == {k: v for k, v in info.items() if k != "spec"}
    assert info["steps"] == 3 and info["positives"] > 0 and info["negatives"] > 0
    assert {"val_f2", "val_f2_heatmap", "threshold", "threshold_heatmap"} <= set(info)
    assert str(PipelineConfig.load(run_dir).threshold) == info["threshold"]
    net, rule_without = load_verifier(run_dir)
    assert str(rule_without) == info["threshold_heatmap"]
    assert net.spec.z_step == 2  # the stacks' lattice at the default z stride and stack step
    for name in ("val_predictions", "threshold_sweep"):
        assert pl.read_csv(run_dir / f"{name}_heatmap.csv").height > 0
    scores = pl.read_csv(run_dir / "val_predictions.csv")["score"].to_numpy()
    heat_scores = pl.read_csv(run_dir / "val_predictions_heatmap.csv")["score"].to_numpy()
    assert not np.allclose(scores, heat_scores)  # the verifier's scores, not the heatmap's


@pytest.mark.slow
def test_inference_uses_the_verifier_and_its_rules(verified, tiny, tmp_path):
    import shutil

    from kernel_lib.infer import run_inference

    run_dir, _ = verified
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = PipelineConfig.load(copy)
    cfg.replace(threshold=ThresholdRule("quantile", 1.0)).save(copy)  # with it: all called
    net, _ = load_verifier(copy)
    save_verifier(net, copy, ThresholdRule("quantile", 0.0))  # without it: none called
    both = run_inference(tiny, [copy], progress=False)
    alone = run_inference(tiny, [copy], progress=False, verifier=False)
    assert (both["Motor axis 0"] >= 0).all() and (alone["Motor axis 0"] == -1).all()
    assert not np.allclose(both["score"].to_numpy(), alone["score"].to_numpy())
    (copy / VERIFIER_NAME).unlink()
    plain = run_inference(tiny, [copy], progress=False, threshold="quantile:0.5")
    np.testing.assert_allclose(plain["score"].to_numpy(), alone["score"].to_numpy())
    assert plain["peak_z"].to_list() == alone["peak_z"].to_list()


@pytest.mark.slow
def test_asking_for_a_missing_verifier_fails_clearly(verified, tiny, tmp_path, capsys):
    from kernel_lib.infer import main

    run_dir, _ = verified
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.pt", "config.json"):
        (bare / name).write_bytes((run_dir / name).read_bytes())
    code = main(["--data-root", str(tiny), "--weights", str(bare), "--verifier",
                 "--out", str(tmp_path / "sub.csv"), "--no-progress"])
    assert code == 2 and "has a verifier.pt" in capsys.readouterr().err
    (bare / VERIFIER_NAME).write_bytes(b"garbage")
    code = main(["--data-root", str(tiny), "--weights", str(bare), "--out",
                 str(tmp_path / "sub.csv"), "--no-progress"])
    assert code == 2 and "delete it" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="config.json's rule"):  # not needed: not fatal
        code = main(["--data-root", str(tiny), "--weights", str(bare), "--no-verifier",
                     "--out", str(tmp_path / "sub.csv"), "--no-progress"])
    assert code == 0 and (tmp_path / "sub.csv").is_file()


@pytest.mark.slow
def test_a_new_checkpoint_drops_the_old_verifier(verified, tiny, tmp_path):
    import shutil

    from kernel_lib.train import TrainConfig, train

    run_dir, _ = verified
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    train(tiny, copy, PipelineConfig(decoder_channels=(32, 16)),
          TrainConfig(epochs=1, steps_per_epoch=1, batch_size=2, crop=64, n_folds=3, seed=1,
                      verifier_steps=0, cache_dir=str(run_dir.parent / "cache")),
          progress=False, resume=False)
    assert not (copy / VERIFIER_NAME).exists() and not (copy / "verifier.json").exists()


def test_the_module_example_runs():
    import doctest

    from kernel_lib import verify

    result = doctest.testmod(verify)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.slow
def test_the_run_summary_reports_the_verifier(verified):
    from kernel_lib.notebooks import describe_run

    run_dir, result = verified
    text = describe_run(result)
    assert f"verifier: {result.verifier['steps']} steps" in text
    assert f"{result.verifier['val_f2']:.3f} with it" in text and "verifier.pt" in text


@pytest.mark.slow
def test_training_on_every_tomogram_fits_a_verifier_within_the_time_limit(tiny, tmp_path):
    from kernel_lib.train import TrainConfig, train

    run_dir = tmp_path / "run"
    result = train(tiny, run_dir, PipelineConfig(decoder_channels=(32, 16)),
                   TrainConfig(fold=-1, epochs=3, steps_per_epoch=2, batch_size=2, crop=64,
                               seed=2, verifier_steps=400, max_minutes=0.001,
                               cache_dir=str(tmp_path / "cache")), progress=False)
    assert result.stopped_by == "max_minutes" and result.epochs_done == 1
    info = json.loads((run_dir / "verifier.json").read_text())
    assert 1 <= info["steps"] < 400  # stopped by what was left of the time limit
    assert "val_f2" not in info  # nothing held out: the rule stays as it was
    _, rule = load_verifier(run_dir)
    assert rule == PipelineConfig.load(run_dir).threshold


@pytest.mark.slow
def test_a_verifier_that_cannot_train_leaves_the_heatmap_run_intact(tiny, tmp_path,
                                                                      monkeypatch, capsys):
    from kernel_lib import train as train_module

    def diverges(*args, **kwargs):
        raise VerifierError("the verifier's loss or gradient was not finite in 3 of 3 steps")

    monkeypatch.setattr(train_module, "train_verifier", diverges)
    run_dir = tmp_path / "run"
    result = train_module.train(
        tiny, run_dir, PipelineConfig(decoder_channels=(32, 16)),
        train_module.TrainConfig(epochs=1, steps_per_epoch=1, batch_size=2, crop=64, n_folds=3,
                                 seed=1, verifier_steps=3, cache_dir=str(tmp_path / "cache")),
        progress=False)
    assert result.verifier is None and not (run_dir / VERIFIER_NAME).exists()
    assert (run_dir / "model.pt").is_file()
    assert "no verifier trained: the verifier's loss" in capsys.readouterr().err


@pytest.mark.slow
def test_the_verifier_plot_draws_one_line_per_validation_tomogram(verified, tiny):
    from kernel_lib.plots import figure_png, plot_verifier_effect

    run_dir, result = verified
    fig = plot_verifier_effect(tiny, run_dir)
    n_val = pl.read_csv(run_dir / "val_predictions.csv").height
    ax = fig.axes[0]
    joined = [line for line in ax.lines if list(line.get_xdata()) == [0, 1]]
    assert len(joined) == n_val
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert f"F2 {result.verifier['val_f2']:.2f}" in labels[1]
    assert figure_png(fig).startswith(b"\x89PNG")


def test_the_last_block_runs_in_float32_under_cpu_bfloat16_autocast():
    # oneDNN's bfloat16 weight gradients of the last block (64 channels on 2 x 5 x 5 voxels)
    # came out NaN in about 1 of 10 batches of 32: that block is kept in float32 on a CPU.
    net = VerifierNet(VerifierSpec()).train()
    seen = {}
    for name, module in (("first", net.blocks[0][0]), ("last", net.blocks[-1][0])):
        module.register_forward_hook(lambda m, args, out, name=name: seen.update({name: out.dtype}))
    crops = np.random.default_rng(0).integers(0, 256, (4, 9, 40, 40), dtype=np.uint8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(crop_input(crops))
    assert seen == {"first": torch.bfloat16, "last": torch.float32}
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())
