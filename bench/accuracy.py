"""Accuracy benchmark: fresh synthetic set -> CPU training on a fixed budget -> test F2.

Compares, in one run and on the same test split:
- the trained model with the assumed test spacing (what a real submission does),
- the same model told each test tomogram's true spacing (what an unknown spacing costs),
- "no motor anywhere",
- a non-learned detector: the darkest blob after smoothing, its contrast threshold chosen on
  the training split.

Appends a section to bench/RESULTS.md (machine, date, command, numbers).

Usage:
    .venv/bin/python bench/accuracy.py [--minutes 10] [--n-train 40] [--n-test 30] [--seed 2026]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import polars as pl
import torch

from kernel_lib.config import Z_SAMPLINGS, PipelineConfig, ThresholdRule
from kernel_lib.infer import run_inference
from kernel_lib.labels import (read_labels, read_sample_submission, read_solution,
                               submission_from_calls)
from kernel_lib.metric import confusion, score, solution_for_submission
from kernel_lib.preprocess import preprocess_tomogram
from kernel_lib.synthetic import generate_dataset
from kernel_lib.threshold import apply_threshold, sweep_thresholds
from kernel_lib.train import TrainConfig, train

ROOT = Path(__file__).resolve().parent
BLOB_SIGMA_ANGSTROM = 150.0  # about a motor's radius


def darkest_blob(folder: Path, spacing: float, cfg: PipelineConfig) -> tuple[np.ndarray, float]:
    """Darkest point of the smoothed volume (original voxels) and its contrast score."""
    prep = preprocess_tomogram(folder, spacing, cfg)
    vol = prep.volume.astype(np.float32)
    sigma = BLOB_SIGMA_ANGSTROM / cfg.target_spacing
    smooth = np.stack([cv2.GaussianBlur(p, (0, 0), sigma) for p in vol])
    smooth = cv2.GaussianBlur(smooth.reshape(smooth.shape[0], -1), (1, 0), 0, sigmaY=sigma
                              ).reshape(smooth.shape) if smooth.shape[0] > 1 else smooth
    index = np.unravel_index(np.argmin(smooth), smooth.shape)
    contrast = float(smooth.mean() - smooth[index]) / 255.0
    return prep.frame.inverse().apply(np.array(index, dtype=float)), contrast


def blob_table(root: Path, split: str, ids: list[str], spacing: float, cfg: PipelineConfig):
    rows = []
    for tomo_id in ids:
        zyx, contrast = darkest_blob(root / split / tomo_id, spacing, cfg)
        rows.append({"tomo_id": tomo_id, "z": zyx[0], "y": zyx[1], "x": zyx[2],
                     "score": contrast})
    return pl.DataFrame(rows)


def ranking_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    wins = (pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()
    return float(wins / (len(pos) * len(neg)))


def diagnostics(solution: pl.DataFrame, table: pl.DataFrame) -> tuple[dict, float]:
    """Diagnostics of one inference table, not results: the scores when every tomogram is
    called positive (misplaced peaks are then the only misses, so this measures localisation
    alone) and the ranking AUC of the top peak score (motor vs none, whatever the threshold)."""
    peaks = table.select("tomo_id", z="peak_z", y="peak_y", x="peak_x")
    all_positive = scored(solution, submission_from_calls(peaks, np.ones(table.height, bool)))
    has = dict(zip(solution["tomo_id"], solution["Has motor"]))
    truth = np.array([bool(has[t]) for t in table["tomo_id"]])
    return all_positive, ranking_auc(table["score"].to_numpy(), truth)


def scored_with_tta(root: Path, run_dir: Path, solution: pl.DataFrame) -> tuple[dict, float]:
    """The run's scores and ranking AUC on one test set with flip TTA (its rule unchanged)."""
    table = run_inference(root, [run_dir], tta=True, progress=False)
    return scored(solution, table), diagnostics(solution, table)[1]


def scored(solution: pl.DataFrame, submission: pl.DataFrame) -> dict:
    submission = submission.select("tomo_id", "Motor axis 0", "Motor axis 1", "Motor axis 2")
    counts = confusion(solution, submission)
    return {"f2": score(solution, submission), "precision": counts["precision"],
            "recall": counts["recall"], "tp": counts["tp"], "fp": counts["fp"],
            "fn": counts["fn"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--n-test", type=int, default=30)
    parser.add_argument("--seed", type=int, default=2026, help="seed of the synthetic set")
    parser.add_argument("--train-seed", type=int, default=None,
                        help="seed of training (default: --seed); another one on the same set "
                             "measures run-to-run noise")
    parser.add_argument("--loss", default="bce", choices=("bce", "focal"))
    parser.add_argument("--steps-per-epoch", type=int, default=150)
    parser.add_argument("--target-spacing", type=float, default=PipelineConfig().target_spacing)
    parser.add_argument("--crop", type=int, default=TrainConfig().crop)
    parser.add_argument("--hard-negative-fraction", type=float,
                        default=TrainConfig().hard_negative_fraction)
    parser.add_argument("--positive-fraction", type=float,
                        default=TrainConfig().positive_fraction)
    parser.add_argument("--lr", type=float, default=TrainConfig().lr)
    parser.add_argument("--peak-weight", type=float, default=TrainConfig().peak_weight,
                        help="weight of the loss on each crop's top logit (0: off)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--verifier-steps", type=int, default=TrainConfig().verifier_steps,
                        help="steps of the second-stage 3D verifier (0: none); the test sets "
                             "are then also scored without it")
    parser.add_argument("--encoder", default=PipelineConfig().encoder,
                        help="timm encoder of the model (random init)")
    parser.add_argument("--z-stride", type=int, default=PipelineConfig().z_stride,
                        help="run the model on every k-th model slice (validation and test)")
    parser.add_argument("--stack-half", type=int, default=PipelineConfig().stack_half,
                        help="n: 2n + 1 slices per 2.5D stack")
    parser.add_argument("--stack-step", type=float,
                        default=PipelineConfig().stack_step_angstrom,
                        help="angstroms between neighbouring channels of a stack")
    parser.add_argument("--z-sampling", default=PipelineConfig().z_sampling,
                        choices=Z_SAMPLINGS, help="z resampling of every volume")
    parser.add_argument("--tta", action="store_true",
                        help="also score the test sets with flip TTA (the rule chosen without)")
    parser.add_argument("--extra-test", type=int, default=0,
                        help="also score the model on this many more test tomograms (their own "
                             "set, seed --seed + 1): less test-sampling noise")
    parser.add_argument("--workdir", type=Path, default=ROOT / "_work")
    parser.add_argument("--keep-data", action="store_true", help="reuse a generated set")
    parser.add_argument("--no-write", action="store_true", help="don't append to RESULTS.md")
    args = parser.parse_args()

    work = args.workdir
    train_seed = args.seed if args.train_seed is None else args.train_seed
    data = work / f"synthetic_{args.seed}_{args.n_train}_{args.n_test}"
    tag = (f"{args.encoder}_{args.loss}_{args.target_spacing:g}A_{args.z_sampling}"
           f"_zs{args.z_stride}_sh{args.stack_half}"
           f"{'' if args.stack_step == 32 else f'_st{args.stack_step:g}'}"
           f"{f'_pk{args.peak_weight:g}' if args.peak_weight else ''}"
           f"{f'_v{args.verifier_steps}' if args.verifier_steps else ''}"
           f"_n{args.n_train}_s{train_seed}")
    run_dir = work / f"run_{tag}"
    if not args.keep_data and data.exists():
        shutil.rmtree(data)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    shutil.rmtree(work / "cache", ignore_errors=True)
    started = time.perf_counter()
    generated = not (data / "test_labels.csv").is_file()
    if generated:
        generate_dataset(data, n_train=args.n_train, n_test=args.n_test, seed=args.seed)
    gen_seconds = time.perf_counter() - started
    extra = work / f"synthetic_{args.seed + 1}_0_{args.extra_test}"
    if args.extra_test and not args.keep_data and extra.exists():
        shutil.rmtree(extra)
    if args.extra_test and not (extra / "test_labels.csv").is_file():
        generate_dataset(extra, n_train=0, n_test=args.extra_test, seed=args.seed + 1)

    cfg = PipelineConfig(target_spacing=args.target_spacing, encoder=args.encoder,
                         z_stride=args.z_stride, z_sampling=args.z_sampling,
                         stack_half=args.stack_half, stack_step_angstrom=args.stack_step)
    tcfg = TrainConfig(fold=0, n_folds=5, epochs=1000, steps_per_epoch=args.steps_per_epoch,
                       max_minutes=args.minutes, seed=train_seed, loss=args.loss,
                       crop=args.crop, hard_negative_fraction=args.hard_negative_fraction,
                       positive_fraction=args.positive_fraction, lr=args.lr,
                       peak_weight=args.peak_weight,
                       batch_size=args.batch_size, verifier_steps=args.verifier_steps,
                       cache_dir=str(work / "cache"))
    t0 = time.perf_counter()
    result = train(data, run_dir, cfg, tcfg, progress=False)
    train_seconds = time.perf_counter() - t0

    solution = read_solution(data / "test_labels.csv")
    test_ids = read_sample_submission(data / "sample_submission.csv")
    true_spacing = dict(zip(solution["tomo_id"], solution["Voxel spacing"]))
    chosen = PipelineConfig.load(run_dir)

    t0 = time.perf_counter()
    model_table = run_inference(data, [run_dir], out=run_dir / "submission.csv", progress=False)
    infer_seconds = time.perf_counter() - t0
    rows = {"model, assumed spacing ({:.1f} A), rule {}".format(chosen.assumed_test_spacing,
                                                                 chosen.threshold):
            scored(solution, model_table)}
    known = run_inference(data, [run_dir], spacings=true_spacing, progress=False)
    rows["model, true test spacing (not available on Kaggle)"] = scored(solution, known)
    peaks = model_table.select("tomo_id", z="peak_z", y="peak_y", x="peak_x")
    for kind in ("fixed", "quantile"):
        if chosen.threshold.kind != kind:
            # The other rule at its validation-best value, applied to the same peaks.
            sweep = pl.read_csv(run_dir / "threshold_sweep.csv").filter(pl.col("kind") == kind)
            best = sweep.filter(pl.col("f2") == sweep["f2"].max())["value"]
            rule = ThresholdRule(kind, float(best[(len(best) - 1) // 2]))
            positive = apply_threshold(model_table["score"].to_numpy(), rule)
            alt = submission_from_calls(peaks, positive)
            rows[f"model, assumed spacing, rule {rule}"] = scored(solution, alt)

    rows["diagnostic: model, every tomogram called positive"], auc = diagnostics(solution,
                                                                                 model_table)
    extra_lines = []
    if args.tta:
        # Flip TTA at test time only: the rule was chosen on validation scores without it.
        rows[f"model with flip TTA, rule {chosen.threshold}"], tta_auc = scored_with_tta(
            data, run_dir, solution)
        extra_lines.append(f"- Ranking with flip TTA: AUC {tta_auc:.3f}")
    if args.extra_test:
        # The same model and rule on an independent, larger test set: one tomogram there moves
        # F2 by less, so this row separates settings that the 30-tomogram set cannot.
        extra_solution = read_solution(extra / "test_labels.csv")
        extra_table = run_inference(extra, [run_dir], progress=False)
        n_motors = int(extra_solution["Has motor"].sum())
        rows[f"model on {args.extra_test} more test tomograms ({n_motors} motors, seed "
             f"{args.seed + 1}), rule {chosen.threshold}"] = scored(extra_solution, extra_table)
        all_positive, extra_auc = diagnostics(extra_solution, extra_table)
        rows[f"diagnostic: the same {args.extra_test}, every tomogram called positive"] = \
            all_positive
        extra_lines.append(f"- Ranking on the {args.extra_test} more test tomograms: AUC "
                           f"{extra_auc:.3f}")
        if args.tta:
            name = f"model with flip TTA on the same {args.extra_test}, rule {chosen.threshold}"
            rows[name], tta_auc = scored_with_tta(extra, run_dir, extra_solution)
            extra_lines.append(f"- Ranking with flip TTA on the {args.extra_test}: AUC "
                               f"{tta_auc:.3f}")

    if (run_dir / "verifier.pt").is_file():
        # The same heatmap model without its verifier, with the rule validation chose for it:
        # what the second stage adds, paired in one run.
        sets = [("", data, solution)]
        if args.extra_test:
            sets.append((f" on the {args.extra_test} more", extra, extra_solution))
        for where, root, truth in sets:
            alone = run_inference(root, [run_dir], progress=False, verifier=False)
            rows[f"heatmap alone (no verifier){where}, its own rule"] = scored(truth, alone)
            extra_lines.append(f"- Ranking by the heatmap alone{where}: AUC "
                               f"{diagnostics(truth, alone)[1]:.3f}")

    none = pl.DataFrame({"tomo_id": test_ids, "Motor axis 0": -1.0, "Motor axis 1": -1.0,
                         "Motor axis 2": -1.0})
    rows["baseline: no motor anywhere"] = scored(solution, none)

    labels = read_labels(data / "train_labels.csv")
    train_ids = labels.tomograms["tomo_id"].to_list()
    train_blobs = blob_table(data, "train", train_ids, chosen.assumed_test_spacing, chosen)

    def train_f2(positive: np.ndarray) -> float:
        sub = submission_from_calls(train_blobs, positive)
        return score(solution_for_submission(labels.motors, labels.tomograms, sub), sub)

    blob_rule = sweep_thresholds(train_blobs["score"].to_numpy(), train_f2).rule
    test_blobs = blob_table(data, "test", test_ids, chosen.assumed_test_spacing, chosen)
    rows[f"baseline: darkest blob, rule {blob_rule} (tuned on train)"] = scored(
        solution, submission_from_calls(
            test_blobs, apply_threshold(test_blobs["score"].to_numpy(), blob_rule)))
    always = np.ones(test_blobs.height, dtype=bool)
    rows["baseline: darkest blob, always positive"] = scored(
        solution, submission_from_calls(test_blobs, always))

    metrics = pl.read_csv(run_dir / "metrics.csv")
    lines = [
        f"## Accuracy benchmark ({dt.date.today().isoformat()})",
        "",
        f"- Machine: {platform.node() or 'unknown'}, {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), no GPU" if not torch.cuda.is_available() else "",
        f"- Command: `.venv/bin/python bench/accuracy.py --minutes {args.minutes:g} "
        f"--n-train {args.n_train} --n-test {args.n_test} --seed {args.seed} --loss {args.loss} "
        f"--steps-per-epoch {args.steps_per_epoch} --target-spacing {args.target_spacing:g} "
        f"--crop {args.crop} --hard-negative-fraction {args.hard_negative_fraction:g} "
        f"--positive-fraction {args.positive_fraction:g} --lr {args.lr:g} "
        f"--peak-weight {args.peak_weight:g} "
        f"--batch-size {args.batch_size} --verifier-steps {args.verifier_steps} "
        f"--encoder {args.encoder} --z-stride {args.z_stride} --z-sampling {args.z_sampling} "
        f"--stack-half {args.stack_half} --stack-step {args.stack_step:g} "
        f"--train-seed {train_seed}{' --tta' if args.tta else ''}"
        f"{' --keep-data' if args.keep_data else ''}"
        f"{f' --extra-test {args.extra_test}' if args.extra_test else ''}`",
        f"- Data: synthetic set, seed {args.seed}, {args.n_train} train / {args.n_test} "
        f"test tomograms ({int(solution['Has motor'].sum())} test motors), "
        + (f"generated in {gen_seconds:.0f} s" if generated else
           "the one an earlier run generated (--keep-data)"),
        f"- Training: {cfg.encoder} at {cfg.target_spacing:g} A/voxel, z sampling "
        f"{cfg.z_sampling}, z stride {cfg.z_stride}, {cfg.in_chans}-slice stacks "
        f"{cfg.stack_step_angstrom:g} A apart, "
        f"crop {args.crop}, batch {args.batch_size}, lr {args.lr:g}, "
        f"loss {args.loss}"
        f"{f' + {args.peak_weight:g} x peak BCE' if args.peak_weight else ''}, "
        f"positive fraction {args.positive_fraction:g}, "
        f"hard-negative fraction {args.hard_negative_fraction:g}, "
        f"{result.epochs_done} epochs "
        f"({int(metrics['step'].max())} steps), stopped by {result.stopped_by}, "
        f"{train_seconds / 60:.1f} min incl. cache and validation; best validation F2 "
        f"{result.best_f2:.3f} (fold 0 of 5)"
        + (f"; verifier: {result.verifier['steps']} steps in "
           f"{result.verifier['train_seconds']:.0f} s on {result.verifier['positives']} "
           f"motor / {result.verifier['negatives']} look-alike examples, validation F2 "
           f"{result.verifier.get('val_f2', float('nan')):.3f} with it, "
           f"{result.verifier.get('val_f2_heatmap', float('nan')):.3f} without"
           if result.verifier else ""),
        f"- Test inference: {infer_seconds:.0f} s for {len(test_ids)} tomograms "
        f"({len(test_ids) / infer_seconds:.2f} tomograms/s)",
        f"- Ranking: AUC of the top peak score, tomograms with a motor vs without: {auc:.3f}",
        *extra_lines,
        "",
        "| predictor | F2 | precision | recall | TP | FP | FN |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['f2']:.3f} | {r['precision']:.3f} | {r['recall']:.3f} | "
                     f"{r['tp']} | {r['fp']} | {r['fn']} |")
    text = "\n".join(line for line in lines if line is not None) + "\n"
    print(text)
    (work / f"accuracy_{tag}.json").write_text(json.dumps(rows, indent=1))
    if not args.no_write:
        results = ROOT / "RESULTS.md"
        previous = results.read_text() if results.is_file() else "# Benchmark results\n\n"
        results.write_text(previous.rstrip("\n") + "\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
