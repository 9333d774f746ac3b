"""ASHA whose rung records survive ``mmctr tune --resume``.

Tune saves the searcher with its experiment state but not the scheduler: ``Tuner.restore`` unpickles the
scheduler as it was when the search was created, with empty rungs. A resumed search then had no cutoff at any
rung until new trials reached it again, so the first trials after a resume were never pruned. Here every result
that ASHA records is also written to ``records`` (JSON: per bracket, each rung's milestone and the value each
trial had when it reached it; and the trials ASHA stopped, with the epoch), and a scheduler that finds that file
before its first trial loads it, so the resumed search prunes against every trial the search has seen. A trial
that reports an epoch again after the kill (it restarts from its checkpoint) gets the decision it had: its rung
record is there, and a trial stopped at that epoch is stopped again.

Each bracket's cutoff counts ``-inf`` (a trial without a finite AUC yet) as the lowest value: Ray's interpolates
with numpy, which over ``-inf`` gives NaN and prints "RuntimeWarning: invalid value encountered" on the console.

These are all of ASHA's state besides the trial-to-bracket map, which Tune rebuilds by adding every unfinished
trial again (one bracket here, so every trial is in it). The file is the one ``records_path`` names for this
process (``mmctr tune`` sets it to TUNE/asha.json on every start), else the path pickled with the scheduler when
the search was created.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.schedulers.async_hyperband import _Bracket

from mmctr_ray.storage import json_text

log = logging.getLogger(__name__)
records_path: str | None = None  # set by mmctr tune for this process: TUNE/asha.json


def stops_recorded() -> dict[str, float]:
    """The trials ASHA stopped in this process's search (trial id → epoch), from :data:`records_path`, which the
    scheduler writes before Tune ends the trial: the searcher tells the study such a trial was pruned. Empty
    without records (no search here, or FIFO)."""
    if records_path is None or not os.path.isfile(records_path):
        return {}
    try:
        return dict(json.loads(Path(records_path).read_text()).get("stopped", {}))
    except (OSError, ValueError, AttributeError):  # cut short by a kill: the study keeps OptunaSearch's verdict
        return {}


class _LowestInfBracket(_Bracket):
    """Ray's bracket with a cutoff defined where a rung holds ``-inf``: the limit of Ray's over finite values as the
    lowest ones fall without end. Where the percentile falls between ``-inf`` and a finite value that limit is
    ``-inf`` (no finite result is cut there, as Ray's NaN did, now without numpy's warning); elsewhere it is Ray's
    own linear percentile. NaN results are left out, as Ray's ``nanpercentile`` leaves them; none left: no cutoff."""

    def cutoff(self, recorded: dict) -> float | None:
        values = np.array(list(recorded.values()), dtype=np.float64)
        values = values[~np.isnan(values)]
        if not values.size:
            return None
        q = (1 - 1 / self.rf) * 100
        if np.percentile(values, q, method="lower") == -np.inf:  # the lower neighbour: interpolating from -inf
            return float("-inf")
        return float(np.percentile(values, q))


def _with_lowest_inf_cutoffs(brackets: list) -> None:
    for bracket in brackets:
        bracket.__class__ = _LowestInfBracket


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` that writes its rung records to ``records`` and reads them back after a restore."""

    def __init__(self, records: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _with_lowest_inf_cutoffs(self._brackets)
        self._records = str(records)
        self._stopped: dict[str, float] = {}  # trial id -> the epoch ASHA stopped it at
        self._stops_complete = True  # False once resumed from a version that kept no list: it lacks earlier stops
        self._loaded = False
        self._save_failed = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": False}  # an unpickled copy (Tuner.restore) reads the file first

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a pickle of an older version: without a list of stops, the stops made before it are not known
        self.__dict__.update({"_stopped": {}, "_save_failed": False, "_stops_complete": "_stopped" in state,
                              **state})
        _with_lowest_inf_cutoffs(self._brackets)  # a pickle of a version without them

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load()
        at = result.get(self._time_attr)
        stopped = self._stopped.get(trial.trial_id)
        if stopped is not None and at == stopped:
            return TrialScheduler.STOP  # stopped at this epoch before the kill: the same decision again
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and at is not None:
            self._stopped[trial.trial_id] = float(at)
        self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._load()
        super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def _load(self) -> None:
        """Once per process: the records a search before a --resume wrote (none on a new search)."""
        if self._loaded:
            return
        self._loaded = True
        if not os.path.isfile(self._path):
            return
        saved = json.loads(Path(self._path).read_text())
        self._stopped.update(saved.get("stopped", {}))
        self._stops_complete = self._stops_complete and "stopped" in saved and saved.get("stops_complete", True)
        for bracket, rungs in zip(self._brackets, saved["brackets"]):
            # null: a value JSON has no number for (json_text): a trial without a finite AUC yet, which a resumed
            # trial reports as -inf (tuning.run_trial) and ASHA's cutoff counts as the lowest (a NaN it would skip)
            by_milestone = {float(milestone): {trial: float("-inf") if value is None else value
                                               for trial, value in recorded.items()}
                            for milestone, recorded in rungs}
            for milestone, recorded in bracket._rungs:
                recorded.update(by_milestone.get(float(milestone), {}))

    @property
    def _path(self) -> str:
        return records_path or self._records

    def save_records(self) -> None:
        """Write the records as they are now (a new search's: empty)."""
        self._save()

    def _save(self) -> None:
        state = {"brackets": [[[milestone, recorded] for milestone, recorded in b._rungs] for b in self._brackets],
                 "stopped": self._stopped, "stops_complete": self._stops_complete}
        tmp = f"{self._path}.tmp"
        try:
            Path(tmp).write_text(json_text(state))
            os.replace(tmp, self._path)  # whole or not at all: a kill mid-write keeps the previous records
        except OSError as err:  # the search goes on; only a later --resume would prune less
            if not self._save_failed:
                log.warning("%s: ASHA's rung records not saved (%s); a --resume would start them empty", tmp, err)
            self._save_failed = True
