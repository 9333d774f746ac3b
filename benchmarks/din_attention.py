"""DIN attention: packed real positions (what DINAttention does) against the padded computation (run by hand).

    .venv/bin/python benchmarks/din_attention.py [--batch 2048] [--max-len 64] [--repeats 5]

Histories follow the real length distribution (median 6, mean ~8, cut at max_len), at the baseline widths
(item representation 256, MLP [512, 256]). Forward + backward, fp32 on CPU (or CUDA when available).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from mmctr_ray.layers.attention import DINAttention


def padded(module: DINAttention, target, history, mask):
    """The same function over every position, padded ones included (the textbook computation)."""
    b, length, d = history.shape
    t = target.unsqueeze(1).expand(-1, length, -1)
    concat = torch.cat([t, history, t - history, t * history], dim=-1).reshape(b * length, 4 * d)
    scores = module.rest(module.first_act(module.first(concat))).view(b, length) * mask
    return torch.einsum("bl,bld->bd", scores, history)


def timed(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    lengths = np.clip(3 + np.rint(np.exp(np.log(3.0) + rng.standard_normal(args.batch))), 3, args.max_len)
    mask = torch.as_tensor(np.arange(args.max_len)[None, :] >= (args.max_len - lengths)[:, None], device=dev)
    module = DINAttention(256, (512, 256)).to(dev)
    target = torch.randn(args.batch, 256, device=dev, requires_grad=True)
    history = torch.randn(args.batch, args.max_len, 256, device=dev, requires_grad=True)
    with torch.no_grad():
        diff = (module(target, history, mask) - padded(module, target, history, mask.float())).abs().max().item()
    results = {}
    for name, fn in (("padded", lambda: padded(module, target, history, mask.float())),
                     ("packed", lambda: module(target, history, mask))):
        results[name] = timed(lambda fn=fn: fn().sum().backward(), args.repeats)
    print(f"device {dev}, batch {args.batch}, max_len {args.max_len}, real positions {mask.float().mean():.3f}, "
          f"max |packed - padded| {diff:.2e}")
    for name, sec in results.items():
        print(f"{name:>7}: {sec * 1e3:8.1f} ms/step  {args.batch / sec:>10,.0f} rows/s (fwd+bwd)")
    print(f"speed-up: {results['padded'] / results['packed']:.2f}x")


if __name__ == "__main__":
    main()
