"""Raw MicroLens files as MicroLens publishes them: where they are, their columns, and reading them.

Inputs (names are options; the defaults find MicroLens-100K's and the full set's files in ``--raw DIR``)::

    *pairs.csv            interactions: user,item,timestamp (header; timestamp in ms)
    *pairs.tsv            or chronological sequences: user<TAB>item item item ... (one line per user)
    *title_en.csv         item,title (header)
    *likes_and_views.txt  item<TAB>likes<TAB>views (a header line is detected and skipped)
    *covers/{item}.jpg    cover images (optional)
    *tags*.csv            item,tags with tags joined by '|' (optional)

User and item ids must be integers (MicroLens' are). Item-level files are small (1.14M items for the full set)
and are read on the driver; interactions are read as a Ray Dataset and never collected.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mmctr_ray.errors import DataError

PATTERNS = {
    "pairs": ("*pairs.csv", "*pairs.tsv"),
    "titles": ("*title_en.csv", "*title*.csv"),
    "likes_views": ("*likes_and_views.txt", "*likes*views*.txt"),
    "covers": ("*covers",),
    "tags": ("*tags*.csv",),
}
TSV_BLOCK_BYTES = 16 << 20  # one line (a user's whole sequence) must fit in a CSV read block


@dataclass(frozen=True)
class RawSpec:
    """Where the raw files are and how their columns are named (MicroLens defaults).

    Attributes:
        raw: folder holding the raw files; relative file options are resolved against it.
        pairs, titles, likes_views, covers, tags: a file (folder for covers) or None to find it by name.
        user_col, item_col, time_col, title_col, tag_col: column names in the headed CSV files.
        tag_sep: separator of the tags inside the tags column.
    """

    raw: Path
    pairs: str | None = None
    titles: str | None = None
    likes_views: str | None = None
    covers: str | None = None
    tags: str | None = None
    user_col: str = "user"
    item_col: str = "item"
    time_col: str = "timestamp"
    title_col: str = "title"
    tag_col: str = "tags"
    tag_sep: str = "|"


@dataclass(frozen=True)
class RawFiles:
    pairs: Path
    sequences: bool  # True: user<TAB>items lines (no timestamps: the position is the time)
    titles: Path
    likes_views: Path | None
    covers: Path | None
    tags: Path | None


def _find(spec: RawSpec, kind: str, required: bool) -> Path | None:
    given = getattr(spec, kind)
    flag = "--" + kind.replace("_", "-")
    if given is not None:
        path = Path(given) if Path(given).is_absolute() else spec.raw / given
        if not path.exists():
            raise DataError(f"{path}: not found ({flag})")
        return path
    for pattern in PATTERNS[kind]:
        found = sorted(p for p in spec.raw.glob(pattern) if p.is_dir() == (kind == "covers"))
        if found:
            return found[0]
    if required:
        raise DataError(f"{spec.raw}: no {kind.replace('_', '/')} file (looked for {', '.join(PATTERNS[kind])}); "
                        f"pass {flag}")
    return None


def locate(spec: RawSpec) -> RawFiles:
    """Find every input; a missing required file or column is a one-line DataError."""
    if not spec.raw.is_dir():
        raise DataError(f"{spec.raw}: raw data folder not found")
    pairs = _find(spec, "pairs", True)
    sequences = pairs.suffix.lower() == ".tsv"
    files = RawFiles(pairs, sequences, _find(spec, "titles", True), _find(spec, "likes_views", False),
                     _find(spec, "covers", False), _find(spec, "tags", False))
    if not sequences:
        _require_columns(pairs, [spec.user_col, spec.item_col, spec.time_col], "--user-col/--item-col/--time-col")
    _require_columns(files.titles, [spec.item_col, spec.title_col], "--item-col/--title-col")
    if files.tags:
        _require_columns(files.tags, [spec.item_col, spec.tag_col], "--item-col/--tag-col")
    return files


def _header(path: Path, delimiter: str = ",") -> list[str]:
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f, delimiter=delimiter), [])


def _require_columns(path: Path, names: list[str], flags: str) -> None:
    header = _header(path)
    missing = [n for n in names if n not in header]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (header: {','.join(header) or 'empty'}; set {flags})")


def has_header(path: Path, delimiter: str = "\t") -> bool:
    """A header-less MicroLens text file starts with a numeric id; anything else is a header line."""
    first = _header(path, delimiter)
    return bool(first) and not first[0].strip().lstrip("-").isdigit()


def _arrow_error(path: Path, err: Exception) -> DataError:
    return DataError(f"{path}: {(str(err).strip().splitlines() or [type(err).__name__])[0]}")


def _read_csv(path: Path, columns: dict[str, pa.DataType], **kw) -> pa.Table:
    try:
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types=columns, include_columns=list(columns), strings_can_be_null=False), **kw)
    except (pa.ArrowInvalid, pa.ArrowKeyError) as err:
        raise _arrow_error(path, err) from None


def _ids(table: pa.Table, name: str, path: Path) -> np.ndarray:
    col = table.column(name)
    if col.null_count:
        row = int(pc.index(pc.is_null(col), True).as_py())
        raise DataError(f"{path}: column {name}: empty value at data row {row + 1}; expected an integer id")
    return col.to_numpy().astype(np.int64, copy=False)


@dataclass
class RawItems:
    """The item catalogue (the titles file), sorted by raw id: dense item id = position + 1."""

    raw_ids: np.ndarray  # (N,) int64, sorted, unique
    titles: list[str]
    likes: np.ndarray  # (N,) int64 raw counts; 0 where the likes/views file has no row
    views: np.ndarray
    no_likes_views: int  # catalogue items the likes/views file does not mention
    tags: list[list[str]]  # per item, in file order ([] when no tags file)

    def dense(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(dense ids 1..N, known mask) of raw item ids; unknown items get 0."""
        pos = np.searchsorted(self.raw_ids, raw).clip(0, max(len(self.raw_ids) - 1, 0))
        known = self.raw_ids[pos] == raw if len(self.raw_ids) else np.zeros(len(raw), dtype=bool)
        return np.where(known, pos + 1, 0), known


def read_items(spec: RawSpec, files: RawFiles) -> RawItems:
    titles = _read_csv(files.titles, {spec.item_col: pa.int64(), spec.title_col: pa.string()})
    raw = _ids(titles, spec.item_col, files.titles)
    if len(raw) == 0:
        raise DataError(f"{files.titles}: no items")
    order = np.argsort(raw, kind="stable")
    raw = raw[order]
    dup = np.flatnonzero(raw[1:] == raw[:-1])
    if len(dup):
        raise DataError(f"{files.titles}: column {spec.item_col}: item {int(raw[dup[0]])} appears twice; "
                        f"expected one title per item")
    text = pc.fill_null(titles.column(spec.title_col), "").to_pylist()
    items = RawItems(raw, [text[i] for i in order], np.zeros(len(raw), np.int64), np.zeros(len(raw), np.int64),
                     len(raw), [[] for _ in range(len(raw))])
    if files.likes_views:
        _read_likes_views(files.likes_views, items)
    if files.tags:
        _read_tags(spec, files.tags, items)
    return items


def _read_likes_views(path: Path, items: RawItems) -> None:
    names = ["item", "likes", "views"]
    table = _read_csv(path, {n: pa.int64() for n in names}, parse_options=pacsv.ParseOptions(delimiter="\t"),
                      read_options=pacsv.ReadOptions(column_names=names, skip_rows=int(has_header(path))))
    dense, known = items.dense(_ids(table, "item", path))
    for name in ("likes", "views"):
        values = pc.fill_null(table.column(name), 0).to_numpy()
        getattr(items, name)[dense[known] - 1] = values[known]
    items.no_likes_views = len(items.raw_ids) - len(np.unique(dense[known]))


def _read_tags(spec: RawSpec, path: Path, items: RawItems) -> None:
    table = _read_csv(path, {spec.item_col: pa.int64(), spec.tag_col: pa.string()})
    dense, known = items.dense(_ids(table, spec.item_col, path))
    for i, text in zip(dense[known], np.asarray(table.column(spec.tag_col).to_pylist(), dtype=object)[known]):
        items.tags[i - 1] = [t.strip() for t in (text or "").split(spec.tag_sep) if t.strip()]


def _interaction_options(spec: RawSpec, files: RawFiles) -> dict:
    """pyarrow CSV options of the interaction file: every column read as text, checked by :func:`parse`."""
    if files.sequences:
        return {"parse_options": pacsv.ParseOptions(delimiter="\t"),
                "read_options": pacsv.ReadOptions(column_names=["user", "items"], block_size=TSV_BLOCK_BYTES,
                                                  skip_rows=int(has_header(files.pairs))),
                "convert_options": pacsv.ConvertOptions(column_types={"user": pa.string(), "items": pa.string()})}
    cols = [spec.user_col, spec.item_col, spec.time_col]
    return {"convert_options": pacsv.ConvertOptions(column_types={c: pa.string() for c in cols},
                                                    include_columns=cols)}


def read_interactions(spec: RawSpec, files: RawFiles):
    """The interaction file as a Ray Dataset of text columns (never collected); :func:`parse` makes ids."""
    import ray.data

    return ray.data.read_csv(str(files.pairs), **_interaction_options(spec, files))


@dataclass(frozen=True)
class BadValue:
    """The first value of a batch that is not an integer: its row in the batch, column and text."""

    row: int
    column: str
    value: str
    count: int


_INT = r"^[+-]?[0-9]{1,18}$"


def _ints(col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(int64 values with 0 where invalid, invalid mask) of a text column."""
    text = pc.utf8_trim_whitespace(col)
    ok = pc.fill_null(pc.match_substring_regex(text, _INT), False)
    values = pc.cast(pc.if_else(ok, text, "0"), pa.int64())
    bad = np.asarray(pc.invert(ok).to_numpy(zero_copy_only=False), dtype=bool)
    return values, bad


def parse(batch: pa.Table, spec: RawSpec, sequences: bool) -> tuple[pa.Table, BadValue | None]:
    """Text interactions → int64 ``user``, ``item``, ``ts`` (sequences: ``ts`` = position in the line).

    Rows with a non-integer value are dropped and described by the returned BadValue (None when clean).
    """
    if sequences:
        return _parse_sequences(batch)
    names = {spec.user_col: "user", spec.item_col: "item", spec.time_col: "ts"}
    cols, bad_any, first = {}, np.zeros(batch.num_rows, dtype=bool), None
    for raw_name, name in names.items():
        cols[name], bad = _ints(batch.column(raw_name))
        if bad.any() and (first is None or np.argmax(bad) < first[0]):
            first = (int(np.argmax(bad)), raw_name)
        bad_any |= bad
    table = pa.table(cols).filter(pa.array(~bad_any))
    if first is None:
        return table, None
    value = batch.column(first[1])[first[0]].as_py()
    return table, BadValue(first[0], first[1], "" if value is None else value, int(bad_any.sum()))


def _parse_sequences(batch: pa.Table) -> tuple[pa.Table, BadValue | None]:
    user, bad_user = _ints(batch.column("user"))
    text = pc.utf8_trim_whitespace(pc.fill_null(batch.column("items").combine_chunks(), ""))
    lists = pc.split_pattern(text, " ")  # ListArray, offset 0
    flat = pc.list_flatten(lists)
    parent = pc.list_parent_indices(lists).to_numpy()
    pos = np.arange(len(flat)) - lists.offsets.to_numpy()[:-1][parent]  # position of each item in its line
    nonempty = np.asarray(pc.not_equal(flat, "").to_numpy(zero_copy_only=False), dtype=bool)  # double spaces
    keep = nonempty.copy()
    item, bad_item = _ints(flat)
    bad_line = bad_user.copy()
    bad_line[parent[keep & bad_item]] = True
    keep &= ~bad_line[parent]
    table = pa.table({"user": pc.take(user, pa.array(parent[keep])), "item": pc.filter(item, pa.array(keep)),
                      "ts": pa.array(pos[keep], pa.int64())})
    if not bad_line.any():
        return table, None
    row = int(np.argmax(bad_line))
    if bad_user[row]:
        return table, BadValue(row, "user", str(batch.column("user")[row].as_py()), int(bad_line.sum()))
    j = np.flatnonzero((parent == row) & nonempty & bad_item)[0]
    return table, BadValue(row, "items", flat[j].as_py(), int(bad_line.sum()))


def first_bad_line(spec: RawSpec, files: RawFiles) -> str:
    """Scan the interaction file on the driver (streamed) for the first non-integer value: the error message.

    Runs only after the distributed pass counted bad values, so the normal path never reads the file here.
    """
    opts = _interaction_options(spec, files)
    header = int(has_header(files.pairs)) if files.sequences else 1
    line = header
    with pacsv.open_csv(files.pairs, **opts) as reader:
        for rb in reader:
            _, bad = parse(pa.Table.from_batches([rb]), spec, files.sequences)
            if bad is not None:
                return (f"{files.pairs}: line {line + bad.row + 1}: column {bad.column}: {bad.value!r} is not an "
                        f"integer{' id' if bad.column != spec.time_col else ' timestamp (ms)'}")
            line += rb.num_rows
    return f"{files.pairs}: non-integer values (not found again on a second read)"
