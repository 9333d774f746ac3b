"""ASHA whose rung records survive ``mmctr tune --resume``.

Tune saves the searcher with its experiment state but not the scheduler: ``Tuner.restore`` unpickles the
scheduler as it was when the search was created, with empty rungs. A resumed search then had no cutoff at any
rung until new trials reached it again, so the first trials after a resume were never pruned. Here every result
that ASHA records is also written to ``records`` (JSON: per bracket, each rung's milestone and the value each
trial had when it reached it), and a scheduler that finds that file before its first trial loads it, so the
resumed search prunes against every trial the search has seen. A trial that reports an epoch it had already
reported before the kill (it restarts from its checkpoint) finds its record there and is not judged twice.

Only the records are kept: they are all ASHA's state besides the trial-to-bracket map, which Tune rebuilds by
adding every unfinished trial again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` that writes its rung records to ``records`` and reads them back after a restore."""

    def __init__(self, records: str | Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._records = str(records)
        self._loaded = False

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_loaded": False}  # an unpickled copy (Tuner.restore) reads the file first

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._load()
        action = super().on_trial_result(tune_controller, trial, result)
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
        if not os.path.isfile(self._records):
            return
        saved = json.loads(Path(self._records).read_text())["brackets"]
        for bracket, rungs in zip(self._brackets, saved):
            by_milestone = {float(milestone): recorded for milestone, recorded in rungs}
            for milestone, recorded in bracket._rungs:
                recorded.update(by_milestone.get(float(milestone), {}))

    def _save(self) -> None:
        state = {"brackets": [[[milestone, recorded] for milestone, recorded in b._rungs] for b in self._brackets]}
        tmp = f"{self._records}.tmp"
        Path(tmp).write_text(json.dumps(state))
        os.replace(tmp, self._records)  # whole or not at all: a kill mid-write keeps the previous records
