"""Dropout whose CPU mask costs a quarter of a random word per element.

On the CPU, PyTorch draws a dropout mask one element at a time through its Mersenne Twister (``bernoulli_``
takes MKL's vectorised generator on Intel processors only), and the baseline model's five dropout layers see
about 50M elements a training step at batch 8192 (the attention MLP's two layers run once per real history
position). Measured on the 2-core AMD EPYC tests run on, 65,536 × 512 elements: ``F.dropout`` 326 ms, of which
the Bernoulli draw 260 ms; 64-bit words from the same generator, four 16-bit draws each, 60 ms
(``benchmarks/model_step.py`` has the step's figures). No library offers a faster seeded CPU dropout, so this
module draws the words and compares each 16-bit draw with a threshold.

The keep probability is ``round((1 - p) · 65536) / 65536`` (within 7.7e-6 of ``1 - p``) and kept elements are
scaled by its inverse, so the expectation of every element is exactly its input, as with ``nn.Dropout``. The
draws come from torch's default CPU generator: ``torch.manual_seed`` makes the masks repeatable. On other devices,
and in evaluation, it is ``nn.Dropout`` itself (CUDA's dropout is a fused Philox kernel already).
"""

from __future__ import annotations

import math

import torch
from torch import nn

_LEVELS = 1 << 16  # equally likely values of one 16-bit draw
_PER_WORD = 4  # 16-bit draws in one 64-bit word


def keep_mask(shape: torch.Size, p: float) -> tuple[torch.Tensor, float]:
    """A boolean CPU mask of ``shape`` keeping each element with probability ``round((1 - p) · 65536) / 65536``,
    and the scale ``65536 / round((1 - p) · 65536)`` that keeps the expectation (0 where nothing is kept)."""
    n = math.prod(shape)
    keep = round((1.0 - p) * _LEVELS)
    words = torch.empty(-(-n // _PER_WORD), dtype=torch.int64).random_(-(1 << 63), None)  # all 64 bits uniform
    draws = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return draws < keep - _LEVELS // 2, (_LEVELS / keep if keep else 0.0)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, no state) with a cheaper mask on the CPU; see the module's docstring.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> y = Dropout(0.5)(torch.ones(10_000))
        >>> sorted(set(y.tolist())), abs(y.mean().item() - 1) < 0.05
        ([0.0, 2.0], True)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        keep, scale = keep_mask(x.shape, self.p)
        return x * keep.to(x.dtype).mul_(scale)
