"""Cover images → CLIP image vectors with open_clip, from local weights only (nothing is downloaded).

``--image-model ARCH[:WEIGHTS]``: ``ARCH`` is an open_clip architecture name (``RN50``, ``ViT-L-14``, …) or
the path of an open_clip model-config JSON (its file stem becomes the name); ``WEIGHTS`` is a local checkpoint
file. Without ``WEIGHTS`` the model has random weights drawn from ``seed`` (identical in every actor): fine for
tests and for checking a pipeline, meaningless as features; a warning says so.

Covers are decoded and resized in CPU tasks (:func:`decode_covers`) the way the model's published weights were
trained (:func:`preprocessing`: OpenAI CLIP's shortest side to the input size, bicubic, centre crop, unless every
open_clip pretrained tag of the architecture says otherwise, as SigLIP's squash and mean/std of 0.5 do) and
travel as uint8; the encoder actor normalises them on its device. A missing or undecodable cover never fails
the job: its pixels are zeros, its status says why (:data:`MISSING`, :data:`CORRUPT`), the actor skips it, and
its image vector is all zeros with ``image_missing`` set (``mmctr fuse`` then gives such items the mean image
vector).
"""

from __future__ import annotations

import json
import logging
import os
import stat
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from mmctr_ray.errors import ConfigError, first_line

log = logging.getLogger(__name__)
OK, MISSING, CORRUPT = 0, 1, 2  # cover status codes


def parse_image_model(spec: str) -> tuple[str, Path | None, Path | None]:
    """``ARCH[:WEIGHTS]`` → (arch name, model-config JSON or None, weights file or None), checked."""
    arch, _, weights = spec.partition(":")
    config = None
    if arch.endswith(".json"):
        config = Path(arch)
        if not config.is_file():
            raise ConfigError(f"{config}: image model config not found (expected an open_clip model-config JSON)")
        try:
            model_cfg = json.loads(config.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ConfigError(f"{config}: not an open_clip model-config JSON ({first_line(err)})") from None
        text_cfg = model_cfg.get("text_cfg") if isinstance(model_cfg, dict) else None
        if not isinstance(text_cfg, dict) or not isinstance(model_cfg.get("vision_cfg"), dict):
            raise ConfigError(f"{config}: not an open_clip model-config JSON (expected a mapping with vision_cfg and "
                              f"text_cfg)")
        if text_cfg.get("hf_model_name"):
            raise ConfigError(f"{config}: text_cfg.hf_model_name {text_cfg['hf_model_name']!r}: a Hugging Face text "
                              f"tower, which open_clip fetches from the hub when it builds the model (nothing is "
                              f"downloaded here); use a config whose text tower is its own")
        arch = config.stem
    else:
        import open_clip

        if arch not in open_clip.list_models():
            raise ConfigError(f"--image-model {arch!r}: unknown open_clip architecture (e.g. RN50, ViT-B-32, "
                              f"ViT-L-14, or the path of a model-config .json)")
    if config is None and (open_clip.get_model_config(arch) or {}).get("text_cfg", {}).get("hf_model_name"):
        raise ConfigError(f"--image-model {arch!r}: its text tower is a Hugging Face model that open_clip fetches "
                          f"from the hub when it builds the model (nothing is downloaded here); use a CLIP "
                          f"architecture with its own text tower (RN50, ViT-B-32, ViT-L-14, ...)")
    wpath = Path(weights) if weights else None
    if wpath is not None and not wpath.is_file():
        raise ConfigError(f"{wpath}: image model weights not found (expected a local checkpoint file; weights are "
                          f"never downloaded)")
    return arch, (config.resolve() if config else None), (wpath.resolve() if wpath else None)


MAX_ASPECT = 16  # a cover longer than this many times its width is cut to its centre before it is resized
RESIZE_MODES = ("shortest", "squash")  # those of open_clip's that load_cover does (no pretrained tag pads)
INTERPOLATIONS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def preprocessing(spec: str, warn: bool = False) -> dict[str, Any]:
    """How covers are prepared for the model ``spec`` names: ``mean``, ``std``, ``interpolation``, ``resize_mode``.

    open_clip attaches the preprocessing of a pretrained tag only when a model is built by that tag's name; built
    from a local weights file (the only way here) it gets OpenAI CLIP's, which is wrong for weights trained
    otherwise (SigLIP: mean and std 0.5, covers squashed to a square). So: the architecture's, where every
    open_clip pretrained tag of it agrees (SigLIP, CLIPA, ...); else OpenAI CLIP's (RN50, ViT-B-32, a model-config
    JSON; with ``warn``, a warning where the tags disagree, as ViT-L-14's do)."""
    import open_clip
    from open_clip.transform import PreprocessCfg

    arch, config, _ = parse_image_model(spec)
    default = {k: getattr(PreprocessCfg(), k) for k in ("mean", "std", "interpolation", "resize_mode")}

    def key(cfg: dict[str, Any]) -> tuple:
        return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v)
                     for k, v in ((k, cfg.get(k, default[k])) for k in default))

    seen: dict[tuple, list[str]] = {}
    for tag in open_clip.list_pretrained_tags_by_model(arch) if config is None else []:
        seen.setdefault(key(open_clip.get_pretrained_cfg(arch, tag)), []).append(tag)
    out = dict(next(iter(seen))) if len(seen) == 1 else dict(default)
    if len(seen) > 1 and warn:
        other = "; ".join(", ".join(tags) for k, tags in seen.items() if k != key(default))
        log.warning("%s: open_clip's pretrained weights of it were trained with %d preprocessings; covers get "
                    "OpenAI CLIP's (mean %s, %s resize), not that of the tags %s", arch, len(seen),
                    _short(default["mean"]), default["resize_mode"], other)
    out["mean"], out["std"] = [float(v) for v in out["mean"]], [float(v) for v in out["std"]]
    if out["resize_mode"] not in RESIZE_MODES or out["interpolation"] not in INTERPOLATIONS:
        raise ConfigError(f"--image-model {arch}: its open_clip pretrained weights resize covers with resize_mode "
                          f"{out['resize_mode']!r} and interpolation {out['interpolation']!r}; supported here: "
                          f"resize_mode {' or '.join(RESIZE_MODES)}, interpolation {' or '.join(INTERPOLATIONS)}")
    return out


def _short(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.3g}" for v in values) + ")"


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``constants.pkl`` or ``code/``), as OpenAI ships
    its CLIP checkpoints, rather than a state dict."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


class ImageEncoder:
    """The vision tower of an open_clip model; ``encode`` maps uint8 covers (B, S, S, 3) to (B, E) float32.

    Args:
        spec: ``ARCH[:WEIGHTS]`` (see the module docstring).
        device: torch device.
        seed: seeds the random weights when no ``WEIGHTS`` is given.
        bf16: bf16 autocast where ``device`` is CUDA (the CPU always runs fp32).
    """

    def __init__(self, spec: str, device: str = "cpu", seed: int = 0, bf16: bool = True) -> None:
        import open_clip

        arch, config, weights = parse_image_model(spec)
        if config is not None:
            open_clip.add_model_config(config)
        if weights is None:
            log.warning("image model %s has random weights (no :WEIGHTS given): vectors are not CLIP features", arch)
            torch.manual_seed(seed)
        elif "openai" in weights.name.lower() and arch.startswith("ViT") and "quickgelu" not in arch:
            log.warning("%s looks like OpenAI's weights, which were trained with QuickGELU; %s builds GELU: use "
                        "%s-quickgelu", weights.name, arch, arch)
        root, level = logging.getLogger(), logging.getLogger().level
        root.setLevel(logging.ERROR)  # open_clip logs its own "no pretrained weights" on the root logger
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if weights is not None and is_torchscript(weights):
                    # OpenAI's own checkpoints (RN50.pt, ...) are TorchScript archives, which open_clip's
                    # create_model cannot read (it loads with weights_only=True); its OpenAI loader rebuilds the
                    # model from the archive's state dict, with OpenAI's QuickGELU
                    model = open_clip.load_openai_model(str(weights), precision="fp32", device="cpu")
                else:
                    model = open_clip.create_model(arch, pretrained=str(weights) if weights else None)
        finally:
            root.setLevel(level)
        self.visual = model.visual.to(device).eval()
        size = self.visual.image_size
        self.size = int(size if isinstance(size, int) else size[0])
        self.device = torch.device(device)
        self.bf16 = bf16 and self.device.type == "cuda"
        self.preprocess = preprocessing(spec)  # mean/std here; the decode tasks resize as it says
        self.mean = torch.tensor(self.preprocess["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.preprocess["std"], device=self.device).view(1, 3, 1, 1)
        # a timm tower (SigLIP, ConvNeXt, EVA, MobileCLIP) has no output_dim: the model's embed_dim is its width
        self.dim = int(getattr(self.visual, "output_dim", None) or _model_config(spec)["embed_dim"])

    @torch.inference_mode()
    def encode(self, pixels: np.ndarray) -> np.ndarray:
        x = torch.as_tensor(pixels, device=self.device).permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, S, S)
        x = (x - self.mean) / self.std
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            out = self.visual(x)
        if isinstance(out, tuple):  # a tower that also returns its tokens (CoCa): the pooled embedding comes first
            out = out[0]
        return out.float().cpu().numpy()


def check_image_model(spec: str) -> None:
    """Build ``spec``'s vision tower once on the CPU, before Ray starts, when it names weights: weights that do not
    fit the architecture failed inside every encoder actor, as a traceback, after Ray had started; a TorchScript
    archive of another architecture (its own, whatever ``ARCH`` says) would get covers of ``ARCH``'s size."""
    arch, _, weights = parse_image_model(spec)
    if weights is None:
        return  # random weights of the named architecture: nothing to fit
    try:
        encoder = ImageEncoder(spec)
    except ConfigError:
        raise
    except Exception as err:  # open_clip: RuntimeError (shapes), AssertionError, KeyError, ... for a foreign file
        raise ConfigError(f"{weights}: cannot load as --image-model {arch} weights ({type(err).__name__}: "
                          f"{first_line(err)})") from None
    if encoder.size != image_size(spec):
        raise ConfigError(f"{weights}: a model for {encoder.size}-pixel covers, but --image-model names {arch} "
                          f"({image_size(spec)} pixels): name the architecture the weights are for")
    dim = int(_model_config(spec)["embed_dim"])
    if encoder.dim != dim:  # a TorchScript archive of another architecture for covers of the same size
        raise ConfigError(f"{weights}: a model of {encoder.dim}-d image vectors, but --image-model names {arch} "
                          f"({dim}-d): name the architecture the weights are for")


def _model_config(spec: str) -> dict:
    """open_clip's config of the model ``spec`` names (no weights are built)."""
    import open_clip

    arch, config, _ = parse_image_model(spec)
    if config is not None:
        open_clip.add_model_config(config)
    return open_clip.get_model_config(arch)


def image_size(spec: str) -> int:
    """Input side of the model ``spec`` names, read from its config (no weights are built)."""
    size = _model_config(spec)["vision_cfg"]["image_size"]
    return int(size if isinstance(size, int) else size[0])


def _eight_bit(img: Image.Image) -> Image.Image:
    """A 16-bit grayscale cover (PNG; PIL's modes ``I;16*`` and ``I``) scaled to 8 bits: ``convert("RGB")`` clips its
    values at 255, and one decoded as 99% white, status OK."""
    if img.mode.startswith("I;16") or (img.mode == "I" and img.getextrema()[1] > 255):
        scaled = np.asarray(img, dtype=np.float64) / 257.0  # 65535 → 255
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    return img


def load_cover(path: Path, size: int, resize_mode: str = "shortest",
               interpolation: str = "bicubic") -> tuple[np.ndarray, int]:
    """One cover → (size, size, 3) uint8 and its status; zeros when missing or undecodable. ``resize_mode``
    ``shortest``: the short side to ``size``, then the centre crop; ``squash``: both sides to ``size``."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a folder or a FIFO named N.jpg is no cover file, as embed's
            raise FileNotFoundError(path)  # pre-check counts it (a FIFO's open blocked the decode task for good)
        with Image.open(path) as img:
            img = _eight_bit(img).convert("RGB")
            if resize_mode == "squash":
                return np.asarray(img.resize((size, size), INTERPOLATIONS[interpolation]), dtype=np.uint8), OK
            w, h = img.size
            short, long = min(w, h), max(w, h)
            if long > MAX_ASPECT * short:  # a strip (1 x 50,000 px): resized whole it took gigabytes, or the task;
                keep, off = MAX_ASPECT * short, (long - MAX_ASPECT * short) // 2  # only its centre is kept anyway
                img = img.crop((off, 0, off + keep, h) if w > h else (0, off, w, off + keep))
                w, h = img.size
                short, long = min(w, h), max(w, h)
            side = (size, int(size * long / short))  # as torchvision's Resize(size): the long side truncated
            img = img.resize(side if w <= h else side[::-1], INTERPOLATIONS[interpolation])
            left, top = int(round((img.width - size) / 2)), int(round((img.height - size) / 2))  # CenterCrop
            return np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8), OK
    except FileNotFoundError:
        return np.zeros((size, size, 3), dtype=np.uint8), MISSING
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return np.zeros((size, size, 3), dtype=np.uint8), CORRUPT


def decode_covers(item_ids: np.ndarray, images_dir: str, size: int, resize_mode: str = "shortest",
                  interpolation: str = "bicubic") -> tuple[np.ndarray, np.ndarray]:
    """Covers of ``item_ids`` (``{images_dir}/{id}.jpg``) → pixels (B, size, size, 3) uint8, status (B,) int8."""
    pixels = np.empty((len(item_ids), size, size, 3), dtype=np.uint8)
    status = np.empty(len(item_ids), dtype=np.int8)
    root = Path(images_dir)
    for i, item in enumerate(item_ids):
        pixels[i], status[i] = load_cover(root / f"{int(item)}.jpg", size, resize_mode, interpolation)
    return pixels, status
