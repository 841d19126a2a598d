"""Training: ``python -m kernel_lib.train --data-root DIR --out RUN_DIR [options]``.

``DIR`` has the competition layout (``train/<tomo_id>/slice_*.jpg`` and ``train_labels.csv``).
Steps: preprocess once into a cache; split tomograms into folds; sample 2.5D stacks around
motors and anywhere else with label-preserving augmentation; train with AdamW, warm-up + cosine
schedule, gradient clipping, EMA and mixed precision (fp16 on CUDA, bf16 on a CPU that has it
natively); after every epoch run full inference on the held-out fold, score it with the
competition metric and sweep a fixed and a quantile threshold. ``RUN_DIR`` gets:

- ``model.pt`` + ``config.json``: the best checkpoint by validation F2 and its config, including
  the chosen threshold rule and the assumed test spacing (what inference loads);
- ``last.pt``: full training state, so a rerun with the same ``--out`` resumes;
- ``metrics.csv`` (one row per epoch), ``threshold_sweep.csv`` and ``val_predictions.csv`` of
  the best epoch, ``folds.csv`` and ``train_config.json``;
- with ``verifier_steps`` > 0, then ``verifier.pt`` + ``verifier.json``: a small 3D CNN trained
  on the saved model's top peaks in the training tomograms (:mod:`kernel_lib.verify`). The
  validation fold is scored again with it, and ``config.json``'s rule, ``threshold_sweep.csv``
  and ``val_predictions.csv`` become those of the two stages together (the heatmap-only ones
  are kept as ``*_heatmap.csv``, and the rule inside ``verifier.pt``).

Example:
    >>> from kernel_lib.train import TrainConfig
    >>> TrainConfig(epochs=2).steps_per_epoch
    100
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import (Z_SAMPLINGS, ConfigError, PipelineConfig, atomic_write_bytes,
                     atomic_write_text)
from .labels import LabelError, read_labels, submission_from_calls
from .metric import MIN_RADIUS_ANGSTROM, score, solution_for_submission
from .model import (CHECKPOINT_NAME, HeatmapModel, ModelError, build_model, check_encoder_name,
                    load_checkpoint, save_checkpoint)
from .infer import (TOP_K, Predictor, autocast_dtype, autocast_to, locate_peaks, model_input,
                    pick_device)
from .peaks import find_peaks, nms_radius_voxels
from .preprocess import CacheEntry, build_cache
from .resample import heatmap_frame
from .sampling import Augment, SampleSpec, StackSampler, dark_spots, far_from
from .threshold import apply_threshold, sweep_thresholds
from .tomogram import TomogramError
from .verify import (VERIFIER_INFO_NAME, VERIFIER_NAME, Verifier, VerifierError, VerifierSpec,
                     collect_examples, save_verifier, train_verifier, z_step_for)

STATE_NAME = "last.pt"
HARD_NEGATIVES_PER_TOMOGRAM = 16
MOTOR_RADIUS_ANGSTROM = 225.0  # half the C-ring width: the blob scale of hard negatives
METRICS_NAME = "metrics.csv"
VERIFIER_POSITIVE_ANGSTROM = 256.0  # a peak this close to a motor is a view of the motor


class TrainError(ValueError):
    """Training inputs or state that cannot be used; the message says what to do."""


@dataclass
class TrainConfig:
    """Settings that only training needs (the model's own settings live in PipelineConfig).

    Attributes:
        fold: held-out fold index, or -1 to train on everything (no validation).
        n_folds: number of folds of the tomogram-level split.
        epochs: maximum number of epochs.
        steps_per_epoch: optimiser steps per epoch.
        batch_size: stacks per step.
        crop: crop side in model voxels (a multiple of 32). 96 (3 kA at 32 A) rather than
            128: in 10 CPU minutes it bought 1504 steps instead of about 1000, found all 17 test
            motors instead of 14 and scored 0.81-0.82 test F2 instead of 0.74-0.77.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps before the cosine decay.
        positive_fraction: share of samples centred near a motor.
        hard_negative_fraction: share of the other samples centred on a hard negative: one
            of the darkest motor-free blobs of a training tomogram (debris, granules, beads:
            what a detector trained on random background confuses with motors) or a false
            peak the model itself found there; the rest are uniform.
        mine_per_epoch: after each epoch, run the model over this many training tomograms
            (in turn) and add their strongest false peaks to the hard negatives (0: never).
        loss: ``"bce"`` (with ``pos_weight``) or ``"focal"`` (penalty-reduced focal loss).
        pos_weight: BCE weight of positive heatmap pixels (10 saturated every top score near 1
            after a few hundred CPU steps, so no threshold separated tomograms; 2 does not).
        peak_weight: weight of a second BCE term on each crop's strongest logit against its
            target's peak (0 off): the pixel loss spends almost nothing on the few pixels of a
            dark blob in a motor-free crop, but a tomogram's top peak is what ranks it. With 1
            against 0, paired over four training seeds on 90 synthetic test tomograms: ranking
            AUC 0.865 vs 0.809, F2 0.771 vs 0.721, motors localised 42.5 vs 39.6 of 49, and no
            poor seed (AUC 0.85-0.88 vs 0.70-0.89); see bench/RESULTS.md, session 6.
        ema_decay: EMA decay of the weights (0 disables EMA).
        amp: mixed precision where the device runs it fast (:func:`~kernel_lib.infer.
            autocast_dtype`): float16 with loss scaling on CUDA, bfloat16 on a CPU with native
            bfloat16 (about 1.4x the steps per CPU minute here); float32 elsewhere. Validation
            and mining predict the same way.
        grad_clip: gradient norm clip.
        zoom_range: training zoom range (tolerance to an unknown test spacing).
        max_minutes: stop after this wall time (0 = no limit), validating and saving first;
            the cosine decay then follows the clock too, so it still ends near zero.
        seed: seed of every random draw (runs are deterministic on CPU, except that with a
            time limit the learning rate depends on the clock).
        val_batch_size: stacks per forward pass in validation.
        device: ``"cpu"``, ``"cuda"`` or None for automatic.
        encoder_weights: optional local timm weights file for the encoder.
        cache_dir: preprocessing cache root (default: ``DATA_ROOT/../cache``).
        verifier_steps: steps of the second-stage 3D verifier trained after the heatmap model
            (:mod:`kernel_lib.verify`); 0: none.
        verifier_share: with ``max_minutes``, the share of it kept for the verifier (finding
            the candidates, training, validating); the heatmap model trains for the rest.
    """

    fold: int = 0
    n_folds: int = 5
    epochs: int = 10
    steps_per_epoch: int = 100
    batch_size: int = 16
    crop: int = 96
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    positive_fraction: float = 0.5
    hard_negative_fraction: float = 0.5
    mine_per_epoch: int = 8
    loss: str = "bce"
    pos_weight: float = 2.0
    peak_weight: float = 1.0
    ema_decay: float = 0.99
    amp: bool = True
    grad_clip: float = 2.0
    zoom_range: tuple[float, float] = (0.75, 1.5)
    max_minutes: float = 0.0
    seed: int = 0
    val_batch_size: int = 8
    device: str | None = None
    encoder_weights: str | None = None
    cache_dir: str | None = None
    verifier_steps: int = 400
    verifier_share: float = 0.2

    def __post_init__(self) -> None:
        self.zoom_range = tuple(float(z) for z in self.zoom_range)
        checks = [
            (self.n_folds >= 2 or self.fold == -1, f"n_folds must be >= 2 (got {self.n_folds})"),
            (-1 <= self.fold < max(self.n_folds, 1),
             f"fold must be in 0..{self.n_folds - 1} or 'all' (got {self.fold})"),
            (self.epochs >= 1 and self.steps_per_epoch >= 1 and self.batch_size >= 1,
             "epochs, steps_per_epoch and batch_size must be >= 1"),
            (self.crop >= 32 and self.crop % 32 == 0,
             f"crop must be a positive multiple of 32 (got {self.crop})"),
            (self.loss in ("bce", "focal"), f"loss must be 'bce' or 'focal' (got {self.loss!r})"),
            (0.0 <= self.positive_fraction <= 1.0,
             f"positive_fraction must be in [0, 1] (got {self.positive_fraction})"),
            (self.mine_per_epoch >= 0,
             f"mine_per_epoch must be >= 0 (got {self.mine_per_epoch})"),
            (0.0 <= self.hard_negative_fraction <= 1.0,
             f"hard_negative_fraction must be in [0, 1] (got {self.hard_negative_fraction})"),
            (0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1) (got {self.ema_decay})"),
            (0 < self.zoom_range[0] <= self.zoom_range[1],
             f"zoom_range must be 0 < low <= high (got {self.zoom_range})"),
            (self.lr > 0, f"lr must be > 0 (got {self.lr})"),
            (self.peak_weight >= 0, f"peak_weight must be >= 0 (got {self.peak_weight})"),
            (self.verifier_steps >= 0,
             f"verifier_steps must be >= 0 (got {self.verifier_steps})"),
            (0 <= self.verifier_share < 1,
             f"verifier_share must be in [0, 1) (got {self.verifier_share})"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainError(message)


# ---------------------------------------------------------------------------- data


def hard_negative_spots(volumes: dict[str, np.ndarray], motors: dict[str, np.ndarray],
                        cfg: PipelineConfig, progress: bool = True) -> dict[str, np.ndarray]:
    """``{tomo_id: (k, 3)}`` darkest motor-free blob centres per training volume (model voxels)."""
    sigma = MOTOR_RADIUS_ANGSTROM / cfg.target_spacing
    avoid_radius = cfg.nms_radius_angstrom / cfg.target_spacing
    return {t: dark_spots(volume, sigma, HARD_NEGATIVES_PER_TOMOGRAM,
                          motors.get(t, np.zeros((0, 3))), avoid_radius)
            for t, volume in tqdm(volumes.items(), desc="hard negatives", unit="tomo",
                                  leave=False, disable=not progress)}


def mine_false_peaks(model: HeatmapModel, cfg: PipelineConfig, volumes: dict[str, np.ndarray],
                     motors: dict[str, np.ndarray], device: torch.device, batch_size: int = 8,
                     count: int = HARD_NEGATIVES_PER_TOMOGRAM, min_score: float = 0.05,
                     amp: bool = True) -> dict[str, np.ndarray]:
    """The model's strongest peaks away from every motor, per volume, in model voxels.

    These are the look-alikes the model currently gets wrong, whatever they are, so sampling
    them as negatives needs no idea of what the data's distractors look like.
    """
    avoid_radius = cfg.nms_radius_angstrom / cfg.target_spacing
    found = top_peaks(model, cfg, volumes, device, batch_size, count, min_score, amp)
    model.train()
    return {tomo_id: far_from(centres, motors.get(tomo_id, np.zeros((0, 3))), avoid_radius)
            for tomo_id, centres in found.items()}


def top_peaks(model: HeatmapModel, cfg: PipelineConfig, volumes: dict[str, np.ndarray],
              device: torch.device, batch_size: int = 8, count: int = TOP_K,
              min_score: float = 0.0, amp: bool = True,
              progress: bool = False) -> dict[str, np.ndarray]:
    """``{tomo_id: (k, 3)}`` the model's ``count`` strongest peaks per volume, model voxels."""
    predictor = Predictor([model], cfg, device, batch_size=batch_size, tta=False, amp=amp)
    radius = nms_radius_voxels(cfg.nms_radius_angstrom, cfg.target_spacing, cfg.output_stride,
                               cfg.z_stride)
    to_model = heatmap_frame(cfg.output_stride, cfg.z_stride).inverse()
    found = {}
    for tomo_id, volume in tqdm(volumes.items(), desc="candidates", unit="tomo", leave=False,
                                disable=not progress):
        peaks = find_peaks(predictor.heatmap(volume), radius, top_k=count, min_score=min_score)
        found[tomo_id] = to_model.apply(peaks[:, :3]) if len(peaks) else np.zeros((0, 3))
    return found


def assign_folds(tomograms: pl.DataFrame, n_folds: int, seed: int) -> pl.DataFrame:
    """``tomo_id -> fold``, shuffled with ``seed`` and stratified by ``has_motor``."""
    rng = np.random.default_rng(seed)
    rows = []
    for has_motor in (True, False):
        ids = sorted(tomograms.filter(pl.col("has_motor") == has_motor)["tomo_id"].to_list())
        ids = [ids[i] for i in rng.permutation(len(ids))]
        rows += [(tomo_id, i % n_folds) for i, tomo_id in enumerate(ids)]
    return pl.DataFrame(rows, schema={"tomo_id": pl.String, "fold": pl.Int64}, orient="row")


def motors_in_model_frame(motors: pl.DataFrame, entries: dict[str, CacheEntry],
                          ) -> dict[str, np.ndarray]:
    """``{tomo_id: (k, 3)}`` motor centres mapped into each cached volume's model frame."""
    result = {tomo_id: np.zeros((0, 3)) for tomo_id in entries}
    for tomo_id, group in motors.group_by("tomo_id"):
        tomo_id = tomo_id[0]
        if tomo_id in entries:
            zyx = group.select(["z", "y", "x"]).to_numpy()
            result[tomo_id] = entries[tomo_id].frame.apply(zyx)
    return result


# ---------------------------------------------------------------------------- losses


def heatmap_loss(logits: torch.Tensor, target: torch.Tensor, kind: str,
                 pos_weight: float, peak_weight: float = 0.0) -> torch.Tensor:
    """BCE with a positive weight on the soft target, or penalty-reduced focal loss, plus
    ``peak_weight`` times the BCE of each crop's largest logit against its target's maximum.

    The focal variant (from CornerNet / CenterNet) treats pixels with target > 0.99 as positives
    and down-weights negatives near a motor by ``(1 - target)^4``.
    """
    loss = _pixel_loss(logits, target, kind, pos_weight)
    if peak_weight:
        peak_logits = logits.flatten(1).amax(dim=1)
        peak_targets = target.flatten(1).amax(dim=1)
        loss = loss + peak_weight * F.binary_cross_entropy_with_logits(peak_logits, peak_targets)
    return loss


def _pixel_loss(logits: torch.Tensor, target: torch.Tensor, kind: str,
                pos_weight: float) -> torch.Tensor:
    if kind == "bce":
        weight = torch.tensor(pos_weight, device=logits.device, dtype=logits.dtype)
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=weight)
    prob = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    positive = target.ge(0.99).float()
    pos_loss = -torch.log(prob) * (1 - prob) ** 2 * positive
    neg_loss = -torch.log(1 - prob) * prob ** 2 * (1 - target) ** 4 * (1 - positive)
    n_pos = positive.sum().clamp(min=1.0)
    return (pos_loss.sum() + neg_loss.sum()) / n_pos


def lr_factor(step: int, total: int, warmup: int, time_fraction: float = 0.0) -> float:
    """Linear warm-up to 1, then cosine decay to 0.01 at ``total`` steps.

    ``time_fraction`` (elapsed / ``max_minutes``) moves the decay ahead when the time limit
    comes before the last step, so a time-boxed run still ends at a low learning rate.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, max((step - warmup) / max(1, total - warmup), time_fraction))
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------- validation


@dataclass
class Validation:
    """One validation pass: per-tomogram top peaks, the sweep and the chosen rule."""

    f2: float
    rule: object
    predictions: pl.DataFrame
    sweep: pl.DataFrame
    precision: float
    recall: float
    f2_fixed: float
    f2_quantile: float
    # With a verifier: the same forward pass scored by the heatmap's own peaks.
    heatmap: Validation | None = None


def validate(model: HeatmapModel, cfg: PipelineConfig, entries: dict[str, CacheEntry],
             motors: pl.DataFrame, tomograms: pl.DataFrame, device: torch.device,
             batch_size: int = 8, progress: bool = False, amp: bool = True,
             verifier: Verifier | None = None) -> Validation:
    """Full inference on the validation tomograms, scored with the competition metric.

    With ``verifier``, the result is that of its re-scored peaks, and ``.heatmap`` that of the
    heatmap's own peaks from the same forward pass (one pass for both).
    """
    predictor = Predictor([model], cfg, device, batch_size=batch_size, amp=amp)
    rows, checked = [], []
    for tomo_id in tqdm(sorted(entries), desc="validate", leave=False, disable=not progress):
        entry = entries[tomo_id]
        volume = entry.load()
        peaks = locate_peaks(predictor, volume, entry.frame, entry.original_shape)
        rows.append(_top_row(tomo_id, peaks))
        if verifier is not None:
            checked.append(_top_row(tomo_id, verifier.rescore(peaks, volume, entry.frame)))
    model.train()
    alone = _scored_validation(pl.DataFrame(rows), entries, motors, tomograms)
    if verifier is None:
        return alone
    return dataclasses.replace(_scored_validation(pl.DataFrame(checked), entries, motors,
                                                  tomograms), heatmap=alone)


def _top_row(tomo_id: str, peaks: np.ndarray) -> dict:
    z, y, x, s = peaks[0] if len(peaks) else (-1.0, -1.0, -1.0, float("nan"))
    return {"tomo_id": tomo_id, "z": z, "y": y, "x": x, "score": s}


def _scored_validation(predictions: pl.DataFrame, entries: dict[str, CacheEntry],
                       motors: pl.DataFrame, tomograms: pl.DataFrame) -> Validation:
    """The metric, the threshold sweep and the chosen rule for one set of top peaks."""
    scores = predictions["score"].to_numpy()
    val_tomos = tomograms.filter(pl.col("tomo_id").is_in(list(entries)))
    val_motors = motors.filter(pl.col("tomo_id").is_in(list(entries)))

    def evaluate(positive: np.ndarray) -> float:
        submission = submission_from_calls(predictions, positive)
        return score(solution_for_submission(val_motors, val_tomos, submission), submission)

    result = sweep_thresholds(scores, evaluate)
    positive = apply_threshold(scores, result.rule)
    submission = submission_from_calls(predictions, positive)
    solution = solution_for_submission(val_motors, val_tomos, submission)
    precision, recall = _precision_recall(solution, submission)
    sweep = pl.DataFrame([("fixed", v, f) for v, f in result.fixed]
                         + [("quantile", v, f) for v, f in result.quantile],
                         schema={"kind": pl.String, "value": pl.Float64, "f2": pl.Float64},
                         orient="row")
    return Validation(result.f2, result.rule, predictions.with_columns(
        pl.Series("positive", positive)), sweep, precision, recall,
        result.best("fixed")[1], result.best("quantile")[1])


def _precision_recall(solution: pl.DataFrame, submission: pl.DataFrame) -> tuple[float, float]:
    from .metric import confusion

    counts = confusion(solution, submission)
    return float(counts["precision"]), float(counts["recall"])


# ---------------------------------------------------------------------------- the loop


def _state_bytes(obj: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@dataclass
class TrainResult:
    """Where the run is and how it went."""

    run_dir: Path
    best_f2: float | None  # validation F2 of the saved checkpoint
    epochs_done: int
    metrics: pl.DataFrame
    stopped_by: str = "epochs"
    history: list[dict] = field(default_factory=list)
    verifier: dict | None = None  # verifier.json's contents when a verifier was trained


def train(data_root: str | os.PathLike, run_dir: str | os.PathLike,
          cfg: PipelineConfig | None = None, tcfg: TrainConfig | None = None,
          progress: bool = True, resume: bool = True) -> TrainResult:
    """Train one fold (or all) and write the run directory; see the module docstring.

    Args:
        data_root: competition layout with ``train/`` and ``train_labels.csv``.
        run_dir: output folder (resumed when it holds ``last.pt`` and ``resume``).
        cfg: model and preprocessing settings.
        tcfg: training-only settings.
        progress: progress bars.
        resume: continue from ``run_dir/last.pt`` when present.
    """
    cfg, tcfg = cfg or PipelineConfig(), tcfg or TrainConfig()
    data_root, run_dir = Path(data_root), Path(run_dir)
    check_encoder_name(cfg.encoder)  # before any heavy work
    if tcfg.encoder_weights is not None and not Path(tcfg.encoder_weights).is_file():
        raise TrainError(f"--encoder-weights {tcfg.encoder_weights} does not exist: attach the "
                         f"file or drop the flag to train from random init")
    labels_path = data_root / "train_labels.csv"
    if not data_root.is_dir():
        raise TrainError(f"--data-root {data_root} does not exist: point it at the competition "
                         f"folder (train/ and train_labels.csv)")
    if not labels_path.is_file():
        raise TrainError(f"{labels_path} not found: --data-root must hold train_labels.csv")
    labels = read_labels(labels_path)
    tomograms, motors = labels.tomograms, labels.motors
    missing = [t for t in tomograms["tomo_id"].to_list() if not (data_root / "train" / t).is_dir()]
    if len(missing) == tomograms.height:
        raise TrainError(f"none of the {tomograms.height} labelled tomograms has a folder in "
                         f"{data_root / 'train'}: check --data-root")
    if missing:
        print(f"warning: {len(missing)} labelled tomogram(s) have no folder and are skipped: "
              f"{missing[:5]}", file=sys.stderr)
        tomograms = tomograms.filter(~pl.col("tomo_id").is_in(missing))

    torch.manual_seed(tcfg.seed)
    device = pick_device(tcfg.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    folds = assign_folds(tomograms, tcfg.n_folds if tcfg.fold >= 0 else 2, tcfg.seed)
    atomic_write_text(run_dir / "folds.csv", folds.write_csv())
    val_ids = set(folds.filter(pl.col("fold") == tcfg.fold)["tomo_id"]) if tcfg.fold >= 0 else set()
    train_tomos = tomograms.filter(~pl.col("tomo_id").is_in(list(val_ids)))
    if train_tomos.height == 0:
        raise TrainError("no tomogram left for training: lower --n-folds or add data")
    if cfg.assumed_test_spacing is None:  # every labelled tomogram's, not only the training
        # folds': runs of other folds and seeds then preprocess alike and can be ensembled
        cfg = cfg.replace(assumed_test_spacing=float(tomograms["voxel_spacing"].median()))
    atomic_write_text(run_dir / "train_config.json",
                      json.dumps(dataclasses.asdict(tcfg), indent=2, default=list) + "\n")

    cache_root = Path(tcfg.cache_dir) if tcfg.cache_dir else data_root.parent / "cache"
    spacing_of = dict(zip(tomograms["tomo_id"], tomograms["voxel_spacing"]))
    train_entries = build_cache(
        [(t, data_root / "train" / t, spacing_of[t]) for t in train_tomos["tomo_id"]],
        cfg, cache_root, progress=progress)
    # Validation sees what a test tomogram sees: the assumed spacing, not the true one.
    val_entries = build_cache(
        [(t, data_root / "train" / t, cfg.assumed_test_spacing) for t in sorted(val_ids)],
        cfg, cache_root, progress=progress)

    spec = SampleSpec(tcfg.crop, cfg.sigma_angstrom / cfg.target_spacing, cfg.output_stride,
                      cfg.stack_offsets)
    volumes = {t: e.load() for t, e in train_entries.items()}
    train_motors = motors_in_model_frame(motors, train_entries)
    hard = {}
    if tcfg.hard_negative_fraction > 0:
        hard = hard_negative_spots(volumes, train_motors, cfg, progress)
    sampler = StackSampler(volumes, train_motors, spec, Augment(zoom_range=tcfg.zoom_range),
                           tcfg.positive_fraction, hard, tcfg.hard_negative_fraction)

    model = build_model(cfg, tcfg.encoder_weights).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    total_steps = tcfg.epochs * tcfg.steps_per_epoch

    # With a verifier to train, the heatmap model leaves it a share of the time limit.
    heat_minutes = tcfg.max_minutes * (1 - (tcfg.verifier_share if tcfg.verifier_steps else 0))

    def set_lr(step: int, minutes: float) -> None:
        fraction = minutes / heat_minutes if heat_minutes else 0.0
        for group in optimizer.param_groups:
            group["lr"] = tcfg.lr * lr_factor(step, total_steps, tcfg.warmup_steps, fraction)
    amp_dtype = autocast_dtype(device) if tcfg.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    ema = None
    if tcfg.ema_decay > 0:
        from timm.utils import ModelEmaV3
        ema = ModelEmaV3(model, decay=tcfg.ema_decay, use_warmup=True)

    history: list[dict] = []
    best_f2, start_epoch, step, elapsed_before = None, 0, 0, 0.0
    top_f2 = None  # the highest validation F2 so far (best_f2 is the saved checkpoint's)
    mined: dict[str, np.ndarray] = {}
    state_path = run_dir / STATE_NAME
    run_key = {"seed": tcfg.seed, "fold": tcfg.fold, "n_folds": tcfg.n_folds}
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=False)
        if state.get("run", run_key) != run_key:  # another seed or split: another run
            raise TrainError(f"{state_path} belongs to a run with {state['run']}, not "
                             f"{run_key}: use a new --out for it, or pass --no-resume to start "
                             f"over")
        if PipelineConfig.from_dict(state["config"]) != cfg:
            raise TrainError(f"{state_path} was written with other settings: use a new "
                             f"--out, or pass --no-resume to start over")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema.module.load_state_dict(state["ema"])
        history, best_f2 = state["history"], state["best_f2"]
        top_f2 = state.get("top_f2", best_f2)
        start_epoch, step = state["epoch"], state["step"]
        mined = {t: np.asarray(c, float) for t, c in state.get("mined", {}).items()}
        sampler.set_hard_negatives(_merge_spots(hard, mined))
        elapsed_before = state.get("elapsed", 0.0)
        print(f"resuming {run_dir} at epoch {start_epoch} (step {step})", file=sys.stderr)

    started = time.perf_counter()
    stopped_by = "epochs"
    model.train()
    for epoch in range(start_epoch, tcfg.epochs):
        rng = np.random.default_rng([tcfg.seed, epoch])
        torch.manual_seed(tcfg.seed * 100_003 + epoch)
        losses, epoch_started = [], time.perf_counter()
        bar = tqdm(range(tcfg.steps_per_epoch), desc=f"epoch {epoch + 1}/{tcfg.epochs}",
                   leave=False, disable=not progress)
        for _ in bar:
            set_lr(step, _minutes(started, elapsed_before))
            stacks, heat = sampler.batch(rng, tcfg.batch_size)
            x = model_input(torch.from_numpy(stacks).to(device))
            y = torch.from_numpy(heat).to(device)
            with autocast_to(device, amp_dtype):
                logits = model(x)
            loss = heatmap_loss(logits.float(), y, tcfg.loss, tcfg.pos_weight,
                                tcfg.peak_weight)
            if not torch.isfinite(loss):
                raise TrainError(f"loss became {loss.item()} at epoch {epoch + 1}, step {step}: "
                                 f"lower --lr; the last good checkpoint is {state_path}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model, step=step)
            step += 1
            losses.append(loss.item())
            rate = len(losses) * tcfg.batch_size / (time.perf_counter() - epoch_started)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", samples_s=f"{rate:.1f}",
                            refresh=False)
            if heat_minutes and _minutes(started, elapsed_before) >= heat_minutes:
                stopped_by = "max_minutes"
                break

        eval_model = ema.module if ema is not None else model
        row = {"epoch": epoch + 1, "step": step, "train_loss": float(np.mean(losses)),
               "lr": optimizer.param_groups[0]["lr"],
               "seconds": time.perf_counter() - epoch_started}
        if val_entries:
            val = validate(eval_model, cfg, val_entries, motors, tomograms, device,
                           tcfg.val_batch_size, progress, amp=tcfg.amp)
            row.update(val_f2=val.f2, val_f2_fixed=val.f2_fixed, val_f2_quantile=val.f2_quantile,
                       val_precision=val.precision, val_recall=val.recall,
                       threshold=str(val.rule))
            improved = replaces_saved(val.f2, top_f2, len(val_entries))
            top_f2 = val.f2 if top_f2 is None else max(top_f2, val.f2)
            if improved:
                best_f2 = val.f2
                _drop_verifier(run_dir)  # it re-scored another checkpoint's peaks
                save_checkpoint(eval_model, cfg.replace(threshold=val.rule), run_dir,
                                extra={"epoch": epoch + 1, "val_f2": val.f2})
                atomic_write_text(run_dir / "threshold_sweep.csv", val.sweep.write_csv())
                atomic_write_text(run_dir / "val_predictions.csv", val.predictions.write_csv())
        else:
            _drop_verifier(run_dir)
            save_checkpoint(eval_model, cfg, run_dir, extra={"epoch": epoch + 1})
        if tcfg.mine_per_epoch and tcfg.hard_negative_fraction > 0 and stopped_by == "epochs":
            ids = sorted(volumes)
            turn = [ids[(epoch * tcfg.mine_per_epoch + i) % len(ids)]
                    for i in range(min(tcfg.mine_per_epoch, len(ids)))]
            mined.update(mine_false_peaks(eval_model, cfg, {t: volumes[t] for t in turn},
                                          train_motors, device, tcfg.val_batch_size,
                                          amp=tcfg.amp))
            sampler.set_hard_negatives(_merge_spots(hard, mined))
            row["hard_negatives"] = len(sampler.hard)
        history.append(row)
        atomic_write_text(run_dir / METRICS_NAME, pl.DataFrame(history).write_csv())
        atomic_write_bytes(state_path, _state_bytes({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "ema": ema.module.state_dict() if ema is not None else None,
            "history": history, "best_f2": best_f2, "top_f2": top_f2, "epoch": epoch + 1,
            "step": step,
            "mined": {t: c.tolist() for t, c in mined.items()},
            "config": cfg.to_dict(), "elapsed": _minutes(started, elapsed_before) * 60,
            "run": run_key}))
        summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in row.items())
        tqdm.write(summary) if progress else None
        if stopped_by != "epochs":
            break
    verifier_info = None
    if tcfg.verifier_steps and (run_dir / VERIFIER_NAME).is_file():
        # A new checkpoint deletes the old verifier, so this one belongs to model.pt: a rerun
        # of a finished run keeps it.
        verifier_info = _saved_verifier_info(run_dir)
    elif tcfg.verifier_steps and (run_dir / CHECKPOINT_NAME).is_file():
        seconds_left = (max(0.0, tcfg.max_minutes - _minutes(started, elapsed_before)) * 60
                        if tcfg.max_minutes else None)
        verifier_info = fit_verifier(run_dir, tcfg, volumes, train_motors, val_entries, motors,
                                     tomograms, device, progress, seconds_left)
    return TrainResult(run_dir, best_f2, len(history), pl.DataFrame(history), stopped_by,
                       history, verifier_info)


def fit_verifier(run_dir: Path, tcfg: TrainConfig, volumes: dict[str, np.ndarray],
                 train_motors: dict[str, np.ndarray], val_entries: dict[str, CacheEntry],
                 motors: pl.DataFrame, tomograms: pl.DataFrame, device: torch.device,
                 progress: bool = True, seconds_left: float | None = None) -> dict | None:
    """Train the second-stage verifier on the saved model's top peaks in the training volumes,
    score the validation fold with it and write it (see the module docstring).

    Returns ``verifier.json``'s contents, or None when there was nothing to learn from (no
    training motor, or no peak away from one): then the run has no verifier.
    """
    started = time.perf_counter()
    model, cfg = load_checkpoint(run_dir, map_location=device)
    model.to(device)
    candidates = top_peaks(model, cfg, volumes, device, tcfg.val_batch_size, amp=tcfg.amp,
                           progress=progress)
    examples = collect_examples(candidates, train_motors,
                                VERIFIER_POSITIVE_ANGSTROM / cfg.target_spacing,
                                MIN_RADIUS_ANGSTROM / cfg.target_spacing)
    if examples.n_positive == 0 or examples.n_negative == 0:
        print(f"warning: no verifier trained: the training tomograms gave "
              f"{examples.n_positive} motor and {examples.n_negative} look-alike examples",
              file=sys.stderr)
        return None
    budget = None
    if seconds_left is not None:  # keep about a fifth of what is left for validating
        budget = max(1.0, 0.8 * seconds_left - (time.perf_counter() - started))
    try:
        fitted = train_verifier(volumes, examples, VerifierSpec(z_step=z_step_for(cfg)),
                                steps=tcfg.verifier_steps, seed=tcfg.seed, device=device,
                                amp=tcfg.amp, max_seconds=budget, progress=progress)
    except VerifierError as exc:  # the heatmap model is saved and usable on its own
        print(f"warning: no verifier trained: {exc}", file=sys.stderr)
        return None
    info = {"steps": fitted.steps, "train_seconds": round(fitted.seconds, 1),
            "positives": examples.n_positive, "negatives": examples.n_negative,
            "final_loss": float(np.mean(fitted.losses[-20:]))}
    rule_without = cfg.threshold
    if val_entries:
        both = validate(model, cfg, val_entries, motors, tomograms, device,
                        tcfg.val_batch_size, amp=tcfg.amp,
                        verifier=Verifier([fitted.net], device, amp=tcfg.amp))
        alone = both.heatmap
        rule_without = alone.rule
        info.update(val_f2_heatmap=alone.f2, val_f2=both.f2, threshold_heatmap=str(alone.rule),
                    threshold=str(both.rule))
        for name, table in (("threshold_sweep", alone.sweep), ("val_predictions",
                                                                alone.predictions)):
            atomic_write_text(run_dir / f"{name}_heatmap.csv", table.write_csv())
        atomic_write_text(run_dir / "threshold_sweep.csv", both.sweep.write_csv())
        atomic_write_text(run_dir / "val_predictions.csv", both.predictions.write_csv())
        cfg = cfg.replace(threshold=both.rule)
    info["seconds"] = round(time.perf_counter() - started, 1)
    save_verifier(fitted.net, run_dir, rule_without, info)
    cfg.save(run_dir)
    summary = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in info.items())
    tqdm.write(f"verifier: {summary}") if progress else None
    return info


def _saved_verifier_info(run_dir: Path) -> dict | None:
    try:
        info = json.loads((run_dir / VERIFIER_INFO_NAME).read_text())
    except (OSError, ValueError):
        return None
    return {k: v for k, v in info.items() if k != "spec"}


def _drop_verifier(run_dir: Path) -> None:
    for name in (VERIFIER_NAME, VERIFIER_INFO_NAME):
        (run_dir / name).unlink(missing_ok=True)


def replaces_saved(val_f2: float, top_f2: float | None, n_val: int) -> bool:
    """Whether this epoch's checkpoint replaces the saved one.

    A later epoch (more data seen, a lower learning rate, a smoother EMA) wins unless its F2 is
    below the best so far by more than half a tomogram's worth: on a small validation fold one
    tomogram flipping moves F2 by about ``1 / n_val``. In the accuracy benchmark (8 validation
    tomograms) the early epoch that got lucky on them ranked the test tomograms far worse (AUC
    0.64) than the last epoch (0.82), which scored 0.04 lower on validation.
    """
    return top_f2 is None or val_f2 >= top_f2 - 0.5 / max(1, n_val)


def _merge_spots(*pools: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = set().union(*pools)
    return {k: np.concatenate([np.asarray(p.get(k, np.zeros((0, 3))), float).reshape(-1, 3)
                               for p in pools]) for k in keys}


def _minutes(started: float, elapsed_before: float) -> float:
    return (time.perf_counter() - started + elapsed_before) / 60.0


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    defaults, pdefaults = TrainConfig(), PipelineConfig()
    parser = argparse.ArgumentParser(prog="python -m kernel_lib.train",
                                     description="Train the 2.5D heatmap model.")
    parser.add_argument("--data-root", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path, help="run directory")
    parser.add_argument("--fold", default="0", help="held-out fold index, or 'all'")
    parser.add_argument("--n-folds", type=int, default=defaults.n_folds)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--steps-per-epoch", type=int, default=defaults.steps_per_epoch)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--crop", type=int, default=defaults.crop)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--loss", choices=("bce", "focal"), default=defaults.loss)
    parser.add_argument("--pos-weight", type=float, default=defaults.pos_weight)
    parser.add_argument("--peak-weight", type=float, default=defaults.peak_weight,
                        help="weight of the loss on each crop's top logit (0: off)")
    parser.add_argument("--positive-fraction", type=float, default=defaults.positive_fraction)
    parser.add_argument("--hard-negative-fraction", type=float,
                        default=defaults.hard_negative_fraction,
                        help="share of negative samples centred on dark motor-free blobs")
    parser.add_argument("--mine-per-epoch", type=int, default=defaults.mine_per_epoch,
                        help="training tomograms searched for false peaks after each epoch")
    parser.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    parser.add_argument("--no-amp", action="store_true",
                        help="train in float32 (default: float16 on CUDA, bfloat16 on a CPU "
                             "that has it natively)")
    parser.add_argument("--zoom-range", type=float, nargs=2, default=defaults.zoom_range)
    parser.add_argument("--max-minutes", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--encoder-weights", default=None,
                        help="local timm weights file for the encoder (never downloaded)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--encoder", default=pdefaults.encoder)
    parser.add_argument("--target-spacing", type=float, default=pdefaults.target_spacing)
    parser.add_argument("--assumed-test-spacing", type=float, default=None,
                        help="spacing assumed for test tomograms (default: the median of all "
                        "labelled tomograms, whatever the fold)")
    parser.add_argument("--stack-half", type=int, default=pdefaults.stack_half,
                        help="n: 2n + 1 slices per 2.5D stack")
    parser.add_argument("--stack-step", type=float, default=pdefaults.stack_step_angstrom,
                        help="angstroms between neighbouring slices of a stack")
    parser.add_argument("--output-stride", type=int, default=pdefaults.output_stride)
    parser.add_argument("--z-stride", type=int, default=pdefaults.z_stride)
    parser.add_argument("--tta", action="store_true",
                        help="flip TTA in validation, saved in config.json so inference predicts "
                             "the way the threshold rule was chosen (3x the forward passes)")
    parser.add_argument("--z-sampling", choices=Z_SAMPLINGS, default=pdefaults.z_sampling,
                        help="z resampling: average every slice, or read the nearest slice per "
                             "model slice (decodes about half the slices at 32 A)")
    parser.add_argument("--verifier-steps", type=int, default=defaults.verifier_steps,
                        help="steps of the second-stage 3D verifier of the top peaks (0: none)")
    parser.add_argument("--verifier-share", type=float, default=defaults.verifier_share,
                        help="share of --max-minutes kept for the verifier")
    parser.add_argument("--no-resume", action="store_true", help="ignore RUN_DIR/last.pt")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fold == "all":
        fold = -1
    else:
        try:
            fold = int(args.fold)
        except ValueError:
            parser.error(f"--fold must be an integer or 'all' (got {args.fold!r})")
    try:
        cfg = PipelineConfig(encoder=args.encoder, target_spacing=args.target_spacing,
                             assumed_test_spacing=args.assumed_test_spacing,
                             stack_half=args.stack_half,
                             stack_step_angstrom=args.stack_step,
                             output_stride=args.output_stride,
                             z_stride=args.z_stride, z_sampling=args.z_sampling,
                             tta=args.tta)
        tcfg = TrainConfig(fold=fold, n_folds=args.n_folds, epochs=args.epochs,
                           steps_per_epoch=args.steps_per_epoch, batch_size=args.batch_size,
                           crop=args.crop, lr=args.lr, loss=args.loss, pos_weight=args.pos_weight,
                           peak_weight=args.peak_weight,
                           positive_fraction=args.positive_fraction,
                           hard_negative_fraction=args.hard_negative_fraction,
                           mine_per_epoch=args.mine_per_epoch,
                           ema_decay=args.ema_decay, amp=not args.no_amp,
                           zoom_range=tuple(args.zoom_range), max_minutes=args.max_minutes,
                           seed=args.seed, device=args.device,
                           encoder_weights=args.encoder_weights, cache_dir=args.cache_dir,
                           verifier_steps=args.verifier_steps,
                           verifier_share=args.verifier_share)
        result = train(args.data_root, args.out, cfg, tcfg, progress=not args.no_progress,
                       resume=not args.no_resume)
    except (TrainError, ConfigError, ModelError, LabelError, TomogramError,
            VerifierError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    best = "n/a" if result.best_f2 is None else f"{result.best_f2:.4f}"
    verifier = result.verifier
    checked = ("" if not verifier else f"; verifier: {verifier['steps']} steps"
               + (f", validation F2 {verifier['val_f2']:.4f} with it" if "val_f2" in verifier
                  else ""))
    print(f"run {result.run_dir}: {result.epochs_done} epoch(s), best validation F2 {best}, "
          f"stopped by {result.stopped_by}{checked}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
