"""Cross Network (DCN v1) and its matrix form (DCN-v2): explicit bounded-degree feature crosses."""

from __future__ import annotations

import torch
from torch import nn


class CrossNet(nn.Module):
    """Stacked cross layers over a flat feature vector.

    v1: ``x_{l+1} = x_0 · (x_l ⋅ w_l) + b_l + x_l`` (a vector w_l per layer).
    v2: ``x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l`` (a full matrix W_l per layer).

    Args:
        dim: X, the width of the flat input.
        num_layers: number of cross layers (0 returns the input unchanged).
        version: ``v1`` or ``v2``.

    Shape:
        (B, X) → (B, X)
    """

    def __init__(self, dim: int, num_layers: int = 3, version: str = "v2") -> None:
        super().__init__()
        if version not in ("v1", "v2"):
            raise ValueError(f"unknown CrossNet version {version!r}: expected v1 or v2")
        self.version = version
        if version == "v1":
            self.weights = nn.ParameterList(nn.Parameter(torch.empty(dim)) for _ in range(num_layers))
            for w in self.weights:  # FuxiCTR's layer is a Linear(X, 1) under xavier_normal: std sqrt(2 / (X + 1))
                nn.init.normal_(w, std=(2.0 / (dim + 1)) ** 0.5)
        else:
            self.weights = nn.ParameterList(nn.Parameter(torch.empty(dim, dim)) for _ in range(num_layers))
            for w in self.weights:
                nn.init.xavier_normal_(w)
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for _ in range(num_layers))

    def forward(self, x0: torch.Tensor) -> torch.Tensor:
        x = x0
        for w, b in zip(self.weights, self.biases, strict=True):
            if self.version == "v1":
                x = x0 * (x @ w).unsqueeze(-1) + b + x
            else:
                x = x0 * (x @ w.T + b) + x
        return x
