"""Experiment configuration: frozen dataclasses loaded strictly from YAML.

One YAML file per experiment, with the sections ``data``, ``fusion``, ``model`` and ``train``. Every key a
file may set is a field below; an unknown key is an error that names it (with the closest known key), a
value of the wrong type or out of range is an error that names the key and what was expected. ``--set
section.key=value`` on the command line overrides one value (the value is parsed as YAML: ``8192``,
``1e-3``, ``true``, ``[512, 256]``). The resolved config is saved with every artifact.

Example:
    >>> cfg = load_config("configs/tiny.yaml", overrides=["train.batch_size=256"])
    >>> cfg.train.batch_size
    256
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mmctr_ray import storage
from mmctr_ray.errors import ConfigError, first_line  # ConfigError re-exported


class _Loader(yaml.SafeLoader):
    """Safe YAML with YAML 1.2 scalars: only true/false are booleans (``bilinear: off`` stays the string
    "off", not False) and ``1e-3`` is a float (PyYAML's YAML 1.1 reads it as a string)."""


def _core_schema(tag: str, pattern: str, first: str) -> None:
    """``tag``'s plain scalars as the YAML 1.2 core schema reads them (``pattern``; ``first``: the characters such a
    scalar starts with), in place of PyYAML's YAML 1.1 resolver of ``tag`` (SafeLoader's own left as they are)."""
    _Loader.yaml_implicit_resolvers = {ch: [(t, rx) for t, rx in resolvers if t != tag]
                                       for ch, resolvers in _Loader.yaml_implicit_resolvers.items()}
    _Loader.add_implicit_resolver(tag, re.compile(pattern), list(first))


# only true/false are booleans (1.1: yes, no, on, off too)
_core_schema("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF")
# floats: 1.5, .5, 1e-3, .inf, .nan (1.1 read 1:30.0 as 90.0 and 1_0.5 as 10.5; 1e-3 as a string)
_core_schema("tag:yaml.org,2002:float", r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
                                        r"|[-+]?[0-9]+[eE][-+]?[0-9]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
             "-+0123456789.")
# integers: decimal (with _ separators), 0o octal, 0x hex (1.1 read 010 as 8, 1:30 as 90)
_INT = "tag:yaml.org,2002:int"
_core_schema(_INT, r"^(?:[-+]?[0-9][0-9_]*|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789")


def _int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")  # 16_384 as PyYAML reads it
    return int(text, 0) if text.startswith(("0o", "0x")) else int(text, 10)  # 010 is ten


_Loader.add_constructor(_INT, _int)


def _mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    """A mapping whose keys are unique: a second ``train:`` section or ``lr:`` key would silently replace the
    first, so it is an error at its line."""
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys the mapping's own may override
            continue
        key = loader.construct_object(key_node, deep=deep)
        if not isinstance(key, collections.abc.Hashable):  # SafeLoader's own error, before `in seen` fails
            raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                    "found unhashable key", key_node.start_mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                        lambda loader, node: dict(_mapping(loader, node, deep=True)))


class _Dumper(yaml.SafeDumper):
    """Writes what :class:`_Loader` reads back the same: a string that would load as a number or a boolean
    there (``1e3``, ``0o17``) is quoted."""


# a string either reader takes for something else is quoted: this module's (1e3, 0o17) and plain YAML 1.1's
# (off, yes, 1_000), so a saved config also reads back the same with yaml.safe_load
_Dumper.yaml_implicit_resolvers = {
    ch: [*yaml.SafeDumper.yaml_implicit_resolvers.get(ch, []), *_Loader.yaml_implicit_resolvers.get(ch, [])]
    for ch in {*yaml.SafeDumper.yaml_implicit_resolvers, *_Loader.yaml_implicit_resolvers}}


def safe_dump(data: Any) -> str:
    """YAML text of ``data`` that :func:`safe_load` reads back equal (keys in the order given)."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def safe_load(text: str) -> Any:
    """Parse YAML text safely (no object construction) with YAML 1.2 booleans and floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506  (_Loader is a SafeLoader)


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected {expected}")


@dataclass(frozen=True)
class DataConfig:
    """How the splits become model inputs.

    Attributes:
        max_len: history length L kept per row (the most recent items); the challenge baseline keeps 64.
        item_vector: the frozen multimodal item vector: ``given`` (item_info's ``item_emb_d128``) or the
            path of a fused ``item_emb.parquet`` written by ``mmctr fuse``.
    """

    max_len: int = 64
    item_vector: str = "given"

    def __post_init__(self) -> None:
        _check(1 <= self.max_len <= 100, "data.max_len", self.max_len, "an integer in 1..100")
        _check(bool(self.item_vector), "data.item_vector", self.item_vector, "'given' or a parquet path")


FUSION_STRATEGIES = ("given", "v1", "v2", "v3", "v4")
FUSION_WIDTHS = ("dims", "text_dim", "image_dim")  # the fusion section's PCA widths (which strategy uses which: PARTS)


@dataclass(frozen=True)
class FusionConfig:
    """How BERT and CLIP item vectors are reduced and combined (README, "Item embeddings and fusion").

    Attributes:
        strategy: ``given`` | ``v1`` (PCA text) | ``v2`` (PCA image) | ``v3`` (PCA of text‖image) |
            ``v4`` (PCA text ‖ PCA image).
        dims: output width for v1, v2, v3.
        text_dim: PCA width of the text part for v4.
        image_dim: PCA width of the image part for v4.
    """

    strategy: str = "given"
    dims: int = 128
    text_dim: int = 64
    image_dim: int = 64

    def __post_init__(self) -> None:
        _check(self.strategy in FUSION_STRATEGIES, "fusion.strategy", self.strategy,
               "one of " + ", ".join(FUSION_STRATEGIES))
        for name in FUSION_WIDTHS:
            _check(getattr(self, name) >= 1, f"fusion.{name}", getattr(self, name), "a positive integer")

    @property
    def vector_dim(self) -> int:
        """Width of the item vectors this fusion trains on: the sum of the PCA widths its strategy reads
        (``given``: item_emb_d128's, as the layout ships it)."""
        if self.strategy == "given":
            from mmctr_ray.schema import GIVEN_EMB_DIM

            return GIVEN_EMB_DIM
        return sum(getattr(self, field) for field in _width_fields(self.strategy))


ATTENTIONS = ("din", "multihead")
BILINEAR_TYPES = ("off", "field_all", "field_each", "field_interaction")
CROSSNET_TYPES = ("off", "v1", "v2")
ACTIVATIONS = ("relu", "prelu", "gelu", "dice")


@dataclass(frozen=True)
class ModelConfig:
    """The DIN family (README, "The model"; the paper: arXiv 2504.18961); each interaction module is switchable.

    Attributes:
        embedding_dim: D, width of every id/tag/level embedding.
        item_vector_proj: width of the trainable projection of the frozen item vector (no bias).
        item_vector_rms: above 0, the frozen item vectors are scaled by one factor to this root mean square (over
            items and dimensions) before the projection; 0 (the challenge baseline) feeds them as they are. The
            paper configs use 0.4, about the shipped ``item_emb_d128``'s RMS on the synthetic data (0.395): PCA
            tables of `mmctr fuse` are 2.5-5x that (the fewer components, the larger), and CrossNet and bilinear
            interaction raise the scale to a power (a search trial on an unscaled v4 table started with logits of
            standard deviation 4.5e4; 0.04 at 0.4).
        use_tags: mean-pool the item's tag embeddings into the item representation.
        use_user_id: add a user-id embedding field (off in the challenge baseline).
        embedding_init_std: embeddings are initialised normal(0, std).
        use_history: attend over the click history (off: the pooled-history fields are zeros; an ablation).
        attention: ``din`` (MLP over [t, h, t-h, t*h], no softmax) or ``multihead`` (target attention).
        attention_units: hidden widths of the DIN attention MLP.
        attention_activation: activation of the DIN attention MLP.
        attention_dropout: dropout inside the attention module.
        num_heads: H for multi-head target attention.
        senet: squeeze-and-excitation over the field embeddings.
        senet_ratio: SENet reduction ratio.
        bilinear: ``off`` or the FiBiNET bilinear type.
        crossnet: ``off``, ``v1`` or ``v2`` (DCN / DCN-v2).
        cross_layers: number of cross layers when ``crossnet`` is on.
        dnn_units: hidden widths of the DNN head.
        dnn_activation: activation of the DNN head.
        batch_norm: batch norm in the DNN head.
        dropout: dropout in the DNN head.
    """

    embedding_dim: int = 64
    item_vector_proj: int = 128
    item_vector_rms: float = 0.0
    use_tags: bool = True
    use_user_id: bool = False
    embedding_init_std: float = 1e-4
    use_history: bool = True
    attention: str = "din"
    attention_units: tuple[int, ...] = (512, 256)
    attention_activation: str = "relu"
    attention_dropout: float = 0.1
    num_heads: int = 4
    senet: bool = False
    senet_ratio: int = 3
    bilinear: str = "off"
    crossnet: str = "off"
    cross_layers: int = 3
    dnn_units: tuple[int, ...] = (1024, 512, 256)
    dnn_activation: str = "relu"
    batch_norm: bool = True
    dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "item_vector_proj", "num_heads", "senet_ratio"):
            _check(getattr(self, name) >= 1, f"model.{name}", getattr(self, name), "a positive integer")
        _check(self.embedding_init_std > 0, "model.embedding_init_std", self.embedding_init_std, "> 0")
        _check(self.item_vector_rms >= 0, "model.item_vector_rms", self.item_vector_rms, ">= 0 (0: as given)")
        _check(self.attention in ATTENTIONS, "model.attention", self.attention, "one of " + ", ".join(ATTENTIONS))
        _check(self.bilinear in BILINEAR_TYPES, "model.bilinear", self.bilinear,
               "one of " + ", ".join(BILINEAR_TYPES))
        _check(self.crossnet in CROSSNET_TYPES, "model.crossnet", self.crossnet,
               "one of " + ", ".join(CROSSNET_TYPES))
        _check(0 <= self.cross_layers <= 16, "model.cross_layers", self.cross_layers, "an integer in 0..16")
        for name in ("dnn_activation", "attention_activation"):
            _check(getattr(self, name) in ACTIVATIONS, f"model.{name}", getattr(self, name),
                   "one of " + ", ".join(ACTIVATIONS))
        # the item representation is cut into D-wide fields for SENet and bilinear interaction
        _check(self.item_vector_proj % self.embedding_dim == 0, "model.item_vector_proj", self.item_vector_proj,
               f"a multiple of model.embedding_dim={self.embedding_dim}")
        for name in ("attention_units", "dnn_units"):
            units = getattr(self, name)
            _check(len(units) >= 1 and all(u >= 1 for u in units), f"model.{name}", list(units),
                   "a non-empty list of positive integers")
        for name in ("dropout", "attention_dropout"):
            _check(0.0 <= getattr(self, name) < 1.0, f"model.{name}", getattr(self, name), "a value in [0, 1)")
        if self.attention == "multihead":
            _check(self.item_dim % self.num_heads == 0, "model.num_heads", self.num_heads,
                   f"a divisor of the item representation width {self.item_dim}")

    @property
    def item_dim(self) -> int:
        """Width of the unified item representation: id ‖ tags ‖ projected item vector."""
        return self.embedding_dim * (2 if self.use_tags else 1) + self.item_vector_proj


OPTIMIZERS = ("adam", "adamw")
PRECISIONS = ("auto", "fp32", "bf16")
RESIDENT_MODES = ("auto", "on", "off")


def worker_batch(batch_size: int, workers: int) -> int:
    """The rows of one worker's training step: ``train.batch_size`` split over the run's workers (at least 1)."""
    return max(1, batch_size // workers)


@dataclass(frozen=True)
class TrainConfig:
    """The training schedule (the challenge baseline's by default).

    Attributes:
        batch_size: training rows per step, over all workers.
        eval_batch_size: rows per step in validation and prediction.
        epochs: upper bound on epochs (early stopping usually ends sooner).
        optimizer: ``adam`` or ``adamw``.
        lr: initial learning rate.
        lr_decay: factor applied to the learning rate after a non-improving epoch.
        min_lr: floor of the learning rate.
        patience: stop after this many non-improving epochs.
        embedding_l2: L2 penalty on embedding tables only.
        weight_decay: the optimizer's weight decay on every trainable parameter: decoupled for ``adamw``,
            added to the gradients (coupled with Adam's moments) for ``adam``. 0 by default: the baseline
            regularises the embedding tables only (``embedding_l2``); before it was a key, ``adamw`` applied
            torch's default of 0.01 without a word.
        grad_clip: gradient clipping max norm (0 disables).
        seed: seed for weights and data order.
        precision: ``auto`` (bf16 autocast on CUDA, fp32 on CPU), ``fp32`` or ``bf16``.
        shuffle_buffer: rows in each worker's local shuffle buffer (0: read order).
        deterministic: read the training split in file order (Ray Data's V1 reader, whatever the split's size,
            and ``preserve_order``), so that the seed alone fixes the order of the rows each epoch, for some
            throughput. On the CPU such a run repeats bit
            for bit, resumed or restarted after a worker died too (dropout is seeded per epoch), unless
            ``resident`` is ``on``; on CUDA it does not (``index_add``, the backward of the model's gathers, adds
            with atomics there).
        resident: after the first epoch, keep each worker's shard of the training split (and rank 0's
            validation split) in device memory and shuffle it there, instead of streaming it from Ray Data
            every epoch (:mod:`mmctr_ray.resident`): ``auto`` up to ``resident_max_mib`` on CUDA and 256 MiB on
            CPU, not in deterministic runs; ``on`` up to ``resident_max_mib`` on any device; ``off`` never. A
            shard over the budget streams every epoch. With ``shuffle_buffer: 0`` a kept shard keeps read order.
        resident_max_mib: the budget per worker, MiB (on CUDA also at most half the free device memory and half
            the worker's share of the device; on CPU at most half the host memory available, within its cgroup's
            limit, split between the node's training processes).
        keep_freed_memory: let a CPU training worker (and a CPU scoring actor of ``mmctr predict`` for this run)
            keep the memory each step frees for the next step instead of handing it back to the kernel, which
            zeroes fresh pages for every step (glibc's malloc tunables in their environment,
            :mod:`mmctr_ray.host_malloc`): faster on the CPU for a higher peak RSS. ``false`` leaves the
            allocator as it is; GPU workers and actors are left as they are.
    """

    batch_size: int = 8192
    eval_batch_size: int = 16384
    epochs: int = 100
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_decay: float = 0.1
    min_lr: float = 1e-6
    patience: int = 3
    embedding_l2: float = 1e-6
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    seed: int = 2025
    precision: str = "auto"
    shuffle_buffer: int = 65_536
    deterministic: bool = False
    resident: str = "auto"
    resident_max_mib: int = 8192
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size", "epochs", "patience"):
            _check(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "a positive integer")
        _check(self.optimizer in OPTIMIZERS, "train.optimizer", self.optimizer, "one of " + ", ".join(OPTIMIZERS))
        _check(self.lr > 0, "train.lr", self.lr, "a learning rate > 0")
        _check(0 < self.lr_decay <= 1, "train.lr_decay", self.lr_decay, "a factor in (0, 1]")
        _check(0 <= self.min_lr <= self.lr, "train.min_lr", self.min_lr, f"a value in [0, train.lr={self.lr}]")
        _check(self.embedding_l2 >= 0, "train.embedding_l2", self.embedding_l2, ">= 0")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, ">= 0")
        _check(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, ">= 0 (0 disables clipping)")
        _check(self.precision in PRECISIONS, "train.precision", self.precision, "one of " + ", ".join(PRECISIONS))
        _check(self.shuffle_buffer >= 0, "train.shuffle_buffer", self.shuffle_buffer, ">= 0 rows")
        _check(self.resident in RESIDENT_MODES, "train.resident", self.resident, "one of " + ", ".join(RESIDENT_MODES))
        _check(self.resident_max_mib >= 0, "train.resident_max_mib", self.resident_max_mib, ">= 0 MiB")
        _check(0 <= self.seed < 2**32, "train.seed", self.seed, "an integer in 0..4294967295")


@dataclass(frozen=True)
class ExperimentConfig:
    """One experiment: everything a run needs besides the data directory."""

    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-ready dict (tuples become lists); ``from_dict(to_dict())`` round-trips."""
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the type ``hint`` of field ``key``; convert lists to tuples, ints to floats."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        _check(isinstance(value, dict), key, value, "a mapping of keys")
        return _build(hint, value, key + ".")
    if origin is tuple:
        _check(isinstance(value, (list, tuple)), key, value, "a list")
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(v, inner, key) for v in value)
    if origin in (typing.Union, types.UnionType):
        _check(isinstance(value, str), key, value, "a string")
        return value
    if hint is bool:
        _check(isinstance(value, bool), key, value, "true or false")
        return value
    if hint is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
        return value
    if hint is float:
        _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value), key, value,
               "a finite number")
        return float(value)
    if hint is str:
        _check(isinstance(value, str), key, value, "a string")
        return value
    raise TypeError(f"config field {key} has an unsupported type {hint!r}")


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    values = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    return cls(**values)


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build a config from a plain dict, rejecting unknown keys and bad values by name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    return _build(ExperimentConfig, raw)


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (a's value, b's value)}`` for every leaf where two nested dicts (configs' ``to_dict()``)
    differ, in key order."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out.update(differences(x, y, f"{prefix}{key}."))
        elif x != y:
            out[f"{prefix}{key}"] = (x, y)
    return out


# Keys that do nothing in a config that sets them: a module's own knobs where the module is off, the attention's
# without the history, the fusion widths another strategy uses. A comparison of two configs leaves them out.
_INERT = {
    "model.num_heads": lambda c: not c.model.use_history or c.model.attention != "multihead",
    "model.attention_units": lambda c: not c.model.use_history or c.model.attention != "din",
    "model.attention_activation": lambda c: not c.model.use_history or c.model.attention != "din",
    "model.attention": lambda c: not c.model.use_history,
    "model.attention_dropout": lambda c: not c.model.use_history,
    "model.senet_ratio": lambda c: not c.model.senet,
    "model.cross_layers": lambda c: c.model.crossnet == "off",
    "model.crossnet": lambda c: c.model.cross_layers == 0,  # no cross layer: the model builds no CrossNet
    **{f"fusion.{w}": (lambda c, w=w: w not in _width_fields(c.fusion.strategy)) for w in FUSION_WIDTHS},
}


def _width_fields(strategy: str) -> set[str]:
    """:func:`mmctr_ray.fusion.width_fields` (imported here: fusion imports this module)."""
    from mmctr_ray.fusion import width_fields

    return width_fields(strategy)


def _as_trained(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` with the fusion section it trained with: ``given`` where it trained on the shipped vectors."""
    if cfg.data.item_vector != "given" or cfg.fusion.strategy == "given":
        return cfg
    return dataclasses.replace(cfg, fusion=dataclasses.replace(cfg.fusion, strategy="given"))


def inert_keys(cfg: ExperimentConfig) -> set[str]:
    """The dotted keys that have no effect in ``cfg`` (:data:`_INERT`)."""
    return {key for key, inert in _INERT.items() if inert(cfg)}


def effective_differences(a: ExperimentConfig, b: ExperimentConfig) -> dict[str, tuple[Any, Any]]:
    """:func:`differences` of two trained runs' configs, without the keys either leaves without effect
    (:func:`inert_keys`): a v3 run against a v4 run differs in ``fusion.strategy``, not in the ``fusion.dims`` v4
    never reads. A run on the shipped vectors (``data.item_vector: given``) fused nothing, whatever its fusion
    section says (`train --fusion` and `pipeline` set ``data.item_vector`` to the table they fused): its strategy
    is compared as ``given`` (a v1 run against it: ``fusion.strategy`` v1 against given). Not for a config still to
    run: a pipeline's fusion section with ``data.item_vector: given`` is what it will fuse."""
    a, b = _as_trained(a), _as_trained(b)
    skip = inert_keys(a) | inert_keys(b)
    return {key: pair for key, pair in differences(a.to_dict(), b.to_dict()).items() if key not in skip}


def value_text(value: Any) -> str:
    """A config value as its YAML says it (``false``, ``[64, 32]``, ``null``, ``0.001``, ``din``)."""
    return json.dumps(value) if not isinstance(value, str) else value


def override_key(assignment: str) -> str:
    """The dotted key a ``section.key=value`` override sets (``train.lr`` of ``train.lr = 1e-3``)."""
    return assignment.split("=", 1)[0].strip()


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one ``section.key=value`` override to a raw config dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r}: expected section.key=value")
    text = assignment.split("=", 1)[1]
    keys = override_key(assignment).split(".")
    if not all(keys):
        raise ConfigError(f"override {assignment!r}: expected section.key=value")
    try:
        value = safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {assignment!r}: value is not valid YAML ({err.__class__.__name__})") from None
    node = raw
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {k} is not a section")
        node = child
    node[keys[-1]] = value


def read_yaml(path: storage.Location) -> dict[str, Any]:
    """A YAML file (local path or URI) as a plain mapping (empty file → {}), or a one-line error naming it."""
    where = str(path)
    if not storage.is_file(path):  # a relative path says where it was looked for (a Ray job without --working-dir
        # runs in another folder than the one it was submitted from)
        here = "" if storage.is_uri(path) or Path(where).is_absolute() else f" (relative to {Path.cwd()})"
        raise ConfigError(f"{where}: config file not found{here}")
    try:
        text = storage.read_text(path)
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where}: not UTF-8 text (byte {err.start}: {err.reason}); expected a YAML config") \
            from None
    except OSError as err:
        raise ConfigError(f"{where}: cannot read the config ({first_line(err)})") from None
    try:
        loaded = safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        why = getattr(err, "problem", None) or first_line(err)
        raise ConfigError(f"{where}: invalid YAML{at}: {why}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{where}: expected a mapping of sections (data, fusion, model, train)")
    return loaded


def load_config(path: storage.Location | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Load an experiment YAML (or the defaults when ``path`` is None) and apply ``overrides``.

    A ``search:`` section (read by ``mmctr tune``, see :mod:`mmctr_ray.search_space`) is skipped here: the
    other sections are the experiment a search starts from, and train on their own.

    Raises:
        ConfigError: naming the file and the bad key or value.
    """
    raw = read_yaml(path) if path is not None else {}
    raw.pop("search", None)
    where = str(path) if path is not None else "defaults"
    merged = copy.deepcopy(raw) if overrides else raw  # the file's own, kept to tell whose mistake it is
    try:
        for assignment in overrides:
            apply_override(merged, assignment)
        return from_dict(merged)
    except ConfigError as err:
        if overrides and is_valid(raw):  # the file alone (or the defaults) is fine: an override broke it
            where = "--set"
        raise ConfigError(f"{where}: {err}") from None


def is_valid(raw: dict[str, Any]) -> bool:
    """Whether ``raw`` (a config's sections as a plain dict) builds a valid config: whose mistake an error is."""
    try:
        from_dict(raw)
    except ConfigError:
        return False
    return True


def save_config(cfg: ExperimentConfig, path: storage.Location) -> storage.Location:
    """Write the resolved config as YAML (sorted as declared) to a local path or a storage URI; return it."""
    path = path if storage.is_uri(path) else Path(path)
    storage.write_text(path, safe_dump(cfg.to_dict()))
    return path
