"""Dropout whose CPU mask costs a quarter of a random word per element, where PyTorch's costs a whole draw.

On the CPU, PyTorch draws a dropout mask through ``bernoulli_``, which takes MKL's vectorised, multi-threaded
generator on Intel processors only; on any other processor it is a loop over the elements, one Mersenne Twister
draw each. The baseline model's five dropout layers see about 65M elements a training step at batch 8192 (the
attention MLP's two layers run once per real history position: ~50M of them). Measured on the 2-core AMD EPYC the
tests run on, 65,536 × 512 elements, forward and backward: ``nn.Dropout`` 383–429 ms, this module 241–265 ms (64-bit
words from the same generator, four 16-bit draws each, compared with a threshold; ``benchmarks/model_step.py`` and
docs/performance.md have the step's figures). No library offers a faster seeded CPU dropout there, so this one is
written here; on Intel processors with MKL, where PyTorch's own is the fast one, it is ``nn.Dropout``.

The keep probability is ``round((1 - p) · 65536) / 65536`` (within 7.7e-6 of ``1 - p``) and kept elements are
scaled by its inverse, so the expectation of every element is exactly its input, as with ``nn.Dropout``; a ``p``
that rounds to keeping all or nothing (within 7.7e-6 of 0 or 1) is left to ``nn.Dropout``. The draws come from
torch's default CPU generator: ``torch.manual_seed`` makes the masks repeatable. On other devices, and in
evaluation, it is ``nn.Dropout`` itself (CUDA's dropout is a fused Philox kernel already).
"""

from __future__ import annotations

import math
import platform
from pathlib import Path

import torch
from torch import nn

_LEVELS = 1 << 16  # equally likely values of one 16-bit draw
_PER_WORD = 4  # 16-bit draws in one 64-bit word


def keep_levels(p: float) -> int:
    """How many of a 16-bit draw's 65536 equally likely values keep an element: ``round((1 - p) · 65536)``."""
    return round((1.0 - p) * _LEVELS)


def keep_mask(shape: torch.Size, keep: int) -> torch.Tensor:
    """A boolean CPU mask of ``shape`` keeping each element with probability ``keep / 65536``."""
    n = math.prod(shape)
    # every 64-bit value but the largest (an out-of-place draw, which torch.compile traces): all 64 bits uniform
    words = torch.randint(-(1 << 63), (1 << 63) - 1, (-(-n // _PER_WORD),), dtype=torch.int64)
    draws = words.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return draws < keep - _LEVELS // 2


def _torch_draws_fast() -> bool:
    """Whether PyTorch's own CPU ``bernoulli_`` takes MKL's vectorised path here: a build with MKL on an Intel
    processor (the condition ATen checks)."""
    if not torch.backends.mkl.is_available():
        return False
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        return "GenuineIntel" in cpuinfo.read_text(errors="replace")
    return "intel" in platform.processor().lower()


TORCH_DRAWS_FAST = _torch_draws_fast()  # once, at import: a constant to torch.compile, not a call it cannot trace


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, no state) with a cheaper mask on the CPU; see the module's docstring.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> y = Dropout(0.5)(torch.ones(10_000))
        >>> sorted(set(y.tolist())), abs(y.mean().item() - 1) < 0.05
        ([0.0, 2.0], True)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = keep_levels(self.p)
        if (not self.training or x.device.type != "cpu" or self.inplace or TORCH_DRAWS_FAST
                or not 0 < keep < _LEVELS):
            return super().forward(x)
        # kept elements scaled by 65536 / keep: the expectation of each element is its input
        return x * keep_mask(x.shape, keep).to(x.dtype).mul_(_LEVELS / keep)
