"""A DINModel training step without the optimizer (forward + loss + backward), fastest of the repeats: packed
history against the padded paths.

    .venv/bin/python benchmarks/model_step.py [--batch 2048 8192] [--repeats 3] [--paths embed_all packed]

The baseline model (configs/baseline.yaml) over an item table of the baseline's size (91,718 rows, 5 tags of
a vocabulary of 11,740, 128-d frozen vectors); histories max_len wide with the real length distribution
(median 6, mean ~8), left-padded. Paths, all the same function:

* ``packed``: the model as it is — only the n real history ids are embedded, attention over them;
* ``embed_all``: every B×L history position embedded, then ``sequence(target, history, mask)`` (the model
  before packing; DIN attention still packs inside);
* ``padded``: every position embedded and attended (the textbook FuxiCTR computation);
* ``compiled``: ``packed`` through ``torch.compile(dynamic=True)``, with dynamo tracing the data-dependent
  ``nonzero`` of packing (one graph, no break); the first step of each batch size and precision compiles. Not
  used by `mmctr train` yet: this measures whether fusing the step's small kernels pays where a step is
  launch-bound (a GPU at batch 8192).

fp32 and ``torch.autocast(<device>, dtype=torch.bfloat16)``; CPU, or CUDA when available. The speed-up column
is against the first path named.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from mmctr_ray.config import load_config
from mmctr_ray.features import FeatureMap, history_mask
from mmctr_ray.layers.attention import DINAttention
from mmctr_ray.model import DINModel

CONFIG = Path(__file__).parent.parent / "configs" / "baseline.yaml"
N_ITEMS, TAG_VOCAB, VEC_DIM = 91_717, 11_740, 128


def padded_din(module: DINAttention, target, history, mask):
    """DIN attention over every position (the concatenation MLP), scores × mask."""
    b, length, d = history.shape
    t = target.unsqueeze(1).expand(-1, length, -1)
    concat = torch.cat([t, history, t - history, t * history], dim=-1).reshape(b * length, 4 * d)
    hidden = module.rest(module.first_drop(module.first_act(module.first(concat))))
    return torch.einsum("bl,bld->bd", hidden.view(b, length) * mask.to(hidden.dtype), history.to(hidden.dtype))


def unpacked_forward(model: DINModel, batch: dict[str, torch.Tensor], textbook: bool) -> torch.Tensor:
    """The model with all B×L history positions embedded; attention padded (textbook) or masked."""
    seq = batch["item_seq"]
    target = model.item_embedding(batch["item_id"])  # (B, R)
    history = model.item_embedding(seq)  # (B, L, R)
    side = model.side_embedding(batch["likes_level"], batch["views_level"], batch.get("user_id"))
    sequence = (lambda *a: padded_din(model.sequence, *a)) if textbook else model.sequence
    pooled = sequence(target, history, history_mask(seq))  # (B, R)
    b, d = target.shape[0], model.cfg.embedding_dim
    fields = torch.cat([side, target.view(b, -1, d), pooled.to(target.dtype).view(b, -1, d)], dim=1)
    return model.head(*model.interaction(fields))


_COMPILED: dict[int, Callable] = {}


def compiled_forward(model: DINModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if id(model) not in _COMPILED:
        import torch._dynamo

        torch._dynamo.config.capture_dynamic_output_shape_ops = True  # pack's nonzero: traced, not a graph break
        torch._dynamo.config.capture_scalar_outputs = True
        _COMPILED[id(model)] = torch.compile(model, dynamic=True)
    return _COMPILED[id(model)](batch)


PATHS: dict[str, Callable[[DINModel, dict], torch.Tensor]] = {
    "packed": lambda m, b: m(b),
    "embed_all": lambda m, b: unpacked_forward(m, b, textbook=False),
    "padded": lambda m, b: unpacked_forward(m, b, textbook=True),
    "compiled": compiled_forward,
}


def make_batch(size: int, max_len: int, rng: np.random.Generator, dev: str) -> dict[str, torch.Tensor]:
    lengths = np.clip(3 + np.rint(np.exp(np.log(3.0) + rng.standard_normal(size))), 3, max_len)
    seq = rng.integers(1, N_ITEMS + 1, (size, max_len))
    seq[np.arange(max_len)[None, :] < (max_len - lengths)[:, None]] = 0
    cols = {"item_id": rng.integers(1, N_ITEMS + 1, size), "item_seq": seq,
            "likes_level": rng.integers(0, 10, size), "views_level": rng.integers(0, 10, size)}
    out = {k: torch.as_tensor(v, device=dev) for k, v in cols.items()}
    out["label"] = torch.as_tensor(rng.integers(0, 2, size), dtype=torch.float32, device=dev)
    return out


def step_seconds(model: DINModel, path: str, batch: dict, bf16: bool, repeats: int, dev: str) -> float:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        amp = torch.autocast(dev, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with amp:
            logits = PATHS[path](model, batch)
        torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), batch["label"]).backward()

    step()  # warm-up
    times = []
    for _ in range(repeats):  # the fastest step: the least disturbed by other work on a shared machine
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[2048, 8192])
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paths", nargs="+", choices=list(PATHS), default=["embed_all", "packed"])
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(0)
    cfg = load_config(CONFIG)
    fmap = FeatureMap(num_items=N_ITEMS, tag_vocab=TAG_VOCAB, tags_per_item=5, vector_dim=VEC_DIM, num_users=0)
    tags = torch.as_tensor(rng.integers(0, TAG_VOCAB, (N_ITEMS + 1, 5)))
    vectors = torch.as_tensor(rng.standard_normal((N_ITEMS + 1, VEC_DIM)), dtype=torch.float32)
    tags[0], vectors[0] = 0, 0
    torch.manual_seed(0)
    model = DINModel(cfg.model, fmap, tags, vectors).to(dev)

    probe = make_batch(512, args.max_len, rng, dev)
    model.eval()
    with torch.no_grad():
        ref = PATHS["padded"](model, probe)
        diffs = {p: (PATHS[p](model, probe) - ref).abs().max().item() for p in args.paths}
    model.train()
    print(f"device {dev}, threads {torch.get_num_threads()}, max_len {args.max_len}; "
          f"max |logit - padded| (eval, fp32): " + ", ".join(f"{p} {d:.1e}" for p, d in diffs.items()))
    print(f"{'precision':>9} {'batch':>6} {'path':>10} {'real':>6} {'ms/step':>9} {'rows/s':>9} {'speed-up':>8}")
    for precision in args.precision:
        for size in args.batch:
            batch = make_batch(size, args.max_len, rng, dev)
            real = history_mask(batch["item_seq"]).float().mean().item()
            secs = {p: step_seconds(model, p, batch, precision == "bf16", args.repeats, dev) for p in args.paths}
            for path, sec in secs.items():
                print(f"{precision:>9} {size:>6} {path:>10} {real:>6.3f} {sec * 1e3:>9.1f} {size / sec:>9,.0f} "
                      f"{secs[args.paths[0]] / sec:>7.2f}x", flush=True)


if __name__ == "__main__":
    main()
