"""Reading a tomogram folder of slice images into a ``uint8`` volume ``(z, y, x)``.

Slices are ordered by the number in their file name (``slice_10`` after ``slice_9``), decoded
in parallel threads (OpenCV releases the GIL), and optionally decoded at 1/2, 1/4 or 1/8
resolution directly by the JPEG decoder when the target voxel spacing allows it.

A slice that cannot be decoded is replaced by its nearest readable neighbour, and slices of a
different size are padded or cropped to the most common size, each with a warning: one damaged
file out of hundreds must not cost a tomogram.

Example:
    >>> import numpy as np, cv2, tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for z in range(3):
    ...     _ = cv2.imwrite(str(folder / f"slice_{z:04d}.jpg"), np.full((16, 24), 40 * z, np.uint8))
    >>> read_tomogram(folder).shape
    (3, 16, 24)
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from .resample import resize_plane as _resize_plane

SLICE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
REDUCTIONS = (1, 2, 4, 8)
_REDUCED_FLAGS = {
    1: cv2.IMREAD_GRAYSCALE,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
_NUMBER = re.compile(r"(\d+)")
_JPEG_TAIL = 64  # bytes at the end of a JPEG searched for its end-of-image marker
# JPEG start-of-frame markers (SOF0-SOF15 without DHT 0xC4, JPG 0xC8 and DAC 0xCC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD9)) | {0x01}


class TomogramError(ValueError):
    """A tomogram folder that cannot be read at all; the message names the path."""


class SliceWarning(UserWarning):
    """A slice was damaged, missing or of the wrong size and was repaired."""


@dataclass
class ReadReport:
    """What happened while reading one tomogram.

    Attributes:
        folder: the tomogram folder.
        n_slices: slices in the returned volume.
        reduction: the JPEG decode reduction used (1, 2, 4 or 8).
        replaced: slice indices that could not be decoded and were replaced by a neighbour.
        resized: slice indices padded or cropped to the common size.
        gaps: slice numbers missing from the numbering (filled by a neighbour).
        decoded_shape: ``(height, width)`` of the common decoded slice, before any resize.
    """

    folder: Path
    n_slices: int = 0
    reduction: int = 1
    replaced: list[int] = field(default_factory=list)
    resized: list[int] = field(default_factory=list)
    gaps: list[int] = field(default_factory=list)
    decoded_shape: tuple[int, int] | None = None

    @property
    def repaired(self) -> bool:
        return bool(self.replaced or self.resized or self.gaps)


def slice_number(path: str | os.PathLike) -> int:
    """The last integer in a slice file's stem (``slice_0042.jpg`` -> 42); -1 if none."""
    numbers = _NUMBER.findall(Path(path).stem)
    return int(numbers[-1]) if numbers else -1


def list_slices(folder: str | os.PathLike) -> list[Path]:
    """Slice image files of a tomogram folder, sorted by slice number.

    Raises:
        TomogramError: the folder does not exist or holds no slice image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TomogramError(f"tomogram folder {folder} does not exist: check --data-root and "
                            f"the split name")
    files = [p for p in folder.iterdir()
             if p.suffix.lower() in SLICE_SUFFIXES and p.is_file() and not p.name.startswith(".")]
    if not files:
        raise TomogramError(f"tomogram folder {folder} holds no slice images "
                            f"({', '.join(SLICE_SUFFIXES)})")
    return sorted(files, key=lambda p: (slice_number(p), p.name))


def choose_reduction(source_spacing: float, target_spacing: float) -> int:
    """Largest JPEG decode reduction that keeps the decoded spacing at or below the target.

    Args:
        source_spacing: angstroms per original pixel.
        target_spacing: angstroms per model voxel.

    Returns:
        1, 2, 4 or 8.
    """
    if source_spacing <= 0 or target_spacing <= 0:
        raise ValueError(f"spacings must be > 0 (got {source_spacing}, {target_spacing})")
    best = 1
    for reduction in REDUCTIONS:
        if reduction * source_spacing <= target_spacing * (1 + 1e-6):
            best = reduction
    return best


def jpeg_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG read from its frame header, without decoding it.

    Walks the marker segments up to the first start-of-frame marker (a few hundred bytes for a
    typical slice).

    Returns:
        The stored size, or None when the file is not a readable JPEG (e.g. a PNG slice).
    """
    try:
        with open(path, "rb") as handle:
            if handle.read(2) != b"\xff\xd8":
                return None
            while True:
                byte = handle.read(1)
                while byte and byte != b"\xff":  # tolerate junk between segments
                    byte = handle.read(1)
                while byte == b"\xff":  # fill bytes
                    byte = handle.read(1)
                if not byte:
                    return None
                marker = byte[0]
                if marker in _STANDALONE_MARKERS:
                    continue
                if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame
                    return None
                length = handle.read(2)
                if len(length) < 2 or int.from_bytes(length, "big") < 2:
                    return None
                if marker in _SOF_MARKERS:
                    header = handle.read(5)  # precision, height (2 bytes), width (2 bytes)
                    if len(header) < 5:
                        return None
                    height = int.from_bytes(header[1:3], "big")
                    width = int.from_bytes(header[3:5], "big")
                    return (height, width) if height > 0 and width > 0 else None
                handle.seek(int.from_bytes(length, "big") - 2, os.SEEK_CUR)
    except OSError:
        return None


def stored_slice_shape(paths: list[Path]) -> tuple[int, int] | None:
    """The most common ``(height, width)`` among the JPEG headers of ``paths``.

    Returns:
        The size, or None when no slice has a readable JPEG header (PNG or TIFF slices): then
        only decoding tells the size.
    """
    sizes = Counter(size for size in map(jpeg_size, paths) if size is not None)
    return sizes.most_common(1)[0][0] if sizes else None


def reduced_size(shape: tuple[int, int], reduction: int) -> tuple[int, int]:
    """Size of a ``(height, width)`` slice decoded at 1/``reduction`` (rounded up, as libjpeg
    and :func:`decode_slice` do)."""
    return (-(-shape[0] // reduction), -(-shape[1] // reduction))


def slice_positions(paths: list[Path]) -> tuple[int, list[int]]:
    """Depth of the volume and the z index of each slice file (sorted as :func:`list_slices`).

    A consecutive numbering with gaps keeps its meaning (the depth covers the gaps, which are
    filled later); names without unique numbers are stacked in order.
    """
    numbers = [slice_number(p) for p in paths]
    if all(n >= 0 for n in numbers) and len(set(numbers)) == len(numbers):
        first = numbers[0]
        return numbers[-1] - first + 1, [n - first for n in numbers]
    return len(paths), list(range(len(paths)))


def decode_slice(path: str | os.PathLike, reduction: int = 1) -> np.ndarray | None:
    """Decode one slice as 2D ``uint8`` gray, or None when it cannot be decoded.

    RGB slices become gray; 16-bit images are scaled to 8 bits. Reduction is applied by the JPEG
    decoder itself when possible and by area resizing otherwise.
    """
    if reduction not in _REDUCED_FLAGS:
        raise ValueError(f"reduction must be one of {REDUCTIONS} (got {reduction})")
    try:
        raw = np.fromfile(str(path), dtype=np.uint8)
    except OSError:
        return None
    if raw.size == 0 or _is_truncated_jpeg(raw):
        return None
    is_jpeg = raw.size > 2 and raw[0] == 0xFF and raw[1] == 0xD8
    image = cv2.imdecode(raw, _REDUCED_FLAGS[reduction]) if is_jpeg else None
    if image is None or image.size == 0:
        # Not a JPEG (e.g. a 16-bit PNG): decode as stored, then convert and reduce here.
        image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
        if image is None or image.size == 0:
            return None
        image = _to_gray_uint8(image)
        if reduction > 1:
            h, w = image.shape
            size = (-(-w // reduction), -(-h // reduction))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return _to_gray_uint8(image)


def _is_truncated_jpeg(raw: np.ndarray) -> bool:
    """A JPEG (starts with FF D8) whose end-of-image marker (FF D9) is missing near its end.

    OpenCV decodes a truncated JPEG into a partly grey slice without failing; treating it as
    unreadable lets the reader replace it with a neighbour instead.
    """
    if raw.size < 4 or raw[0] != 0xFF or raw[1] != 0xD8:
        return False
    tail = raw[-_JPEG_TAIL:].tobytes()
    return b"\xff\xd9" not in tail


def _to_gray_uint8(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code) if image.shape[2] in (3, 4) else image[..., 0]
    if image.dtype == np.uint16:
        # 8-bit data stored in a 16-bit file keeps its values; real 16-bit data keeps its top byte.
        image = image.astype(np.uint8) if image.max() <= 255 else (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX)
        image = image.astype(np.uint8)
    return np.ascontiguousarray(image)


def _fit(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Crop or edge-pad a slice to ``shape`` (top-left aligned so coordinates keep meaning)."""
    h, w = shape
    image = image[:h, :w]
    pad_y, pad_x = h - image.shape[0], w - image.shape[1]
    if pad_y or pad_x:
        image = np.pad(image, ((0, pad_y), (0, pad_x)), mode="edge")
    return image


def read_tomogram(folder: str | os.PathLike, reduction: int = 1, workers: int | None = None,
                  report: ReadReport | None = None, plane_shape: tuple[int, int] | None = None,
                  out: np.ndarray | None = None,
                  z_select: Sequence[int] | np.ndarray | None = None,
                  rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Read a tomogram folder into a ``uint8`` array ``(z, y, x)``.

    Args:
        folder: folder of slice images named with their slice number.
        reduction: decode at 1/reduction of the resolution in y and x (1, 2, 4 or 8).
        workers: decoding threads (default: all cores, at most 8).
        report: if given, filled with what was repaired.
        plane_shape: resize every decoded slice to this ``(height, width)`` inside the decoding
            threads (as :func:`~kernel_lib.resample.resize_plane`: area when shrinking, linear
            when growing), so the decoded full-size volume never exists. None keeps the size.
        out: optional C-contiguous ``uint8`` buffer ``(n, height, width)`` to decode into, with
            ``n`` at least the depth (or ``len(z_select)``); e.g. with spare slices for
            :func:`~kernel_lib.resample.resize_depth_inplace`.
        z_select: read only these z positions (indices into the full depth, see
            :func:`slice_positions`), in this order; slice i of the result is position
            ``z_select[i]``. Only their files are decoded. None reads every position.
        rows: with ``out``: the rows of ``out`` that receive the positions (row ``rows[i]``
            gets position ``z_select[i]``, or i when ``z_select`` is None), all different; the
            other rows of ``out`` are left as they are and the whole of ``out`` is returned.

    Returns:
        The volume (``out[:n]`` when ``out`` is given, ``out`` with ``rows``); slice i of it
        is the i-th slice number in order (or ``z_select[i]``). A gap in the numbering or an
        unreadable slice is filled with the nearest readable slice, so z indices keep their
        meaning.

    Raises:
        TomogramError: the folder is missing, empty, or no slice in it can be decoded.
        ValueError: a ``z_select`` position is outside the tomogram's depth, or ``rows`` does
            not fit ``out``.
    """
    folder = Path(folder)
    paths = list_slices(folder)
    report = report if report is not None else ReadReport(folder)
    report.folder, report.reduction = folder, reduction
    workers = workers or min(8, os.cpu_count() or 1)
    depth, z_of = slice_positions(paths)
    z_files = np.asarray(z_of, dtype=np.int64)
    wanted = _wanted_positions(z_select, depth, folder)
    dest = _destination_rows(rows, len(wanted), out, folder)
    n_rows = len(wanted) if rows is None else out.shape[0]
    jobs = [(i, dest[r].tolist()) for i, r in _plan_decodes(z_files, wanted)]
    position_of_row = np.full(n_rows, -1, dtype=np.int64)
    position_of_row[dest] = wanted
    # With a resize or a buffer, the JPEG headers tell the decoded size up front, so each
    # thread can resize its slice straight into place.
    expected = None
    if plane_shape is not None or out is not None:
        stored = stored_slice_shape(paths)
        expected = reduced_size(stored, reduction) if stored is not None else None
    volume = None
    if expected is not None:
        volume = _volume_buffer(out, n_rows, tuple(plane_shape or expected), folder)
        images = _decode_all(paths, jobs, reduction, workers, expected, volume)
        jobs, images = _probe_size_if_none_read(paths, z_files, wanted, jobs, images, reduction)
        if _common_shape(images, expected, folder) != expected:  # headers disagree: decode again
            images = _decode_all(paths, jobs, reduction, workers)
    else:
        images = _decode_all(paths, jobs, reduction, workers)
        jobs, images = _probe_size_if_none_read(paths, z_files, wanted, jobs, images, reduction)
    shape = _common_shape(images, expected, folder)
    if volume is None or shape != expected:
        volume = _volume_buffer(out, n_rows, tuple(plane_shape or shape), folder)
    filled = np.ones(n_rows, dtype=bool)  # rows not asked for stay as they are
    filled[dest] = False
    bad: set[int] = set()

    def place(i: int, image, row: int) -> None:
        if image is not _DONE:
            if image.shape != shape:
                report.resized.append(z_of[i])
                image = _fit(image, shape)
            _resize_plane(image, volume.shape[1:], out=volume[row])

    filled_from: dict[int, int] = {}  # file index -> a row that holds it
    for (i, rows), image in zip(jobs, images):
        if image is None:
            bad.add(i)
            continue
        if not rows:  # only decoded to learn the size; the fallback below decodes it again
            continue
        place(i, image, rows[0])
        for row in rows[1:]:
            volume[row] = volume[rows[0]]
        filled[rows] = True
        filled_from[i] = rows[0]
    # Rows whose file failed: the nearest readable file (decoded now if it was not selected).
    for row in np.flatnonzero(~filled):
        for i in _nearest_first(z_files, position_of_row[row]):
            if i in bad:
                continue
            if i in filled_from:
                volume[row] = volume[filled_from[i]]
            else:
                image = decode_slice(paths[i], reduction)
                if image is None:
                    bad.add(i)
                    continue
                place(i, image, row)
                filled_from[i] = int(row)
            filled[row] = True
            break
    report.replaced = sorted({z_of[i] for i in bad} & set(wanted.tolist()))
    report.gaps = sorted(set(wanted.tolist()) - set(z_of))
    report.n_slices, report.decoded_shape = len(wanted), shape
    if report.repaired:
        warnings.warn(
            f"{folder}: repaired {len(report.replaced)} unreadable, {len(report.gaps)} missing and "
            f"{len(report.resized)} wrongly sized slice(s) "
            f"(z {sorted(report.replaced + report.gaps + report.resized)[:10]})",
            SliceWarning, stacklevel=2)
    return volume


_DONE = object()  # a slice already decoded and resized into the volume by its thread


def _wanted_positions(z_select, depth: int, folder: Path) -> np.ndarray:
    if z_select is None:
        return np.arange(depth, dtype=np.int64)
    wanted = np.asarray(z_select, dtype=np.int64).reshape(-1)
    if wanted.size == 0 or wanted.min() < 0 or wanted.max() >= depth:
        raise ValueError(f"z_select must hold positions in [0, {depth}) for {folder} "
                         f"(got {wanted.size} positions, range "
                         f"{wanted.min() if wanted.size else None}..."
                         f"{wanted.max() if wanted.size else None})")
    return wanted


def _destination_rows(rows, n: int, out: np.ndarray | None, folder: Path) -> np.ndarray:
    """Row of the volume each of the ``n`` wanted positions goes to (validated ``rows``)."""
    if rows is None:
        return np.arange(n, dtype=np.int64)
    dest = np.asarray(rows, dtype=np.int64).reshape(-1)
    if out is None:
        raise ValueError(f"rows needs an out buffer to place the slices of {folder} in")
    if (len(dest) != n or len(np.unique(dest)) != n or dest.min() < 0
            or dest.max() >= out.shape[0]):
        raise ValueError(f"rows must be {n} different rows of out (0..{out.shape[0] - 1}) to "
                         f"read {folder} (got {len(dest)} rows, {len(np.unique(dest))} different, "
                         f"range {dest.min() if len(dest) else None}.."
                         f"{dest.max() if len(dest) else None})")
    return dest


def _plan_decodes(z_files: np.ndarray, wanted: np.ndarray) -> list[tuple[int, list[int]]]:
    """``(file index, output rows)`` pairs: each wanted position takes the file at that z, or
    the nearest file (the lower one on a tie) when the numbering has a gap there; each file is
    decoded once."""
    right = np.clip(np.searchsorted(z_files, wanted), 0, len(z_files) - 1)
    left = np.clip(right - 1, 0, len(z_files) - 1)
    nearest = np.where(np.abs(z_files[left] - wanted) <= np.abs(z_files[right] - wanted),
                       left, right)
    rows: dict[int, list[int]] = {}
    for row, i in enumerate(nearest.tolist()):
        rows.setdefault(i, []).append(row)
    return list(rows.items())


def _nearest_first(z_files: np.ndarray, z: int) -> list[int]:
    """File indices ordered by the distance of their z from ``z`` (the lower z on a tie)."""
    return np.argsort(np.abs(z_files - z), kind="stable").tolist()


def _probe_size_if_none_read(paths: list[Path], z_files: np.ndarray, wanted: np.ndarray,
                             jobs: list[tuple[int, list[int]]], images: list, reduction: int,
                             ) -> tuple[list, list]:
    """When every selected slice is unreadable, decode the nearest readable other slice (as a
    job without rows) so the slice size is known; its rows are filled by the fallback."""
    if any(image is not None for image in images) or len(jobs) == len(paths):
        return jobs, images
    chosen = {i for i, _ in jobs}
    for i in _nearest_first(z_files, wanted[0]):
        image = None if i in chosen else decode_slice(paths[i], reduction)
        if image is not None:
            return jobs + [(i, [])], images + [image]
    return jobs, images


def _decode_all(paths: list[Path], jobs: list[tuple[int, list[int]]], reduction: int,
                workers: int, expected: tuple[int, int] | None = None,
                volume: np.ndarray | None = None) -> list:
    """Decode the planned slices in threads: a slice of the ``expected`` size goes straight
    into ``volume`` (resized, at its first row) and is returned as ``_DONE``; others come back
    as arrays (None when unreadable)."""
    def work(job: tuple[int, list[int]]):
        i, rows = job
        image = decode_slice(paths[i], reduction)
        if expected is None or image is None or image.shape != expected:
            return image
        _resize_plane(image, volume.shape[1:], out=volume[rows[0]])
        return _DONE

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(work, jobs))


def _common_shape(images: list, expected: tuple[int, int] | None,
                  folder: Path) -> tuple[int, int]:
    shapes = Counter(expected if image is _DONE else image.shape
                     for image in images if image is not None)
    if not shapes:
        raise TomogramError(f"no slice of {folder} could be decoded ({len(images)} files): the "
                            f"folder holds no readable image")
    return shapes.most_common(1)[0][0]


def _volume_buffer(out: np.ndarray | None, depth: int, plane: tuple[int, int],
                   folder: Path) -> np.ndarray:
    if out is None:
        return np.empty((depth,) + plane, dtype=np.uint8)
    if (out.dtype != np.uint8 or out.ndim != 3 or out.shape[0] < depth
            or out.shape[1:] != plane or not out.flags.c_contiguous):
        raise ValueError(f"out must be a C-contiguous uint8 array of at least {(depth,) + plane} "
                         f"to read {folder} (got {out.dtype} {out.shape})")
    return out[:depth]
