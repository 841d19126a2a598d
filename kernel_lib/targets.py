"""Training targets: Gaussian heatmaps for the 2.5D setting, in the heatmap frame.

A motor at model voxel ``(mz, my, mx)`` contributes to the target of the stack centred on
model slice ``zc`` the in-plane Gaussian around ``(my, mx)`` scaled by ``exp(-(zc - mz)^2 /
(2 sigma^2))``: the same isotropic 3D Gaussian, sampled at the centre slice. Several motors
combine by maximum.

Example:
    >>> import numpy as np
    >>> heat = gaussian_heatmap((64, 64), [(10.0, 30.0, 30.0)], z_centre=10, sigma=8.0, stride=4)
    >>> heat.shape, round(float(heat.max()), 2)
    ((16, 16), 0.99)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sigma_in_voxels(sigma_angstrom: float, spacing: float) -> float:
    """Gaussian sigma in voxels of a volume with ``spacing`` angstroms per voxel."""
    if sigma_angstrom <= 0 or spacing <= 0:
        raise ValueError(f"sigma and spacing must be > 0 (got {sigma_angstrom}, {spacing})")
    return sigma_angstrom / spacing


def gaussian_heatmap(image_shape: tuple[int, int], motors: Sequence[Sequence[float]] | np.ndarray,
                     z_centre: float, sigma: float, stride: int) -> np.ndarray:
    """Target heatmap ``(H / stride, W / stride)`` of one 2.5D stack.

    Args:
        image_shape: ``(H, W)`` of the model input in model voxels.
        motors: motor centres ``(k, 3)`` in model voxels ``(z, y, x)``; may be empty.
        z_centre: model slice the stack is centred on.
        sigma: Gaussian sigma in model voxels.
        stride: model voxels per heatmap pixel.

    Returns:
        ``float32`` heatmap in [0, 1], 1 at a motor's centre.
    """
    h, w = image_shape
    if h % stride or w % stride:
        raise ValueError(f"image shape {image_shape} is not a multiple of the stride {stride}")
    out = np.zeros((h // stride, w // stride), dtype=np.float32)
    motors = np.asarray(motors, dtype=np.float64).reshape(-1, 3)
    if len(motors) == 0:
        return out
    # Centres of heatmap pixels in model voxels (pixel-centre convention).
    ys = (np.arange(h // stride) + 0.5) * stride - 0.5
    xs = (np.arange(w // stride) + 0.5) * stride - 0.5
    inv = 1.0 / (2.0 * sigma * sigma)
    for mz, my, mx in motors:
        weight = np.exp(-((z_centre - mz) ** 2) * inv)
        if weight < 1e-4:
            continue
        gy = np.exp(-((ys - my) ** 2) * inv)
        gx = np.exp(-((xs - mx) ** 2) * inv)
        np.maximum(out, (weight * gy[:, None] * gx[None, :]).astype(np.float32), out=out)
    return out
