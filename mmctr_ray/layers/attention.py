"""Target attention over the click history. Every module here has ``forward(target, history, mask)`` and the
packed entry point ``forward_packed(target, history, rows)`` that the model calls.

Notation: B batch, L history length, D item representation width, H heads, U attention MLP width, n real
positions in the batch. Padded positions (``mask`` False) never change the output, whatever the history
holds there, and an all-padding history pools to exact zeros: both modules compute only over the real
positions (see :mod:`mmctr_ray.layers.packing`), which is the same function as the masked padded one; the one
exception is a ``dice`` activation of :class:`DINAttention` in training mode, whose batch statistics are then taken
over the real positions only (in evaluation, with the running statistics, the two agree).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmctr_ray.layers.dropout import Dropout
from mmctr_ray.layers.mlp import MLP, activation
from mmctr_ray.layers.packing import pack


class TargetAttention(nn.Module):
    """Pools a history for a target. Subclasses implement :meth:`forward_packed`; :meth:`forward` packs.

    ``forward_packed`` takes the history either per position, (n, D), or as the u distinct items of the
    batch, (u, D), with ``inverse`` (n,) giving each position's row in it: work that depends on the history
    item alone (the DIN first-layer history term, the key and value projections) is then done once per item.

    Shape:
        forward: target (B, D), history (B, L, D), mask (B, L) bool → (B, D)
        forward_packed: target (B, D), history (n, D) or (u, D), rows (n,) long ascending, inverse (n,) → (B, D)
    """

    def forward(self, target: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        packed, rows = pack(history, mask)  # (n, D), (n,)
        return self.forward_packed(target, packed, rows)

    def forward_packed(self, target: torch.Tensor, history: torch.Tensor, rows: torch.Tensor,
                       inverse: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError


def per_position(values: torch.Tensor, inverse: torch.Tensor | None) -> torch.Tensor:
    """Values of the distinct items (u, ...) spread to the n positions, or ``values`` as they are."""
    return values if inverse is None else values.index_select(0, inverse)


class DINAttention(TargetAttention):
    """DIN's local activation unit: an MLP over ``[t, h, t-h, t*h]`` scores each position; no softmax;
    scores × mask weight a sum of the history.

    Two rewrites make it cheap without changing the function or the parameters:

    * the MLP runs only on the real (row, position) pairs, packed: histories average ~8 real items in a
      width of 64, so most of the padded work is skipped (and batch statistics of a ``dice`` activation see
      real positions only);
    * the first Linear over the concatenation is computed in split form,
      ``(W_t + W_d)·t + (W_h - W_d)·h + W_p·(t*h)``, so the target term is computed once per row and the
      (·, 4D) concatenation is never built.

    Args:
        dim: D.
        units: widths of the MLP's hidden layers (the first is U).
        act: activation name.
        dropout: dropout after each hidden layer.

    Shape:
        target (B, D), history (B, L, D), mask (B, L) bool → (B, D);
        packed: target (B, D), history (n, D), rows (n,) → (B, D)
    """

    def __init__(self, dim: int, units: tuple[int, ...] = (512, 256), act: str = "relu", dropout: float = 0.0):
        super().__init__()
        if not units:
            raise ValueError("DINAttention needs at least one hidden layer (model.attention_units)")
        self.dim = dim
        self.first = nn.Linear(4 * dim, units[0])
        self.first_act = activation(act, units[0])
        self.first_drop = Dropout(dropout)
        self.rest = MLP(units[0], tuple(units[1:]), act=act, dropout=dropout, out_dim=1)

    def forward_packed(self, target: torch.Tensor, history: torch.Tensor, rows: torch.Tensor,
                       inverse: torch.Tensor | None = None) -> torch.Tensor:
        d = target.shape[1]
        w_t, w_h, w_d, w_p = self.first.weight.split(d, dim=1)  # each (U, D)
        row_term = target @ (w_t + w_d).T + self.first.bias  # (B, U), once per row
        item_term = per_position(history @ (w_h - w_d).T, inverse)  # (n, U), once per distinct item
        h, t = per_position(history, inverse), target.index_select(0, rows)  # (n, D) each
        hidden = row_term.index_select(0, rows) + item_term + (t * h) @ w_p.T  # (n, U)
        scores = self.rest(self.first_drop(self.first_act(hidden)))  # (n, 1)
        return torch.zeros_like(target).index_add_(0, rows, scores * h)  # (B, D); no softmax


class MultiHeadTargetAttention(TargetAttention):
    """Multi-head target attention: the target queries its history with H scaled dot-product heads.

    ``q = W_q t``, ``k = W_k h``, ``v = W_v h`` split into H heads of D/H; per head
    ``softmax(q·k / sqrt(D/H))`` over the real positions weights ``v``; heads are concatenated and mixed by
    ``W_o``. Computed on the packed real positions as a segment softmax per (row, head); padded positions
    get weight 0; an all-padding row pools to exact zeros (gradients included).

    Args:
        dim: D (divisible by ``num_heads``).
        num_heads: H.
        dropout: dropout on the attention weights.

    Shape:
        target (B, D), history (B, L, D), mask (B, L) bool → (B, D);
        packed: target (B, D), history (n, D), rows (n,) → (B, D)
    """

    def __init__(self, dim: int, num_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"MultiHeadTargetAttention: num_heads {num_heads} is not a positive integer")
        if dim % num_heads:
            raise ValueError(f"MultiHeadTargetAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)  # no bias: an all-padding history pools to exact zeros
        self.drop = Dropout(dropout)

    def forward_packed(self, target: torch.Tensor, history: torch.Tensor, rows: torch.Tensor,
                       inverse: torch.Tensor | None = None) -> torch.Tensor:
        (b, d), h, dh = target.shape, self.num_heads, self.head_dim
        q = self.q(target).view(b, h, dh)  # (B, H, dh)
        k = per_position(self.k(history), inverse).view(-1, h, dh)  # (n, H, dh)
        v = per_position(self.v(history), inverse).view(-1, h, dh)
        # softmax statistics in fp32 (bf16 under autocast otherwise); rows with no real position stay 0
        scores = (q.index_select(0, rows).float() * k.float()).sum(-1) / math.sqrt(dh)  # (n, H)
        index = rows.unsqueeze(1).expand(-1, h)  # (n, H)
        top = scores.new_zeros(b, h).scatter_reduce_(0, index, scores.detach(), "amax", include_self=False)
        # the shift cancels in the softmax, so it needs no gradient; each row's denominator is >= 1
        exp = torch.exp(scores - top.index_select(0, rows))  # (n, H)
        weights = exp / scores.new_zeros(b, h).index_add_(0, rows, exp).index_select(0, rows)  # (n, H)
        values = self.drop(weights).unsqueeze(-1) * v.float()  # (n, H, dh)
        pooled = values.new_zeros(b, h, dh).index_add_(0, rows, values).reshape(b, d)  # (B, D)
        return self.out(pooled.to(v.dtype))


def make_attention(kind: str, dim: int, units: tuple[int, ...], act: str, num_heads: int,
                   dropout: float) -> TargetAttention:
    """The sequence module named by ``model.attention`` (a dict look-up)."""
    factories = {
        "din": lambda: DINAttention(dim, units, act=act, dropout=dropout),
        "multihead": lambda: MultiHeadTargetAttention(dim, num_heads=num_heads, dropout=dropout),
    }
    if kind not in factories:
        raise ValueError(f"unknown attention {kind!r}: expected one of {', '.join(factories)}")
    return factories[kind]()
