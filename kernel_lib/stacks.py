"""2.5D slice stacks: for a centre slice z, the channels are slices ``z + k * step``, ``k = -n..n``.

Indices beyond the volume are clamped to the first or last slice. Stacks are gathered in
batches straight from the ``uint8`` volume (one fancy-index per batch, no per-stack copy of the
volume), so memory stays at one batch.

Example:
    >>> import numpy as np
    >>> volume = np.arange(5, dtype=np.uint8)[:, None, None].repeat(2, 1).repeat(2, 2)
    >>> slice_stack(volume, 0, stack_offsets(1, 2))[:, 0, 0].tolist()
    [0, 0, 2]
    >>> [zs.tolist() for zs, _ in iter_stack_batches(volume, stack_offsets(1, 1), batch_size=2)]
    [[0, 1], [2, 3], [4]]
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def stack_offsets(stack_half: int, step: int) -> np.ndarray:
    """Slice offsets ``k * step`` for ``k = -n..n``."""
    if stack_half < 0 or step < 1:
        raise ValueError(f"need stack_half >= 0 and step >= 1 (got {stack_half}, {step})")
    return np.arange(-stack_half, stack_half + 1, dtype=np.int64) * step


def step_in_slices(step_angstrom: float, spacing: float) -> int:
    """A channel step given in angstroms, in slices of a volume with ``spacing`` (at least 1)."""
    if step_angstrom <= 0 or spacing <= 0:
        raise ValueError(f"step and spacing must be > 0 (got {step_angstrom}, {spacing})")
    return max(1, int(round(step_angstrom / spacing)))


def stack_indices(centres: Sequence[int] | np.ndarray, depth: int,
                  offsets: np.ndarray) -> np.ndarray:
    """Clamped slice indices ``(len(centres), len(offsets))`` of the stacks around ``centres``."""
    centres = np.asarray(centres, dtype=np.int64)
    return np.clip(centres[:, None] + offsets[None, :], 0, depth - 1)


def slices_read(depth: int, offsets: np.ndarray, z_stride: int = 1) -> np.ndarray:
    """Sorted slices that the stacks centred on every ``z_stride``-th slice of a ``depth``-slice
    volume read (what :func:`iter_stack_batches` gathers); the others are never looked at.

    Example:
        >>> slices_read(9, stack_offsets(2, 2), z_stride=2).tolist()
        [0, 2, 4, 6, 8]
    """
    if depth < 1 or z_stride < 1:
        raise ValueError(f"need depth >= 1 and z_stride >= 1 (got {depth}, {z_stride})")
    centres = np.arange(0, depth, z_stride, dtype=np.int64)
    return np.unique(stack_indices(centres, depth, offsets))


def slice_stack(volume: np.ndarray, z: int, offsets: np.ndarray) -> np.ndarray:
    """One stack ``(2n + 1, y, x)`` centred on slice ``z``."""
    return volume[stack_indices([z], volume.shape[0], offsets)[0]]


def iter_stack_batches(volume: np.ndarray, offsets: np.ndarray, batch_size: int = 16,
                       z_stride: int = 1, centres: Sequence[int] | None = None,
                       ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(centres, stacks)`` with ``stacks`` of shape ``(B, 2n + 1, y, x)`` over a volume.

    Args:
        volume: ``(z, y, x)`` array (any dtype; stays in it).
        offsets: from :func:`stack_offsets`.
        batch_size: stacks per batch.
        z_stride: use every k-th slice as a centre (ignored when ``centres`` is given).
        centres: explicit centre slices.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (got {batch_size})")
    depth = volume.shape[0]
    all_centres = (np.arange(0, depth, z_stride, dtype=np.int64) if centres is None
                   else np.asarray(centres, dtype=np.int64))
    for start in range(0, len(all_centres), batch_size):
        batch_centres = all_centres[start:start + batch_size]
        index = stack_indices(batch_centres, depth, offsets)
        yield batch_centres, volume[index.reshape(-1)].reshape(index.shape + volume.shape[1:])
