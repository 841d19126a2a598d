"""Inference: tomogram folders in, ``submission.csv`` out.

For each tomogram: read and preprocess exactly as the checkpoint's config says (with the
config's assumed spacing: test tomograms have none), run the model (or an ensemble, optionally
with flip TTA) over 2.5D stacks of every ``z_stride``-th slice in batches, decode 3D peaks with
max-pool NMS, and map them back to original voxels. When the run directory has a verifier
(:mod:`kernel_lib.verify`), a small 3D CNN re-scores the top peaks and the best by the combined
score is the answer. Then one threshold rule over the whole run
(fixed, or the quantile trick) decides which tomograms have a motor. A tomogram that fails gets
a ``-1`` row and a warning naming it; the run goes on.

A background thread reads and preprocesses the next tomogram while the model runs on the current
one (``prefetch``). With a deadline (:mod:`kernel_lib.budget`) the run watches its own rate and,
when it would be late, drops TTA, then the extra ensemble members, and finally writes ``-1`` rows
for the tomograms it has no time for: ``submission.csv`` is always written.

Command line::

    python -m kernel_lib.infer --data-root DIR --weights RUN_DIR [RUN_DIR ...] \\
        [--split test] --out submission.csv [--threshold quantile:0.45] [--[no-]tta] \\
        [--[no-]verifier] \\
        [--deadline-minutes 600 | --deadline 2026-03-01T21:30] [--prefetch 1] [--compile]

Example:
    >>> from kernel_lib.infer import run_inference  # doctest: +SKIP
    >>> table = run_inference("data/synthetic", ["runs/fold0"],  # doctest: +SKIP
    ...                       out="submission.csv")
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import math
import os
import queue
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from .budget import DEFAULT_RESERVE_SECONDS, EPOCH_CUTOFF, Budget, BudgetError, Deadline
from .config import ConfigError, PipelineConfig, ThresholdRule
from .labels import LabelError, read_sample_submission, write_submission
from .model import HeatmapModel, ModelError, load_checkpoint
from .peaks import find_peaks, nms_radius_voxels
from .preprocess import Preprocessed, preprocess_tomogram
from .resample import Frame, heatmap_frame
from .stacks import iter_stack_batches, slices_read
from .threshold import apply_threshold
from .verify import Verifier, VerifierError, load_verifier

INPUT_MEAN, INPUT_STD = 0.5, 0.25  # uint8 [0, 255] -> roughly zero-mean, unit-variance input
TOP_K = 5


class InferenceError(ValueError):
    """Inputs that make a whole inference run impossible; the message says what to do."""


INPUT_SCALE, INPUT_SHIFT = 1.0 / (255.0 * INPUT_STD), -INPUT_MEAN / INPUT_STD


def model_input(stacks: torch.Tensor, multiple: int = 1, channels_last: bool = False,
                ) -> torch.Tensor:
    """``uint8`` stacks ``(..., H, W)`` in [0, 255] -> the float input the model was trained on,
    on ``stacks``' device.

    One float buffer is allocated and filled in one converting copy, then scaled in place:
    ``H`` and ``W`` padded at the bottom and right to a multiple of ``multiple`` with edge
    values (as :func:`~kernel_lib.model.pad_to_multiple`), in the channels-last layout when
    asked (4D only). That is about 3x faster on a CPU than converting, scaling, re-laying out
    and padding in separate passes (bench/RESULTS.md, session 9).
    """
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1 (got {multiple})")
    h, w = stacks.shape[-2:]
    padded = tuple(stacks.shape[:-2]) + (-(-h // multiple) * multiple,
                                         -(-w // multiple) * multiple)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(padded, dtype=torch.float32, device=stacks.device, memory_format=layout)
    out[..., :h, :w].copy_(stacks)
    if padded[-1] > w:
        out[..., :h, w:] = out[..., :h, w - 1:w]
    if padded[-2] > h:
        out[..., h:, :] = out[..., h - 1:h, :]
    return out.mul_(INPUT_SCALE).add_(INPUT_SHIFT)


def pick_device(name: str | None = None) -> torch.device:
    """``name`` if given, else CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The mixed-precision type ``device`` runs fast, or None (stay in float32).

    float16 on CUDA (a T4 has no fast bfloat16); bfloat16 on a CPU with native bfloat16
    instructions (AVX512-BF16 or AMX), where a training step of the default model takes
    0.6-0.7x the float32 time and inference about 0.5x (bench/RESULTS.md); None on other CPUs,
    which would emulate it.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16
    return None


def autocast_to(device: torch.device | str, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op context when None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _cpu_has_bf16() -> bool:
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:  # private probes of torch.cpu; a torch without them counts as "no"
        return any(bool(getattr(torch.cpu, name)()) for name in checks
                   if hasattr(torch.cpu, name))
    except Exception:  # noqa: BLE001 - a failing probe must never stop a run
        return False


class Predictor:
    """Runs one or more models (flip TTA optional) over every 2.5D stack of a volume.

    Args:
        models: models sharing one config's geometry.
        cfg: the shared config.
        device: where to run.
        batch_size: stacks per forward pass.
        tta: also run the x-flipped and y-flipped stacks and average; None: ``cfg.tta`` (what
            the threshold rule was chosen with).
        amp: autocast to the device's fast mixed precision (:func:`autocast_dtype`: fp16 on
            CUDA, bf16 on a CPU with native bf16, none elsewhere).
        channels_last: NHWC weights and inputs (faster convolutions on GPU tensor cores and
            on CPU alike; same results up to float rounding).
        compile: wrap each model in ``torch.compile`` (off by default: unmeasured on GPU, and
            the first batch pays the compilation).
        verifier: re-scores the top peaks of each tomogram (:func:`locate_peaks`); None: the
            heatmap's peaks as they are.
    """

    def __init__(self, models: Sequence[HeatmapModel], cfg: PipelineConfig,
                 device: torch.device | str = "cpu", batch_size: int = 8,
                 tta: bool | None = None,
                 amp: bool = True, channels_last: bool = True, compile: bool = False,
                 verifier: Verifier | None = None) -> None:
        self.device = torch.device(device)
        self.verifier = verifier
        self.channels_last = channels_last
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.models = [m.to(self.device, memory_format=layout).eval() for m in models]
        self.multiple = max(m.input_multiple for m in self.models)
        if compile:
            self.models = [torch.compile(m) for m in self.models]
        self.cfg, self.batch_size = cfg, batch_size
        self.tta = cfg.tta if tta is None else bool(tta)
        self.amp = amp
        self.offsets = cfg.stack_offsets

    @torch.inference_mode()
    def heatmap(self, volume: np.ndarray, z_stride: int | None = None,
                model_slices: np.ndarray | None = None) -> torch.Tensor:
        """Probabilities ``(ceil(Z / z_stride), ceil(Y / s), ceil(X / s))`` on the CPU.

        NaN or infinite model outputs become 0 (never a peak); an out-of-memory error splits the
        batch in halves, and at batch size 1 moves the models to the CPU (see :meth:`_predict`).
        ``model_slices`` (from :class:`~kernel_lib.preprocess.Preprocessed`) names the slices
        that hold data; stacks that would read any other raise ``ValueError``.
        """
        z_stride = z_stride or self.cfg.z_stride
        stride = self.cfg.output_stride
        depth, h, w = volume.shape
        if model_slices is not None:
            missing = np.setdiff1d(slices_read(depth, self.offsets, z_stride), model_slices)
            if len(missing):
                raise ValueError(f"the stacks at z stride {z_stride} read model slices "
                                 f"{missing[:5].tolist()} that were not prepared: preprocess "
                                 f"with z_stride={z_stride} (or None for every slice)")
        out = torch.zeros((math.ceil(depth / z_stride), math.ceil(h / stride),
                           math.ceil(w / stride)), dtype=torch.float32)
        row = 0
        for _, stacks in iter_stack_batches(volume, self.offsets, self.batch_size, z_stride):
            probs = self._predict(torch.from_numpy(stacks))[:, 0, :out.shape[1], :out.shape[2]]
            out[row:row + len(probs)] = torch.nan_to_num(probs.float().cpu(), nan=0.0,
                                                         posinf=1.0, neginf=0.0)
            row += len(probs)
        return out

    def _predict(self, stacks: torch.Tensor) -> torch.Tensor:
        """Forward ``uint8`` stacks, retrying smaller batches, then the CPU, when out of memory."""
        try:
            # uint8 to the device, then one converting copy there (a GPU does the layout)
            x = model_input(stacks.to(self.device), self.multiple, self.channels_last)
            return self._forward(x)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_out_of_memory(exc):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(stacks) > 1:
                self.batch_size = max(1, len(stacks) // 2)
                warnings.warn(f"out of memory at batch size {len(stacks)}: retrying with "
                              f"{self.batch_size}", stacklevel=3)
                half = len(stacks) // 2
                return torch.cat([self._predict(stacks[:half]), self._predict(stacks[half:])])
            if self.device.type != "cpu":
                warnings.warn("out of memory at batch size 1: moving the models to the CPU "
                              "(slow, but the tomogram is not lost)", stacklevel=3)
                self.device = torch.device("cpu")
                self.models = [m.to(self.device) for m in self.models]
                return self._predict(stacks)
            raise

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        flips = [(), (-1,), (-2,)] if self.tta else [()]
        total = None
        dtype = autocast_dtype(self.device) if self.amp else None  # follows a move to the CPU
        with autocast_to(self.device, dtype):
            for model in self.models:
                for dims in flips:
                    xi = torch.flip(x, dims) if dims else x
                    p = torch.sigmoid(model(xi).float())
                    p = torch.flip(p, dims) if dims else p
                    total = p if total is None else total + p
        return total / (len(self.models) * len(flips))

def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower() \
        or "can't allocate memory" in str(exc).lower()


def decode_peaks(heat: torch.Tensor | np.ndarray, cfg: PipelineConfig, frame: Frame,
                 original_shape: Sequence[int], z_stride: int | None = None,
                 top_k: int = TOP_K) -> np.ndarray:
    """Peaks ``(k, 4)`` of ``(z, y, x, score)`` in original voxels, best first.

    Args:
        heat: heatmap volume from :meth:`Predictor.heatmap`.
        cfg: config of the model that made it.
        frame: original -> model frame of the tomogram.
        original_shape: the tomogram's stored shape (peaks are clipped into it).
        z_stride: the z stride the heatmap was computed with.
        top_k: peaks kept.
    """
    z_stride = z_stride or cfg.z_stride
    radius = nms_radius_voxels(cfg.nms_radius_angstrom, cfg.target_spacing, cfg.output_stride,
                               z_stride)
    peaks = find_peaks(heat, radius, top_k=top_k)
    if len(peaks) == 0:
        return peaks
    to_original = frame.then(heatmap_frame(cfg.output_stride, z_stride)).inverse()
    coords = to_original.apply(peaks[:, :3])
    upper = np.asarray(original_shape, dtype=np.float64) - 1
    peaks[:, :3] = np.clip(coords, 0, upper)
    return peaks


def locate_peaks(predictor: Predictor, volume: np.ndarray, frame: Frame,
                 original_shape: Sequence[int], model_slices: np.ndarray | None = None,
                 ) -> np.ndarray:
    """Heatmap, peaks in original voxels and, with a verifier, their combined scores: ``(k, 4)``
    of ``(z, y, x, score)``, best first."""
    heat = predictor.heatmap(volume, model_slices=model_slices)
    peaks = decode_peaks(heat, predictor.cfg, frame, original_shape)
    if predictor.verifier is not None:
        peaks = predictor.verifier.rescore(peaks, volume, frame, model_slices)
    return peaks


@dataclass
class TomogramResult:
    """What inference found in one tomogram (coordinates in original voxels)."""

    tomo_id: str
    peaks: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    seconds: float = 0.0
    error: str | None = None

    @property
    def score(self) -> float:
        """Top peak score; NaN when the tomogram failed or had no peak."""
        return float(self.peaks[0, 3]) if len(self.peaks) else float("nan")


def predict_tomogram(folder: str | os.PathLike, predictor: Predictor, source_spacing: float,
                     tomo_id: str | None = None) -> TomogramResult:
    """Preprocess and predict one tomogram folder."""
    started = time.perf_counter()
    cfg = predictor.cfg
    prep = preprocess_tomogram(folder, source_spacing, cfg, z_stride=cfg.z_stride)
    peaks = locate_peaks(predictor, prep.volume, prep.frame, prep.original_shape,
                         prep.model_slices)
    return TomogramResult(tomo_id or Path(folder).name, peaks, time.perf_counter() - started)


class TomogramPrefetcher:
    """Reads and preprocesses tomograms in a background thread, ahead of the model.

    Decoding (OpenCV) and resampling release the GIL, so the next tomogram is prepared while
    the model runs on the current one. At most ``ahead`` tomograms are prepared beyond the one
    being predicted, so memory stays bounded (``ahead + 1`` preprocessed volumes).

    Iterate to get ``(tomo_id, Preprocessed or None, error or None, seconds)`` in job order;
    each item's volume may be released as soon as the next item is requested.

    Args:
        jobs: ``(tomo_id, folder, source_spacing)`` per tomogram.
        cfg: preprocessing settings; only the model slices that stacks at ``cfg.z_stride``
            read are prepared.
        ahead: tomograms prepared in advance (>= 1).
    """

    def __init__(self, jobs: Sequence[tuple[str, Path, float]], cfg: PipelineConfig,
                 ahead: int = 1) -> None:
        if ahead < 1:
            raise ValueError(f"ahead must be >= 1 (got {ahead}); read in the main thread instead")
        self._jobs, self._cfg = list(jobs), cfg
        self._ready: queue.Queue = queue.Queue()
        self._slots = threading.Semaphore(ahead + 1)  # the one being predicted + ``ahead``
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tomogram-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for tomo_id, folder, spacing in self._jobs:
            while not self._slots.acquire(timeout=0.1):
                if self._stop.is_set():
                    return
            if self._stop.is_set():
                return
            started = time.perf_counter()
            try:
                item = (tomo_id, preprocess_tomogram(folder, spacing, self._cfg,
                                                     z_stride=self._cfg.z_stride), None)
            except Exception as exc:  # handed to the consumer, which writes a -1 row
                item = (tomo_id, None, exc)
            self._ready.put(item + (time.perf_counter() - started,))

    def __iter__(self):
        for index in range(len(self._jobs)):
            if index:
                self._slots.release()  # the previous tomogram is done with
            yield self._ready.get()

    def close(self) -> None:
        """Stop reading ahead (a tomogram being read is finished, then dropped)."""
        self._stop.set()


def _read_in_place(jobs: Sequence[tuple[str, Path, float]], cfg: PipelineConfig):
    """The prefetcher's items, read in the calling thread (``prefetch=0``)."""
    for tomo_id, folder, spacing in jobs:
        started = time.perf_counter()
        try:
            item = (tomo_id, preprocess_tomogram(folder, spacing, cfg, z_stride=cfg.z_stride),
                    None)
        except Exception as exc:
            item = (tomo_id, None, exc)
        yield item + (time.perf_counter() - started,)


def _predict_prepared(tomo_id: str, prep: Preprocessed | None, error: Exception | None,
                      read_seconds: float, predictor: Predictor) -> TomogramResult:
    """Model and peaks for one preprocessed tomogram; any failure becomes a ``-1`` row."""
    started = time.perf_counter()
    try:
        if error is not None:
            raise error
        peaks = locate_peaks(predictor, prep.volume, prep.frame, prep.original_shape,
                             prep.model_slices)
        return TomogramResult(tomo_id, peaks, read_seconds + time.perf_counter() - started)
    except Exception as exc:  # one bad tomogram must not sink the submission
        message = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"tomogram {tomo_id} failed and gets a -1 row ({message})", stacklevel=3)
        if os.environ.get("BYU_DEBUG"):
            traceback.print_exception(exc)
        return TomogramResult(tomo_id, error=message)


def _keep_pace(budget: Budget, predictor: Predictor, remaining: int) -> bool:
    """Drop one step of optional work when the projection is late (TTA first, then the extra
    ensemble members); False when not even the next tomogram fits before the deadline."""
    if budget.should_drop_optional(remaining):
        projected = budget.projected(remaining) / 60
        if predictor.tta:
            predictor.tta = False
            dropped = "flip TTA"
        elif len(predictor.models) > 1:
            dropped = f"{len(predictor.models) - 1} extra ensemble member(s)"
            predictor.models = predictor.models[:1]
        else:
            dropped = None
        if dropped:
            budget.stepped_down()
            warnings.warn(f"{remaining} tomograms would take {projected:.1f} min, "
                          f"{budget.available() / 60:.1f} min are left before the deadline: "
                          f"dropping {dropped}", stacklevel=3)
    return budget.can_start_next()


def load_ensemble(weights: Sequence[str | os.PathLike], device: torch.device | str = "cpu",
                  ) -> tuple[list[HeatmapModel], PipelineConfig]:
    """Load one or more run directories; they must share preprocessing and heatmap geometry."""
    if not weights:
        raise InferenceError("no weights given: pass at least one run directory (--weights)")
    models, configs = [], []
    for run_dir in weights:
        model, cfg = load_checkpoint(run_dir, map_location=device)
        models.append(model)
        configs.append(cfg)
    shared = ("target_spacing", "assumed_test_spacing", "percentile_low", "percentile_high",
              "normalize_per", "z_sampling", "stack_half", "stack_step_angstrom",
              "output_stride", "z_stride")
    for run_dir, cfg in zip(weights[1:], configs[1:]):
        differs = [name for name in shared if getattr(cfg, name) != getattr(configs[0], name)]
        if differs:
            hint = (" (train each run on the same train_labels.csv, or with the same "
                    "--assumed-test-spacing)"
                    if "assumed_test_spacing" in differs else "")
            raise InferenceError(f"{run_dir} differs from {weights[0]} in {differs}: an ensemble "
                                 f"needs the same preprocessing and heatmap geometry{hint}")
    return models, configs[0]


def load_verifiers(weights: Sequence[str | os.PathLike], device: torch.device | str = "cpu",
                   amp: bool = True) -> tuple[Verifier | None, ThresholdRule | None]:
    """The runs' verifiers as one (probabilities averaged) and the first run's rule for use
    without its verifier; ``(None, None)`` when no run has one."""
    loaded = []
    for run_dir in weights:
        try:
            loaded.append(load_verifier(run_dir, map_location=device))
        except VerifierError as exc:
            raise InferenceError(str(exc)) from None
    nets = [item[0] for item in loaded if item is not None]
    if not nets:
        return None, None
    if len(nets) < len(loaded):
        missing = [str(w) for w, item in zip(weights, loaded) if item is None]
        warnings.warn(f"{len(missing)} run(s) have no verifier ({missing[:3]}): the others' "
                      f"verifiers re-score the ensemble's peaks", stacklevel=2)
    try:
        verifier = Verifier(nets, device, amp=amp)
    except VerifierError as exc:
        raise InferenceError(f"{exc}: ensemble runs trained with the same verifier settings")
    return verifier, (loaded[0][1] if loaded[0] is not None else None)


def list_test_tomograms(data_root: Path, split: str) -> list[str]:
    """Tomogram ids to predict: ``sample_submission.csv`` order, else the split's folders."""
    split_dir = data_root / split
    sample = data_root / "sample_submission.csv"
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir()) if split_dir.is_dir() \
        else []
    if sample.is_file() and split == "test":
        ids = read_sample_submission(sample)
        extra = sorted(set(folders) - set(ids))
        if extra:
            warnings.warn(f"{len(extra)} folder(s) in {split_dir} are not in {sample} and are "
                          f"skipped: {extra[:5]}", stacklevel=2)
        return ids
    if not split_dir.is_dir():
        raise InferenceError(f"{split_dir} does not exist and there is no {sample}: check "
                             f"--data-root and --split")
    return folders


def run_inference(data_root: str | os.PathLike, weights: Sequence[str | os.PathLike] | None,
                  split: str = "test", out: str | os.PathLike | None = None,
                  threshold: ThresholdRule | str | None = None, tta: bool | None = None,
                  batch_size: int = 8, device: str | None = None,
                  spacings: dict[str, float] | None = None, z_stride: int | None = None,
                  progress: bool = True, predictor: Predictor | None = None,
                  deadline: Deadline | float | None = None,
                  reserve_seconds: float = DEFAULT_RESERVE_SECONDS, prefetch: int = 1,
                  compile_model: bool = False, amp: bool = True,
                  verifier: bool | None = None) -> pl.DataFrame:
    """Predict every tomogram of a split and write the submission.

    Args:
        data_root: competition layout (``test/<tomo_id>/slice_*.jpg``, ``sample_submission.csv``).
        weights: run directories (several = ensemble, heatmaps averaged).
        split: sub-folder of ``data_root`` to predict.
        out: where to write ``submission.csv`` (atomically); None to skip writing.
        threshold: overrides the checkpoint's rule (``"fixed:0.4"``, ``"quantile:0.45"``).
        tta: flip test-time augmentation; None: the checkpoint's ``tta`` setting (the one
            its threshold rule was chosen with).
        batch_size: stacks per forward pass.
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA if available).
        spacings: known spacings per tomogram, for experiments only; a real test set has none,
            and the config's assumed spacing is used.
        z_stride: overrides the config's z stride.
        progress: show a progress bar.
        predictor: an already built :class:`Predictor` to use instead of loading ``weights``
            (tests and notebooks that hold a model in memory).
        deadline: when the submission must be written: a :class:`~kernel_lib.budget.Deadline`,
            seconds from now, or a Unix time (see :meth:`Deadline.coerce`). When the run's
            own rate says it will be late it drops TTA, then the extra ensemble members, and
            finally writes ``-1`` rows for the tomograms it has no time for. None: no limit.
        reserve_seconds: time kept free before the deadline to write the submission.
        prefetch: tomograms read and preprocessed ahead in a background thread while the
            model runs (0: read in turn, in the main thread).
        compile_model: ``torch.compile`` the models (see :class:`Predictor`).
        amp: mixed precision where the device runs it fast (see :func:`autocast_dtype`);
            False keeps float32.
        verifier: re-score the top peaks with the runs' verifiers (``verifier.pt``); None:
            when they have one. Off, the rule is the one validation chose without it. Ignored
            when ``predictor`` is given (its own ``verifier`` is used).

    Returns:
        A DataFrame with the submission columns plus ``score``, ``peak_z/y/x`` and ``error``
        per tomogram (see :func:`results_to_table`).
    """
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise InferenceError(f"--data-root {data_root} does not exist: point it at the "
                             f"competition folder (with test/ and sample_submission.csv)")
    checker, rule_without = None, None
    if predictor is None:
        dev = pick_device(device)
        models, cfg = load_ensemble(list(weights or []), dev)
        if verifier is not False:
            checker, rule_without = load_verifiers(list(weights), dev, amp)
            if verifier and checker is None:
                raise InferenceError(f"--verifier: none of {[str(w) for w in weights]} has a "
                                     f"verifier.pt; train with --verifier-steps > 0 or drop "
                                     f"the flag")
        elif weights:
            try:  # only the rule is needed; a damaged verifier must not stop a run without it
                saved = load_verifier(weights[0])
                rule_without = saved[1] if saved is not None else None
            except VerifierError as exc:
                warnings.warn(f"{exc}; using config.json's rule", stacklevel=2)
    else:
        cfg = predictor.cfg
    if z_stride:
        cfg = cfg.replace(z_stride=z_stride)
    default_rule = rule_without if (verifier is False and rule_without) else cfg.threshold
    rule = ThresholdRule.parse(threshold) if isinstance(threshold, str) else (threshold or
                                                                               default_rule)
    if cfg.assumed_test_spacing is None and not spacings:
        raise InferenceError("the checkpoint's config has no assumed_test_spacing: retrain, or "
                             "set it in config.json (angstroms per voxel, e.g. 15.6)")
    if prefetch < 0:
        raise InferenceError(f"prefetch must be >= 0 (got {prefetch})")
    try:
        budget = (None if deadline is None
                  else Budget(Deadline.coerce(deadline), reserve_seconds=reserve_seconds))
    except BudgetError as exc:
        raise InferenceError(str(exc)) from None
    if predictor is None:
        predictor = Predictor(models, cfg, dev, batch_size=batch_size, tta=tta,
                              amp=amp, compile=compile_model, verifier=checker)
    predictor.cfg = cfg
    ids = list_test_tomograms(data_root, split)
    jobs = [(tomo_id, data_root / split / tomo_id,
             (spacings or {}).get(tomo_id, cfg.assumed_test_spacing)) for tomo_id in ids]
    results: list[TomogramResult] = []
    started = time.perf_counter()
    bar = tqdm(total=len(ids), desc=f"infer {split}", unit="tomo", disable=not progress)
    if budget is None or budget.can_start_next():
        reader = TomogramPrefetcher(jobs, cfg, prefetch) if prefetch else None
        if budget is not None:
            budget.start()
        for tomo_id, prep, error, read_seconds in (reader or _read_in_place(jobs, cfg)):
            results.append(_predict_prepared(tomo_id, prep, error, read_seconds, predictor))
            del prep  # let the volume go before the next one arrives
            bar.update(1)
            bar.set_postfix(tomo_per_s=f"{len(results) / (time.perf_counter() - started):.2f}")
            if budget is not None:
                budget.finished()
                if len(results) < len(ids) and not _keep_pace(budget, predictor,
                                                              len(ids) - len(results)):
                    break
        if reader is not None:
            reader.close()
    bar.close()
    if len(results) < len(ids):
        skipped = ids[len(results):]
        warnings.warn(f"deadline {budget.deadline}: no time left for {len(skipped)} of "
                      f"{len(ids)} tomogram(s), which get -1 rows (from {skipped[0]})",
                      stacklevel=2)
        results += [TomogramResult(tomo_id, error="skipped: no time left before the deadline")
                    for tomo_id in skipped]
    table = results_to_table(results, rule)
    if out is not None:
        write_submission(table.select(["tomo_id", "Motor axis 0", "Motor axis 1",
                                       "Motor axis 2"]), out)
    return table


def results_to_table(results: Sequence[TomogramResult], rule: ThresholdRule) -> pl.DataFrame:
    """Apply the threshold rule and build the submission table, plus the top peak's score and
    position (``peak_z/y/x``, whatever the rule said) and the error of a failed tomogram."""
    scores = np.array([r.score for r in results], dtype=np.float64)
    positive = apply_threshold(scores, rule)
    rows = []
    for result, pos in zip(results, positive):
        top = result.peaks[0, :3] if len(result.peaks) else (np.nan, np.nan, np.nan)
        z, y, x = top if pos else (-1.0, -1.0, -1.0)
        rows.append({"tomo_id": result.tomo_id, "Motor axis 0": float(z),
                     "Motor axis 1": float(y), "Motor axis 2": float(x),
                     "score": result.score, "peak_z": float(top[0]), "peak_y": float(top[1]),
                     "peak_x": float(top[2]), "error": result.error})
    schema = {"tomo_id": pl.String, "Motor axis 0": pl.Float64, "Motor axis 1": pl.Float64,
              "Motor axis 2": pl.Float64, "score": pl.Float64, "peak_z": pl.Float64,
              "peak_y": pl.Float64, "peak_x": pl.Float64, "error": pl.String}
    return pl.DataFrame(rows, schema=schema)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kernel_lib.infer", description=__doc__
                                     .split("\n\n")[0])
    parser.add_argument("--data-root", required=True, type=Path,
                        help="competition folder with <split>/<tomo_id>/slice_*.jpg")
    parser.add_argument("--weights", required=True, nargs="+", type=Path,
                        help="run directories (config.json + model.pt); several = ensemble")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, default=Path("submission.csv"))
    parser.add_argument("--threshold", default=None,
                        help="override the checkpoint's rule: fixed:0.4 or quantile:0.45")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="flip test-time augmentation on or off (default: the checkpoint's "
                             "setting, which its threshold rule was chosen with)")
    parser.add_argument("--verifier", action=argparse.BooleanOptionalAction, default=None,
                        help="re-score the top peaks with the runs' 3D verifier (default: when "
                             "a run has verifier.pt; --no-verifier uses the heatmap alone and "
                             "the rule validation chose for it)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--z-stride", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--deadline-minutes", type=float, default=None,
                       help="write the submission within this many minutes from now: drops TTA, "
                            "then extra ensemble members, then writes -1 rows when late")
    limit.add_argument("--deadline", default=None,
                       help="the same as an absolute time: a Unix time or an ISO date-time "
                            "(2026-03-01T21:30, local time unless it has an offset)")
    parser.add_argument("--reserve-seconds", type=float, default=DEFAULT_RESERVE_SECONDS,
                        help="time kept free before the deadline to write the submission")
    parser.add_argument("--prefetch", type=int, default=1,
                        help="tomograms read ahead in a background thread (0: none)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the models (unmeasured on GPU; first batch compiles)")
    parser.add_argument("--no-amp", action="store_true",
                        help="predict in float32 (default: fp16 on CUDA, bf16 on a CPU that has "
                             "it natively)")
    return parser


def parse_deadline(text: str) -> Deadline:
    """``--deadline``: a Unix time or an ISO date-time.

    Raises:
        BudgetError: neither, or a number too small to be a Unix time.
    """
    try:
        value = float(text)
    except ValueError:
        try:
            return Deadline.at_time(dt.datetime.fromisoformat(text))
        except ValueError:
            raise BudgetError(f"--deadline {text!r} is neither a Unix time nor an ISO date-time "
                              f"(e.g. 2026-03-01T21:30)") from None
    if value < EPOCH_CUTOFF:
        raise BudgetError(f"--deadline {text} is not a Unix time: use --deadline-minutes for a "
                          f"time from now")
    return Deadline.at_time(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.z_stride is not None and args.z_stride < 1:
        parser.error(f"--z-stride must be >= 1 (got {args.z_stride})")
    if args.threshold is not None:
        try:
            ThresholdRule.parse(args.threshold)
        except ConfigError as exc:
            parser.error(str(exc))
    if args.prefetch < 0:
        parser.error(f"--prefetch must be >= 0 (got {args.prefetch})")
    if args.reserve_seconds < 0:
        parser.error(f"--reserve-seconds must be >= 0 (got {args.reserve_seconds})")
    deadline = None
    try:
        if args.deadline is not None:
            deadline = parse_deadline(args.deadline)
        elif args.deadline_minutes is not None:
            deadline = Deadline.in_seconds(args.deadline_minutes * 60.0)
    except BudgetError as exc:
        parser.error(str(exc))
    try:
        table = run_inference(args.data_root, args.weights, args.split, args.out,
                              args.threshold, args.tta, args.batch_size, args.device,
                              z_stride=args.z_stride, progress=not args.no_progress,
                              deadline=deadline, reserve_seconds=args.reserve_seconds,
                              prefetch=args.prefetch, compile_model=args.compile,
                              amp=not args.no_amp, verifier=args.verifier)
    except (InferenceError, ConfigError, ModelError, LabelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_pos = int((table["Motor axis 0"] >= 0).sum())
    n_err = int(table["error"].is_not_null().sum())
    print(f"wrote {args.out}: {table.height} tomograms, {n_pos} with a motor, {n_err} failed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
