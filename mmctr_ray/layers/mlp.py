"""Multi-layer perceptron blocks and the Dice activation (DIN paper)."""

from __future__ import annotations

import torch
from torch import nn

from mmctr_ray.layers.dropout import Dropout


class Dice(nn.Module):
    """Data-adaptive PReLU from DIN: ``p·x + (1-p)·alpha·x`` with ``p = sigmoid(BN(x))``.

    Args:
        dim: feature width (the last axis).

    Shape:
        (B, dim) → (B, dim)
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-9)
        self.alpha = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:  # one row has no batch statistics (BatchNorm refuses it): use the
            # running ones, e.g. a DIN attention batch with a single real history position among its rows
            z = nn.functional.batch_norm(x, self.bn.running_mean, self.bn.running_var, training=False, eps=self.bn.eps)
        else:
            z = self.bn(x)
        p = torch.sigmoid(z)
        return p * x + (1 - p) * self.alpha * x


def activation(name: str, dim: int) -> nn.Module:
    """Activation module by name (a dict look-up): relu, prelu, gelu, dice. PReLU's slopes start at 0.1, as
    FuxiCTR's (torch's default is 0.25)."""
    factories = {"relu": nn.ReLU, "gelu": nn.GELU, "prelu": lambda: nn.PReLU(dim, init=0.1),
                 "dice": lambda: Dice(dim)}
    if name not in factories:
        raise ValueError(f"unknown activation {name!r}: expected one of {', '.join(factories)}")
    return factories[name]()


class MLP(nn.Module):
    """Stack of Linear → (BatchNorm) → activation → (Dropout) blocks, optionally ending in a Linear to ``out_dim``.

    Args:
        in_dim: input width.
        units: hidden widths.
        act: activation name.
        batch_norm: batch norm after each hidden Linear.
        dropout: dropout rate after each hidden block.
        out_dim: width of a final Linear without activation (None: no final Linear).

    Shape:
        (B, in_dim) → (B, out_dim or units[-1])

    Example:
        >>> MLP(16, (8, 4), out_dim=1)(torch.zeros(2, 16)).shape
        torch.Size([2, 1])
    """

    def __init__(self, in_dim: int, units: tuple[int, ...], act: str = "relu", batch_norm: bool = False,
                 dropout: float = 0.0, out_dim: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for u in units:
            layers.append(nn.Linear(width, u))
            if batch_norm:
                layers.append(nn.BatchNorm1d(u))
            layers.append(activation(act, u))
            if dropout > 0:
                layers.append(Dropout(dropout))
            width = u
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
