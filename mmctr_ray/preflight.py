"""Checks a stage makes on its driver before any Ray work: parquet footers (schema, row counts, column statistics),
then one streamed read of every split's pages (:func:`scan_part`: pages that decode, histories of 100 ids row by row
and left-padded, labels 0 or 1, which statistics cannot show), so bad input ends as one line naming the file, the
column and the row or values instead of a worker's ~500-line traceback after Ray has started. The footers cost
milliseconds; the read about 3 s for a 3.6M-row split on 2 cores (~630 MiB at its peak; `benchmarks/preflight_scan.py`).

They are not a full validation: the ids' values are checked by range from the statistics; ``mmctr validate``
checks every value of every file, and the workers that convert each batch check the histories again
(:func:`mmctr_ray.features.check_left_padded`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mmctr_ray.config import worker_batch
from mmctr_ray.errors import ConfigError, DataError
from mmctr_ray.schema import (INT64_MAX, ITEM_INFO_COLUMNS, LEVELS, NO_PARTS, SEQ_LEN, SPLIT_COLUMNS, Layout,
                              history_around_gap, padding_gaps)
from mmctr_ray.validate import Problem, _open

HINT = "run `mmctr validate {data}` for the rows"


def _fail(problems: list[Problem]) -> None:
    if problems:
        p = problems[0]
        where = f"{p.file}: column {p.column}" if p.column else p.file
        raise DataError(f"{where}: {p.message}")


def _opened(path: Path, columns: dict[str, object], allow_empty: bool = False) -> pq.ParquetFile:
    problems: list[Problem] = []
    pf = _open(path, str(path), columns, problems, allow_empty)
    _fail(problems)
    assert pf is not None
    return pf


def split_files(data_dir: str | Path, split: str) -> list[tuple[Path, pq.ParquetFile]]:
    """The split's files and each opened, in row order, their columns checked (:meth:`Layout.split_files`); a one-line
    DataError for a missing split, a folder without parts, an unreadable part, or no rows at all."""
    path = Layout(data_dir).split(split)
    parts = Layout(data_dir).split_files(split)
    if path.is_dir() and not parts:
        raise DataError(f"{path}: {NO_PARTS}")
    opened = [(part, _opened(part, SPLIT_COLUMNS, allow_empty=path.is_dir())) for part in parts or [path]]
    if path.is_dir() and not sum(pf.metadata.num_rows for _, pf in opened):
        raise DataError(f"{path}: empty split: 0 rows in its {len(parts)} part files")
    return opened


def _leaf(pf: pq.ParquetFile, column: str) -> int:
    """Index of the parquet leaf column that holds ``column``'s values (a list column has one leaf)."""
    schema = pf.metadata.schema
    return next(j for j in range(pf.metadata.num_columns) if schema.column(j).path.split(".")[0] == column)


def column_stats(pf: pq.ParquetFile, column: str, path: str | Path) -> tuple[float | None, float | None, int]:
    """(min, max, nulls) of ``column`` (of its elements for a list column): from the row-group statistics, or,
    when a row group has none (a writer may omit them), streamed from the column itself. (None, None, n) when
    the column holds no value. ``path``: the file ``pf`` opened, named by the one-line error of a page that does
    not decode."""
    j = _leaf(pf, column)
    lo = hi = None
    nulls = 0
    for g in range(pf.metadata.num_row_groups):
        stats = pf.metadata.row_group(g).column(j).statistics
        if stats is None or not stats.has_null_count or (not stats.has_min_max and stats.num_values > 0) or (
                stats.has_min_max and isinstance(stats.min, bytes)):  # values (num_values counts the non-null ones)
            # but no min/max, or a min/max pyarrow gives as raw bytes (float16's): read them
            return _scanned_stats(pf, column, path)
        nulls += stats.null_count
        if stats.has_min_max:
            lo = stats.min if lo is None else min(lo, stats.min)
            hi = stats.max if hi is None else max(hi, stats.max)
    return lo, hi, nulls


def _scanned_stats(pf: pq.ParquetFile, column: str, path: str | Path) -> tuple[float | None, float | None, int]:
    lo = hi = None
    nulls = 0
    from mmctr_ray.features import iter_parquet

    for batch in iter_parquet(path, parquet_file=pf, batch_size=1 << 16, columns=[column]):
        values = batch.column(0)
        if (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)
                or pa.types.is_fixed_size_list(values.type)):  # min_max has no kernel for the lists themselves
            nulls += values.null_count
            values = values.flatten()
        nulls += values.null_count
        if pa.types.is_float16(values.type):  # min_max has no float16 kernel
            values = values.cast(pa.float32())
        seen = pc.min_max(values)
        if seen["min"].is_valid:
            lo = seen["min"].as_py() if lo is None else min(lo, seen["min"].as_py())
            hi = seen["max"].as_py() if hi is None else max(hi, seen["max"].as_py())
    return lo, hi, nulls


def value_range(pf: pq.ParquetFile, column: str, path: str | Path) -> tuple[float, float] | None:
    """(min, max) of ``column`` (of its elements for a list column); None when it holds no value."""
    lo, hi, _ = column_stats(pf, column, path)
    return None if lo is None else (lo, hi)


def _check_range(pf: pq.ParquetFile, path: Path, column: str, lo: float, hi: float | None, expected: str,
                 hint: str) -> None:
    seen_lo, seen_hi, nulls = column_stats(pf, column, path)
    if nulls:
        raise DataError(f"{path}: column {column}: {nulls:,} null values, expected {expected}; {hint}")
    if seen_lo is not None and (seen_lo < lo or (hi is not None and seen_hi > hi)):
        raise DataError(f"{path}: column {column}: values span {_number(seen_lo)}..{_number(seen_hi)}, expected "
                        f"{expected}; {hint}")


def _number(value: float) -> str:
    """An id or level as written (1000000, not :g's 1e+06), a float as :g writes it."""
    if isinstance(value, (int, np.integer)):
        return str(value)
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value + 0:g}"  # 1e300: not
    # its 301 digits


def _check_width(pf: pq.ParquetFile, path: Path, hint: str) -> None:
    """Every history holds SEQ_LEN ids: a row group of R rows stores R × SEQ_LEN values of ``item_seq``."""
    j = _leaf(pf, "item_seq")
    for g in range(pf.metadata.num_row_groups):
        group = pf.metadata.row_group(g)
        values = group.column(j).num_values
        if values != group.num_rows * SEQ_LEN:
            raise DataError(f"{path}: column item_seq: {values:,} ids in {group.num_rows:,} rows (row group {g}), "
                            f"expected fixed-width histories of {SEQ_LEN} ids, left-padded with 0; {hint}")


def num_items(data_dir: str | Path) -> int:
    """Items of the data set (item_info rows less the padding row 0), from item_info's footer, once its columns,
    types, nulls and tag ids are checked (from the statistics): the item table is built from it in every worker,
    where a negative tag was an IndexError in the model's lookup, a null tag a huge negative id, a tag list of floats
    cut to integers, a missing column or a null id a traceback."""
    lay = Layout(data_dir)
    if not lay.item_info.is_file():
        raise DataError(lay.missing(lay.item_info))
    pf = _opened(lay.item_info, ITEM_INFO_COLUMNS)
    items = pf.metadata.num_rows - 1
    if items < 1:
        raise DataError(f"{lay.item_info}: holds only the padding row 0, expected the items 1..N after it")
    hint = HINT.format(data=data_dir)
    _check_range(pf, lay.item_info, "item_id", 0, items, f"item ids 0..{items} in row order", hint)
    _check_range(pf, lay.item_info, "item_tags", 0, None, "tag ids >= 0 (0 = padding)", hint)
    limit = float(np.finfo(np.float32).max)  # a float64 beyond it: inf once the table is read as float32
    _check_range(pf, lay.item_info, "item_emb_d128", -limit, limit, "vectors of numbers within float32's range", hint)
    return items


def check_split(data_dir: str | Path, split: str, items: int | None = None, scan: bool = True) -> int:
    """Raise a one-line DataError if ``split`` cannot feed the model; return its row count. ``scan``: read every
    page (:func:`scan_part`); without it, the footers alone (a search's trial, on splits its search scanned)."""
    data_dir = Path(data_dir)
    items = num_items(data_dir) if items is None else items
    hint = HINT.format(data=data_dir)
    parts = split_files(data_dir, split)
    labels = split != "test" or Layout(data_dir).labelled_test  # the test split's are placeholders, unless converted
    for path, pf in parts:
        # nulls first: a null history counts as one value, so the width check said "9,901 ids in 100 rows"
        _check_range(pf, path, "item_seq", 0, items, f"item ids in 0..{items} (0 = padding)", hint)
        _check_width(pf, path, hint)
        _check_range(pf, path, "user_id", 0, INT64_MAX, f"non-negative ids of at most {INT64_MAX:,} (int64)", hint)
        _check_range(pf, path, "item_id", 1, items, f"item ids in 1..{items} (item_info rows)", hint)
        for name in ("likes_level", "views_level"):
            _check_range(pf, path, name, 0, LEVELS - 1, f"levels in 0..{LEVELS - 1}", hint)
        if scan:
            _scan_once(pf, path, labels, hint)
    return sum(pf.metadata.num_rows for _, pf in parts)


SCAN_ROWS = 1 << 16  # rows a batch of scan_part: 6.5M history ids, ~52 MB
_SCANNED: set[tuple[Any, ...]] = set()  # the parts this process has scanned, as they were then


def _scan_once(pf: pq.ParquetFile, path: Path, labels: bool, hint: str) -> None:
    """:func:`scan_part`, once a process for a file as it is (its inode, size, modification and change times): a
    command checks before Ray starts and its stage again after (predict, tune), and a pipeline's steps one after
    another."""
    stat = path.stat()  # a file replaced (a rename over it, a copy that kept the time) has another inode or ctime
    key = (str(path.resolve()), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, labels)
    if key not in _SCANNED:
        scan_part(pf, path, labels, hint)
        _SCANNED.add(key)


def scan_part(pf: pq.ParquetFile, path: Path, labels: bool, hint: str) -> None:
    """Read every page of a split's part once, streamed: a page that does not decode behind an intact footer is a
    one-line DataError here, not ~500 lines of Ray Data's and Ray Train's tracebacks from a worker (after Ray had
    started, and with --overwrite after RUN was set aside); each history holds SEQ_LEN ids, row by row (a row
    group's footer count lets 99 and 101 ids in two of its rows pass), left-padded (the workers' own check,
    :func:`mmctr_ray.features.check_left_padded`, said it without the row); with ``labels``, each label is 0 or 1
    (:func:`check_labels`)."""
    from mmctr_ray.features import iter_parquet

    row = 0  # every column is decoded (a test split's placeholder labels too: predict reads them), not only checked
    for batch in iter_parquet(path, parquet_file=pf, batch_size=SCAN_ROWS, columns=list(SPLIT_COLUMNS)):
        lengths = pc.fill_null(pc.list_value_length(batch.column("item_seq")), SEQ_LEN)  # nulls: _check_range's
        off = np.flatnonzero(lengths.to_numpy(zero_copy_only=False) != SEQ_LEN)
        if len(off):
            raise DataError(f"{path}: column item_seq: row {row + int(off[0]):,} holds {lengths[int(off[0])]} ids, "
                            f"expected fixed-width histories of {SEQ_LEN} ids, left-padded with 0; {hint}")
        seq = batch.column("item_seq").flatten().to_numpy(zero_copy_only=False).reshape(-1, SEQ_LEN)
        gaps = np.flatnonzero(padding_gaps(seq))
        if len(gaps):
            raise DataError(f"{path}: column item_seq: row {row + int(gaps[0]):,} holds a padding 0 after an item id "
                            f"({history_around_gap(seq[gaps[0]])}); expected left-padded histories, all 0s before "
                            f"the history, most recent last; {hint}")
        if labels:
            _check_label_batch(batch.column("label"), row, path, hint)
        row += batch.num_rows


def check_labels(pf: pq.ParquetFile, path: Path, hint: str) -> None:
    """Every label is 0 or 1. Read from the column itself (one float per row, streamed): column statistics leave
    NaN out of their min and max, and cannot tell a 0.5 from the 0s and 1s around it; a NaN label made the first
    epoch's loss NaN, which the run then blamed on the learning rate."""
    from mmctr_ray.features import iter_parquet

    row = 0
    for batch in iter_parquet(path, parquet_file=pf, batch_size=1 << 20, columns=["label"]):
        _check_label_batch(batch.column(0), row, path, hint)
        row += batch.num_rows


HIDDEN_LABELS = "the hidden test labels `mmctr synth` wrote: synthesize the data again"


def label_file(path: Path, hint: str = HIDDEN_LABELS) -> pq.ParquetFile:
    """``path`` opened, holding a label column, or a one-line DataError naming it (``hint``: what it should be, how
    to get it): a damaged file of hidden test labels was pyarrow's traceback, after Ray had started in predict."""
    from mmctr_ray.features import open_parquet

    pf = open_parquet(path, hint)
    if "label" not in pf.schema_arrow.names:
        raise DataError(f"{path}: no label column (it has {', '.join(pf.schema_arrow.names) or 'none'}); expected "
                        f"{hint}")
    return pf


def _check_label_batch(column: pa.Array, row: int, path: Path, hint: str) -> None:
    """A one-line DataError at the first label of ``column`` (rows from ``row`` of ``path``) that is not 0 or 1."""
    values = column.to_numpy(zero_copy_only=False)  # a null reads as NaN
    bad = np.flatnonzero((values != 0) & (values != 1))
    if len(bad):
        first = row + int(bad[0])
        value = column[int(bad[0])].as_py()  # a NaN and a null both read as NaN above
        found = f"row {first:,} holds {'null' if value is None else f'{value:g}'}"
        raise DataError(f"{path}: column label: {found}, expected labels 0 or 1; {hint}")


def valid_labels_problem(data_dir: str | Path) -> str | None:
    """Why the valid split's label column cannot rank (no rows, or one label only: its AUC, which the schedule and
    early stopping follow, would be undefined), or None."""
    parts = {part: pq.ParquetFile(part) for part in Layout(data_dir).split_files("valid")}
    seen = [(lo, hi) for lo, hi, _ in (column_stats(pf, "label", part) for part, pf in parts.items())
            if lo is not None]
    lo = min((s[0] for s in seen), default=None)
    hi = max((s[1] for s in seen), default=None)
    if lo is not None and lo != hi:
        return None
    rows = sum(pf.metadata.num_rows for pf in parts.values())
    held = "no rows" if lo is None else f"label {lo + 0:g} in all {rows:,} rows"
    return (f"{held}, expected clicks (1) and non-clicks (0): validation AUC, which the schedule and early stopping "
            f"follow, needs both")


def check_valid_labels(data_dir: str | Path) -> None:
    """Raise a one-line DataError if the valid split cannot rank (:func:`valid_labels_problem`)."""
    why = valid_labels_problem(data_dir)
    if why is not None:
        raise DataError(f"{Layout(data_dir).split('valid')}: column label: {why}")


def check_batch_size(batch_size: int, train_rows: int, workers: int) -> None:
    """Raise a one-line ConfigError when the training split holds no full batch: every epoch would take no step
    (a worker trains on full batches of ``batch_size // workers`` rows) and validate an untrained model."""
    per_worker = worker_batch(batch_size, workers)
    if train_rows < per_worker * workers:
        split = f" ({workers} workers x {per_worker:,})" if workers > 1 else ""
        raise ConfigError(f"train.batch_size={batch_size:,}{split} exceeds the {train_rows:,} rows of the training "
                          f"split: not one full batch to train on; lower train.batch_size")


def check_batch_norm_rows(batch_size: int, workers: int, batch_norm: bool) -> None:
    """Raise a one-line ConfigError when ``model.batch_norm`` would see one-row batches: each worker trains on
    ``batch_size // workers`` rows, and BatchNorm has no batch statistics for one row (it stops the first step)."""
    per_worker = worker_batch(batch_size, workers)
    if batch_norm and per_worker < 2:
        split = f" over {workers} workers" if workers > 1 else ""
        raise ConfigError(f"train.batch_size={batch_size:,}{split} gives each worker a batch of {per_worker} row: "
                          f"model.batch_norm needs at least 2; raise train.batch_size to {2 * workers} or more, "
                          f"or set model.batch_norm=false")


def batch_split_note(batch_size: int, workers: int) -> str | None:
    """A line for the log when ``train.batch_size`` does not split evenly over ``workers``: each worker steps on
    ``batch_size // workers`` rows, so a step trains a few rows fewer than the config says; None when it splits."""
    if workers < 2 or batch_size % workers == 0:
        return None
    per_worker = worker_batch(batch_size, workers)
    even = batch_size - batch_size % workers
    return (f"train.batch_size={batch_size:,} does not split evenly over {workers} workers: each steps on "
            f"{per_worker:,} rows, {per_worker * workers:,} a step (train.batch_size={even:,} or "
            f"{even + workers:,} splits evenly)")


def check_splits(data_dir: str | Path, splits: Iterable[str], scan: bool = True) -> dict[str, int]:
    """:func:`check_split` for each of ``splits``; their row counts."""
    items = num_items(data_dir)
    return {split: check_split(data_dir, split, items, scan) for split in splits}
