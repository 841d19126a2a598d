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
import torch.nn.functional as F


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
    heat = torch.as_tensor(heatmap).float()
    if heat.dim() != 3:
        raise ValueError(f"find_peaks needs a (z, y, x) heatmap (got shape {tuple(heat.shape)})")
    heat = torch.nan_to_num(heat, nan=0.0, posinf=1.0, neginf=0.0)
    kernel = tuple(2 * r + 1 for r in radius)
    pooled = F.max_pool3d(heat[None, None], kernel, stride=1,
                          padding=tuple(radius))[0, 0]
    is_peak = (heat == pooled) & (heat >= min_score)
    scores = heat[is_peak]
    if scores.numel() == 0:
        return np.zeros((0, 4), dtype=np.float64)
    coords = is_peak.nonzero()
    order = torch.argsort(scores, descending=True)
    # Plateaus (equal neighbours) give several maxima; keep the first of each radius.
    kept: list[int] = []
    coords_np = coords[order].cpu().numpy()
    radius_np = np.asarray(radius)
    for i in range(len(order)):
        if len(kept) >= top_k:
            break
        if kept and np.any(np.all(np.abs(coords_np[kept] - coords_np[i]) <= radius_np, axis=1)):
            continue
        kept.append(i)
    chosen = order[kept]
    result = np.zeros((len(kept), 4), dtype=np.float64)
    result[:, :3] = coords[chosen].cpu().numpy()
    result[:, 3] = scores[chosen].cpu().numpy()
    return result
