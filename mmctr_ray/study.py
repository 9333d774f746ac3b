"""The Optuna study's storage, which follows the TUNE folder when a search resumes.

``Tuner.restore`` unpickles the searcher with the study it was created with, and Optuna's ``RDBStorage`` reconnects
to the database URL it was pickled with. A search whose TUNE folder has moved (or is mounted elsewhere on another
machine) would reopen the old path: "unable to open database file", or another search's study if one is there
now. ``mmctr tune`` sets :data:`url` to this TUNE's ``optuna.db`` before it restores, and the storage reconnects
there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

url: str | None = None  # set by mmctr tune for this process: sqlite:///TUNE/optuna.db


def sqlite_url(tune_dir: str | Path) -> str:
    return f"sqlite:///{tune_dir}/optuna.db"


class StudyStorage(optuna.storages.RDBStorage):
    """``RDBStorage`` whose unpickled copy connects to :data:`url` when it is set."""

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__({**state, "url": url} if url else state)
