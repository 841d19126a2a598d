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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

SLICE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
REDUCTIONS = (1, 2, 4, 8)
_REDUCED_FLAGS = {
    1: cv2.IMREAD_GRAYSCALE,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
_NUMBER = re.compile(r"(\d+)")


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
    """

    folder: Path
    n_slices: int = 0
    reduction: int = 1
    replaced: list[int] = field(default_factory=list)
    resized: list[int] = field(default_factory=list)
    gaps: list[int] = field(default_factory=list)

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
    if raw.size == 0:
        return None
    image = cv2.imdecode(raw, _REDUCED_FLAGS[reduction])
    if image is None or image.size == 0:
        # Not a JPEG the reduced decoder handles (e.g. a 16-bit PNG): decode as it is.
        image = cv2.imdecode(raw, cv2.IMREAD_UNCHANGED)
        if image is None or image.size == 0:
            return None
        image = _to_gray_uint8(image)
        if reduction > 1:
            h, w = image.shape
            size = (-(-w // reduction), -(-h // reduction))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return _to_gray_uint8(image)


def _to_gray_uint8(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code) if image.shape[2] in (3, 4) else image[..., 0]
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
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
                  report: ReadReport | None = None) -> np.ndarray:
    """Read a tomogram folder into a ``uint8`` array ``(z, y, x)``.

    Args:
        folder: folder of slice images named with their slice number.
        reduction: decode at 1/reduction of the resolution in y and x (1, 2, 4 or 8).
        workers: decoding threads (default: all cores, at most 8).
        report: if given, filled with what was repaired.

    Returns:
        The volume; slice i of it is the i-th slice number in order. A gap in the numbering is
        filled with the previous slice so z indices keep their meaning.

    Raises:
        TomogramError: the folder is missing, empty, or no slice in it can be decoded.
    """
    folder = Path(folder)
    paths = list_slices(folder)
    report = report if report is not None else ReadReport(folder)
    report.folder, report.reduction = folder, reduction
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        images = list(pool.map(lambda p: decode_slice(p, reduction), paths))

    good = [i for i, image in enumerate(images) if image is not None]
    if not good:
        raise TomogramError(f"no slice of {folder} could be decoded ({len(paths)} files): the "
                            f"folder holds no readable image")
    shape = Counter(images[i].shape for i in good).most_common(1)[0][0]

    # Map slice numbers to z: fill gaps in a consecutive numbering, keep order otherwise.
    numbers = [slice_number(p) for p in paths]
    if all(n >= 0 for n in numbers) and len(set(numbers)) == len(numbers):
        first = numbers[0]
        depth = numbers[-1] - first + 1
        z_of = [n - first for n in numbers]
    else:
        depth, z_of = len(paths), list(range(len(paths)))
    volume = np.empty((depth,) + shape, dtype=np.uint8)
    filled = np.zeros(depth, dtype=bool)
    for i, image in enumerate(images):
        if image is None:
            report.replaced.append(z_of[i])
            continue
        if image.shape != shape:
            report.resized.append(z_of[i])
            image = _fit(image, shape)
        volume[z_of[i]] = image
        filled[z_of[i]] = True
    report.gaps = [z for z in range(depth) if not filled[z] and z not in report.replaced]
    if not filled.all():
        good_z = np.flatnonzero(filled)
        for z in np.flatnonzero(~filled):
            volume[z] = volume[good_z[np.argmin(np.abs(good_z - z))]]
    report.n_slices = depth
    if report.repaired:
        warnings.warn(
            f"{folder}: repaired {len(report.replaced)} unreadable, {len(report.gaps)} missing and "
            f"{len(report.resized)} wrongly sized slice(s) "
            f"(z {sorted(report.replaced + report.gaps + report.resized)[:10]})",
            SliceWarning, stacklevel=2)
    return volume
