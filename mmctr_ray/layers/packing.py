"""Packing: keep only the real (row, position) pairs of a padded history.

Histories are stored L wide (64 or 100) but real ones average ~8 items, so the model embeds and attends over
the n real positions only. A packed history is ``values`` (n, ...) with ``rows`` (n,) long, the batch row of
each position, in row-major order (rows ascending, positions in their original order within a row).

Notation: B batch, L history length, D width, n real positions in the batch.
"""

from __future__ import annotations

import torch


def pack(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The real positions of a padded tensor and the row each came from.

    One ``nonzero`` (one host sync on an accelerator: n is data-dependent) serves both outputs.

    Args:
        values: (B, L, ...) e.g. history ids (B, L) or history vectors (B, L, D).
        mask: (B, L) bool, True at real positions.

    Returns:
        ``(packed, rows)``: packed (n, ...) = the values at real positions, row-major; rows (n,) long, ascending.

    Example:
        >>> pack(torch.tensor([[0, 7], [5, 6]]), torch.tensor([[False, True], [True, True]]))
        (tensor([7, 5, 6]), tensor([0, 1, 1]))
    """
    b, length = mask.shape
    real = mask.reshape(-1).nonzero().squeeze(1)  # (n,) flat indices of real positions
    rows = torch.div(real, length, rounding_mode="floor")  # (n,)
    # index_select, not values[real]: its backward is an index_add, far cheaper on CPU than index_put
    return values.reshape(b * length, *values.shape[2:]).index_select(0, real), rows
