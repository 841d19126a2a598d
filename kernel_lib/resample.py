"""Resampling a volume to a target voxel spacing, and the coordinate frames that go with it.

Frames (every array of coordinates is ``(..., 3)`` in ``(z, y, x)`` order):

- *original*: voxel indices of the tomogram as stored (the labels' frame);
- *model*: voxel indices of the resampled volume the model sees;
- *heatmap*: indices of the model's output (every ``z_stride``-th model slice, ``output_stride``
  model pixels per heatmap pixel in y and x).

Each map between frames is a per-axis affine ``b = scale * a + offset`` (:class:`Frame`), built
with the pixel-centre convention OpenCV's resize uses: pixel i covers ``[i, i + 1)`` and its
centre is ``i + 0.5``. Frames compose and invert, so original -> heatmap -> original is exact.

Example:
    >>> import numpy as np
    >>> frame = Frame.resize((100, 200, 200), (50, 100, 100))
    >>> frame.apply([[10.0, 20.0, 30.0]]).round(2).tolist()
    [[4.75, 9.75, 14.75]]
    >>> np.allclose(frame.inverse().apply(frame.apply([[10.0, 20.0, 30.0]])), [[10, 20, 30]])
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .config import Z_SAMPLINGS

# cv2.resize caps each side at SHRT_MAX for some interpolations; split wide z-resizes below it.
_MAX_COLUMNS = 32000
# Source overlaps (in slices) below this add nothing to an area z resize: OpenCV drops those
# under 1e-3, so skipping those under 1e-4 is safe and keeps integer ratios at s sources each.
_MIN_OVERLAP = 1e-4
# In-plane shrinks to at least this fraction per side resize bilinearly (see resize_plane).
_LINEAR_SHRINK = 0.95


@dataclass(frozen=True)
class Frame:
    """A per-axis affine map ``target = scale * source + offset`` over ``(z, y, x)``."""

    scale: tuple[float, float, float]
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def centered(cls, scale: tuple[float, float, float]) -> "Frame":
        """Pixel-centre aligned scaling: ``t = (s + 0.5) * scale - 0.5`` per axis."""
        scale = tuple(float(s) for s in scale)
        return cls(scale, tuple(0.5 * s - 0.5 for s in scale))

    @classmethod
    def resize(cls, source_shape: tuple[int, ...], target_shape: tuple[int, ...]) -> "Frame":
        """The frame of resizing an array of ``source_shape`` to ``target_shape``."""
        return cls.centered(tuple(t / s for s, t in zip(source_shape, target_shape)))

    @classmethod
    def identity(cls) -> "Frame":
        return cls((1.0, 1.0, 1.0))

    def apply(self, points: np.ndarray | list) -> np.ndarray:
        """Map points ``(..., 3)`` from the source frame to the target frame."""
        points = np.asarray(points, dtype=np.float64)
        return points * np.asarray(self.scale) + np.asarray(self.offset)

    def inverse(self) -> "Frame":
        scale = tuple(1.0 / s for s in self.scale)
        offset = tuple(-o / s for o, s in zip(self.offset, self.scale))
        return Frame(scale, offset)

    def then(self, other: "Frame") -> "Frame":
        """The frame that applies ``self`` first, then ``other``."""
        scale = tuple(a * b for a, b in zip(self.scale, other.scale))
        offset = tuple(o1 * s2 + o2 for o1, s2, o2 in zip(self.offset, other.scale, other.offset))
        return Frame(scale, offset)

    def to_dict(self) -> dict:
        return {"scale": list(self.scale), "offset": list(self.offset)}

    @classmethod
    def from_dict(cls, data: dict) -> "Frame":
        return cls(tuple(data["scale"]), tuple(data["offset"]))


def decode_frame(reduction: int) -> Frame:
    """Original -> decoded frame of a JPEG decoded at 1/``reduction`` in y and x.

    The reduced decoder averages ``reduction x reduction`` blocks, so decoded pixel i covers
    original pixels ``[r i, r i + r)``.
    """
    return Frame.centered((1.0, 1.0 / reduction, 1.0 / reduction))


def heatmap_frame(output_stride: int, z_stride: int = 1) -> Frame:
    """Model -> heatmap frame: heatmap slice k is model slice ``k * z_stride``; pixels are
    ``output_stride`` model pixels wide and centre-aligned."""
    inplane = Frame.centered((1.0, 1.0 / output_stride, 1.0 / output_stride))
    return Frame((1.0 / z_stride, inplane.scale[1], inplane.scale[2]),
                 (0.0, inplane.offset[1], inplane.offset[2]))


def target_shape(shape: tuple[int, int, int], source_spacing: float | tuple[float, float, float],
                 target_spacing: float) -> tuple[int, int, int]:
    """Shape of a volume of ``shape`` resampled from ``source_spacing`` to ``target_spacing``.

    ``source_spacing`` may be one value or one per axis (a reduced JPEG decode has a larger
    spacing in y and x than in z).
    """
    spacing = np.broadcast_to(np.asarray(source_spacing, dtype=np.float64), (3,))
    if np.any(spacing <= 0) or target_spacing <= 0:
        raise ValueError(f"spacings must be > 0 (got {source_spacing}, {target_spacing})")
    return tuple(max(1, int(round(n * s / target_spacing))) for n, s in zip(shape, spacing))


def nearest_slices(depth_in: int, depth_out: int) -> np.ndarray:
    """For each of ``depth_out`` slices, the index of the ``depth_in`` slice nearest to its
    centre (pixel-centre convention, the lower one on a tie), so the map keeps
    :meth:`Frame.resize`'s frame to within half a source slice.

    Example:
        >>> nearest_slices(10, 4).tolist()
        [1, 3, 6, 8]
    """
    if depth_in < 1 or depth_out < 1:
        raise ValueError(f"depths must be >= 1 (got {depth_in}, {depth_out})")
    centres = (np.arange(depth_out) + 0.5) * (depth_in / depth_out) - 0.5
    return np.clip(np.ceil(centres - 0.5), 0, depth_in - 1).astype(np.int64)


def box_slices(depth_in: int, depth_out: int) -> np.ndarray:
    """For each of ``depth_out`` slices, the ``k = round(depth_in / depth_out)`` (at least 1)
    consecutive ``depth_in`` slices nearest to its centre, shape ``(depth_out, k)``.

    Their mean is a whole-slice box filter as wide as the z step: at 15.6 -> 32 A each model
    slice averages 2 source slices where an area resize blends about 3 (two whole ones and the
    edges of two more). The box centre lies within half a source slice of the output's centre
    (as :func:`nearest_slices`, which is ``k = 1``), so :meth:`Frame.resize` stays its frame.

    Example:
        >>> box_slices(9, 4).tolist()
        [[0, 1], [2, 3], [5, 6], [7, 8]]
    """
    if depth_in < 1 or depth_out < 1:
        raise ValueError(f"depths must be >= 1 (got {depth_in}, {depth_out})")
    width = min(depth_in, max(1, int(np.floor(depth_in / depth_out + 0.5))))
    centres = (np.arange(depth_out) + 0.5) * (depth_in / depth_out) - 0.5
    first = np.clip(np.ceil(centres - (width - 1) / 2 - 0.5), 0, depth_in - width)
    return first.astype(np.int64)[:, None] + np.arange(width)


def z_sources(depth_in: int, depth_out: int, z_sampling: str = "area") -> np.ndarray | None:
    """Source slices a z resize reads, one per output slice, or None when it blends several.

    ``"area"`` averages (shrinking) or interpolates (enlarging) along z; ``"nearest"`` takes the
    nearest source slice per output slice when z shrinks, so only those need decoding (it
    interpolates like ``"area"`` when z grows). ``"box"`` averages the :func:`box_slices` of
    each output when z shrinks (a blend, so None here; :func:`z_sources_of` lists them).
    """
    if z_sampling not in Z_SAMPLINGS:
        raise ValueError(f"z_sampling must be one of {Z_SAMPLINGS} (got {z_sampling!r})")
    if z_sampling == "nearest" and depth_out < depth_in:
        return nearest_slices(depth_in, depth_out)
    return None


def z_sources_of(depth_in: int, depth_out: int, outputs: np.ndarray | list,
                 z_sampling: str = "area") -> np.ndarray:
    """Sorted source slices that the output slices ``outputs`` of a z resize depend on.

    The other source slices do not change those outputs, so a reader that only needs some model
    slices can skip them. Shrinking with ``"area"`` averages output j over the source interval
    ``[j * s, (j + 1) * s)``, ``s = depth_in / depth_out``: every slice overlapping it by more
    than 1e-4 of a slice is returned (OpenCV skips overlaps under 1e-3, so this is a superset
    that still leaves out the neighbours an interval only touches at a whole s; these are the
    sources of :func:`area_weights`). Enlarging
    interpolates between the two slices around each output's centre: those and one more on each
    side are returned. ``"nearest"`` shrinking needs just the nearest slice (:func:`z_sources`),
    ``"box"`` shrinking the slices of each output's box (:func:`box_slices`).

    Example:
        >>> z_sources_of(300, 146, [0, 2]).tolist()
        [0, 1, 2, 4, 5, 6]
    """
    if z_sampling not in Z_SAMPLINGS:
        raise ValueError(f"z_sampling must be one of {Z_SAMPLINGS} (got {z_sampling!r})")
    if depth_in < 1 or depth_out < 1:
        raise ValueError(f"depths must be >= 1 (got {depth_in}, {depth_out})")
    outputs = np.unique(np.asarray(outputs, dtype=np.int64).reshape(-1))
    if outputs.size and (outputs[0] < 0 or outputs[-1] >= depth_out):
        raise ValueError(f"output slices must lie in [0, {depth_out}) (got {outputs[0]}.."
                         f"{outputs[-1]})")
    nearest = z_sources(depth_in, depth_out, z_sampling)
    if nearest is not None:
        return np.unique(nearest[outputs])
    if depth_in == depth_out:
        return outputs
    if z_sampling == "box" and depth_out < depth_in:
        return np.unique(box_slices(depth_in, depth_out)[outputs])
    scale = depth_in / depth_out
    if depth_out < depth_in:  # area: sources overlapping [j * s, (j + 1) * s) by > 1e-4
        first, last = _area_span(outputs, scale)
    else:  # linear: floor(c) and floor(c) + 1 around the centre c, one more each side
        first = np.floor((outputs + 0.5) * scale - 0.5).astype(np.int64) - 1
        last = first + 3
    first, last = np.clip(first, 0, depth_in - 1), np.clip(last, 0, depth_in - 1)
    lengths = last - first + 1
    steps = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.unique(np.repeat(first, lengths) + steps)


def _area_span(outputs: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """First and last source slice overlapping each output's ``[j s, (j + 1) s)`` by more than
    ``_MIN_OVERLAP`` of a slice."""
    first = np.floor(outputs * scale + _MIN_OVERLAP).astype(np.int64)
    last = np.ceil((outputs + 1) * scale - _MIN_OVERLAP).astype(np.int64) - 1
    return first, last


def area_weights(depth_in: int, depth_out: int, output: int) -> tuple[np.ndarray, np.ndarray]:
    """Sources and weights of output slice ``output`` of an area z shrink.

    Output j averages the source interval ``[j s, (j + 1) s)``, ``s = depth_in / depth_out``:
    each source slice counts with its overlap (overlaps of at most 1e-4 of a slice are left
    out, as :func:`z_sources_of` does); the weights sum to 1.

    Example:
        >>> sources, weights = area_weights(5, 2, 1)
        >>> sources.tolist(), weights.round(2).tolist()
        ([2, 3, 4], [0.2, 0.4, 0.4])
    """
    if not 1 <= depth_out < depth_in:
        raise ValueError(f"an area shrink needs 1 <= depth_out < depth_in (got {depth_in} -> "
                         f"{depth_out})")
    if not 0 <= output < depth_out:
        raise ValueError(f"output slice must lie in [0, {depth_out}) (got {output})")
    scale = depth_in / depth_out
    first, last = (int(v[0]) for v in _area_span(np.array([output]), scale))
    last = min(last, depth_in - 1)
    sources = np.arange(first, last + 1)
    overlap = (np.minimum(sources + 1, (output + 1) * scale)
               - np.maximum(sources, output * scale))
    return sources, overlap / overlap.sum()


def area_depth_inplace(buffer: np.ndarray, depth_in: int, depth_out: int,
                       outputs: np.ndarray | list | None = None) -> np.ndarray:
    """Shrink the first ``depth_in`` slices of ``buffer`` along z to ``depth_out`` slices by
    area averaging (:func:`area_weights`), in place, making only the output slices
    ``outputs`` (None: all).

    Only the sources of ``outputs`` need to hold data; slice j of the result is written for j
    in ``outputs`` only. Each output is a running weighted mean in ``float32``
    (``cv2.accumulateWeighted``), rounded to the nearest level: within one gray level of
    OpenCV's area resize along z (and equal to it on about 99.9 % of the pixels), at about a
    tenth of its time when every other slice is made (bench/RESULTS.md, session 9).

    Args:
        buffer: C-contiguous ``uint8`` ``(n, y, x)`` array, ``n >= depth_in > depth_out``.
        depth_in: slices of the input volume (its first slices).
        depth_out: slices wanted (fewer than ``depth_in``).
        outputs: the output slices to make; None for all.

    Returns:
        ``buffer[:depth_out]``, a view.
    """
    if buffer.ndim != 3 or not buffer.flags.c_contiguous or buffer.dtype != np.uint8:
        raise ValueError(f"area_depth_inplace needs a C-contiguous uint8 (z, y, x) buffer "
                         f"(got {buffer.dtype} {buffer.shape})")
    if not 1 <= depth_out < depth_in <= buffer.shape[0]:
        raise ValueError(f"area_depth_inplace shrinks z: it needs depth_out < depth_in <= "
                         f"{buffer.shape[0]} slices (got {depth_in} -> {depth_out})")
    outputs = (np.arange(depth_out) if outputs is None
               else np.unique(np.asarray(outputs, dtype=np.int64).reshape(-1)))
    if outputs.size and (outputs[0] < 0 or outputs[-1] >= depth_out):
        raise ValueError(f"output slices must lie in [0, {depth_out}) (got {outputs[0]}.."
                         f"{outputs[-1]})")
    # Output j goes to row j once its sources (rows >= floor(j s) >= j) are read, in increasing
    # order, so no row is overwritten before its last use.
    acc = np.empty(buffer.shape[1:], dtype=np.float32)
    for j in outputs:
        sources, weights = area_weights(depth_in, depth_out, int(j))
        acc[...] = buffer[sources[0]]
        total = weights[0]
        for i, weight in zip(sources[1:], weights[1:]):
            total += weight  # acc holds the mean of the sources so far; fold the next one in
            cv2.accumulateWeighted(buffer[i], acc, float(weight / total))
        cv2.convertScaleAbs(acc, dst=buffer[j])  # round to nearest, saturate to uint8
    return buffer[:depth_out]


def resize_volume(volume: np.ndarray, shape: tuple[int, int, int],
                  z_sampling: str = "area") -> np.ndarray:
    """Resize a ``(z, y, x)`` volume to ``shape``: in-plane slice by slice
    (:func:`resize_plane`), then along z by area averaging when shrinking, linear when
    enlarging (or picking the nearest slices first when ``z_sampling="nearest"`` and z
    shrinks, see :func:`z_sources`, or averaging each output's :func:`box_slices` when
    ``z_sampling="box"`` and z shrinks). Keeps the dtype.

    The area z shrink of a ``uint8`` volume (every tomogram) is :func:`area_depth_inplace`,
    other dtypes take OpenCV's area resize, which it matches to within one level."""
    if volume.ndim != 3:
        raise ValueError(f"resize_volume needs a (z, y, x) volume (got shape {volume.shape})")
    z, y, x = shape
    sources = z_sources(volume.shape[0], z, z_sampling)
    if sources is not None:
        volume = volume[sources]
    box = z_sampling == "box" and z < volume.shape[0]
    area = z_sampling == "area" and z < volume.shape[0] and volume.dtype == np.uint8
    if (y, x) != volume.shape[1:]:
        planes = np.empty((volume.shape[0], y, x), dtype=volume.dtype)
        used = (z_sources_of(volume.shape[0], z, np.arange(z), "box") if box
                else range(volume.shape[0]))
        for i in used:  # a box resize leaves some slices out: those are never read
            resize_plane(volume[i], (y, x), out=planes[i])
    elif box or area:  # the caller's volume is not ours to overwrite
        planes = np.ascontiguousarray(volume).copy()
    if box:
        return box_depth_inplace(planes, volume.shape[0], z)
    if area:
        return area_depth_inplace(planes, volume.shape[0], z)
    if (y, x) != volume.shape[1:]:
        volume = planes
    if z != volume.shape[0]:
        interp = _interpolation(volume.shape[0], z)
        flat = volume.reshape(volume.shape[0], -1)
        out = np.empty((z, flat.shape[1]), dtype=volume.dtype)
        for start in range(0, flat.shape[1], _MAX_COLUMNS):
            chunk = np.ascontiguousarray(flat[:, start:start + _MAX_COLUMNS])
            out[:, start:start + chunk.shape[1]] = cv2.resize(
                chunk, (chunk.shape[1], z), interpolation=interp)
        volume = out.reshape(z, y, x)
    return volume


def resize_plane(image: np.ndarray, shape: tuple[int, int],
                 out: np.ndarray | None = None) -> np.ndarray:
    """Resize one ``(y, x)`` slice as :func:`resize_volume` does in-plane (area when the slice
    shrinks, linear when it grows or shrinks by less than 5 % per side); thread-safe, so a
    reader can resize while it decodes.

    The near-identity shrink is the common one (a 15.6 A slice decoded at 1/2 is 31.2 A, one
    step from 32 A): there OpenCV's area filter costs about 6x the bilinear one and differs
    from it by 0.17 gray levels on average (bench/RESULTS.md, session 7).

    Args:
        image: 2D slice.
        shape: ``(height, width)`` wanted.
        out: optional C-contiguous array of that shape and ``image``'s dtype to write into.
    """
    height, width = shape
    if image.shape == (height, width):
        if out is None:
            return image
        out[...] = image
        return out
    interp = (cv2.INTER_LINEAR if min(height / image.shape[0], width / image.shape[1])
              >= _LINEAR_SHRINK else _interpolation(image.size, height * width))
    if out is None:
        return cv2.resize(image, (width, height), interpolation=interp)
    result = cv2.resize(image, (width, height), dst=out, interpolation=interp)
    if result is not out and not np.shares_memory(result, out):  # cv2 declined the buffer
        out[...] = result
    return out


def resize_depth_inplace(buffer: np.ndarray, depth_in: int, depth_out: int,
                         outputs: np.ndarray | list | None = None) -> np.ndarray:
    """Resize the first ``depth_in`` slices of ``buffer`` along z to ``depth_out`` slices, in
    place: no second volume is allocated (peak extra memory is one column chunk).

    The result equals the z step of :func:`resize_volume` exactly: a ``uint8`` shrink is
    :func:`area_depth_inplace` (making only the slices ``outputs``, None: all), anything else
    the same ``cv2.resize`` on the same columns, taken a chunk at a time and copied out before
    they are overwritten (``outputs`` is then ignored: every slice is made).

    Args:
        buffer: C-contiguous ``(n, y, x)`` array with ``n >= max(depth_in, depth_out)``.
        depth_in: slices of the input volume (its first slices).
        depth_out: slices wanted.
        outputs: the output slices needed, None for all.

    Returns:
        ``buffer[:depth_out]``, a view.
    """
    if buffer.ndim != 3 or not buffer.flags.c_contiguous:
        raise ValueError(f"resize_depth_inplace needs a C-contiguous (z, y, x) buffer "
                         f"(got shape {buffer.shape})")
    if not 1 <= depth_in <= buffer.shape[0] or not 1 <= depth_out <= buffer.shape[0]:
        raise ValueError(f"buffer of {buffer.shape[0]} slices cannot hold {depth_in} -> "
                         f"{depth_out} slices: allocate max(depth_in, depth_out) slices")
    if depth_out < depth_in and buffer.dtype == np.uint8:
        return area_depth_inplace(buffer, depth_in, depth_out, outputs)
    if depth_out != depth_in:
        interp = _interpolation(depth_in, depth_out)
        flat = buffer.reshape(buffer.shape[0], -1)
        for start in range(0, flat.shape[1], _MAX_COLUMNS):
            chunk = np.ascontiguousarray(flat[:depth_in, start:start + _MAX_COLUMNS])
            flat[:depth_out, start:start + chunk.shape[1]] = cv2.resize(
                chunk, (chunk.shape[1], depth_out), interpolation=interp)
    return buffer[:depth_out]


def box_depth_inplace(buffer: np.ndarray, depth_in: int, depth_out: int,
                      outputs: np.ndarray | list | None = None) -> np.ndarray:
    """Shrink the first ``depth_in`` slices of ``buffer`` along z to ``depth_out`` slices by
    averaging each output's :func:`box_slices`, in place.

    Only the box slices of ``outputs`` (None: all) need to hold data; slice j of the result is
    written for j in ``outputs`` only, the other slices are left as they are. Integer volumes
    are rounded half up (``uint8`` stays ``uint8``), float volumes averaged.

    Args:
        buffer: C-contiguous ``(n, y, x)`` array, ``n >= depth_in > depth_out``.
        depth_in: slices of the input volume (its first slices).
        depth_out: slices wanted (fewer than ``depth_in``).
        outputs: the output slices to make; None for all.

    Returns:
        ``buffer[:depth_out]``, a view.
    """
    if buffer.ndim != 3 or not buffer.flags.c_contiguous:
        raise ValueError(f"box_depth_inplace needs a C-contiguous (z, y, x) buffer "
                         f"(got shape {buffer.shape})")
    if not 1 <= depth_out < depth_in <= buffer.shape[0]:
        raise ValueError(f"box_depth_inplace shrinks z: it needs depth_out < depth_in <= "
                         f"{buffer.shape[0]} slices (got {depth_in} -> {depth_out})")
    boxes = box_slices(depth_in, depth_out)
    outputs = (np.arange(depth_out) if outputs is None
               else np.unique(np.asarray(outputs, dtype=np.int64).reshape(-1)))
    if outputs.size and (outputs[0] < 0 or outputs[-1] >= depth_out):
        raise ValueError(f"output slices must lie in [0, {depth_out}) (got {outputs[0]}.."
                         f"{outputs[-1]})")
    # Outputs are written in increasing order, output j into row j: every later box starts
    # after row j (box starts rise by at least one slice per output when z shrinks; tested
    # for every depth pair up to 400), so no row is overwritten before its last use.
    width = boxes.shape[1]
    integer = np.issubdtype(buffer.dtype, np.integer)
    acc_type = (np.uint32 if width > 256 else np.uint16) if buffer.dtype == np.uint8 else (
        np.int64 if integer else np.float64)
    acc = np.empty(buffer.shape[1:], dtype=acc_type)
    for j in outputs:
        box = boxes[j]
        if width == 1:
            if box[0] != j:
                buffer[j] = buffer[box[0]]
            continue
        np.add(buffer[box[0]], buffer[box[1]], out=acc, dtype=acc_type)
        for i in box[2:]:
            acc += buffer[i]
        if integer:
            acc += width // 2
            acc //= width
            buffer[j] = acc
        else:
            buffer[j] = acc / width
    return buffer[:depth_out]


def _interpolation(source_size: int, target_size: int) -> int:
    return cv2.INTER_AREA if target_size < source_size else cv2.INTER_LINEAR


def resample_to_spacing(volume: np.ndarray, source_spacing: float | tuple[float, float, float],
                        target_spacing: float, z_sampling: str = "area",
                        ) -> tuple[np.ndarray, Frame]:
    """Resample a volume to an isotropic ``target_spacing``.

    Args:
        volume: ``(z, y, x)`` array as read.
        source_spacing: angstroms per voxel of ``volume`` (one value or per axis).
        target_spacing: angstroms per voxel wanted.
        z_sampling: ``"area"``, ``"box"`` or ``"nearest"`` (see :func:`z_sources`).

    Returns:
        The resampled volume and the frame from ``volume``'s voxels to its voxels.
    """
    shape = target_shape(volume.shape, source_spacing, target_spacing)
    return resize_volume(volume, shape, z_sampling), Frame.resize(volume.shape, shape)
