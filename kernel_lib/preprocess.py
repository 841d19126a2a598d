"""Preprocessing one tomogram exactly as the config says, and the training cache.

``read -> resample to cfg.target_spacing -> percentile-normalise -> uint8`` in the *model* frame.
The JPEG decoder already reduces by 2, 4 or 8 when the source spacing allows it. The returned
:class:`~kernel_lib.resample.Frame` maps original voxels to model voxels.

The cache holds one ``.npy`` (memory-mappable ``uint8``) per tomogram and source spacing plus a
``manifest.json``; its folder name is a hash of the preprocessing settings, so a changed setting
never reuses stale volumes. Every file is written to a temporary name and renamed.

Example:
    >>> from kernel_lib.config import PipelineConfig
    >>> preprocessing_key(PipelineConfig()) == preprocessing_key(PipelineConfig(encoder="x"))
    True
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .config import PipelineConfig, atomic_write_bytes, atomic_write_text
from .normalize import normalize
from .resample import (Frame, box_depth_inplace, decode_frame, resample_to_spacing,
                       resize_depth_inplace, target_shape, z_sources, z_sources_of)
from .stacks import slices_read
from .tomogram import (ReadReport, choose_reduction, list_slices, read_tomogram, reduced_size,
                       slice_positions, stored_slice_shape)

MANIFEST_NAME = "manifest.json"
_PREPROCESSING_FIELDS = ("target_spacing", "percentile_low", "percentile_high", "normalize_per",
                         "z_sampling")
CACHE_FORMAT = 3  # 2: near-identity in-plane shrinks are bilinear (resample.resize_plane);
#                  3: the area z shrink is resample.area_depth_inplace (within a level of cv2)


@dataclass
class Preprocessed:
    """A tomogram in the model frame.

    Attributes:
        volume: ``uint8`` ``(z, y, x)`` at ``cfg.target_spacing``, normalised to [0, 255].
        frame: original voxels -> model voxels.
        original_shape: shape of the tomogram as stored.
        source_spacing: the spacing assumed for the original voxels.
        report: what the reader repaired.
        model_slices: the slices of ``volume`` that were prepared (sorted), None for all;
            the others are 0 (see :func:`preprocess_tomogram`'s ``z_stride``).
    """

    volume: np.ndarray
    frame: Frame
    original_shape: tuple[int, int, int]
    source_spacing: float
    report: ReadReport
    model_slices: np.ndarray | None = None


def preprocess_tomogram(folder: str | os.PathLike, source_spacing: float,
                        cfg: PipelineConfig, workers: int | None = None,
                        z_stride: int | None = None) -> Preprocessed:
    """Read, resample and normalise one tomogram folder.

    JPEG slices take the streaming path: the headers give the stored size, each reader thread
    resizes its slice in-plane as soon as it is decoded, the z resize and the normalisation run
    in place, so the only volume ever held is one at the model's resolution (``uint8``). With
    ``cfg.z_sampling == "nearest"`` only the source slices nearest to the model slices are
    decoded and there is no z resize at all; with ``"box"`` only the slices of each model
    slice's box (:func:`~kernel_lib.resample.box_slices`). The result is identical to reading
    the whole volume, then resampling, then normalising, which is what other slice formats
    still do.

    With ``z_stride`` (inference), only the model slices that the 2.5D stacks centred on every
    ``z_stride``-th slice read are prepared (:func:`~kernel_lib.stacks.slices_read`; with the
    default 5 slices 64 A apart and stride 4 or 2, every other slice) and only the source slices
    they are made from are decoded (:func:`~kernel_lib.resample.z_sources_of`). Those slices
    equal the full path's resampled slices exactly; the percentiles are measured over them
    alone, so the normalisation bounds can differ by a gray level or so from the full volume's.
    The other slices are 0 and ``model_slices`` lists the prepared ones. None prepares every
    slice (the training cache).
    """
    reduction = choose_reduction(source_spacing, cfg.target_spacing)
    report = ReadReport(Path(folder))
    paths = list_slices(folder)
    stored = stored_slice_shape(paths)
    if stored is not None:
        depth, _ = slice_positions(paths)
        decoded = (depth,) + reduced_size(stored, reduction)
        decoded_spacing = (source_spacing, source_spacing * reduction, source_spacing * reduction)
        shape = target_shape(decoded, decoded_spacing, cfg.target_spacing)
        keep = _slices_needed(shape[0], cfg, z_stride)
        plan = reading_plan(depth, shape[0], keep, cfg.z_sampling)
        buffer = np.empty((plan.buffer_depth,) + shape[1:], dtype=np.uint8)
        read_tomogram(folder, reduction=reduction, workers=workers, report=report,
                      plane_shape=shape[1:], out=buffer, z_select=plan.select, rows=plan.rows)
        if report.decoded_shape == decoded[1:]:  # else the headers lied: take the slow path
            volume = normalize(plan.resize_depth(buffer), cfg.percentile_low,
                               cfg.percentile_high, per_slice=cfg.normalize_per == "slice",
                               out="uint8", overwrite=True, slices=keep)
            if keep is not None:
                volume[np.setdiff1d(np.arange(shape[0]), keep)] = 0
            frame = decode_frame(reduction).then(Frame.resize(decoded, shape))
            return Preprocessed(volume, frame, (depth,) + tuple(stored), float(source_spacing),
                                report, keep)
        del buffer
        report = ReadReport(Path(folder))
    raw = read_tomogram(folder, reduction=reduction, workers=workers, report=report)
    # The reduced decode has ceil(n / r) pixels per row; recover the stored size for the frame.
    original_shape = (raw.shape[0],) + tuple(_stored_size(folder, raw.shape[1:], reduction))
    decoded_spacing = (source_spacing, source_spacing * reduction, source_spacing * reduction)
    volume, resize = resample_to_spacing(raw, decoded_spacing, cfg.target_spacing,
                                         cfg.z_sampling)
    del raw
    volume = normalize(volume, cfg.percentile_low, cfg.percentile_high,
                       per_slice=cfg.normalize_per == "slice", out="uint8")
    return Preprocessed(volume, decode_frame(reduction).then(resize), original_shape,
                        float(source_spacing), report)


@dataclass(frozen=True)
class ReadingPlan:
    """How the streaming reader makes some model slices of a ``depth_in`` -> ``depth_out``
    z resize: which source slices it decodes (``select``, None: all), into which rows of a
    ``buffer_depth``-slice buffer (``rows``, None: in order), and the z step that turns that
    buffer into the model slices ``keep`` (None: all), :meth:`resize_depth`."""

    depth_in: int
    depth_out: int
    keep: np.ndarray | None
    z_sampling: str
    select: np.ndarray | None
    rows: np.ndarray | None
    buffer_depth: int

    def resize_depth(self, buffer: np.ndarray) -> np.ndarray:
        """The ``depth_out`` model slices from the buffer the reader filled (in place; only
        the ``keep`` slices are meaningful)."""
        shrinks = self.depth_out < self.depth_in
        if self.z_sampling == "nearest" and shrinks:  # the reader put each slice in its row
            return buffer[:self.depth_out]
        if self.z_sampling == "box" and shrinks:
            return box_depth_inplace(buffer, self.depth_in, self.depth_out, self.keep)
        return resize_depth_inplace(buffer, self.depth_in, self.depth_out, self.keep)


def reading_plan(depth_in: int, depth_out: int, keep: np.ndarray | None, z_sampling: str,
                 ) -> ReadingPlan:
    """The :class:`ReadingPlan` that makes the model slices ``keep`` (None: all) of a
    ``depth_in`` -> ``depth_out`` z resize: with nearest sampling one source per kept slice,
    into that slice's row; otherwise the sources they average (area or box), each into its own
    row of a buffer of ``max(depth_in, depth_out)`` slices."""
    sources = z_sources(depth_in, depth_out, z_sampling)  # one per output (nearest) or None
    if sources is not None:
        select, rows = (sources, None) if keep is None else (sources[keep], keep)
        return ReadingPlan(depth_in, depth_out, keep, z_sampling, select, rows, depth_out)
    buffer_depth = max(depth_in, depth_out)
    if keep is None and (z_sampling != "box" or depth_out >= depth_in):
        return ReadingPlan(depth_in, depth_out, keep, z_sampling, None, None, buffer_depth)
    outputs = np.arange(depth_out) if keep is None else keep
    select = z_sources_of(depth_in, depth_out, outputs, z_sampling)
    return ReadingPlan(depth_in, depth_out, keep, z_sampling, select, select, buffer_depth)


def _slices_needed(depth: int, cfg: PipelineConfig, z_stride: int | None) -> np.ndarray | None:
    """Model slices the stacks of every ``z_stride``-th slice read; None when that is all."""
    if z_stride is None:
        return None
    keep = slices_read(depth, cfg.stack_offsets, z_stride)
    return None if len(keep) == depth else keep


def _stored_size(folder: str | os.PathLike, decoded: tuple[int, int], reduction: int,
                 ) -> tuple[int, int]:
    """Stored ``(height, width)`` of slices read at 1/``reduction``: from the JPEG headers when
    there are any, else by decoding one slice at full size."""
    if reduction == 1:
        return decoded
    import cv2

    stored = stored_slice_shape(list_slices(folder))
    if stored is not None:
        return stored
    for path in list_slices(folder)[:5]:
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is not None:
            return image.shape
    return tuple(n * reduction for n in decoded)


def preprocessing_key(cfg: PipelineConfig) -> str:
    """Short hash of the settings that change a cached volume."""
    data = {name: getattr(cfg, name) for name in _PREPROCESSING_FIELDS}
    data["format"] = CACHE_FORMAT
    return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:10]


def cache_dir_for(cache_root: str | os.PathLike, cfg: PipelineConfig) -> Path:
    return Path(cache_root) / f"prep_{preprocessing_key(cfg)}"


def save_npy(path: Path, array: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    atomic_write_bytes(path, buffer.getvalue())


@dataclass
class CacheEntry:
    """One cached tomogram: where its volume is and how its frames relate."""

    tomo_id: str
    path: Path
    shape: tuple[int, int, int]
    original_shape: tuple[int, int, int]
    source_spacing: float
    frame: Frame

    def load(self, mmap: bool = True) -> np.ndarray:
        return np.load(self.path, mmap_mode="r" if mmap else None)

    def to_json(self) -> dict:
        return {"tomo_id": self.tomo_id, "file": self.path.name, "shape": list(self.shape),
                "original_shape": list(self.original_shape),
                "source_spacing": self.source_spacing, "frame": self.frame.to_dict()}

    @classmethod
    def from_json(cls, data: dict, root: Path) -> "CacheEntry":
        return cls(data["tomo_id"], root / data["file"], tuple(data["shape"]),
                   tuple(data["original_shape"]), float(data["source_spacing"]),
                   Frame.from_dict(data["frame"]))


def _entry_name(tomo_id: str, spacing: float) -> str:
    return f"{tomo_id}__{spacing:.3f}A.npy"


def load_manifest(cache: Path) -> dict[str, dict]:
    path = cache / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())["entries"]
    except (json.JSONDecodeError, KeyError):
        return {}  # a damaged manifest is rebuilt; the volumes are re-checked below


def build_cache(folders: Iterable[tuple[str, Path, float]], cfg: PipelineConfig,
                cache_root: str | os.PathLike, progress: bool = True,
                ) -> dict[str, CacheEntry]:
    """Preprocess tomograms into the cache, reusing what is already there.

    Args:
        folders: ``(tomo_id, folder, source_spacing)`` for each tomogram.
        cfg: preprocessing settings.
        cache_root: parent folder; the cache lives in a settings-specific sub-folder.
        progress: show a progress bar.

    Returns:
        ``{tomo_id: CacheEntry}`` for the requested tomograms (keyed by ``tomo_id`` and, when a
        tomogram is requested with several spacings, the last one wins).
    """
    cache = cache_dir_for(cache_root, cfg)
    cache.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(cache)
    items = list(folders)
    result: dict[str, CacheEntry] = {}
    started, built = time.perf_counter(), 0
    bar = tqdm(items, desc=f"cache {cache.name}", unit="tomo", disable=not progress)
    for tomo_id, folder, spacing in bar:
        name = _entry_name(tomo_id, spacing)
        if name in manifest and (cache / name).is_file():
            result[tomo_id] = CacheEntry.from_json(manifest[name], cache)
            continue
        prep = preprocess_tomogram(folder, spacing, cfg)
        save_npy(cache / name, prep.volume)
        entry = CacheEntry(tomo_id, cache / name, prep.volume.shape, prep.original_shape,
                           spacing, prep.frame)
        manifest[name] = entry.to_json()
        result[tomo_id] = entry
        built += 1
        # Rewrite the manifest after each volume: an interrupted build keeps what it finished.
        _write_manifest(cache, manifest, cfg)
        bar.set_postfix(built=built, rate=f"{built / (time.perf_counter() - started):.2f}/s")
    if not (cache / MANIFEST_NAME).is_file():
        _write_manifest(cache, manifest, cfg)
    return result


def _write_manifest(cache: Path, manifest: dict, cfg: PipelineConfig) -> None:
    settings = {name: getattr(cfg, name) for name in _PREPROCESSING_FIELDS}
    atomic_write_text(cache / MANIFEST_NAME, json.dumps(
        {"format": CACHE_FORMAT, "settings": settings, "entries": manifest}, indent=1))


def cache_size_bytes(entries: Iterable[CacheEntry]) -> int:
    """Bytes on disk of the given cache entries."""
    return sum(entry.path.stat().st_size for entry in entries if entry.path.is_file())
