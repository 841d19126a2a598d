"""Peak decoding: max-pool NMS on a 3D heatmap volume, top-k peaks with scores.

A voxel is a peak when it equals the maximum of its ``(2 rz + 1, 2 ry + 1, 2 rx + 1)``
neighbourhood and its score is at least ``min_score``. Radii are given per axis in heatmap
voxels (the heatmap is anisotropic: z in model slices, y and x in output-stride pixels); use
:func:`nms_radius_voxels` to get them from a radius in angstroms.

Example:
    >>> import torch
    >>> heat = torch.zeros(8, 8, 8); heat[2, 3, 4] = 0.9; heat[2, 3, 5] = 0.5; heat[6, 6, 6] = 0.7
    >>> find_peaks(heat, (1, 1, 1), top_k=5).tolist()
    [[2.0, 3.0, 4.0, 0.8999999761581421], [6.0, 6.0, 6.0, 0.699999988079071]]
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

_MIN_CANDIDATES = 4096
_CANDIDATES_PER_PEAK = 256


def nms_radius_voxels(radius_angstrom: float, target_spacing: float, output_stride: int,
                      z_stride: int = 1) -> tuple[int, int, int]:
    """NMS radius ``(rz, ry, rx)`` in heatmap voxels for a radius in angstroms."""
    model_voxels = radius_angstrom / target_spacing
    rz = max(1, math.ceil(model_voxels / z_stride))
    rxy = max(1, math.ceil(model_voxels / output_stride))
    return rz, rxy, rxy


def find_peaks(heatmap: torch.Tensor | np.ndarray, radius: tuple[int, int, int],
               top_k: int = 5, min_score: float = 0.0) -> np.ndarray:
    """Local maxima of a ``(z, y, x)`` heatmap, best first.

    Args:
        heatmap: scores (probabilities) in the heatmap frame.
        radius: NMS radius per axis, in heatmap voxels.
        top_k: at most this many peaks.
        min_score: drop peaks scoring below it.

    Returns:
        ``float64`` array ``(k, 4)`` of ``(z, y, x, score)`` in heatmap voxels, sorted by score.
    """
    heat = torch.as_tensor(heatmap).float().cpu()
    if heat.dim() != 3:
        raise ValueError(f"find_peaks needs a (z, y, x) heatmap (got shape {tuple(heat.shape)})")
    heat = torch.nan_to_num(heat, nan=0.0, posinf=1.0, neginf=0.0)
    values = heat.numpy()
    # A box max filter is separable: scipy runs it as three 1D passes, orders of magnitude
    # faster than a dense max_pool3d with a (2r+1)^3 kernel. Edge replication cannot create a
    # new maximum, so it equals max-pooling with -inf padding.
    pooled = ndimage.maximum_filter(values, size=tuple(2 * r + 1 for r in radius), mode="nearest")
    # Candidates: only the best values can be peaks worth keeping, which also bounds the work
    # on a flat heatmap where every voxel is a local maximum.
    flat = values.reshape(-1)
    n_candidates = min(flat.size, max(_MIN_CANDIDATES, top_k * _CANDIDATES_PER_PEAK))
    if n_candidates < flat.size:
        index = np.argpartition(-flat, n_candidates - 1)[:n_candidates]
    else:
        index = np.arange(flat.size)
    index = index[(flat[index] == pooled.reshape(-1)[index]) & (flat[index] >= min_score)]
    if index.size == 0:
        return np.zeros((0, 4), dtype=np.float64)
    index = index[np.lexsort((index, -flat[index]))]  # best first, ties in scan order
    coords = np.stack(np.unravel_index(index, values.shape), axis=1)
    # Plateaus (equal neighbours) give several maxima; keep the first of each radius.
    kept: list[int] = []
    radius_np = np.asarray(radius)
    for i in range(len(index)):
        if len(kept) >= top_k:
            break
        if kept and np.any(np.all(np.abs(coords[kept] - coords[i]) <= radius_np, axis=1)):
            continue
        kept.append(i)
    result = np.zeros((len(kept), 4), dtype=np.float64)
    result[:, :3] = coords[kept]
    result[:, 3] = flat[index[kept]]
    return result
