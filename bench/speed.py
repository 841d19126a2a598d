"""Speed benchmark: each inference stage of one real-size tomogram against a baseline decode.

Builds real-size tomogram folders of JPEG slices (the synthetic generator's fast mode) and times,
in one run and for each target spacing:

- baseline decode: ``cv2.imread`` of every slice at full resolution, one thread, in order;
- our reader: threads, reduced-resolution JPEG decode when the spacing allows, and the in-plane
  resize done in the reader threads;
- the z resize (in place) and the percentile normalisation (``np.percentile`` per volume and per
  slice vs our histogram + look-up table), and the plain pre-streaming path for comparison;
- 2.5D stack gathering, the float model input, the model forward (CPU here, extrapolated from
  the first batches unless ``--forward-stacks 0``), one real end-to-end tomogram, and a
  ``run_inference`` over ``--e2e-copies`` copies of it (the prefetching reader, as a submission
  runs);
- peak decoding (``peaks.find_peaks``: a separable 3D max filter, then the top candidates) and
  the second-stage verifier of the top peaks (``--no-verifier`` leaves it out);
- peak memory (RSS) of the whole inference of one tomogram, in a fresh subprocess.

Every time is also reported as a ratio to the baseline decode of the same slices measured in the
same repeat (medians over repeats): the machine is shared and its load varies. CPU seconds
(``time.process_time``) are reported beside wall seconds for the same reason. A section with the
machine, date, command, tables and the verdict on each target is appended to ``bench/RESULTS.md``.

Usage:
    .venv/bin/python bench/speed.py [--depth 300 800] [--sizes 928x960] \\
        [--target-spacing 16 32] [--repeats 3] [--out-md bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn

from kernel_lib.config import Z_SAMPLINGS, PipelineConfig
from kernel_lib.infer import Predictor, autocast_dtype, decode_peaks, model_input
from kernel_lib.verify import Verifier, VerifierNet, VerifierSpec, z_step_for
from kernel_lib.model import build_model
from kernel_lib.normalize import normalize, percentile_bounds
from kernel_lib.preprocess import preprocess_tomogram, reading_plan
from kernel_lib.resample import resample_to_spacing, target_shape
from kernel_lib.stacks import iter_stack_batches, slices_read
from kernel_lib.synthetic import render_tomogram, write_tomogram
from kernel_lib.tomogram import (choose_reduction, list_slices, read_tomogram, reduced_size,
                                 stored_slice_shape)

ROOT = Path(__file__).resolve().parent

GIB = 1024 ** 3
TARGET_NON_MODEL = 0.5  # x baseline decode, at the default target spacing
TARGET_END_TO_END = 3.0  # x baseline decode, CPU, default model, 300 slices
TARGET_RSS_GIB = 2.0  # one 800-slice tomogram
N_TEST_TOMOGRAMS = 900
GPU_GOAL_MINUTES = 30.0


# --- helpers ---------------------------------------------------------------------------------

def timed(fn, *args, **kwargs) -> tuple[float, float, object]:
    """``(wall seconds, CPU seconds of this process, result)`` of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def ensure_tomogram(work: Path, depth: int, height: int, width: int, quality: int,
                    spacing: float) -> Path:
    """A real-size folder of JPEG slices (generated once, reused while its marker matches)."""
    folder = work / f"tomo_{depth}x{height}x{width}_q{quality}"
    marker = folder / "bench.json"
    spec = {"depth": depth, "height": height, "width": width, "quality": quality,
            "spacing": spacing}
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return folder
    rng = np.random.default_rng(depth * 7 + height)
    started = time.perf_counter()
    volume = render_tomogram((depth, height, width), spacing,
                             [(depth // 2, height // 2, width // 3)], rng, fast=True)
    for old in folder.glob("slice_*.jpg"):
        old.unlink()
    write_tomogram(volume, folder, quality)
    marker.write_text(json.dumps(spec))
    print(f"generated {folder} in {time.perf_counter() - started:.1f} s", flush=True)
    return folder


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "off (float32)" if dtype is None else str(dtype).replace("torch.", "")


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.node() or 'unknown'}: {os.cpu_count()} CPU cores ({cpu}), {gpu}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"OpenCV {cv2.__version__}, numpy {np.__version__}")


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f} (1 min) / {five:.1f} (5 min) on {os.cpu_count()} cores"


def bench_config(target: float, args: argparse.Namespace) -> PipelineConfig:
    """The config benchmarked: the defaults, with the spacing and the command line's model,
    z sampling and z stride."""
    return PipelineConfig(target_spacing=target, assumed_test_spacing=args.source_spacing,
                          encoder=args.encoder, z_sampling=args.z_sampling,
                          z_stride=args.z_stride)


def default_model(cfg: PipelineConfig) -> nn.Module:
    """The default architecture, randomly initialised, with a random head: the zero-initialised
    head of an untrained model gives a constant heatmap, i.e. one plateau of millions of equal
    "peaks", which no trained model produces and which would dominate peak decoding."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    nn.init.normal_(model.head.weight, std=0.05)
    return model


class FirstBatchesOnly(nn.Module):
    """Runs the real model on the first ``n`` batches and returns fixed random logits of the
    right shape after: the memory of a whole tomogram's inference without its CPU forward time
    (``n = 0``: no activations on the host at all, as when the model runs on a GPU)."""

    def __init__(self, model: nn.Module, n: int) -> None:
        super().__init__()
        self.model, self.n, self.calls = model, n, 0
        self.input_multiple = model.input_multiple
        self.output_stride = model.output_stride
        self.generator = torch.Generator().manual_seed(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.n:
            return self.model(x)
        s = self.output_stride
        shape = (x.shape[0], 1, x.shape[2] // s, x.shape[3] // s)
        return torch.randn(shape, generator=self.generator) - 4.0


# --- one tomogram, one target spacing ------------------------------------------------------------

@dataclass
class Stage:
    """Wall and CPU seconds of one stage over the repeats, with the baseline of each repeat."""

    name: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    base_wall: list[float] = field(default_factory=list)
    base_cpu: list[float] = field(default_factory=list)
    note: str = ""

    def add(self, wall: float, cpu: float, base_wall: float, base_cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.base_wall.append(base_wall)
        self.base_cpu.append(base_cpu)

    @property
    def seconds(self) -> float:
        return statistics.median(self.wall)

    @property
    def ratio(self) -> float:
        return statistics.median(w / b for w, b in zip(self.wall, self.base_wall))

    @property
    def cpu_ratio(self) -> float:
        return statistics.median(c / b for c, b in zip(self.cpu, self.base_cpu))


def bench_one(folder: Path, target: float, args: argparse.Namespace) -> dict:
    """All stages of one tomogram at one target spacing; ratios against the baseline decode."""
    cfg = bench_config(target, args)
    paths = list_slices(folder)
    spacing = args.source_spacing
    reduction = choose_reduction(spacing, target)
    stored = stored_slice_shape(paths)
    decoded = (len(paths),) + reduced_size(stored, reduction)
    decoded_spacing = (spacing, spacing * reduction, spacing * reduction)
    shape = target_shape(decoded, decoded_spacing, target)
    predictor = Predictor([default_model(cfg)], cfg, "cpu", batch_size=args.batch_size)
    offsets = cfg.stack_offsets
    n_stacks = math.ceil(shape[0] / cfg.z_stride)
    # What inference prepares: the model slices the stacks read, from the sources they need.
    keep = slices_read(shape[0], offsets, cfg.z_stride)
    plan = reading_plan(decoded[0], shape[0], keep, cfg.z_sampling)
    every = reading_plan(decoded[0], shape[0], None, cfg.z_sampling)  # the training cache's
    n_every = decoded[0] if every.select is None else len(every.select)
    names = ["baseline decode", "reader, every slice (training cache)",
             "reader (threads, in-plane resize)",
             "reader, decode only (no resize)", "z resize (in place)",
             "np.percentile, volume", "np.percentile, per slice", "histogram percentiles",
             "look-up table (in place)", "preprocess total (streaming)",
             "preprocess, every slice (training cache)",
             "preprocess, plain path (before)", "stack gathering (uint8)",
             "float input + padding (on the GPU there)", "model forward", "peak decoding",
             "verifier (top peaks, 3 flips)"]
    stages = {name: Stage(name) for name in names}
    verifier = bench_verifier(cfg, args)
    heat_shape = (n_stacks, math.ceil(shape[1] / cfg.output_stride),
                  math.ceil(shape[2] / cfg.output_stride))
    # A smooth stand-in heatmap with many local maxima (a trained model's is smoother).
    plane = cv2.GaussianBlur(np.random.default_rng(0).random(heat_shape[1:], np.float32),
                             (0, 0), 3)
    heat = torch.from_numpy(plane[None] * np.linspace(0.5, 1.0, heat_shape[0],
                                                      dtype=np.float32)[:, None, None])
    forward_stacks = min(n_stacks, args.forward_stacks or n_stacks)
    predictor.heatmap(np.zeros((cfg.z_stride,) + shape[1:], np.uint8))  # warm-up
    for repeat in range(args.repeats):
        base_wall, base_cpu, _ = timed(baseline_decode, paths)

        def add(name: str, wall: float, cpu: float) -> None:
            stages[name].add(wall, cpu, base_wall, base_cpu)

        add("baseline decode", base_wall, base_cpu)
        buffer = np.empty((every.buffer_depth,) + shape[1:], np.uint8)
        wall, cpu, _ = timed(read_tomogram, folder, reduction, plane_shape=shape[1:], out=buffer,
                             z_select=every.select, rows=every.rows)
        add("reader, every slice (training cache)", wall, cpu)
        buffer = np.empty((plan.buffer_depth,) + shape[1:], np.uint8)
        wall, cpu, _ = timed(read_tomogram, folder, reduction, plane_shape=shape[1:], out=buffer,
                             z_select=plan.select, rows=plan.rows)
        add("reader (threads, in-plane resize)", wall, cpu)
        wall, cpu, _ = timed(read_tomogram, folder, reduction, z_select=plan.select)
        add("reader, decode only (no resize)", wall, cpu)
        # area / box: the kept slices' area or box means, in place; nearest: nothing
        wall, cpu, volume = timed(plan.resize_depth, buffer)
        add("z resize (in place)", wall, cpu)
        wall, cpu, _ = timed(lambda: np.percentile(volume[keep],
                                                   (cfg.percentile_low, cfg.percentile_high)))
        add("np.percentile, volume", wall, cpu)
        if repeat == 0 or not args.fast_percentile:
            wall, cpu, _ = timed(lambda: [np.percentile(volume[k], (2, 98)) for k in keep])
            add("np.percentile, per slice", wall, cpu)
        wall, cpu, _ = timed(percentile_bounds, volume, cfg.percentile_low, cfg.percentile_high,
                             slices=keep)
        add("histogram percentiles", wall, cpu)
        wall, cpu, _ = timed(normalize, volume, cfg.percentile_low, cfg.percentile_high,
                             out="uint8", overwrite=True, slices=keep)
        add("look-up table (in place)", wall, cpu)
        del buffer, volume
        wall, cpu, _ = timed(preprocess_tomogram, folder, spacing, cfg)
        add("preprocess, every slice (training cache)", wall, cpu)
        wall, cpu, prep = timed(preprocess_tomogram, folder, spacing, cfg, z_stride=cfg.z_stride)
        add("preprocess total (streaming)", wall, cpu)
        if repeat == 0 or not args.skip_plain_repeats:
            wall, cpu, _ = timed(plain_preprocess, folder, spacing, cfg)
            add("preprocess, plain path (before)", wall, cpu)
        wall, cpu, _ = timed(gather_stacks, prep.volume, offsets, cfg, predictor, False)
        add("stack gathering (uint8)", wall, cpu)
        wall_f, cpu_f, _ = timed(gather_stacks, prep.volume, offsets, cfg, predictor, True)
        add("float input + padding (on the GPU there)", max(0.0, wall_f - wall),
            max(0.0, cpu_f - cpu))
        part = prep.volume[:forward_stacks * cfg.z_stride]
        wall, cpu, _ = timed(predictor.heatmap, part)
        scale = n_stacks / forward_stacks
        add("model forward", wall * scale, cpu * scale)
        wall, cpu, peaks = timed(decode_peaks, heat, cfg, prep.frame, prep.original_shape)
        add("peak decoding", wall, cpu)
        if verifier is not None:
            wall, cpu, _ = timed(verifier.rescore, peaks, prep.volume, prep.frame,
                                 prep.model_slices)
            add("verifier (top peaks, 3 flips)", wall, cpu)
        del prep
        print(f"  repeat {repeat + 1}/{args.repeats}: baseline {base_wall:.2f} s, "
              f"preprocess {stages['preprocess total (streaming)'].wall[-1]:.2f} s, "
              f"load {load_line()}", flush=True)
    z_kind = f"{cfg.z_sampling} z"
    if n_every < decoded[0]:
        stages["reader, every slice (training cache)"].note = (
            f"{n_every} of {decoded[0]} slices ({z_kind})")
    n_select = decoded[0] if plan.select is None else len(plan.select)
    for name in ("reader (threads, in-plane resize)", "reader, decode only (no resize)"):
        stages[name].note = (f"{n_select} of {decoded[0]} slices ({z_kind}, for the "
                             f"{len(keep)} of {shape[0]} model slices the stacks read)")
    stages["z resize (in place)"].note = {
        "area": f"area means of the {len(keep)} kept model slices",
        "box": f"box means of the {len(keep)} kept model slices",
        "nearest": "nothing to do: one source per model slice"}[cfg.z_sampling]
    for name in ("np.percentile, volume", "np.percentile, per slice", "histogram percentiles",
                 "look-up table (in place)"):
        stages[name].note = f"the {len(keep)} model slices the stacks read"
    if forward_stacks < n_stacks:
        stages["model forward"].note = (f"first {forward_stacks} of {n_stacks} stacks, "
                                        f"extrapolated")
    names = ["preprocess total (streaming)", "stack gathering (uint8)", "peak decoding"]
    result = {"folder": folder.name, "target": target, "reduction": reduction,
              "model_shape": shape, "n_stacks": n_stacks, "stages": stages,
              "base_seconds": stages["baseline decode"].seconds,
              "non_model_ratio": sum(stages[n].ratio for n in names),
              "non_model_cpu_ratio": sum(stages[n].cpu_ratio for n in names),
              "non_model_seconds": sum(stages[n].seconds for n in names)}
    result["end_to_end_estimate_ratio"] = (result["non_model_ratio"]
                                           + stages["float input + padding (on the GPU there)"]
                                           .ratio + stages["model forward"].ratio
                                           + (stages["verifier (top peaks, 3 flips)"].ratio
                                              if verifier is not None else 0.0))
    return result


def baseline_decode(paths: list[Path]) -> list[np.ndarray]:
    """The baseline every ratio divides by: ``cv2.imread`` of every slice at full resolution,
    one thread, in order."""
    return [cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) for path in paths]


def bench_verifier(cfg: PipelineConfig, args: argparse.Namespace) -> Verifier | None:
    """The default second stage, random weights (its cost does not depend on them), or None
    with ``--no-verifier``."""
    if args.no_verifier:
        return None
    return Verifier([VerifierNet(VerifierSpec(z_step=z_step_for(cfg)))], "cpu")


def plain_preprocess(folder: Path, spacing: float, cfg: PipelineConfig) -> np.ndarray:
    """The pre-streaming path: read the whole volume, resample, normalise into a new array."""
    reduction = choose_reduction(spacing, cfg.target_spacing)
    raw = read_tomogram(folder, reduction)
    volume, _ = resample_to_spacing(raw, (spacing, spacing * reduction, spacing * reduction),
                                    cfg.target_spacing, cfg.z_sampling)
    del raw
    return normalize(volume, cfg.percentile_low, cfg.percentile_high, out="uint8")


def gather_stacks(volume: np.ndarray, offsets: np.ndarray, cfg: PipelineConfig,
                  predictor: Predictor, as_float: bool) -> None:
    """The data path between the volume and the model: batches of ``uint8`` stacks (what the
    host does), and (``as_float``) the padded channels-last float input made from them (what
    ``Predictor`` does on the model's device)."""
    for _, stacks in iter_stack_batches(volume, offsets, predictor.batch_size, cfg.z_stride):
        if as_float:
            model_input(torch.from_numpy(stacks), predictor.multiple, predictor.channels_last)


def end_to_end(folder: Path, target: float, args: argparse.Namespace) -> tuple[float, float]:
    """One real tomogram through preprocess -> full forward -> peaks, with a baseline decode
    right before it: ``(seconds, ratio)``."""
    cfg = bench_config(target, args)
    predictor = Predictor([default_model(cfg)], cfg, "cpu", batch_size=args.batch_size)
    predictor.heatmap(np.zeros((cfg.z_stride, 64, 64), np.uint8))
    paths = list_slices(folder)
    base, _, _ = timed(baseline_decode, paths)

    verifier = bench_verifier(cfg, args)

    def run() -> None:
        prep = preprocess_tomogram(folder, args.source_spacing, cfg, z_stride=cfg.z_stride)
        heat = predictor.heatmap(prep.volume, model_slices=prep.model_slices)
        peaks = decode_peaks(heat, cfg, prep.frame, prep.original_shape)
        if verifier is not None:
            verifier.rescore(peaks, prep.volume, prep.frame, prep.model_slices)

    wall, _, _ = timed(run)
    return wall, wall / base


def accelerator_throughput(folder: Path, target: float, args: argparse.Namespace) -> list[str]:
    """Tomograms per second on the accelerator: fp16 autocast, channels_last, a batch size sweep,
    then a real ``run_inference`` over copies of the tomogram with the reader thread prefetching
    the next one while the model runs. Returns report lines."""
    from kernel_lib.infer import run_inference

    device = args.accelerator
    cfg = bench_config(target, args)
    model = default_model(cfg)
    prep_wall, _, prep = timed(preprocess_tomogram, folder, args.source_spacing, cfg,
                               z_stride=cfg.z_stride)
    lines = [f"#### Accelerator ({device}): {folder.name} at {target:g} A", "",
             "| batch | forward seconds per tomogram | stacks per second |", "|---:|---:|---:|"]
    n_stacks = math.ceil(prep.volume.shape[0] / cfg.z_stride)
    best = None
    for batch in args.accelerator_batches:
        predictor = Predictor([model], cfg, device, batch_size=batch, amp=True)
        predictor.heatmap(prep.volume[:batch * cfg.z_stride])  # warm-up (kernels, autotune)
        _sync(device)
        wall, _, heat = timed(predictor.heatmap, prep.volume)
        _sync(device)
        lines.append(f"| {batch} | {wall:.3f} | {n_stacks / wall:.1f} |")
        if best is None or wall < best[1]:
            best = (batch, wall)
    peaks_wall, _, _ = timed(decode_peaks, heat, cfg, prep.frame, prep.original_shape)
    root, run_dir, ids = copies_root(folder, args.work / f"accelerator_{folder.name}", model,
                                     cfg, args.accelerator_copies, args)
    run_inference(root, [run_dir], device=device, batch_size=best[0], progress=False,
                  out=None)  # warm-up
    wall, _, _ = timed(run_inference, root, [run_dir], device=device, batch_size=best[0],
                       progress=False, out=None, prefetch=1)
    per_tomogram = wall / len(ids)
    lines += ["", f"- Best batch {best[0]}: forward {best[1]:.2f} s, preprocessing "
              f"{prep_wall:.2f} s (CPU), peak decoding {peaks_wall:.3f} s.",
              f"- `run_inference` over {len(ids)} copies with the prefetching reader: "
              f"{per_tomogram:.2f} s per tomogram = {1 / per_tomogram:.2f} tomograms/s; "
              f"projected {N_TEST_TOMOGRAMS} tomograms of this size: "
              f"{N_TEST_TOMOGRAMS * per_tomogram / 60:.1f} min (goal < {GPU_GOAL_MINUTES:g} min "
              f"on a T4).", ""]
    return lines


def copies_root(folder: Path, root: Path, model: torch.nn.Module, cfg: PipelineConfig,
                copies: int, args: argparse.Namespace) -> tuple[Path, Path, list[str]]:
    """A competition-layout folder whose test split is ``copies`` links to ``folder``, and a
    run folder with ``model`` (and, unless ``--no-verifier``, a random verifier) to infer it
    with: ``(data_root, run_dir, tomo_ids)``."""
    from kernel_lib.model import save_checkpoint
    from kernel_lib.verify import save_verifier

    run_dir = root / "run"
    save_checkpoint(model, cfg, run_dir)
    verifier = bench_verifier(cfg, args)
    if verifier is not None:
        save_verifier(verifier.nets[0], run_dir, cfg.threshold)
    elif (run_dir / "verifier.pt").exists():
        (run_dir / "verifier.pt").unlink()
    (root / "test").mkdir(parents=True, exist_ok=True)
    ids = [f"copy_{i:02d}" for i in range(copies)]
    for tomo_id in ids:
        link = root / "test" / tomo_id
        if not link.exists():
            link.symlink_to(folder.resolve(), target_is_directory=True)
    (root / "sample_submission.csv").write_text(
        "tomo_id,Motor axis 0,Motor axis 1,Motor axis 2\n"
        + "".join(f"{tomo_id},-1,-1,-1\n" for tomo_id in ids))
    return root, run_dir, ids


def cpu_run(folder: Path, target: float, args: argparse.Namespace) -> tuple[float, float]:
    """``run_inference`` on the CPU over ``--e2e-copies`` copies of one tomogram (the reader
    thread prefetching the next one while the model runs), after a warm-up run, with a
    baseline decode of the slices right before: ``(seconds per tomogram, ratio)``."""
    from kernel_lib.infer import run_inference

    cfg = bench_config(target, args)
    root, run_dir, ids = copies_root(folder, args.work / f"cpu_run_{folder.name}",
                                     default_model(cfg), cfg, args.e2e_copies, args)
    run_inference(root, [run_dir], device="cpu", batch_size=args.batch_size, progress=False)
    paths = list_slices(folder)
    base, _, _ = timed(baseline_decode, paths)
    wall, _, _ = timed(run_inference, root, [run_dir], device="cpu",
                       batch_size=args.batch_size, progress=False, prefetch=1)
    return wall / len(ids), wall / len(ids) / base


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --- peak memory in a fresh process -----------------------------------------------------------

def rss_child(folder: Path, cfg: PipelineConfig, mode: str, batch_size: int,
              real_batches: int) -> dict:
    """Peak RSS of one tomogram's whole inference (run as ``--_rss-child``)."""
    target, spacing = cfg.target_spacing, cfg.assumed_test_spacing
    model = FirstBatchesOnly(default_model(cfg), real_batches)
    predictor = Predictor([model], cfg, "cpu", batch_size=batch_size)
    before = vm_hwm()
    if mode == "stream":
        prep = preprocess_tomogram(folder, spacing, cfg, z_stride=cfg.z_stride)
        volume, frame, shape = prep.volume, prep.frame, prep.original_shape
    else:
        reduction = choose_reduction(spacing, target)
        raw = read_tomogram(folder, reduction)
        shape = raw.shape
        volume, frame = resample_to_spacing(raw, (spacing, spacing * reduction,
                                                  spacing * reduction), target, cfg.z_sampling)
        del raw
        volume = normalize(volume, cfg.percentile_low, cfg.percentile_high, out="uint8")
    after_prep = vm_hwm()
    heat = predictor.heatmap(volume)
    decode_peaks(heat, cfg, frame, shape)
    return {"before": before, "after_preprocess": after_prep, "peak": vm_hwm(),
            "volume_bytes": int(volume.nbytes)}


def vm_hwm() -> int:
    """Peak resident set size of this process so far, in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_rss(folder: Path, cfg: PipelineConfig, mode: str, batch_size: int,
                real_batches: int) -> dict:
    """Run :func:`rss_child` in a fresh interpreter and return its numbers."""
    command = [sys.executable, str(Path(__file__).resolve()), "--_rss-child", str(folder),
               json.dumps(cfg.to_dict()), mode, str(batch_size), str(real_batches)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"RSS child failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- report ----------------------------------------------------------------------------------

def stage_table(result: dict) -> list[str]:
    lines = [f"#### {result['folder']} at {result['target']:g} A "
             f"(JPEG decode 1/{result['reduction']}, model volume "
             f"{'x'.join(map(str, result['model_shape']))}, {result['n_stacks']} stacks)", "",
             "| stage | seconds (wall, median) | x baseline (wall) | x baseline (CPU) | note |",
             "|---|---:|---:|---:|---|"]
    for stage in result["stages"].values():
        if not stage.wall:
            continue
        lines.append(f"| {stage.name} | {stage.seconds:.3f} | {stage.ratio:.3f} | "
                     f"{stage.cpu_ratio:.3f} | {stage.note} |")
    lines.append(f"| **non-model total** (preprocess + stacks + peaks) | "
                 f"{result['non_model_seconds']:.3f} | **{result['non_model_ratio']:.3f}** | "
                 f"{result['non_model_cpu_ratio']:.3f} | target <= {TARGET_NON_MODEL} |")
    lines.append(f"| end to end, estimated (non-model + forward) | | "
                 f"{result['end_to_end_estimate_ratio']:.2f} | | |")
    return lines + [""]


def verdicts(results: list[dict], e2e: dict, rss: dict, args: argparse.Namespace,
             cpu_runs: dict | None = None) -> list[str]:
    lines = ["#### Targets", ""]
    default = PipelineConfig().target_spacing
    for result in results:
        stages = result["stages"]
        read = stages["reader (threads, in-plane resize)"].ratio
        decode_only = stages["reader, decode only (no resize)"].ratio
        total, total_cpu = result["non_model_ratio"], result["non_model_cpu_ratio"]
        normalise = (stages["histogram percentiles"].ratio
                     + stages["look-up table (in place)"].ratio)
        lines.append(
            f"- Non-model path at {result['target']:g} A ({result['folder']}"
            f"{', the default spacing' if result['target'] == default else ''}): "
            f"{total:.2f}x baseline (wall; {total_cpu:.2f}x in CPU time) -> "
            f"{'MET' if total <= TARGET_NON_MODEL else 'NOT MET'} (target "
            f"{TARGET_NON_MODEL}x). Peak decoding: "
            f"{stages['peak decoding'].ratio:.3f}x. The threaded reader alone is {read:.2f}x "
            f"for the slices the stacks need ("
            f"{stages['reader, every slice (training cache)'].ratio:.2f}x for every slice; "
            f"decode without "
            f"the resize {decode_only:.2f}x), the z resize "
            + (f"{stages['z resize (in place)'].ratio:.2f}x" if stages['z resize (in place)'].wall
               else "none (nearest z: the reader read one slice per model slice)")
            + f", the histogram + look-up table "
            f"{normalise:.2f}x (np.percentile alone: "
            f"{stages['np.percentile, volume'].ratio:.2f}x per volume); "
            f"preprocessing every slice (the training cache) "
            f"{stages['preprocess, every slice (training cache)'].ratio:.2f}x, "
            f"the plain path it replaces "
            f"{stages['preprocess, plain path (before)'].ratio:.2f}x.")
    for key, (seconds, ratio, forward_share, peaks_share) in e2e.items():
        lines.append(f"- End to end on CPU, {key}: {seconds:.1f} s = {ratio:.1f}x baseline -> "
                     f"{'MET' if ratio <= TARGET_END_TO_END else 'NOT MET'} (target "
                     f"{TARGET_END_TO_END}x). The model forward is about {forward_share:.0%} "
                     f"of it and peak decoding about {peaks_share:.0%} (timed separately "
                     f"above).")
    for key, (seconds, ratio) in (cpu_runs or {}).items():
        lines.append(f"- End to end on CPU in a `run_inference` over {args.e2e_copies} copies of "
                     f"{key} (prefetching reader): {seconds:.1f} s per tomogram = {ratio:.1f}x "
                     f"baseline -> {'MET' if ratio <= TARGET_END_TO_END else 'NOT MET'} "
                     f"(target {TARGET_END_TO_END}x).")
    for key, value in rss.items():
        peak = value["peak"] / GIB
        lines.append(
            f"- Peak RSS, {key}: {peak:.2f} GiB (imports + model {value['before'] / GIB:.2f} "
            f"GiB, after preprocessing {value['after_preprocess'] / GIB:.2f} GiB, model volume "
            f"{value['volume_bytes'] / GIB:.2f} GiB) -> "
            f"{'MET' if peak < TARGET_RSS_GIB else 'NOT MET'} (target < {TARGET_RSS_GIB} GiB"
            f"{'' if 'stream' in key else '; the plain pre-streaming path, for comparison'}).")
    if args.accelerator and args.accelerator != "cpu":
        lines.append(f"- GPU ({args.accelerator}): see the accelerator tables above. "
                     f"torch.compile (`--compile`) was not part of this run.")
    else:
        lines.append(
            f"- GPU throughput (fp16 autocast, channels_last, tuned batch, prefetching reader "
            f"thread): NOT MEASURED, no GPU on this machine. The code path exists "
            f"(`Predictor(channels_last=True)`, `run_inference(prefetch=1)`); the goal is "
            f"{N_TEST_TOMOGRAMS} tomograms in under {GPU_GOAL_MINUTES:g} min on a T4, i.e. "
            f"{GPU_GOAL_MINUTES * 60 / N_TEST_TOMOGRAMS:.1f} s per tomogram, which the data "
            f"path above must also meet on Kaggle's 4 CPU cores.")
        lines.append("- torch.compile: behind `--compile` / `compile_model=True`, default off, "
                     "UNMEASURED (no GPU here).")
    return lines + [""]


def write_section(path: Path, body: list[str]) -> None:
    """Append a section, re-reading the file right before (another benchmark may append)."""
    existing = path.read_text() if path.is_file() else "# Benchmark results\n"
    if not existing.endswith("\n"):
        existing += "\n"
    path.write_text(existing + "\n" + "\n".join(body) + "\n")


# --- main ------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, nargs="+", default=[300, 800],
                        help="slices per benchmark tomogram")
    parser.add_argument("--sizes", nargs="+", default=["928x960"],
                        help="slice sizes HEIGHTxWIDTH")
    parser.add_argument("--target-spacing", type=float, nargs="+", default=[16.0, 32.0])
    parser.add_argument("--source-spacing", type=float, default=15.6,
                        help="angstroms per original voxel (the real median)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--jpeg-quality", type=int, default=82,
                        help="the middle of the generator's real-looking 70-95 range")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--forward-stacks", type=int, default=8,
                        help="stacks timed per repeat and extrapolated (0: all)")
    parser.add_argument("--e2e-depth", type=int, default=300,
                        help="depth of the one full end-to-end run per spacing (0: skip)")
    parser.add_argument("--e2e-copies", type=int, default=4,
                        help="also time run_inference over this many copies of the end-to-end "
                             "tomogram on the CPU (0: skip)")
    parser.add_argument("--e2e-targets", type=float, nargs="+", default=None,
                        help="target spacings of the end-to-end runs (default: all)")
    parser.add_argument("--rss-depth", type=int, default=None,
                        help="depth of the RSS measurement (default: the largest --depth)")
    parser.add_argument("--rss-real-batches", type=int, default=2,
                        help="batches really forwarded in the RSS run (the rest return zeros)")
    parser.add_argument("--accelerator", default="cuda" if torch.cuda.is_available() else None,
                        help="device for the throughput section (default: CUDA when present; "
                             "'cpu' smoke-tests it on small --sizes)")
    parser.add_argument("--accelerator-batches", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--accelerator-copies", type=int, default=8,
                        help="tomograms in the overlapped run_inference measurement")
    parser.add_argument("--skip-plain-repeats", action="store_true",
                        help="time the plain path once only")
    parser.add_argument("--fast-percentile", action="store_true",
                        help="time np.percentile per slice once only")
    parser.add_argument("--work", type=Path, default=ROOT / "_work" / "speed")
    parser.add_argument("--out-md", type=Path, default=ROOT / "RESULTS.md")
    parser.add_argument("--no-write", action="store_true", help="print, don't append")
    defaults = PipelineConfig()
    parser.add_argument("--encoder", default=defaults.encoder, help="timm encoder of the model")
    parser.add_argument("--z-sampling", default=defaults.z_sampling, choices=Z_SAMPLINGS)
    parser.add_argument("--z-stride", type=int, default=defaults.z_stride)
    parser.add_argument("--no-verifier", action="store_true",
                        help="leave out the second-stage verifier of the top peaks")
    parser.add_argument("--_rss-child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.batch_size < 1 or args.forward_stacks < 0 or args.z_stride < 1:
        parser.error("--repeats, --batch-size and --z-stride must be >= 1, --forward-stacks >= 0")
    try:
        args.sizes = [tuple(int(n) for n in s.lower().split("x")) for s in args.sizes]
    except ValueError:
        parser.error(f"--sizes must look like 928x960 (got {args.sizes})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._rss_child:
        folder, cfg_json, mode, batch, real = args._rss_child
        print(json.dumps(rss_child(Path(folder), PipelineConfig.from_dict(json.loads(cfg_json)),
                                   mode, int(batch), int(real))))
        return 0
    torch.set_grad_enabled(False)
    started = time.perf_counter()
    load_start = load_line()
    folders = {(d, h, w): ensure_tomogram(args.work, d, h, w, args.jpeg_quality,
                                          args.source_spacing)
               for d in args.depth for h, w in args.sizes}
    results = []
    for (depth, h, w), folder in folders.items():
        for target in args.target_spacing:
            print(f"{folder.name} at {target:g} A", flush=True)
            results.append(bench_one(folder, target, args))
    e2e, cpu_runs = {}, {}
    if args.e2e_depth:
        for (depth, h, w), folder in folders.items():
            if depth != args.e2e_depth:
                continue
            for target in args.e2e_targets or args.target_spacing:
                print(f"end to end {folder.name} at {target:g} A", flush=True)
                seconds, ratio = end_to_end(folder, target, args)
                match = next(r for r in results if r["folder"] == folder.name
                             and r["target"] == target)
                forward = match["stages"]["model forward"].seconds
                peaks = match["stages"]["peak decoding"].seconds
                e2e[f"{folder.name} at {target:g} A"] = (seconds, ratio,
                                                         min(1.0, forward / seconds),
                                                         min(1.0, peaks / seconds))
                if args.e2e_copies:
                    print(f"run_inference over {args.e2e_copies} copies", flush=True)
                    cpu_runs[f"{folder.name} at {target:g} A"] = cpu_run(folder, target,
                                                                         args)
    rss = {}
    rss_depth = args.rss_depth or max(args.depth)
    default = PipelineConfig().target_spacing
    for (depth, h, w), folder in folders.items():
        if depth != rss_depth:
            continue
        for target in args.target_spacing:
            runs = [("stream", args.batch_size, args.rss_real_batches)]
            if target == default:
                runs += [("stream", 2, args.rss_real_batches), ("stream", args.batch_size, 0),
                         ("plain", args.batch_size, 0)]
            for mode, batch, real in runs:
                label = (f"{folder.name} at {target:g} A, {mode} path, "
                         + (f"CPU forward at batch {batch}" if real else
                            "data path only (model activations off the host, as on a GPU)"))
                print(f"peak RSS: {label}", flush=True)
                rss[label] = measure_rss(folder, bench_config(target, args), mode, batch, real)
    accelerator = []
    if args.accelerator:
        for (depth, h, w), folder in folders.items():
            for target in args.target_spacing:
                print(f"accelerator throughput {folder.name} at {target:g} A", flush=True)
                try:
                    accelerator += accelerator_throughput(folder, target, args)
                except Exception as exc:  # report it; the CPU numbers above still count
                    accelerator += [f"- Accelerator run for {folder.name} at {target:g} A "
                                    f"failed: {type(exc).__name__}: {exc}", ""]
    command = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/speed.py"]
                       + (sys.argv[1:] if argv is None else list(argv)))
    body = [f"## Speed: data path, model forward and memory per tomogram "
            f"({dt.date.today().isoformat()})", "",
            f"- Machine: {machine_line()}",
            f"- Load average: {load_start} at the start, {load_line()} at the end (shared "
            f"machine: compare ratios, not seconds)",
            f"- Command: `{command}` ({(time.perf_counter() - started) / 60:.1f} min)",
            f"- Data: fast-mode synthetic JPEG slices, quality {args.jpeg_quality}, source "
            f"spacing {args.source_spacing} A; model {args.encoder} (random init), z sampling "
            f"{args.z_sampling}, z stride {args.z_stride}, batch {args.batch_size}, "
            f"{'no verifier' if args.no_verifier else 'verifier of the top 5 peaks'}, "
            f"channels_last, CPU ({torch.get_num_threads()} torch threads), autocast "
            f"{_dtype_name(autocast_dtype('cpu'))}.",
            f"- Baseline: `cv2.imread(path, IMREAD_GRAYSCALE)` of every slice, one thread, in "
            f"order, timed in every repeat right before the stages it is compared with; ratios "
            f"are medians over {args.repeats} repeats.", ""]
    for result in results:
        body += stage_table(result)
    body += accelerator
    body += verdicts(results, e2e, rss, args, cpu_runs)
    print("\n".join(body))
    if not args.no_write:
        write_section(args.out_md, body)
        print(f"appended to {args.out_md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
