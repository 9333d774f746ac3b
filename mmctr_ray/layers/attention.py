"""Target attention over the click history. Every module here has ``forward(target, history, mask)``.

Notation: B batch, L history length, D item representation width, H heads, U attention MLP width.
Padded positions (``mask`` False) never change the output, whatever the history holds there, and an
all-padding history pools to zeros.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmctr_ray.layers.mlp import MLP, activation


class DINAttention(nn.Module):
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
        target (B, D), history (B, L, D), mask (B, L) bool → (B, D)
    """

    def __init__(self, dim: int, units: tuple[int, ...] = (512, 256), act: str = "relu", dropout: float = 0.0):
        super().__init__()
        if not units:
            raise ValueError("DINAttention needs at least one hidden layer (model.attention_units)")
        self.dim = dim
        self.first = nn.Linear(4 * dim, units[0])
        self.first_act = activation(act, units[0])
        self.first_drop = nn.Dropout(dropout)
        self.rest = MLP(units[0], tuple(units[1:]), act=act, dropout=dropout, out_dim=1)

    def forward(self, target: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, d = history.shape
        real = mask.reshape(-1).nonzero().squeeze(1)  # (n,) flat indices of real positions
        rows = torch.div(real, length, rounding_mode="floor")  # (n,) the row of each
        h = history.reshape(b * length, d)[real]  # (n, D)
        t = target[rows]  # (n, D)
        w_t, w_h, w_d, w_p = self.first.weight.split(d, dim=1)  # each (U, D)
        row_term = target @ (w_t + w_d).T + self.first.bias  # (B, U), once per row
        hidden = row_term[rows] + h @ (w_h - w_d).T + (t * h) @ w_p.T  # (n, U)
        scores = self.rest(self.first_drop(self.first_act(hidden)))  # (n, 1)
        return torch.zeros_like(target).index_add_(0, rows, scores * h)  # (B, D); no softmax


class MultiHeadTargetAttention(nn.Module):
    """Multi-head target attention: the target queries its history with H scaled dot-product heads.

    ``q = W_q t``, ``k = W_k h``, ``v = W_v h`` split into H heads of D/H; per head
    ``softmax(q·k / sqrt(D/H))`` over the real positions weights ``v``; heads are concatenated and mixed by
    ``W_o``. Padded positions get weight 0; an all-padding row pools to zeros.

    Args:
        dim: D (divisible by ``num_heads``).
        num_heads: H.
        dropout: dropout on the attention weights.

    Shape:
        target (B, D), history (B, L, D), mask (B, L) bool → (B, D)
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
        self.drop = nn.Dropout(dropout)

    def forward(self, target: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, length, d = history.shape
        h, dh = self.num_heads, self.head_dim
        q = self.q(target).view(b, h, dh)  # (B, H, dh)
        k = self.k(history).view(b, length, h, dh)  # (B, L, H, dh)
        v = self.v(history).view(b, length, h, dh)
        scores = torch.einsum("bhe,blhe->bhl", q, k) / math.sqrt(dh)  # (B, H, L)
        real = mask.unsqueeze(1)  # (B, 1, L)
        scores = scores.masked_fill(~real, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1) * real.to(scores.dtype)  # all-padding rows → 0
        pooled = torch.einsum("bhl,blhe->bhe", self.drop(weights), v).reshape(b, d)
        return self.out(pooled)


def make_attention(kind: str, dim: int, units: tuple[int, ...], act: str, num_heads: int,
                   dropout: float) -> nn.Module:
    """The sequence module named by ``model.attention`` (a dict look-up)."""
    factories = {
        "din": lambda: DINAttention(dim, units, act=act, dropout=dropout),
        "multihead": lambda: MultiHeadTargetAttention(dim, num_heads=num_heads, dropout=dropout),
    }
    if kind not in factories:
        raise ValueError(f"unknown attention {kind!r}: expected one of {', '.join(factories)}")
    return factories[kind]()
