"""The MicroLens_1M_x1 layout, exactly as the WWW 2025 MMCTR challenge ships it, as code.

A data directory ``DATA`` holds::

    DATA/MicroLens_1M_x1/train.parquet      user_id, item_seq, item_id, likes_level, views_level, label
    DATA/MicroLens_1M_x1/valid.parquet      (same columns)
    DATA/MicroLens_1M_x1/test.parquet       (same columns; label is a placeholder)
    DATA/MicroLens_1M_x1/item_info.parquet  item_id, item_tags, item_emb_d128; row index == item_id, row 0 = padding
    DATA/item_feature.parquet               item_id (1..N), item_title, item_tags, likes_level, views_level,
                                            txt_emb_BERT (768), img_emb_CLIPRN50 (1024)
    DATA/item_images/{item_id}.jpg          cover images

A split may also be a folder of that name holding part files (``train.parquet/part-00000.parquet`` …), as
Spark, Ray Data and ``mmctr convert --split-layout parts`` write large splits: every stage reads the parts in
name order, numbers by value (``part-2`` before ``part-10``), which is the split's row order (:func:`parquet_parts`).

Conventions: ``PAD_ID = 0`` pads ``item_seq`` (fixed width 100, left-padded, most recent item last) and
``item_tags`` (width 5, left-padded). Integer columns may be stored 32 or 64 bit and float columns 32 or 64
bit: readers here accept either and normalise (int64, float32).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmctr_ray.errors import DataError

PAD_ID = 0
DATASET_NAME = "MicroLens_1M_x1"
SPLITS = ("train", "valid", "test")
SEQ_LEN = 100  # stored width of item_seq
TAGS_LEN = 5  # stored width of item_tags
LEVELS = 10  # likes_level / views_level take values 0..9
GIVEN_EMB_DIM = 128
# the submission's prediction.csv column: the challenge track it enters (Task1&2: both); mmctr_ray.predict
TASKS = ("Task2", "Task1", "Task1&2")
BERT_DIM = 768
CLIP_DIM = 1024

# The real challenge's sizes: validate uses them to tell what a submission for the real data needs.
REAL_NUM_ITEMS = 91_717
REAL_TEST_ROWS = 379_142

# column kinds: "int", "float", "str", ("list", kind, width or None)
SPLIT_COLUMNS: dict[str, object] = {
    "user_id": "int",
    "item_seq": ("list", "int", SEQ_LEN),
    "item_id": "int",
    "likes_level": "int",
    "views_level": "int",
    "label": "float",
}
ITEM_INFO_COLUMNS: dict[str, object] = {
    "item_id": "int",
    "item_tags": ("list", "int", TAGS_LEN),
    "item_emb_d128": ("list", "float", GIVEN_EMB_DIM),
}
ITEM_FEATURE_COLUMNS: dict[str, object] = {
    "item_id": "int",
    "item_title": "str",
    "item_tags": ("list", "int", TAGS_LEN),
    "likes_level": "int",
    "views_level": "int",
    "txt_emb_BERT": ("list", "float", BERT_DIM),
    "img_emb_CLIPRN50": ("list", "float", CLIP_DIM),
}


# where `mmctr synth` and `mmctr convert` stage a data directory inside OUT until it is whole (an interrupted one
# leaves it: never published, so it is no output)
SYNTH_STAGING, CONVERT_STAGING = ".mmctr-synth.partial", ".mmctr-convert.partial"

NO_PARTS = ("a folder without part files (*.parquet); expected the split as one parquet file or a folder of "
            "them")  # the message for a split folder parquet_parts finds empty


def parquet_parts(path: str | Path) -> list[Path]:
    """The files of a split: ``path`` itself when it is a file; when it is a folder, its ``*.parquet`` files in name
    order, numbers by value (the split's row order), leaving out names that start with ``.`` or ``_`` (partial
    files, ``_SUCCESS``, checksums), as pyarrow's datasets do; empty when ``path`` is missing or holds no part."""
    path = Path(path)
    if path.is_dir():
        named = _named(path)
        stray = stray_entry(path, named)
        if stray is not None:
            raise DataError(f"{stray[0]}: {stray[1]}")
        return sorted(named, key=lambda p: (natural_key(p.name), p.name))
    return [path] if path.is_file() else []


def _named(folder: Path) -> list[Path]:
    """A split folder's entries but those whose names start with ``.`` or ``_``, which pyarrow's datasets skip."""
    return [p for p in folder.iterdir() if not p.name.startswith((".", "_"))]


def stray_entry(folder: Path, named: list[Path] | None = None) -> tuple[Path, str] | None:
    """The first entry of a split's folder that is not a part file, and why, or None: a subfolder (a part written as
    a folder, a Hive/Spark partition ``day=1/part-0.parquet``) or a file not named ``*.parquet`` (``part-3.txt``,
    ``part-3.PARQUET``, Hive's ``000000_0``), whose rows no stage would read. ``named``: the folder's listing
    (:func:`_named`) where the caller has it."""
    named = _named(folder) if named is None else named
    nested = next((p for p in named if p.is_dir()), None)
    if nested is not None:
        return nested, (f"a folder among the split's part files; expected *.parquet files only (its rows would not be "
                        f"read): put its files in {folder.name} itself")
    other = next((p for p in named if p.suffix != ".parquet"), None)
    if other is not None:
        return other, ("not named *.parquet, among the split's part files (its rows would not be read): rename it "
                       "to *.parquet if it holds rows of the split, else move it out of the folder (names starting "
                       "with . or _ are skipped)")
    return None


INT64_MAX = int(np.iinfo(np.int64).max)  # ids past it (uint64 columns) turn negative in every stage's int64 read


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key of a part file's name with its runs of digits compared as numbers: writers that do not pad their
    part numbers (pyarrow's ``part-{i}``, Dask's ``part.{i}``) put ``part-10`` after ``part-9``, where plain name
    order reads it before ``part-2``. Padded names (``part-00010``) sort the same either way."""
    return tuple((0, int(run)) if run.isdigit() else (1, run) for run in re.split(r"(\d+)", name) if run)


@dataclass(frozen=True)
class Layout:
    """Paths of one data directory in the challenge layout.

    Example:
        >>> Layout(Path("DATA")).split("train")
        PosixPath('DATA/MicroLens_1M_x1/train.parquet')
    """

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))  # a str from a caller works too

    @property
    def dataset_dir(self) -> Path:
        return self.root / DATASET_NAME

    def split(self, name: str) -> Path:
        """The split's path: one parquet file, or a folder of part files (:meth:`split_files`)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}: expected one of {', '.join(SPLITS)}")
        return self.dataset_dir / f"{name}.parquet"

    def split_files(self, name: str) -> list[Path]:
        """The split's parquet files in row order (:func:`parquet_parts`)."""
        return parquet_parts(self.split(name))

    @property
    def item_info(self) -> Path:
        return self.dataset_dir / "item_info.parquet"

    def not_a_data_dir(self) -> str | None:
        """Why the root is not a data directory, said of the root (None: it holds MicroLens_1M_x1/). The most common
        slip is passing the MicroLens_1M_x1 folder itself."""
        if self.dataset_dir.is_dir():
            return None
        if not self.root.is_dir():
            return "a file, not a data directory" if self.root.is_file() else "no such data directory"
        name, root = DATASET_NAME, self.root.resolve()  # `--data .` too
        if root.name == name or any((root / f"{n}.parquet").exists() for n in ("item_info", *SPLITS)):
            return f"looks like the {name} folder itself: --data is the folder above it, here {root.parent}"
        return f"holds no {name}/ folder: --data is the folder that holds {name}/ and item_feature.parquet"

    def missing(self, path: Path) -> str:
        """The one-line message for a missing ``path`` of this layout; when the root is not a data directory, that
        reason (:meth:`not_a_data_dir`) alone, said of the folder the user typed, as `mmctr validate` says it (it came
        after a path under that folder: ``DATA/MicroLens_1M_x1/MicroLens_1M_x1/item_info.parquet: missing file``)."""
        why = self.not_a_data_dir()
        return f"{self.root}: {why}" if why else f"{path}: missing file"

    @property
    def item_feature(self) -> Path:
        return self.root / "item_feature.parquet"

    @property
    def images_dir(self) -> Path:
        return self.root / "item_images"

    def image(self, item_id: int) -> Path:
        return self.images_dir / f"{item_id}.jpg"

    @property
    def oracle(self) -> Path:
        """Written by ``mmctr synth`` only: AUC of the planted click probabilities."""
        return self.root / "oracle.json"

    def oracle_auc(self, split: str, rows: int | None) -> float | None:
        """:attr:`oracle`'s AUC for ``split`` when it is the AUC of the split's ``rows`` rows; None without the file
        (data not from `mmctr synth`), for a split of one class, and for a split cut or grown since synth wrote it
        (its oracle is another set of rows'; a file from before oracle.json recorded ``rows``, or ``rows`` None, is
        taken as it is)."""
        if not self.oracle.is_file():
            return None
        try:  # shown beside an AUC at the end of a run: a file edited by hand must not fail the run there
            entry = json.loads(self.oracle.read_text()).get(split) or {}
            auc = entry.get("oracle_auc") if rows is None or entry.get("rows", rows) == rows else None
        except (ValueError, AttributeError) as err:
            logging.getLogger(__name__).warning("%s: not the oracle.json `mmctr synth` writes (%s): no oracle AUC",
                                                self.oracle, err)
            return None
        return auc if isinstance(auc, (int, float)) else None

    @property
    def synth_manifest(self) -> Path:
        """Written by ``mmctr synth`` only: the generator's parameters and row counts."""
        return self.root / "synth.json"

    @property
    def hidden_test_labels(self) -> Path:
        """Written by ``mmctr synth`` only: the true test labels and probabilities (ID order)."""
        return self.root / "synthetic_truth" / "test_labels.parquet"

    @property
    def convert_manifest(self) -> Path:
        """Written by ``mmctr convert`` only: its inputs, options and counts."""
        return self.root / "convert.json"

    @property
    def labelled_test(self) -> bool:
        """Whether the test split's own labels are true ones: ``mmctr convert`` keeps them (the test split is the
        user's held-out set); the challenge's test split holds placeholders, and ``mmctr synth`` keeps the true ones
        apart (:attr:`hidden_test_labels`)."""
        return self.convert_manifest.is_file()

    @property
    def mapping_dir(self) -> Path:
        """Written by ``mmctr convert`` only: dense id <-> raw id tables."""
        return self.root / "mapping"

    @property
    def manifests(self) -> list[Path]:
        """The completion markers: each producer writes its own last."""
        return [self.synth_manifest, self.convert_manifest]

    @property
    def produced(self) -> list[Path]:
        """Every top-level entry ``mmctr synth`` or ``mmctr convert`` writes into a data directory. A new output
        replaces all of them, so nothing of an older one (another producer's truth, oracle or mapping) survives
        next to it looking current."""
        return [self.dataset_dir, self.item_feature, self.images_dir, self.oracle, self.hidden_test_labels.parent,
                self.mapping_dir, *self.manifests]


def kind_name(kind: object) -> str:
    """Human-readable name of a column kind, for error messages."""
    if isinstance(kind, tuple):
        _, inner, width = kind
        return f"list<{inner}> of length {width}" if width else f"list<{inner}>"
    return {"int": "integer", "float": "float", "str": "string"}[kind]  # type: ignore[index]


SHOWN_IDS = 12  # the most ids of a history an error message shows


def padding_gaps(histories: np.ndarray) -> np.ndarray:
    """Which rows of (B, W) stored histories hold a padding 0 after an item id (right-padded, or a gap): the
    layout's lists are left-padded, all 0s before the history, most recent last."""
    real = histories != PAD_ID
    return (real[:, :-1] > real[:, 1:]).any(axis=1)


def history_around_gap(row: np.ndarray) -> str:
    """A stored history row that :func:`padding_gaps` flags, for an error message: from its first id up to its
    first padding 0 after it, the last :data:`SHOWN_IDS` ids at most, "…" for what is left out."""
    history = row[int(np.flatnonzero(row != PAD_ID)[0]):].tolist()
    end = history.index(PAD_ID) + 1
    shown = ", ".join(str(v) for v in history[max(0, end - SHOWN_IDS):end])
    return f"[{'…, ' if end > SHOWN_IDS else ''}{shown}{', …' if len(history) > end else ''}]"
