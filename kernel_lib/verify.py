"""Second stage: a small 3D CNN that re-scores the heatmap's top peaks of each tomogram.

The 2.5D heatmap model sees a slab of five slices, about +-128 A at the defaults; a dense dark
blob (debris, a storage granule, a gold bead) and a motor look alike there, and such blobs give
motor-free tomograms top scores as high as real motors (bench/RESULTS.md, sessions 4-5). The
verifier looks at a taller box around each of a tomogram's top ``TOP_K`` peaks (by default 9
slices ``z_step`` apart by 40 x 40 model voxels: about 0.5 kA x 1.3 kA x 1.3 kA at 32 A) and
says motor or not. It trains in a minute or two on the training tomograms, after the heatmap
model: positives are the motors (and peaks on them), negatives the model's own strongest peaks
away from every motor, which are exactly the look-alikes it confuses.

A peak's final score mixes the two stages' logits (:func:`combine_scores`), and the
best candidate by that score is the tomogram's answer, so the verifier can also promote a motor
that the heatmap ranked second.

Crops read only the model slices that inference prepared (``model_slices``): each of its
slices is the prepared slice nearest to where it should be, so the partial preprocessing of
:func:`~kernel_lib.preprocess.preprocess_tomogram` is kept.

Files in a run directory: ``verifier.pt`` (weights, :class:`VerifierSpec`, and the threshold
rule to use when the verifier is switched off) and ``verifier.json`` (what it trained on and
how validation scored with and without it).

Example:
    >>> import numpy as np
    >>> spec = VerifierSpec(depth=3, size=8, z_step=2)
    >>> cut_crops(np.zeros((6, 16, 16), np.uint8), np.array([[2.0, 4.0, 4.0]]), spec).shape
    (1, 3, 8, 8)
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import ConfigError, ThresholdRule, atomic_write_bytes, atomic_write_text
from .resample import Frame

if TYPE_CHECKING:
    from .config import PipelineConfig

VERIFIER_NAME = "verifier.pt"
VERIFIER_INFO_NAME = "verifier.json"
_EPS = 1e-4
VERIFIER_WEIGHT = 1 / 3  # the verifier's share of a peak's combined logit (combine_scores)


class VerifierError(ValueError):
    """A verifier file or setting that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class VerifierSpec:
    """Geometry and width of the verifier (saved with its weights).

    Attributes:
        depth: slices per crop (odd, so one is the centre).
        size: crop side in model voxels (y and x).
        z_step: model slices between two crop slices (:func:`z_step_for`: 2 at the defaults,
            64 A, so the crops read only slices that inference prepares).
        width: channels of the first block (the later blocks have 2x and 4x).
    """

    depth: int = 9
    size: int = 40
    z_step: int = 2
    width: int = 16

    def __post_init__(self) -> None:
        if self.depth < 1 or self.depth % 2 == 0:
            raise VerifierError(f"verifier depth must be odd and >= 1 (got {self.depth})")
        if self.size < 8:
            raise VerifierError(f"verifier crop size must be >= 8 voxels (got {self.size})")
        if self.z_step < 1 or self.width < 1:
            raise VerifierError(f"verifier z_step and width must be >= 1 (got {self.z_step}, "
                                f"{self.width})")


def z_step_for(cfg: "PipelineConfig") -> int:
    """The z step of crops that read only prepared slices: inference prepares the slices that
    stacks centred on every ``z_stride``-th slice read, a lattice ``gcd(z_stride, stack step)``
    apart (2 model slices at the defaults)."""
    offsets = cfg.stack_offsets
    step = int(offsets[1] - offsets[0]) if len(offsets) > 1 else cfg.z_stride
    return math.gcd(int(cfg.z_stride), step)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True),
        nn.Conv3d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm3d(cout),
        nn.ReLU(inplace=True))


class VerifierNet(nn.Module):
    """Four 3D conv blocks (pooling y and x, then all axes), global mean and max, one logit."""

    def __init__(self, spec: VerifierSpec) -> None:
        super().__init__()
        c = spec.width
        self.spec = spec
        self.blocks = nn.ModuleList([_block(1, c), _block(c, 2 * c), _block(2 * c, 4 * c),
                                     _block(4 * c, 4 * c)])
        self.head = nn.Linear(8 * c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, depth, size, size)`` floats -> ``(B,)`` logits."""
        for i, block in enumerate(self.blocks):
            if i == len(self.blocks) - 1 and x.device.type == "cpu":
                # The last block in float32 on a CPU: its bfloat16 weight gradients at this
                # size (64 channels, about 2 x 5 x 5 voxels) came out NaN in about 1 of 10
                # batches with oneDNN (torch 2.14; tests/test_verify.py checks it); here it
                # costs almost nothing.
                with torch.autocast("cpu", enabled=False):
                    x = block(x.float())
            else:
                x = block(x)
            if i < len(self.blocks) - 1:  # never pool an axis below 1 voxel
                kernel = tuple(2 if n >= 2 and (i > 0 or axis > 0) else 1  # z pools from block 2
                               for axis, n in enumerate(x.shape[2:]))
                x = F.max_pool3d(x, kernel)
        pooled = torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1)
        return self.head(pooled)[:, 0]


def crop_input(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    """``uint8`` crops ``(B, D, S, S)`` -> the float input ``(B, 1, D, S, S)`` (the heatmap
    model's scaling)."""
    from .infer import model_input

    return model_input(torch.as_tensor(crops))[:, None]


def cut_crops(volume: np.ndarray, centres: np.ndarray, spec: VerifierSpec,
              model_slices: np.ndarray | None = None) -> np.ndarray:
    """``uint8`` crops ``(n, depth, size, size)`` centred on ``centres`` (model voxels).

    Voxels outside the volume repeat its edge. With ``model_slices`` (the prepared slices of a
    partly preprocessed volume) the centre snaps to the nearest prepared slice and every crop
    slice is the prepared slice nearest to where it should be; no other slice is read.
    """
    depth, height, width = volume.shape
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 3)
    available = (np.arange(depth) if model_slices is None
                 else np.unique(np.asarray(model_slices, dtype=np.int64)))
    if available.size == 0 or available[0] < 0 or available[-1] >= depth:
        raise VerifierError(f"model_slices must name slices of the {depth}-slice volume")
    half, reach = spec.depth // 2, np.arange(spec.size) - spec.size // 2
    out = np.empty((len(centres), spec.depth, spec.size, spec.size), dtype=volume.dtype)
    for i, (z, y, x) in enumerate(np.rint(centres).astype(np.int64)):
        z0 = _nearest(available, np.clip(centres[i, :1], 0, depth - 1))[0]
        zs = _nearest(available, np.clip(z0 + spec.z_step * np.arange(-half, half + 1), 0,
                                          depth - 1))
        ys = np.clip(y + reach, 0, height - 1)
        xs = np.clip(x + reach, 0, width - 1)
        out[i] = volume[np.ix_(zs, ys, xs)]
    return out


def _nearest(available: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """The entry of sorted ``available`` nearest to each of ``wanted`` (the lower on a tie)."""
    index = np.clip(np.searchsorted(available, wanted), 1, max(1, len(available) - 1))
    lower = available[index - 1]
    upper = available[np.minimum(index, len(available) - 1)]
    return np.where(wanted - lower <= upper - wanted, lower, upper)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


def combine_scores(heatmap_score: np.ndarray, verifier_prob: np.ndarray,
                   weight: float = VERIFIER_WEIGHT) -> np.ndarray:
    """A peak's final score: the sigmoid of the weighted mean of both stages' logits
    (``weight`` on the verifier's).

    Offline, on the benchmark's 90 extra test tomograms with three heatmap checkpoints (seeds
    2026, 7, 11) and a verifier trained for each, tomograms ranked at AUC 0.900 with weight
    1/3, 0.886 with 1/2, 0.855 with the verifier alone and 0.870 with the heatmap alone
    (bench/RESULTS.md, session 8).
    """
    mixed = (1 - weight) * _logit(heatmap_score) + weight * _logit(verifier_prob)
    return 1.0 / (1.0 + np.exp(-mixed))


class Verifier:
    """One or more trained verifier nets (an ensemble averages their probabilities).

    Args:
        nets: nets sharing one :class:`VerifierSpec`.
        device: where they run.
        amp: mixed precision as the heatmap model does (see
            :func:`~kernel_lib.infer.autocast_dtype`).
        flips: also score the y- and x-mirrored crops and average.
    """

    def __init__(self, nets: Sequence[VerifierNet], device: torch.device | str = "cpu",
                 amp: bool = True, flips: bool = True) -> None:
        if not nets:
            raise VerifierError("a Verifier needs at least one net")
        specs = {net.spec for net in nets}
        if len(specs) > 1:
            raise VerifierError(f"the verifiers of an ensemble differ in geometry: {specs}")
        self.spec = nets[0].spec
        self.device = torch.device(device)
        self.nets = [net.to(self.device).eval() for net in nets]
        self.amp, self.flips = amp, flips

    @torch.inference_mode()
    def probabilities(self, volume: np.ndarray, centres: np.ndarray,
                      model_slices: np.ndarray | None = None) -> np.ndarray:
        """Motor probability of each centre (model voxels), ``float64 (n,)``."""
        if len(centres) == 0:
            return np.zeros(0)
        from .infer import autocast_dtype, autocast_to

        crops = torch.from_numpy(cut_crops(volume, centres, self.spec, model_slices))
        x = crop_input(crops).to(self.device)
        views = [x, torch.flip(x, (-2,)), torch.flip(x, (-1,))] if self.flips else [x]
        total = torch.zeros(len(crops), dtype=torch.float32, device=self.device)
        dtype = autocast_dtype(self.device) if self.amp else None
        with autocast_to(self.device, dtype):
            for net in self.nets:
                for view in views:
                    total += torch.sigmoid(net(view).float())
        probs = (total / (len(self.nets) * len(views))).cpu().numpy().astype(np.float64)
        return np.nan_to_num(probs, nan=0.0)

    def rescore(self, peaks: np.ndarray, volume: np.ndarray, frame: Frame,
                model_slices: np.ndarray | None = None) -> np.ndarray:
        """Peaks ``(k, 4)`` (original voxels, heatmap score) -> the same peaks with the combined
        score, best first."""
        if len(peaks) == 0:
            return peaks
        probs = self.probabilities(volume, frame.apply(peaks[:, :3]), model_slices)
        combined = combine_scores(peaks[:, 3], probs)
        order = np.argsort(-combined, kind="stable")
        result = peaks[order].copy()
        result[:, 3] = combined[order]
        return result


# ---------------------------------------------------------------------------- training


@dataclass
class VerifierExamples:
    """Training crops' centres: ``(volume id, centre in model voxels, label)``."""

    ids: list[str]
    centres: np.ndarray
    labels: np.ndarray

    @property
    def n_positive(self) -> int:
        return int(self.labels.sum())

    @property
    def n_negative(self) -> int:
        return int(len(self.labels) - self.labels.sum())


def collect_examples(candidates: dict[str, np.ndarray], motors: dict[str, np.ndarray],
                     positive_radius: float, negative_radius: float) -> VerifierExamples:
    """Positives: every motor, and every candidate within ``positive_radius`` of one;
    negatives: candidates farther than ``negative_radius`` from every motor (model voxels).
    Candidates in between are left out: neither centred on a motor nor clear of it."""
    kept: list[tuple[str, np.ndarray, float]] = []
    for tomo_id in sorted(set(candidates) | set(motors)):
        known = np.asarray(motors.get(tomo_id, np.zeros((0, 3))), dtype=np.float64).reshape(-1, 3)
        kept += [(tomo_id, motor, 1.0) for motor in known]
        found = np.asarray(candidates.get(tomo_id, np.zeros((0, 3)))).reshape(-1, 3)
        for centre in found:
            distance = (np.linalg.norm(known - centre, axis=1).min() if len(known)
                        else math.inf)
            if distance <= positive_radius or distance > negative_radius:
                kept.append((tomo_id, centre, float(distance <= positive_radius)))
    return VerifierExamples([k[0] for k in kept],
                            np.asarray([k[1] for k in kept], dtype=np.float64).reshape(-1, 3),
                            np.asarray([k[2] for k in kept], dtype=np.float64))


def augmented_crop(volume: np.ndarray, centre: np.ndarray, spec: VerifierSpec,
                   rng: np.random.Generator, jitter: tuple[int, int] = (1, 2)) -> np.ndarray:
    """One training crop: the centre moved by up to ``jitter`` = (z steps, voxels), mirrored
    on each axis and turned by a multiple of 90 degrees in y-x at random (the object stays at
    the centre, so the label holds), contrast and brightness changed a little."""
    shift = np.array([rng.integers(-jitter[0], jitter[0] + 1) * spec.z_step,
                      rng.integers(-jitter[1], jitter[1] + 1),
                      rng.integers(-jitter[1], jitter[1] + 1)], dtype=np.float64)
    crop = cut_crops(volume, np.asarray(centre)[None] + shift, spec)[0]
    for axis in range(3):
        if rng.random() < 0.5:
            crop = np.flip(crop, axis)
    crop = np.rot90(crop, int(rng.integers(4)), axes=(1, 2)).astype(np.float32)
    mean = crop.mean()
    crop = (crop - mean) * rng.uniform(0.85, 1.15) + mean + rng.uniform(-10.0, 10.0)
    return np.clip(np.rint(crop), 0, 255).astype(np.uint8)


@dataclass
class VerifierTraining:
    """What :func:`train_verifier` did."""

    net: VerifierNet
    steps: int
    seconds: float
    losses: list[float]
    skipped: int = 0  # steps whose loss or gradient was not finite (not applied)


def train_verifier(volumes: dict[str, np.ndarray], examples: VerifierExamples,
                   spec: VerifierSpec, steps: int = 400, batch_size: int = 32, lr: float = 2e-3,
                   seed: int = 0, device: torch.device | str = "cpu", amp: bool = True,
                   max_seconds: float | None = None, progress: bool = True) -> VerifierTraining:
    """Train a verifier on balanced batches (half positives, half negatives) with AdamW and a
    warm-up + cosine schedule; stops at ``steps`` or after ``max_seconds``."""
    from .infer import autocast_dtype, autocast_to

    if examples.n_positive == 0 or examples.n_negative == 0:
        raise VerifierError(f"the verifier needs positives and negatives (got "
                            f"{examples.n_positive} and {examples.n_negative}): train on "
                            f"tomograms with and without motors")
    if steps < 1 or batch_size < 2:
        raise VerifierError(f"verifier steps must be >= 1 and batch size >= 2 (got {steps}, "
                            f"{batch_size})")
    device = torch.device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    net = VerifierNet(spec).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    positives = np.flatnonzero(examples.labels == 1)
    negatives = np.flatnonzero(examples.labels == 0)
    half = batch_size // 2
    target = torch.tensor([1.0] * half + [0.0] * (batch_size - half), device=device)
    dtype = autocast_dtype(device) if amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    warmup, losses, started, skipped = max(1, steps // 20), [], time.perf_counter(), 0
    bar = tqdm(range(steps), desc="verifier", leave=False, disable=not progress)
    for step in bar:
        factor = ((step + 1) / warmup if step < warmup
                  else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        picked = np.concatenate([rng.choice(positives, half), rng.choice(negatives,
                                                                          batch_size - half)])
        crops = np.stack([augmented_crop(volumes[examples.ids[i]], examples.centres[i], spec,
                                         rng) for i in picked])
        with autocast_to(device, dtype):
            logits = net(crop_input(crops).to(device))
        loss = F.binary_cross_entropy_with_logits(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), 2.0)
        if torch.isfinite(loss) and torch.isfinite(norm):
            scaler.step(optimizer)
        else:
            skipped += 1
        scaler.update()
        losses.append(float(loss.item()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", skipped=skipped, refresh=False)
        if max_seconds is not None and time.perf_counter() - started >= max_seconds:
            break
    if skipped > len(losses) // 2:
        raise VerifierError(f"the verifier's loss or gradient was not finite in {skipped} of "
                            f"{len(losses)} steps: train it without mixed precision (amp)")
    net.eval()
    return VerifierTraining(net, len(losses), time.perf_counter() - started, losses, skipped)


# ---------------------------------------------------------------------------- files


def save_verifier(net: VerifierNet, run_dir: str | os.PathLike,
                  threshold_without: ThresholdRule | None, info: dict | None = None) -> Path:
    """Write ``verifier.pt`` (weights, spec, the rule for use without it) and
    ``verifier.json`` (``info``, readable) into ``run_dir`` atomically."""
    run_dir = Path(run_dir)
    buffer = io.BytesIO()
    torch.save({"state_dict": net.state_dict(), "spec": asdict(net.spec),
                "threshold_without": str(threshold_without) if threshold_without else None},
               buffer)
    path = run_dir / VERIFIER_NAME
    atomic_write_bytes(path, buffer.getvalue())
    atomic_write_text(run_dir / VERIFIER_INFO_NAME,
                      json.dumps({"spec": asdict(net.spec), **(info or {})}, indent=2,
                                 default=str) + "\n")
    return path


def load_verifier(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu",
                  ) -> tuple[VerifierNet, ThresholdRule | None] | None:
    """The run's verifier net and its no-verifier rule, or None when it has no verifier."""
    path = Path(run_dir) / VERIFIER_NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        net = VerifierNet(VerifierSpec(**state["spec"]))
        net.load_state_dict(state["state_dict"])
        rule = state.get("threshold_without")
        return net.eval(), (ThresholdRule.parse(rule) if rule else None)
    except (VerifierError, ConfigError) as exc:
        raise VerifierError(f"{path}: {exc}: retrain, or delete it to predict without the "
                            f"verifier") from None
    except Exception as exc:  # a truncated or foreign file
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise VerifierError(f"cannot read {path} ({type(exc).__name__}: {first}): retrain, or "
                            f"delete it to predict without the verifier") from None


__all__ = ["Verifier", "VerifierError", "VerifierExamples", "VerifierNet", "VerifierSpec",
           "VerifierTraining", "augmented_crop", "collect_examples", "combine_scores",
           "crop_input", "cut_crops", "load_verifier", "save_verifier", "train_verifier",
           "z_step_for"]
