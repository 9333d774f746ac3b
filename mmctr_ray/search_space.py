"""The ``search:`` section of an experiment YAML: what ``mmctr tune`` samples, declared as data.

Example (``configs/search_tiny.yaml`` is a complete one)::

    search:
      num_samples: 20          # trials
      max_epochs: 3            # each trial's epoch cap (ASHA cuts only at epochs before it)
      grace_period: 1          # epochs every trial gets before ASHA may stop it
      reduction_factor: 3
      seed: 2025               # TPE sampler seed
      startup_trials: 10       # trials drawn at random before TPE models the results (Optuna's default)
      space:                   # parameter → one of {choice: [...]}, {int: [lo, hi]}, {float: [lo, hi]}
        fusion.strategy: {choice: [given, v1, v2, v3, v4]}
        fusion.text_dim: {int: [8, 128], log: true, when: {fusion.strategy: [v4]}}
        model.crossnet: {choice: ["off", v1, v2]}
        model.cross_layers: {int: [1, 4], when: {model.crossnet: [v1, v2]}}
        train.lr: {float: [1.0e-4, 3.0e-3], log: true}

Every parameter is a config key (``section.key``) and is sampled in the order written (a parameter always
after those its ``when`` names); ``when`` makes it conditional on other parameters (Optuna's define-by-run),
so PCA sizes are sampled only for the strategies that use them. Choices may be lists
(``model.dnn_units: {choice: [[512, 256], [256, 128]]}``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmctr_ray.config import (FUSION_WIDTHS, ConfigError, ExperimentConfig, apply_override, from_dict, is_valid,
                              override_key, read_yaml)

KINDS = ("choice", "int", "float")
PARAM_KEYS = {*KINDS, "log", "step", "when"}
SEARCH_KEYS = ("num_samples", "max_epochs", "grace_period", "reduction_factor", "seed", "startup_trials", "space")


@dataclass(frozen=True)
class Param:
    """One searched config key: ``kind`` is choice/int/float; ``when`` maps earlier keys to allowed values."""

    key: str
    kind: str
    values: tuple[Any, ...]  # choices, or (low, high)
    log: bool = False
    step: float | None = None
    when: tuple[tuple[str, tuple[Any, ...]], ...] = ()

    def active(self, sampled: dict[str, Any]) -> bool:
        return all(k in sampled and sampled[k] in allowed for k, allowed in self.when)

    def suggest(self, trial: Any) -> Any:
        """Ask an ``optuna.Trial`` for this parameter's value."""
        if self.kind == "choice":
            encoded = [_encode(v) for v in self.values]
            return _decode(trial.suggest_categorical(self.key, encoded))
        low, high = self.values
        if self.kind == "int":
            return trial.suggest_int(self.key, low, high, log=self.log, step=int(self.step or 1))
        return trial.suggest_float(self.key, low, high, log=self.log, step=self.step)


def _encode(v: Any) -> Any:
    """Optuna's categorical choices must be primitives: lists travel as JSON text."""
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else v


def _decode(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) and v[:1] in "[{" else v


@dataclass(frozen=True)
class SearchSpace:
    """The parsed ``search:`` section."""

    params: tuple[Param, ...]
    num_samples: int = 20
    max_epochs: int = 3
    grace_period: int = 1
    reduction_factor: int = 3
    seed: int = 2025
    startup_trials: int = 10  # TPE's: drawn at random before it models the results (Optuna's n_startup_trials)
    base: dict[str, Any] = field(default_factory=dict)  # the rest of the YAML: the config every trial starts from

    @property
    def prunes(self) -> bool:
        """Whether ASHA has an epoch before the last to stop trials at (else every trial runs to its end)."""
        return self.grace_period < self.max_epochs

    def define_by_run(self, trial: Any) -> None:
        """Optuna define-by-run function: suggests each active parameter in order (no computation)."""
        sampled: dict[str, Any] = {}
        for p in self.params:
            if p.active(sampled):
                sampled[p.key] = p.suggest(trial)

    def fusion_axes(self) -> int:
        """The widest PCA part any trial can ask for (the search's PCA cache keeps that many axes of each fit): the
        highest value of every searched ``fusion.dims``, ``fusion.text_dim`` and ``fusion.image_dim``, and the base
        config's size of each of them that some trial can use unsampled (a strategy the search can pick uses it,
        and it is not searched whenever such a strategy is: its ``when`` holds only ``fusion.strategy`` values
        covering every such strategy)."""
        from mmctr_ray.fusion import PARTS, width_fields  # which strategy reads which size

        base = self.trial_config({}).fusion
        by_key = {p.key: p for p in self.params}
        picked = by_key.get("fusion.strategy")
        strategies = set(picked.values) if picked is not None else {base.strategy}
        if picked is not None and picked.when:  # trials where it is not sampled keep the base's
            strategies.add(base.strategy)
        widths = []
        for size in FUSION_WIDTHS:
            users = {s for s in PARTS if size in width_fields(s)} & strategies
            if not users:
                continue  # no trial reads this size
            p = by_key.get(f"fusion.{size}")
            if p is not None:
                widths += [int(v) for v in p.values]
                when = dict(p.when)
                if not (set(when) - {"fusion.strategy"}) and users <= set(when.get("fusion.strategy", users)):
                    continue  # sampled by every trial that reads it
            widths.append(getattr(base, size))
        return max(widths, default=max(base.dims, base.text_dim, base.image_dim))

    def fused_sizes(self) -> dict[str, dict[str, list[tuple[int, str]]]]:
        """What trials that fuse their own table (:func:`mmctr_ray.tuning._fits_in_trial`) can ask each strategy's
        PCA parts for: ``{strategy: {size field: [(value, where it comes from), ...]}}``, a searched size's
        bounds (``search.space.fusion.dims``) and the base config's size where some trial of the strategy uses it
        unsampled (``fusion.dims``)."""
        from mmctr_ray.fusion import PARTS

        base = self.trial_config({})
        by_key = {p.key: p for p in self.params}
        picked = by_key.get("fusion.strategy")
        strategies = set(picked.values) if picked is not None else set()
        searches_fusion = any(p.key.startswith("fusion.") for p in self.params)
        if (picked is None or picked.when) and (searches_fusion or base.data.item_vector == "given"):
            strategies.add(base.fusion.strategy)  # trials that keep the base's strategy and fuse its table
        sizes: dict[str, dict[str, list[tuple[int, str]]]] = {}
        for strategy in sorted(strategies & set(PARTS)):
            for _, _, size in PARTS[strategy]:
                drawn = sizes.setdefault(strategy, {}).setdefault(size, [])
                p = by_key.get(f"fusion.{size}")
                when = dict(p.when) if p is not None else {}
                if p is not None and strategy in when.get("fusion.strategy", [strategy]):
                    drawn += [(int(max(p.values)), f"search.space.fusion.{size}")]
                    if set(when) <= {"fusion.strategy"}:
                        continue  # sampled by every trial of this strategy
                drawn.append((getattr(base.fusion, size), f"fusion.{size}"))
        return sizes

    def trial_config(self, params: dict[str, Any]) -> ExperimentConfig:
        """The base config with the sampled ``params`` (flat ``section.key`` names) applied, checked."""
        raw = json.loads(json.dumps(self.base))
        for key, value in params.items():
            section, name = key.split(".", 1)
            raw.setdefault(section, {})[name] = _decode(value)
        raw.setdefault("train", {})["epochs"] = self.max_epochs
        return from_dict(raw)


def _param(key: str, spec: Any, keys: list[str], where: str) -> Param:
    at = f"{where}: search.space.{key}"
    if not isinstance(spec, dict) or len([k for k in spec if k in KINDS]) != 1:
        raise ConfigError(f"{at}: expected a mapping with exactly one of {', '.join(KINDS)}")
    unknown = set(spec) - PARAM_KEYS
    if unknown:
        raise ConfigError(f"{at}: unknown key {sorted(unknown)[0]} (known: {', '.join(sorted(PARAM_KEYS))})")
    kind = next(k for k in spec if k in KINDS)
    values = spec[kind]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{at}: {kind} expects a non-empty list")
    if kind != "choice" and (len(values) != 2 or not all(isinstance(v, (int, float)) for v in values)
                             or values[0] >= values[1]):
        raise ConfigError(f"{at}: {kind} expects [low, high] with low < high, got {values}")
    if kind == "int" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{at}: int expects integer bounds, got {values}")
    if "log" in spec and not isinstance(spec["log"], bool):  # the string 'false' is truthy: lr went log-scaled
        raise ConfigError(f"{at}: log expects true or false, got {spec['log']!r}")
    if spec.get("log") and kind == "choice":
        raise ConfigError(f"{at}: log applies to int and float ranges, not to choice (which samples its values "
                          f"as listed)")
    if spec.get("log") and kind != "choice" and values[0] <= 0:
        raise ConfigError(f"{at}: log: true expects a positive low bound, got {values}")
    if spec.get("log") and spec.get("step") is not None:
        raise ConfigError(f"{at}: log and step cannot be combined (Optuna samples one or the other)")
    step = spec.get("step")
    if step is not None and (kind == "choice" or isinstance(step, bool) or not isinstance(step, (int, float))
                             or step <= 0 or (kind == "int" and not isinstance(step, int))):
        raise ConfigError(f"{at}: step expects a positive {'integer' if kind == 'int' else 'number'} for an int or "
                          f"float range, got {step!r}")
    if step is not None and kind != "choice" and step > values[1] - values[0]:
        raise ConfigError(f"{at}: step {step} is wider than the range {values}: only {values[0]} could be drawn")
    if kind == "float":  # YAML reads [1024, 4096] as integers: the bounds' check then missed that a trial draws
        values = [float(v) for v in values]  # 2709.95, which an integer key refuses in every trial
    when = spec.get("when", {})
    if not isinstance(when, dict) or not all(isinstance(v, list) and v for v in when.values()):
        raise ConfigError(f"{at}: when expects a mapping of earlier parameters to non-empty lists of values")
    for dep in when:
        if dep not in keys or dep == key:
            raise ConfigError(f"{at}: when refers to {dep}, which is not another searched parameter")
    return Param(key, kind, tuple(values), bool(spec.get("log", False)), spec.get("step"),
                 tuple((k, tuple(v)) for k, v in when.items()))


def _dependency_order(params: list[Param], where: str) -> list[Param]:
    """The parameters in file order, except that each comes after the ones its ``when`` names."""
    placed: list[Param] = []
    pending = list(params)
    while pending:
        ready = next((p for p in pending if all(dep in {q.key for q in placed} for dep, _ in p.when)), None)
        if ready is None:
            raise ConfigError(f"{where}: search.space: the when conditions of {', '.join(p.key for p in pending)} "
                              f"form a cycle")
        placed.append(ready)
        pending.remove(ready)
    return placed


def _check_key(key: str, where: str) -> None:
    """A searched key must name a field of a config section (``section.name``)."""
    if not isinstance(key, str) or key.count(".") != 1:
        raise ConfigError(f"{where}: search.space.{key}: expected a config key section.name (e.g. model.dropout)")
    section, name = key.split(".")
    if section not in {f.name for f in dataclasses.fields(ExperimentConfig)} or section == "name":
        raise ConfigError(f"{where}: search.space.{key}: unknown config section {section}")
    sub = {f.name for f in dataclasses.fields(ExperimentConfig.__dataclass_fields__[section].default_factory())}
    if name not in sub:
        raise ConfigError(f"{where}: search.space.{key}: unknown config key {section}.{name}")


def _check_values(space: SearchSpace, where: str) -> None:
    """Every value a trial can draw must make a valid config, so a bad one (YAML reads an unquoted ``off`` as
    false; a width the model refuses) fails here, not as errored trials: each choice, each integer of a small int
    range and each bound of a larger range, with the conditions that activate it set to their first allowed value;
    every ``when`` value must be one its parameter can take; ``train.epochs`` is not searched (every trial trains
    ``max_epochs``); ``reduction_factor`` is at least 2 (Ray's ASHA asserts it inside ``tuner.fit()``)."""
    if any(p.key == "train.epochs" for p in space.params):  # trial_config sets it: a sampled value goes unused
        raise ConfigError(f"{where}: search.space.train.epochs: every trial trains search.max_epochs epochs (ASHA "
                          f"stops it earlier); set search.max_epochs instead")
    if space.reduction_factor < 2:
        raise ConfigError(f"{where}: search.reduction_factor={space.reduction_factor}: expected at least 2 (ASHA keeps "
                          f"1/reduction_factor of the trials at each rung)")
    by_key = {p.key: p for p in space.params}
    for p in space.params:
        for key, allowed in p.when:  # a value the parameter it names can never take: p would never be sampled
            parent = by_key[key]
            never = [v for v in allowed if (v not in parent.values if parent.kind == "choice"
                                            else not parent.values[0] <= v <= parent.values[1])]
            if never:
                raise ConfigError(f"{where}: search.space.{p.key}: when {key} is {never[0]!r}, a value {key} "
                                  f"never takes ({'choices' if parent.kind == 'choice' else 'range'} "
                                  f"{list(parent.values)})")
        context = {key: allowed[0] for key, allowed in p.when}
        for value in _drawn(p, most=256):
            try:
                space.trial_config({**context, p.key: _encode(value)})
            except ConfigError as err:
                raise ConfigError(f"{where}: search.space.{p.key}: the value {value!r} gives no valid config "
                                  f"({err})") from None
    _check_pairs(space, where)


def _drawn(p: Param, most: int) -> tuple[Any, ...]:
    """The values of ``p`` a check tries: its choices, each integer of an int range of at most ``most``, or a
    range's two bounds."""
    if p.kind == "int" and (p.values[1] - p.values[0]) // int(p.step or 1) < most:
        return tuple(range(p.values[0], p.values[1] + 1, int(p.step or 1)))
    return tuple(p.values)


def _check_pairs(space: SearchSpace, where: str) -> None:
    """Every two values two parameters can draw together must make a valid config too: the config's rules across
    keys (``item_vector_proj`` a multiple of ``embedding_dim``, the attention width a multiple of ``num_heads``,
    ``min_lr`` at most ``lr``) otherwise failed as errored trials. Two parameters whose ``when`` conditions
    cannot hold together are never drawn together and are skipped."""
    for i, p in enumerate(space.params):
        for q in space.params[i + 1:]:
            allowed: dict[str, list[Any]] = {}  # the values each condition key may take, in the YAML's order
            for key, values in (*p.when, *q.when):
                allowed[key] = [v for v in allowed.get(key, values) if v in values]
            if any(not v for v in allowed.values()):
                continue  # p and q are never active in one trial
            _check_table_with_fusion(p, q, allowed, where)
            context = {k: v[0] for k, v in allowed.items() if k not in (p.key, q.key)}
            for a in (v for v in _drawn(p, most=16) if v in allowed.get(p.key, [v])):
                for b in (v for v in _drawn(q, most=16) if v in allowed.get(q.key, [v])):
                    try:
                        space.trial_config({**context, p.key: _encode(a), q.key: _encode(b)})
                    except ConfigError as err:
                        raise ConfigError(f"{where}: search.space: {p.key}={a!r} with {q.key}={b!r} gives no valid "
                                          f"config ({err}); a trial can draw them together") from None


def _check_table_with_fusion(p: Param, q: Param, allowed: dict[str, list[Any]], where: str) -> None:
    """A trial that draws a ``fusion.*`` key trains on the table it fuses (or, for ``fusion.strategy: given``, on
    the shipped vector), so a fused table it drew as ``data.item_vector`` in the same trial went unused without a
    word: refused where the two can be drawn together (a drawn ``given`` names no table: such a trial fuses)."""
    pair = {p.key: p, q.key: q}
    table, fusion = pair.get("data.item_vector"), next((x for x in (p, q) if x.key.startswith("fusion.")), None)
    if table is None or fusion is None or table.kind != "choice":
        return
    tables = [v for v in table.values if v != "given" and v in allowed.get(table.key, [v])]
    if tables:
        raise ConfigError(f"{where}: search.space: data.item_vector={tables[0]!r} with {fusion.key}: a trial that "
                          f"draws a fusion.* key trains on the table it fuses, not on the one it drew; give them when "
                          f"conditions that keep them apart, or search one of the two")


def _own_space(params: list[Param], base: dict[str, Any], search: dict[str, Any]) -> SearchSpace | None:
    """The space of a search file without the ``--set`` overrides; None when its own settings are not valid."""
    settings = {k: search[k] for k in SEARCH_KEYS if k in search and k != "space"}
    if not is_valid(base) or not all(isinstance(v, int) and not isinstance(v, bool) for v in settings.values()):
        return None
    return SearchSpace(tuple(params), base=base, **settings)


def _passes(check: Any, *args: Any) -> bool:
    """Whether ``check(*args)`` raises no ConfigError."""
    try:
        check(*args)
    except ConfigError:
        return False
    return True


def load_search(path: str | Path, overrides: list[str] | tuple[str, ...] = (), strict: bool = True) -> SearchSpace:
    """Parse the ``search:`` section of ``path``; the other sections (plus ``overrides``) are the base config.
    An override ``search.KEY=V`` (``--set search.max_epochs=2``) sets the search section's own key.
    ``strict=False`` skips the checks of the values trials can draw (:func:`_check_values`): for a search's own
    ``TUNE/search.yaml``, which a report or a resume reads as it is, checked or not when the search began."""
    raw = read_yaml(path)
    where = str(path)
    search = raw.pop("search", None)
    if not isinstance(search, dict) or not isinstance(search.get("space"), dict) or not search["space"]:
        raise ConfigError(f"{where}: expected a search: section with a non-empty space: mapping")
    own_search, own_base = copy.deepcopy(search), copy.deepcopy(raw)  # the file's own: whose mistake an error is
    own_keys = set(own_search)
    for assignment in overrides:  # search.* into the search section (the same dict), the rest into the base
        if assignment.strip().startswith("search.space"):
            raise ConfigError(f"--set {assignment}: the search space is set in the YAML, not with --set")
        apply_override({"search": search} if assignment.strip().startswith("search.") else raw, assignment)
    unknown = sorted(set(search) - set(SEARCH_KEYS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], SEARCH_KEYS, n=1)
        hint = f"did you mean search.{close[0]}?" if close else f"known: {', '.join(SEARCH_KEYS)}"
        whose = where if unknown[0] in own_keys else "--set"
        raise ConfigError(f"{whose}: unknown key search.{unknown[0]} ({hint})")
    try:
        from_dict(raw)  # the base must be a valid config on its own
    except ConfigError as err:
        raise ConfigError(f"{'--set' if overrides and is_valid(own_base) else where}: {err}") from None
    keys = list(search["space"])
    for key in keys:
        _check_key(key, where)
    params = [_param(key, spec, keys, where) for key, spec in search["space"].items()]
    params = _dependency_order(params, where)
    settings = {k: search[k] for k in SEARCH_KEYS if k in search and k != "space"}
    by_set = {override_key(a).removeprefix("search.") for a in overrides if a.strip().startswith("search.")}
    for k, v in settings.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "seed" else 1):
            raise ConfigError(f"{'--set' if k in by_set else where}: search.{k}={v!r}: expected a "
                              f"{'non-negative' if k == 'seed' else 'positive'} integer")
    space = SearchSpace(tuple(params), base=raw, **settings)
    own = _own_space(params, own_base, own_search) if overrides else None  # None: the file's own is no valid space
    if strict:
        try:
            _check_values(space, where)
        except ConfigError as err:
            if own is None or not _passes(_check_values, own, where):
                raise
            raise ConfigError(f"--set{str(err).removeprefix(where)}") from None  # the file's values alone pass
    if space.grace_period > space.max_epochs:
        by_file = own.grace_period > own.max_epochs if own is not None else not by_set & {"grace_period", "max_epochs"}
        whose = where if by_file else "--set"
        raise ConfigError(f"{whose}: search.grace_period={space.grace_period}: expected at most "
                          f"search.max_epochs={space.max_epochs}")
    return space
