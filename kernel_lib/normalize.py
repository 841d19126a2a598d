"""Percentile normalisation: clip to the low-high percentile and scale to [0, 1] or [0, 255].

For ``uint8`` input the percentiles come from a 256-bin histogram instead of a sort. The
histogram gives the exact order statistics, so the result equals ``np.percentile`` (linear
interpolation) exactly, at a fraction of the cost, and the scaling is a 256-entry look-up table.
A constant slice (low == high) maps to 0 instead of dividing by zero.

Example:
    >>> import numpy as np
    >>> x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16)
    >>> y = normalize(x, out="uint8")
    >>> int(y.min()), int(y.max()), y.dtype.name
    (0, 255, 'uint8')
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

_EPS = 1e-6
N_BINS = 256
# cv2.calcHist counts in float32, exact up to 2**24 per bin: larger planes are counted in bands.
_EXACT_FLOAT_COUNT = 2 ** 24


def histogram_uint8(volume: np.ndarray, per_slice: bool = False,
                    slices: np.ndarray | None = None) -> np.ndarray:
    """Counts of each gray value: shape (256,) for the volume or (z, 256) per slice (only the
    ``slices`` of a 3D volume when given: ``(len(slices), 256)``)."""
    if volume.dtype != np.uint8:
        raise TypeError(f"histogram_uint8 needs uint8 input (got {volume.dtype})")
    planes = volume.reshape((-1,) + volume.shape[-2:]) if volume.ndim >= 2 else volume[None, None]
    chosen = range(len(planes)) if slices is None else np.asarray(slices).tolist()
    hists = np.stack([_plane_histogram(planes[k]) for k in chosen])
    return hists if per_slice else hists.sum(axis=0)


def _plane_histogram(plane: np.ndarray) -> np.ndarray:
    """Exact ``int64`` counts of a 2D ``uint8`` plane (``cv2.calcHist``, several times faster
    than ``np.bincount``, which widens every value to 64 bits first)."""
    plane = np.ascontiguousarray(plane)
    rows = max(1, _EXACT_FLOAT_COUNT // max(1, plane.shape[1]))
    counts = np.zeros(N_BINS, dtype=np.int64)
    for start in range(0, plane.shape[0], rows):
        band = plane[start:start + rows]
        if band.shape[1] > _EXACT_FLOAT_COUNT:  # one row too long for float32 counts
            counts += np.bincount(band.ravel(), minlength=N_BINS)
            continue
        hist = cv2.calcHist([band], [0], None, [N_BINS], [0, N_BINS])
        counts += np.rint(hist[:, 0]).astype(np.int64)
    return counts


def percentiles_from_histogram(hist: np.ndarray, q: tuple[float, ...]) -> np.ndarray:
    """Percentiles of the values counted in ``hist`` (last axis = 256 bins).

    Uses the same linear interpolation between order statistics as ``np.percentile``.

    Returns:
        Array of shape ``hist.shape[:-1] + (len(q),)``.
    """
    hist = np.asarray(hist, dtype=np.int64)
    cum = np.cumsum(hist, axis=-1)
    n = cum[..., -1:]
    out = np.empty(hist.shape[:-1] + (len(q),), dtype=np.float64)
    for j, quantile in enumerate(q):
        rank = (n[..., 0] - 1) * (quantile / 100.0)
        below = np.floor(rank).astype(np.int64)
        frac = rank - below
        # k-th order statistic (0-based) is the first value whose cumulative count exceeds k.
        lo_val = _order_statistic(cum, below)
        hi_val = _order_statistic(cum, np.minimum(below + 1, n[..., 0] - 1))
        out[..., j] = lo_val + frac * (hi_val - lo_val)
    return out


def _order_statistic(cum: np.ndarray, k: np.ndarray) -> np.ndarray:
    flat_cum = cum.reshape(-1, cum.shape[-1])
    flat_k = np.broadcast_to(k, cum.shape[:-1]).reshape(-1)
    values = np.array([np.searchsorted(c, kk, side="right") for c, kk in zip(flat_cum, flat_k)])
    return values.reshape(cum.shape[:-1]).astype(np.float64)


def percentile_bounds(volume: np.ndarray, low: float = 2.0, high: float = 98.0,
                      per_slice: bool = False, slices: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Low and high percentiles of a volume (scalars) or of each slice (arrays of length z);
    of the ``slices`` of a 3D volume only, when given."""
    if slices is not None and volume.dtype != np.uint8:
        volume = volume[np.asarray(slices)]
    if volume.dtype == np.uint8:
        hist = histogram_uint8(volume, per_slice, slices)
        bounds = percentiles_from_histogram(hist, (low, high))
    elif per_slice:
        flat = volume.reshape(volume.shape[0], -1)
        bounds = np.percentile(flat, (low, high), axis=1).T
    else:
        bounds = np.percentile(volume, (low, high))
    return bounds[..., 0], bounds[..., 1]


def normalize(volume: np.ndarray, low: float = 2.0, high: float = 98.0, per_slice: bool = False,
              out: str = "float", overwrite: bool = False,
              slices: np.ndarray | list | None = None) -> np.ndarray:
    """Clip to the [low, high] percentiles and scale to [0, 1] (``float32``) or [0, 255] (``uint8``).

    Args:
        volume: 2D slice or 3D volume ``(z, y, x)``, any numeric dtype.
        low: lower percentile.
        high: upper percentile.
        per_slice: percentiles of each slice instead of the whole volume (3D input only).
        out: ``"float"`` or ``"uint8"``.
        overwrite: write the result into ``volume`` itself and return it (``uint8`` in and
            out only): no second volume is allocated.
        slices: 3D input only: measure and normalise just these slices (sorted, different);
            the others are left as they are with ``overwrite``, else 0 in the result. The
            normalised slices equal ``normalize(volume[slices])``'s.
    """
    if out not in ("float", "uint8"):
        raise ValueError(f"out must be 'float' or 'uint8' (got {out!r})")
    if per_slice and volume.ndim != 3:
        raise ValueError(f"per_slice needs a 3D volume (got shape {volume.shape})")
    if overwrite and (volume.dtype != np.uint8 or out != "uint8"):
        raise ValueError(f"overwrite needs uint8 input and out='uint8' (got {volume.dtype}, "
                         f"out={out!r}): drop overwrite to get a new array")
    if slices is not None:
        slices = _check_slices(slices, volume)
        if volume.dtype != np.uint8:
            result = np.zeros(volume.shape, dtype=np.float32 if out == "float" else np.uint8)
            result[slices] = normalize(volume[slices], low, high, per_slice, out)
            return result
    lo, hi = percentile_bounds(volume, low, high, per_slice, slices)
    if volume.dtype == np.uint8:
        return _normalize_lut(volume, np.atleast_1d(lo), np.atleast_1d(hi), per_slice, out,
                              overwrite, slices)
    shape = (-1,) + (1,) * (volume.ndim - 1) if per_slice else ()
    lo_b = np.reshape(lo, shape).astype(np.float32)
    scale = 1.0 / np.maximum(np.reshape(hi, shape) - lo_b, _EPS).astype(np.float32)
    result = np.clip((volume.astype(np.float32) - lo_b) * scale, 0.0, 1.0)
    return _to_out(result, out)


def _check_slices(slices, volume: np.ndarray) -> np.ndarray:
    if volume.ndim != 3:
        raise ValueError(f"slices needs a 3D volume (got shape {volume.shape})")
    slices = np.asarray(slices, dtype=np.int64).reshape(-1)
    if (slices.size == 0 or slices[0] < 0 or slices[-1] >= volume.shape[0]
            or np.any(np.diff(slices) <= 0)):
        raise ValueError(f"slices must be sorted, different slices of the {volume.shape[0]} "
                         f"(got {slices.size} slices: {slices[:5].tolist()}...)")
    return slices


def _normalize_lut(volume: np.ndarray, lo: np.ndarray, hi: np.ndarray, per_slice: bool,
                   out: str, overwrite: bool = False,
                   slices: np.ndarray | None = None) -> np.ndarray:
    values = np.arange(N_BINS, dtype=np.float32)
    luts = np.clip((values[None] - lo[:, None]) / np.maximum(hi - lo, _EPS)[:, None], 0.0, 1.0)
    luts = np.ascontiguousarray(_to_out(luts.astype(np.float32), out))
    if overwrite:
        result = volume
    else:
        result = (np.empty if slices is None else np.zeros)(volume.shape, dtype=luts.dtype)
    # cv2.LUT, one plane at a time (same values as luts[k][plane], several times faster).
    source, target = _as_planes(volume), _as_planes(result)
    chosen = range(source.shape[0]) if slices is None else slices.tolist()
    for k, z in enumerate(chosen):
        plane = np.ascontiguousarray(source[z])
        lut = luts[k if per_slice else 0]
        mapped = cv2.LUT(plane, lut, dst=target[z] if target[z].flags.c_contiguous else None)
        if not np.shares_memory(mapped, target[z]):
            target[z] = mapped
    if not np.shares_memory(target, result):  # a reshape had to copy (non-contiguous > 3D)
        result[...] = target.reshape(result.shape)
    return result


def _as_planes(array: np.ndarray) -> np.ndarray:
    """A ``(k, y, x)`` view (a copy only for a non-contiguous array of more than 3 dims)."""
    if array.ndim == 1:
        return array[None, None]
    if array.ndim == 2:
        return array[None]
    return array if array.ndim == 3 else array.reshape((-1,) + array.shape[-2:])


def _to_out(values: np.ndarray, out: str) -> np.ndarray:
    if out == "uint8":
        return np.rint(values * 255.0).astype(np.uint8)
    return values.astype(np.float32, copy=False)


def normalize_torch(volume: torch.Tensor, low: float = 2.0, high: float = 98.0,
                    per_slice: bool = False, out: str = "float") -> torch.Tensor:
    """The torch twin of :func:`normalize`, on the tensor's own device.

    ``uint8`` input uses a per-slice or per-volume histogram (``torch.bincount``), other dtypes
    ``torch.quantile`` on a sort; results match :func:`normalize`.
    """
    if out not in ("float", "uint8"):
        raise ValueError(f"out must be 'float' or 'uint8' (got {out!r})")
    if per_slice and volume.dim() != 3:
        raise ValueError(f"per_slice needs a 3D volume (got shape {tuple(volume.shape)})")
    planes = volume.reshape(volume.shape[0], -1) if per_slice else volume.reshape(1, -1)
    if volume.dtype == torch.uint8:
        hists = torch.stack([torch.bincount(p.long(), minlength=N_BINS) for p in planes])
        bounds = torch.from_numpy(
            percentiles_from_histogram(hists.cpu().numpy(), (low, high))).to(volume.device)
    else:
        q = torch.tensor([low / 100.0, high / 100.0], dtype=torch.float64, device=volume.device)
        bounds = torch.stack([_quantile(p.double(), q) for p in planes])
    shape = (-1,) + (1,) * (volume.dim() - 1)
    lo = bounds[:, 0].float().reshape(shape)
    hi = bounds[:, 1].float().reshape(shape)
    result = ((volume.float() - lo) / torch.clamp(hi - lo, min=_EPS)).clamp_(0.0, 1.0)
    if out == "uint8":
        return torch.round(result * 255.0).to(torch.uint8)
    return result


def _quantile(values: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``torch.quantile`` without its input-size limit (linear interpolation)."""
    ordered, _ = torch.sort(values)
    rank = (ordered.numel() - 1) * q
    below = rank.floor().long()
    above = torch.clamp(below + 1, max=ordered.numel() - 1)
    frac = rank - below
    return ordered[below] + frac * (ordered[above] - ordered[below])
