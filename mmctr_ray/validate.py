"""Check a data directory against the challenge layout; report every problem as one line.

Files are streamed in record batches, so validating the full MicroLens (or a 10M-row synthetic split) needs
memory for one batch, not one file. Each problem names the file, the column and the offending value (the
first one, with a count) and what was expected.

Example:
    >>> problems = validate("DATA")
    >>> print("\\n".join(str(p) for p in problems if p.is_error))
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmctr_ray.errors import DataError
from mmctr_ray.schema import (INT64_MAX, ITEM_FEATURE_COLUMNS, ITEM_INFO_COLUMNS, LEVELS, NO_PARTS, REAL_NUM_ITEMS,
                              REAL_TEST_ROWS, SPLIT_COLUMNS, SPLITS, Layout, history_around_gap, kind_name,
                              padding_gaps, stray_entry)

BATCH_BYTES = 32 << 20  # decoded bytes per scanned batch: bounds memory for wide files (item_feature)


def _batch_rows(pf: pq.ParquetFile) -> int:
    """Rows per batch so that one decoded batch is about BATCH_BYTES."""
    meta = pf.metadata
    sizes = [meta.row_group(i).total_byte_size for i in range(meta.num_row_groups)]
    per_row = max(1.0, sum(sizes) / max(meta.num_rows, 1))
    return int(min(65_536, max(256, BATCH_BYTES // per_row)))
_NON_NULL = "non-null (null found)"  # the expectation a null value breaks


@dataclass(frozen=True)
class Problem:
    """One finding: ``file: column: message``; warnings do not fail validation."""

    file: str
    column: str | None
    message: str
    is_error: bool = True

    def __str__(self) -> str:
        where = f"{self.file}: column {self.column}" if self.column else self.file
        return f"{'error' if self.is_error else 'warning'}: {where}: {self.message}"


def _kind_of(t: pa.DataType) -> object:
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        inner = _kind_of(t.value_type)
        return ("list", inner, None)
    return str(t)


def _kind_matches(actual: object, expected: object) -> bool:
    if isinstance(expected, tuple):
        return isinstance(actual, tuple) and actual[1] == expected[1]
    # a float column (the label) may hold integers: 0/1 labels exported as integers read as the same floats
    return actual == expected or (expected, actual) == ("float", "int")


class _Text(str):
    """An offender's description, shown as it is (not as a quoted repr)."""


@dataclass
class _Tally:
    """Counts of one kind of bad value in one column, with the first offender."""

    count: int = 0
    first: str = ""

    def add(self, bad: np.ndarray, values: np.ndarray, offset: int, rows: np.ndarray | None = None) -> None:
        """``rows``: the batch row of each value, for flattened list values (default: values are rows)."""
        idx = np.flatnonzero(bad)
        if len(idx):
            if not self.count:
                value = values[idx[0]]
                value = value.item() if isinstance(value, np.generic) else value  # 5, not np.int64(5)
                row = int(rows[idx[0]]) if rows is not None else int(idx[0])
                self.first = f"{value if isinstance(value, _Text) else repr(value)} at row {offset + row}"
            self.count += len(idx)


@dataclass
class _FileCheck:
    """Streams one parquet file and collects tallies keyed by (column, expectation)."""

    path: Path
    rel: str
    tallies: dict[tuple[str, str], _Tally] = field(default_factory=dict)

    def bad(self, column: str, expected: str, mask: np.ndarray, values: np.ndarray, offset: int,
            rows: np.ndarray | None = None) -> None:
        self.tallies.setdefault((column, expected), _Tally()).add(mask, values, offset, rows)

    def problems(self) -> list[Problem]:
        out = []
        for (column, expected), t in self.tallies.items():
            if t.count:
                many = f"{t.count:,} values" if t.count > 1 else "1 value"
                out.append(Problem(self.rel, column, f"{many} not {expected}; first {t.first}"))
        return out


_READ_ERRORS = (pa.ArrowException, OSError)


def _unreadable(rel: str, err: Exception) -> Problem:
    first = (str(err).splitlines() or [type(err).__name__])[0]
    return Problem(rel, None, f"not a readable parquet file ({first})")


def _open(path: Path, rel: str, columns: dict[str, object], problems: list[Problem],
          allow_empty: bool = False) -> pq.ParquetFile | None:
    """The file opened, its columns checked; None (with the problem added) when it cannot be read. A part of a
    split held as a folder may be empty (``allow_empty``): the split as a whole may not."""
    if not path.is_file():
        problems.append(Problem(rel, None, "a folder; expected one parquet file (only the splits may be folders of "
                                           "parts)" if path.is_dir() else "missing file"))
        return None
    try:
        pf = pq.ParquetFile(path, pre_buffer=False)  # pre-buffering reads whole row groups ahead: memory
    except _READ_ERRORS as err:
        problems.append(_unreadable(rel, err))
        return None
    if pf.metadata.num_rows == 0 and not allow_empty:
        problems.append(Problem(rel, None, "empty file: 0 rows"))
        return None
    schema = pf.schema_arrow
    for name, kind in columns.items():
        if name not in schema.names:
            problems.append(Problem(rel, name, f"missing column (expected {kind_name(kind)})"))
        elif schema.names.count(name) > 1:  # pyarrow's KeyError traceback in every reader
            problems.append(Problem(rel, name, f"{schema.names.count(name)} columns of that name, expected one"))
        elif not _kind_matches(_kind_of(schema.field(name).type), kind):
            problems.append(Problem(rel, name, f"has type {schema.field(name).type}, expected {kind_name(kind)}"))
    return pf


def _usable(pf: pq.ParquetFile, columns: dict[str, object]) -> list[str]:
    schema = pf.schema_arrow
    return [c for c, k in columns.items() if schema.names.count(c) == 1
            and _kind_matches(_kind_of(schema.field(c).type), k)]


def _list_values(check: _FileCheck, col: pa.Array, name: str, width: int | None,
                 offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Check list lengths and nulls inside lists; return the flattened values, the row of each and, where there are
    nulls, whether each value is there (a null reads as NaN, which only the null check reports), as numpy."""
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    wrong = (lengths != width) & ~np.isnan(lengths.astype(np.float64)) if width is not None else None  # a null list
    if wrong is not None and wrong.any():  # is the null check's (its lengths turn float, NaN for the null)
        shown = np.empty(len(lengths), dtype=object)
        i = int(np.flatnonzero(wrong)[0])
        shown[i] = _Text(f"a list of {int(lengths[i])}")
        check.bad(name, f"lists of length {width}", wrong, shown, offset)
    flat = pc.list_flatten(col)
    rows = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
    present = _present(flat) if flat.null_count else None  # no array of the values' size where none is null
    if present is not None:
        check.bad(name, _NON_NULL, ~present, np.full(len(flat), None), offset, rows)
    return flat.to_numpy(zero_copy_only=False), rows, present


def _present(col: pa.Array) -> np.ndarray:
    """Which values of ``col`` are not null: a null reads as NaN, and is the null check's alone (a null label was
    also "not 0 or 1; first nan", a null in a vector also "not finite floats")."""
    return ~col.is_null().to_numpy(zero_copy_only=False)


def _check_nulls(check: _FileCheck, batch: pa.RecordBatch, offset: int, skip: tuple[str, ...] = ()) -> None:
    for name in batch.schema.names:
        if name in skip:
            continue
        col = batch.column(name)
        if col.null_count:
            check.bad(name, _NON_NULL, col.is_null().to_numpy(zero_copy_only=False), np.full(len(col), None), offset)


def _scan_split(check: _FileCheck, pf: pq.ParquetFile, n_items: int | None, is_test: bool) -> None:
    offset = 0
    for batch in pf.iter_batches(batch_size=_batch_rows(pf), columns=_usable(pf, SPLIT_COLUMNS)):
        _check_nulls(check, batch, offset, skip=("label",) if is_test else ())  # test labels: placeholders
        cols = {n: batch.column(n) for n in batch.schema.names}
        if "user_id" in cols:
            uid = cols["user_id"].to_numpy(zero_copy_only=False)
            check.bad("user_id", "non-negative ids", uid < 0, uid, offset)
            if uid.dtype == np.uint64:  # past 2^63 - 1 every stage's int64 read turns them negative
                check.bad("user_id", f"ids of at most {INT64_MAX:,} (int64)", uid > INT64_MAX, uid, offset)
        if "item_id" in cols and n_items is not None:
            iid = cols["item_id"].to_numpy(zero_copy_only=False)
            check.bad("item_id", f"item ids in 1..{n_items} (item_info rows)", (iid < 1) | (iid > n_items), iid, offset)
        if "item_seq" in cols:
            seq = cols["item_seq"]
            lengths = pc.list_value_length(seq).to_numpy(zero_copy_only=False)
            flat, rows, present = _list_values(check, seq, "item_seq", SPLIT_COLUMNS["item_seq"][2], offset)
            if n_items is not None:
                check.bad("item_seq", f"item ids in 0..{n_items} (0 = padding)", (flat < 0) | (flat > n_items),
                          flat, offset, rows)
            # the rows of the right width without nulls (a batch holding one short or null row skipped them all,
            # so the padding errors came only on the run after the width was fixed)
            width = SPLIT_COLUMNS["item_seq"][2]
            whole = lengths == width
            if present is not None:  # nulls inside lists: their rows are the null check's
                whole[np.unique(rows[~present])] = False
            if width > 1 and whole.any():
                mat = flat[whole[rows]].astype(np.int64).reshape(-1, width)
                gap = np.zeros(len(lengths), dtype=bool)
                gap[np.flatnonzero(whole)[padding_gaps(mat)]] = True
                if gap.any():
                    shown = np.empty(len(gap), dtype=object)
                    i = int(np.flatnonzero(gap)[0])
                    shown[i] = _Text(f"history {history_around_gap(mat[int(whole[:i].sum())])}")
                    check.bad("item_seq", "left-padded (all padding 0s before the history, most recent last)",
                              gap, shown, offset)
        for name in ("likes_level", "views_level"):
            if name in cols:
                v = cols[name].to_numpy(zero_copy_only=False)
                check.bad(name, f"levels in 0..{LEVELS - 1}", (v < 0) | (v >= LEVELS), v, offset)
        if "label" in cols and not is_test:
            y = cols["label"].to_numpy(zero_copy_only=False)
            check.bad("label", "0 or 1", ~np.isin(y, (0, 1)) & _present(cols["label"]), y, offset)
        offset += batch.num_rows


def _check_vectors(check: _FileCheck, col: pa.Array, name: str, width: int | None, offset: int) -> None:
    flat, rows, present = _list_values(check, col, name, width, offset)
    bad = ~np.isfinite(flat)
    if present is not None:  # a null is the null check's
        bad &= present
    check.bad(name, "finite floats (NaN/inf found)", bad, flat, offset, rows)
    if flat.dtype.itemsize > 4:  # float64 values the stages' float32 cast turns into inf (1e300): said OK here,
        # refused there
        finite = np.isfinite(flat)
        check.bad(name, "within float32's range (|x| <= 3.4e38: the stages read float32)",
                  finite & (np.abs(np.where(finite, flat, 0)) > np.finfo(np.float32).max), flat, offset, rows)


def _scan_items(check: _FileCheck, pf: pq.ParquetFile, spec: dict[str, object], first_id: int,
                tags_seen: list[np.ndarray] | None = None) -> np.ndarray:
    """Scan item_info (first_id 0) or item_feature (first_id 1); return the item ids seen (and append the tag ids
    to ``tags_seen``)."""
    ids = []
    offset = 0
    for batch in pf.iter_batches(batch_size=_batch_rows(pf), columns=_usable(pf, spec)):
        _check_nulls(check, batch, offset)
        for name in batch.schema.names:
            kind = spec[name]
            col = batch.column(name)
            if name == "item_id":
                iid = col.to_numpy(zero_copy_only=False)
                ids.append(iid)
                if first_id == 0:
                    rows = np.arange(offset, offset + len(iid))
                    check.bad("item_id", "equal to the row index (row 0 = padding)", (iid != rows) & _present(col),
                              iid, offset)
            elif name in ("likes_level", "views_level"):
                v = col.to_numpy(zero_copy_only=False)
                check.bad(name, f"levels in 0..{LEVELS - 1}", (v < 0) | (v >= LEVELS), v, offset)
            elif isinstance(kind, tuple) and kind[1] == "float":
                _check_vectors(check, col, name, kind[2], offset)
            elif isinstance(kind, tuple):
                tags, rows, _ = _list_values(check, col, name, kind[2], offset)
                check.bad(name, "non-negative tag ids", tags < 0, tags, offset, rows)
                if tags_seen is not None:
                    tags_seen.append(tags)
        offset += batch.num_rows
    return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)


def _expected_test_rows(lay: Layout, n_items: int | None, expect: int | None) -> tuple[int | None, str]:
    if expect is not None:
        return expect, "as requested"
    if lay.synth_manifest.is_file():
        try:
            return int(json.loads(lay.synth_manifest.read_text())["spec"]["test_rows"]), "per synth.json"
        except (ValueError, KeyError, TypeError):  # said by validate(): the check was skipped without a word
            return None, ""
    if n_items == REAL_NUM_ITEMS:
        return REAL_TEST_ROWS, "for a MicroLens_1M_x1 submission"
    return None, ""


def validate(root: str | Path, expect_test_rows: int | None = None) -> list[Problem]:
    """All problems found in the data directory ``root`` (empty list: it validates clean)."""
    lay = Layout(root)
    problems: list[Problem] = []
    if not lay.root.is_dir():
        return [Problem(str(lay.root), None, "a file; expected the data directory" if lay.root.exists() else
                        "data directory not found")]
    if (why := lay.not_a_data_dir()) is not None:  # one line saying so, not one per missing file
        return [Problem(str(lay.root), None, why)]
    rel = lambda p: str(p.relative_to(lay.root))  # noqa: E731
    n_items = None
    # a footer can be intact while pages behind it fail to decode: _open passes, the scan raises
    pf = _open(lay.item_info, rel(lay.item_info), ITEM_INFO_COLUMNS, problems)
    if pf is not None:
        check = _FileCheck(lay.item_info, rel(lay.item_info))
        try:
            tags: list[np.ndarray] = []
            ids = _scan_items(check, pf, ITEM_INFO_COLUMNS, first_id=0, tags_seen=tags)
            # items 1..N from row 0, the padding row left out (a table written from item_feature): one cause, said
            # once, and N taken as it is; it was 11 errors (row 0 of each column, every id off by one, every id N)
            no_padding = len(ids) > 0 and bool(np.array_equal(ids, np.arange(1, len(ids) + 1)))
            if no_padding:
                problems.append(Problem(rel(lay.item_info), "item_id", f"rows hold items 1..{len(ids):,} with no "
                                        f"padding row before them; expected row 0 = the all-zero padding item, then "
                                        f"item i at row i"))
            else:
                _check_padding_row(lay, pf, problems)
            problems += _check_tag_vocabulary(rel(lay.item_info), tags)
            n_items = len(ids) if no_padding else pf.metadata.num_rows - 1
            if n_items < 1:  # ids of the other files are then not checked against an empty range
                problems.append(Problem(rel(lay.item_info), None, "holds only the padding row 0, expected the "
                                                                  "items 1..N after it"))
                n_items = None
        except _READ_ERRORS as err:
            problems.append(_unreadable(rel(lay.item_info), err))
            no_padding = False
        problems += [p for p in check.problems() if not (no_padding and p.column == "item_id")]
    pf = _open(lay.item_feature, rel(lay.item_feature), ITEM_FEATURE_COLUMNS, problems)
    if pf is not None:
        check = _FileCheck(lay.item_feature, rel(lay.item_feature))
        try:
            ids = _scan_items(check, pf, ITEM_FEATURE_COLUMNS, first_id=1)
            problems += _check_feature_ids(rel(lay.item_feature), ids, n_items)
        except _READ_ERRORS as err:
            problems.append(_unreadable(rel(lay.item_feature), err))
        problems += check.problems()
    for split in SPLITS:
        path = lay.split(split)
        stray = stray_entry(path) if path.is_dir() else None
        if stray is not None:  # a problem of the data like the others: one line among them, exit 1
            problems.append(Problem(rel(stray[0]), None, stray[1]))
            continue
        parts = lay.split_files(split)
        if path.is_dir() and not parts:
            problems.append(Problem(rel(path), None, NO_PARTS))
            continue
        rows, readable = 0, True
        for part in parts or [path]:  # a missing split: _open reports the missing file
            pf = _open(part, rel(part), SPLIT_COLUMNS, problems, allow_empty=path.is_dir())
            if pf is None:
                readable = False
                continue
            rows += pf.metadata.num_rows
            check = _FileCheck(part, rel(part))
            try:
                _scan_split(check, pf, n_items, is_test=split == "test")
            except _READ_ERRORS as err:
                problems.append(_unreadable(rel(part), err))
            problems += check.problems()
        if not readable:
            continue
        if path.is_dir() and rows == 0:
            problems.append(Problem(rel(path), None, f"empty split: 0 rows in its {len(parts)} part files"))
        if split == "valid" and rows and not any(p.is_error and p.file.startswith(rel(path)) for p in problems):
            from mmctr_ray.preflight import valid_labels_problem  # (preflight imports this module)

            why = valid_labels_problem(lay.root)  # one class: training refuses it, after the pipeline's embed and
            if why is not None:  # fuse had run
                problems.append(Problem(rel(path), "label", why))
        if split == "test":
            expected, why = _expected_test_rows(lay, n_items, expect_test_rows)
            if expected is not None and rows != expected:
                problems.append(Problem(rel(path), None, f"has {rows:,} rows; a submission needs "
                                                         f"{expected:,} ({why})"))
    problems += _check_manifests(lay, expect_test_rows)
    if not lay.images_dir.is_dir():
        problems.append(Problem(rel(lay.images_dir), None, "no cover images (image embedding needs them)", False))
    elif n_items:  # one listing: a converted set may hold most covers and not all
        entries = {entry.name: entry for entry in os.scandir(lay.images_dir)}
        dangling = {name for name, entry in entries.items() if _links_to_nothing(entry)}  # missing, as embed says
        missing = [item for item in range(1, n_items + 1) if f"{item}.jpg" not in entries or f"{item}.jpg" in dangling]
        if missing:
            problems.append(Problem(rel(lay.images_dir), None, f"{len(missing):,} of {n_items:,} items have no cover "
                                                               f"(the first: {missing[0]}.jpg); embed flags them "
                                                               f"missing, up to --max-bad-covers (10% by default)",
                                    False))
        unusable = [(name, why) for item in range(1, n_items + 1) if (name := f"{item}.jpg") in entries
                    and name not in dangling and (why := _unusable_cover(entries[name]))]
        if unusable:  # passed as OK; embed counts them corrupt and, past --max-bad-covers, fails after Ray started
            problems.append(Problem(rel(lay.images_dir), None, f"{len(unusable):,} of {n_items:,} covers cannot be "
                                                               f"images (the first: {unusable[0][0]}, "
                                                               f"{unusable[0][1]}); embed flags them corrupt, up to "
                                                               f"--max-bad-covers (10% by default)", False))
    return problems


def _links_to_nothing(entry: os.DirEntry) -> bool:
    """Whether a cover's directory entry is a link whose target does not exist: embed finds no file there and flags
    the cover missing (status 1), as it does a cover not listed at all."""
    if not entry.is_symlink():
        return False
    try:
        os.stat(entry.path)
    except FileNotFoundError:
        return True
    except OSError:  # a link loop, say: embed cannot read it, and counts it corrupt
        return False
    return False


def _unusable_cover(entry: os.DirEntry) -> str | None:
    """Why a cover's directory entry cannot be an image, from its listing and one stat (no file is opened or decoded:
    a cover cut short passes here, and embed finds it): a folder, an empty file, not a file (a link to nothing is a
    missing cover: :func:`_links_to_nothing`)."""
    try:
        if not entry.is_file():
            return "a folder" if entry.is_dir() else "not a file"
        return "an empty file" if entry.stat().st_size == 0 else None
    except OSError as err:  # a link loop, a file gone since the listing
        return f"unreadable ({err.strerror or type(err).__name__})"


def _check_manifests(lay: Layout, expect_test_rows: int | None) -> list[Problem]:
    """The JSON files beside the data the stages read: convert.json (every stage, for the placeholder vectors: a file
    cut short failed each with a traceback while validate said OK) and synth.json (the test split's row count, whose
    check a damaged file skipped without a word)."""
    from mmctr_ray.features import has_placeholder_embeddings

    problems = []
    try:
        has_placeholder_embeddings(lay.root)
    except DataError as err:
        problems.append(Problem("convert.json", None, str(err).removeprefix(f"{lay.root / 'convert.json'}: ")))
    if lay.synth_manifest.is_file() and expect_test_rows is None and _expected_test_rows(lay, None, None)[0] is None:
        problems.append(Problem(lay.synth_manifest.name, None, "unreadable (expected the synth.json `mmctr synth` "
                                                               "writes, with spec.test_rows): the test split's row "
                                                               "count is not checked", False))
    return problems


def _check_tag_vocabulary(rel: str, tags: list[np.ndarray]) -> list[Problem]:
    """A warning when the tag ids are not a dense vocabulary: `mmctr train` refuses them with ``model.use_tags``
    (:func:`mmctr_ray.features.check_id_tables`)."""
    from mmctr_ray.features import sparse_tags

    sparse = sparse_tags(np.concatenate(tags)) if tags else None
    if sparse is None:
        return []
    return [Problem(rel, "item_tags", f"largest tag id {sparse[0]:,} for {sparse[1]:,} distinct tags: not a dense "
                                      f"vocabulary 1..T; `mmctr train` refuses its {sparse[0] + 1:,}-row tag table "
                                      f"unless model.use_tags=false", False)]


def _check_padding_row(lay: Layout, pf: pq.ParquetFile, problems: list[Problem]) -> None:
    # the first row of the file, not of its first row group: a writer may leave that one empty
    batch = next((b for b in pf.iter_batches(batch_size=1, columns=_usable(pf, ITEM_INFO_COLUMNS)) if b.num_rows),
                 None)
    if batch is None:
        return  # no row at all: reported as an empty file
    for name, value in batch.to_pylist()[0].items():  # a null, in it or for it, is the null check's alone
        flat = np.asarray([v for v in (value if isinstance(value, list) else [value]) if v is not None], dtype=float)
        if np.any(flat != 0):
            problems.append(Problem(str(lay.item_info.relative_to(lay.root)), name,
                                    f"row 0 must be the all-zero padding item; found {flat[flat != 0][0]:g}"))


def _check_feature_ids(rel: str, ids: np.ndarray, n_items: int | None) -> list[Problem]:
    out = []
    if ids.dtype.kind == "f":  # null ids read as NaN (the scan reports them): the rest are checked here
        ids = ids[~np.isnan(ids)].astype(np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        out.append(Problem(rel, "item_id", f"{len(dup):,} duplicate item ids; first {int(dup[0])}"))
    if n_items is not None:
        bad = uniq[(uniq < 1) | (uniq > n_items)]
        if len(bad):
            out.append(Problem(rel, "item_id", f"{len(bad):,} item ids outside 1..{n_items} (item_info rows); "
                                               f"first {int(bad[0])}"))
        missing = np.setdiff1d(np.arange(1, n_items + 1), uniq)
        if len(missing):
            out.append(Problem(rel, "item_id", f"{len(missing):,} of item_info's items 1..{n_items} have no row; "
                                               f"first {int(missing[0])}"))
    return out
