"""What a training checkpoint holds, and how it is written and read (no pickles).

A checkpoint directory (one per epoch, ``RUN/checkpoint_epoch_NNN``; RUN a local path or a storage URI) holds::

    model.pt           model state_dict (tensors only; loaded with torch.load(weights_only=True))
    optimizer.pt       optimizer state_dict (tensors and numbers; weights_only=True)
    state.json         epoch, learning rate, best AUC so far, non-improving epochs, history (every epoch's metrics)
    config.yaml        the resolved experiment config
    feature_map.json   vocabulary sizes the model was built for
    item_source.json   where the item table's frozen vectors came from (given column or fused file)
    files.json         the size of each file above, written last: a checkpoint whose files do not match it
                       (a copy to RUN cut short by a kill, even one that left every name) is not complete

Everything prediction needs is here; the item table itself is rebuilt from the data directory (it is 50 MB
for MicroLens-1M and would otherwise be copied into every epoch's checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterator

from mmctr_ray import storage
from mmctr_ray.config import ExperimentConfig, load_config, save_config
from mmctr_ray.errors import DataError, UserError, first_line
from mmctr_ray.features import FeatureMap
from mmctr_ray.report import EPOCH_NUMBERS, is_number
from mmctr_ray.storage import Location, json_text, nan_for_null

if TYPE_CHECKING:  # torch is imported where tensors are saved or read: a run's driver and a search's trials
    import torch  # read checkpoints' state.json only, and need no torch (~1.2 s and ~470 MB a process)

log = logging.getLogger(__name__)

FILES = ("model.pt", "optimizer.pt", "state.json", "config.yaml", "feature_map.json", "item_source.json")
DIVERGED = "diverged.txt"  # in RUN: why the workers ended the run on a non-finite loss or prediction
BEGAN = "began.txt"  # in RUN of a search's trial with a time budget: when its training began (wall-clock seconds)
MANIFEST = "files.json"


@dataclass
class TrainState:
    """Schedule state carried from epoch to epoch (and across restarts)."""

    epoch: int = 0  # epochs completed
    lr: float = 0.0
    best_auc: float = float("-inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "lr": self.lr, "best_auc": self.best_auc, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs, "history": self.history or []}


def save_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: TrainState, cfg: ExperimentConfig, fmap: FeatureMap, item_source: dict[str, Any]) -> None:
    """Write a checkpoint into ``directory`` (which must exist)."""
    import torch

    torch.save(model.state_dict(), directory / "model.pt")
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    (directory / "state.json").write_text(json_text({**state.to_json(), MANIFEST: True}, indent=2) + "\n")
    save_config(cfg, directory / "config.yaml")
    fmap.to_json(directory / "feature_map.json")
    (directory / "item_source.json").write_text(json_text(item_source, indent=2) + "\n")
    sizes = {name: (directory / name).stat().st_size for name in FILES if (directory / name).is_file()}
    (directory / MANIFEST).write_text(json_text(sizes, indent=2) + "\n")


STATE_NUMBERS = ("epoch", "lr", "best_auc", "best_epoch", "bad_epochs")  # state.json's, beside its history


def _integer(value: Any) -> bool:
    return is_number(value) and isinstance(value, int)


def _schedule_state(state: Any) -> bool:
    """Whether ``state`` (a ``state.json`` parsed) holds what loading and resuming read: the schedule's numbers
    (``best_auc`` null before a finite AUC) and epoch rows whose ``valid_auc`` is a number or null."""
    return (isinstance(state, dict) and all(k in state for k in STATE_NUMBERS)
            and all(_integer(state[k]) for k in ("epoch", "best_epoch", "bad_epochs"))
            and is_number(state["lr"]) and (state["best_auc"] is None or is_number(state["best_auc"]))
            and isinstance(state.get("history", []), list)
            and all(isinstance(row, dict) and "valid_auc" in row
                    and (row["valid_auc"] is None or is_number(row["valid_auc"])) for row in state.get("history", [])))


def read_state(directory: Location) -> dict[str, Any]:
    """A checkpoint's ``state.json``, with the numbers JSON has no token for back (:func:`storage.json_text` wrote
    them as null): NaN in its epoch rows (:data:`EPOCH_NUMBERS`), and -inf for ``best_auc``, the schedule's start
    before any finite AUC (a NaN there would never be beaten)."""
    path = storage.join(directory, "state.json")
    try:
        state = json.loads(storage.read_text(path))
    except ValueError as err:  # JSONDecodeError, or bytes that are not UTF-8: a file training did not write
        raise DataError(f"{path}: not the state.json `mmctr train` writes ({first_line(err)})") from None
    if not _schedule_state(state):
        raise DataError(f"{path}: not the state.json `mmctr train` writes (expected an object of the schedule's "
                        f"{', '.join(STATE_NUMBERS)} and a history that is a list of epoch rows with a valid_auc)")
    if "best_auc" in state and state["best_auc"] is None:
        state["best_auc"] = float("-inf")
    if state.get("history"):
        state["history"] = [nan_for_null(row, EPOCH_NUMBERS) for row in state["history"]]
    return state


def incomplete(directory: Location, skipped: Collection[str] = ()) -> str | None:
    """Why the checkpoint in ``directory`` is not whole (a file missing or of another size than its
    ``files.json`` says, or that manifest unreadable or missing while state.json says it was written), or
    None. Checkpoints written before the manifest existed are judged by their files' presence alone. ``skipped``:
    files a copy left out on purpose (scoring's copy has no optimizer.pt)."""
    sizes = storage.file_sizes(directory)
    if MANIFEST not in sizes:  # not copied yet (Ray copies a checkpoint's files in parallel), or an older format
        missing = [f for f in FILES if f != "optimizer.pt" and f not in sizes]
        if missing:
            return f"{missing[0]} missing"
        state = _json_or_none(storage.join(directory, "state.json"))
        if not isinstance(state, dict):  # not JSON, or JSON but no state: loading it names the file
            return "state.json unreadable"
        return f"{MANIFEST} missing" if state.get(MANIFEST) else None
    expected = _json_or_none(storage.join(directory, MANIFEST))
    if not isinstance(expected, dict) or not all(_integer(size) for size in expected.values()):
        return f"{MANIFEST} unreadable"  # not JSON, or not the {file: bytes} a checkpoint's save writes
    for name, size in expected.items():
        if name not in skipped and sizes.get(name) != size:
            return f"{name} {'missing' if name not in sizes else f'has {sizes[name]} bytes, expected {size}'}"
    return None


def _json_or_none(path: Location) -> Any:
    """The JSON value of the file ``path``, or None where it is not JSON (or not UTF-8)."""
    try:
        return json.loads(storage.read_text(path))
    except ValueError:
        return None


@dataclass
class LoadedCheckpoint:
    """A checkpoint read back: tensors on CPU, config, feature map, item source and schedule state."""

    path: Location
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None
    state: TrainState
    cfg: ExperimentConfig
    fmap: FeatureMap
    item_source: dict[str, Any]


def _tensors(path: Path, name: Location) -> dict[str, Any]:
    """A state dict saved by ``torch.save``, read without running any code it holds (``weights_only``): a file
    holding anything but tensors and plain containers is a one-line error, never executed."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's message is a paragraph: keep its line that names the object
        lines = [x.strip() for x in str(err).splitlines() if x.strip()]
        why = next((x for x in lines if "GLOBAL" in x), lines[-1] if lines else type(err).__name__)
        raise DataError(f"{name}: not a state dict of tensors; refused without running it ({why})") from None
    except (RuntimeError, EOFError, ValueError) as err:  # damaged bytes of a file of the size files.json records:
        # torch's "PytorchStreamReader failed reading zip archive" traceback
        raise DataError(f"{name}: not a readable torch.save file ({first_line(err).split('. ')[0]}): damaged, or "
                        f"not written by `mmctr train`") from None


@contextlib.contextmanager
def _named_as(local: Path, directory: Location) -> Iterator[None]:
    """A user error about a file of the local copy ``local`` of the checkpoint ``directory`` (a URI's temporary
    download) names the checkpoint's own file."""
    try:
        yield
    except UserError as err:
        if storage.local_path(directory) == local or len(err.args) != 1 or not isinstance(err.args[0], str):
            raise
        message = err.args[0]
        for name in FILES:  # a URI's query (?endpoint_override=...) after the file's name, as storage.join puts it
            message = message.replace(str(local / name), str(storage.join(directory, name)))
        raise type(err)(message.replace(str(local), str(directory))) from None


def load_checkpoint(directory: Location, with_optimizer: bool = True) -> LoadedCheckpoint:
    """Read a checkpoint directory (local, or a URI: downloaded to a temporary folder first); a missing file is
    an error naming it. Without ``with_optimizer`` a URI's ``optimizer.pt`` (twice the model's size with Adam) is not
    downloaded: predict loads the checkpoint on the driver and in each actor."""
    skip = () if with_optimizer else ("optimizer.pt",)
    with storage.local_copy(directory, skip) as local:
        for name in ("model.pt", "state.json", "config.yaml", "feature_map.json", "item_source.json"):
            if not (local / name).is_file():
                raise DataError(f"{storage.join(directory, name)}: missing checkpoint file (is this a checkpoint "
                                f"of `mmctr train`?)")
        why = incomplete(local, skip)  # the copy that is loaded, less what it left out
        if why:
            raise DataError(f"{directory}: incomplete checkpoint ({why}): a copy cut short")
        opt_path = local / "optimizer.pt"
        with _named_as(local, directory):  # their one-line errors name the checkpoint's own files
            raw = read_state(local)
            cfg = load_config(local / "config.yaml")
        state = TrainState(**{k: raw[k] for k in ("epoch", "lr", "best_auc", "best_epoch", "bad_epochs", "history")})
        return LoadedCheckpoint(
            path=directory,
            model_state=_tensors(local / "model.pt", storage.join(directory, "model.pt")),
            optimizer_state=(_tensors(opt_path, storage.join(directory, "optimizer.pt"))
                             if with_optimizer and opt_path.is_file() else None),
            state=state,
            cfg=cfg,
            fmap=FeatureMap.from_json(local / "feature_map.json", storage.join(directory, "feature_map.json")),
            item_source=storage.read_json_object(local / "item_source.json", "the item_source.json `mmctr train` "
                                                 "writes", storage.join(directory, "item_source.json")),
        )


PREFIX = "checkpoint_epoch_"


def checkpoint_epoch(path: Location | str) -> int | None:
    """The epoch in a checkpoint directory's name (``.../checkpoint_epoch_003`` → 3); None for another name.

    A URI's query (``s3://b/run/checkpoint_epoch_003?region=x``) is not part of the name."""
    name = storage.basename(path)
    return int(name.removeprefix(PREFIX)) if name.startswith(PREFIX) and name[len(PREFIX):].isdigit() else None


def _in_epoch_order(run_dir: Location) -> list[Location]:
    """The run's checkpoint directories, complete or not, oldest first (by number: epoch 1000 after 999)."""
    epochs = {e: n for n in storage.listdir(run_dir) if (e := checkpoint_epoch(n)) is not None}
    return [storage.join(run_dir, epochs[e]) for e in sorted(epochs)]


_WARNED: set[tuple[str, str]] = set()  # (checkpoint, why) said once a process: a resume looks three times


def _complete(path: Location) -> bool:
    """Whether the checkpoint in ``path`` is whole; a warning says why not (a copy cut short), once."""
    why = incomplete(path)
    if why and (str(path), why) not in _WARNED:
        _WARNED.add((str(path), why))
        log.warning("%s: skipped, incomplete (%s): its copy was cut short", path, why)
    return not why


def epoch_checkpoints(run_dir: Location) -> list[Location]:
    """The run's complete checkpoint directories, oldest first (one cut short while copied is skipped)."""
    return [path for path in _in_epoch_order(run_dir) if _complete(path)]


def kept_checkpoints(run: Location, then: str = "") -> str:
    """What ``run`` keeps of a run that ended early: its epochs' checkpoints, which ``--resume`` continues from;
    ``then`` follows when there is one."""
    epochs = [checkpoint_epoch(c) for c in epoch_checkpoints(run)]
    if not epochs:  # stopped before the first epoch's checkpoint
        return f"{run} holds no checkpoint yet"
    return f"{run} keeps " + (f"the checkpoint of epoch {epochs[0]}" if len(epochs) == 1 else
                              f"the checkpoints of epochs {_span(epochs)}") + then


def latest_checkpoint(run_dir: Location) -> Location | None:
    """The run's newest complete checkpoint directory, or None: :func:`epoch_checkpoints`' last, found newest first
    (one check of completeness per checkpoint cut short, instead of one per epoch of the run)."""
    return next((path for path in reversed(_in_epoch_order(run_dir)) if _complete(path)), None)


def best_checkpoint(run_dir: Location) -> Location:
    """The checkpoint of the epoch with the best validation AUC (the earliest among equals)."""
    best, best_auc = None, float("-inf")
    found = epoch_checkpoints(run_dir)
    for path in found:
        history = read_state(path).get("history") or []
        auc = history[-1]["valid_auc"] if history else float("-inf")
        if auc > best_auc:
            best, best_auc = path, auc
    if best is None and found:
        raise DataError(f"{run_dir}: no checkpoint with a finite validation AUC among {len(found)} (the model "
                        f"diverged, or the validation split holds one class): nothing to score with")
    if best is None and (cut := [checkpoint_epoch(path) for path in _in_epoch_order(run_dir)]):
        raise DataError(f"{run_dir}: no whole checkpoint: its {len(cut)} checkpoint folder"
                        f"{'s (epochs ' + _span(cut) + ') were' if len(cut) > 1 else f' (epoch {cut[0]}) was'} "
                        f"cut short while copied (the warnings above say what each lacks): nothing to score with")
    if best is None:
        missing = "not found; " if not storage.exists(run_dir) else ""  # a mistyped RUN, said as such
        raise DataError(f"{run_dir}: {missing}no checkpoint found (expected checkpoint_epoch_*/ written by `mmctr "
                        f"train`)")
    return best


def _span(epochs: list[int]) -> str:
    """``1–3`` for consecutive epochs, else ``1, 3, 4``."""
    consecutive = epochs == list(range(epochs[0], epochs[0] + len(epochs)))
    return f"{epochs[0]}–{epochs[-1]}" if consecutive else ", ".join(map(str, epochs))


def run_or_checkpoint(given: Location) -> Location:
    """The checkpoint ``given`` names, as an absolute location: itself when it is a checkpoint folder
    (``RUN/checkpoint_epoch_003``, which must be whole), else the run's best (:func:`best_checkpoint`)."""
    location = storage.normalize(given)
    if storage.basename(location).startswith(PREFIX):  # a checkpoint folder, whole or cut short
        why = incomplete(location) if storage.exists(location) else "not found"
        if why:
            raise DataError(f"{given}: not a whole checkpoint ({why})")
        return location
    return best_checkpoint(location)
