"""Raw MicroLens files as MicroLens publishes them: where they are, their columns, and reading them.

Inputs (names are options; the defaults find MicroLens-100K's and the full set's files in ``--raw DIR``)::

    *pairs.csv            interactions: user,item,timestamp (header; timestamp in ms)
    *pairs.tsv            or chronological sequences: user<TAB>item item item ... (one line per user)
    *title_en.csv         item,title: a headed CSV, or header-less as MicroLens-100K ships it (id, first comma,
                          then the title to the line's end, commas included)
    *likes_and_views.txt  item<TAB>likes<TAB>views (a header line is detected and skipped)
    *covers/{item}.jpg    cover images (optional)
    *tags*.csv            item,tags with tags joined by '|' (optional; headed, or header-less as the titles)

User and item ids must be integers (MicroLens' are). Item-level files are small (1.14M items for the full set)
and are read on the driver; interactions are read as a Ray Dataset and never collected.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from mmctr_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PATTERNS = {
    "pairs": ("*pairs.csv", "*pairs.tsv"),
    "titles": ("*title_en.csv", "*title*.csv"),
    "likes_views": ("*likes_and_views.txt", "*likes*views*.txt"),
    "covers": ("*covers",),
    "tags": ("*tags*.csv",),
}
TSV_BLOCK_BYTES = 16 << 20  # one line (a user's whole sequence) must fit in a read block


@dataclass(frozen=True)
class RawSpec:
    """Where the raw files are and how their columns are named (MicroLens defaults).

    Attributes:
        raw: folder holding the raw files; relative file options are resolved against it (then against the current
            folder, as every other path flag is, where ``raw`` holds no such file).
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

    def __post_init__(self) -> None:
        if not self.tag_sep:  # str.split("") raises ValueError: a traceback, after OUT was made
            raise ConfigError("convert: --tag-sep is empty; expected the separator of the tags inside the tags column "
                              "(default '|')")


@dataclass(frozen=True)
class RawFiles:
    pairs: Path
    sequences: bool  # True: user<TAB>items lines (no timestamps: the position is the time)
    titles: Path
    likes_views: Path | None
    covers: Path | None
    tags: Path | None


_SAID_MATCHES: set[tuple[str, str]] = set()  # (raw folder, pattern) whose several matches were said


def _find(spec: RawSpec, kind: str, required: bool) -> Path | None:
    given = getattr(spec, kind)
    flag = "--" + kind.replace("_", "-")
    if given is not None:
        path = Path(given) if Path(given).is_absolute() else spec.raw / given
        if not path.exists() and not Path(given).is_absolute() and Path(given).exists():
            path = Path(given).resolve()  # `--covers R/covers` beside `--raw R`: a path from here, not R/R/covers
        if not path.exists():
            raise DataError(f"{path}: not found ({flag}" + ("" if Path(given).is_absolute() else
                                                           f"; nor {given} in the current folder") + ")")
        if path.is_dir() != (kind == "covers"):
            raise DataError(f"{path}: {'a file' if kind == 'covers' else 'a folder'}; expected "
                            f"{'the covers folder' if kind == 'covers' else 'a file'} ({flag})")
        return path
    for pattern in PATTERNS[kind]:
        found = sorted(p for p in spec.raw.glob(pattern) if p.is_dir() == (kind == "covers"))
        if len(found) > 1 and (str(spec.raw), pattern) not in _SAID_MATCHES:  # said once (the CLI's checks and the
            # conversion both locate the files), not chosen without a word: another file may be the one meant
            _SAID_MATCHES.add((str(spec.raw), pattern))
            log.warning("%s: %d files match %s (%s); reading %s: pass %s to read another", spec.raw, len(found),
                        pattern, ", ".join(p.name for p in found), found[0].name, flag)
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
    if has_header(files.titles, ","):
        _require_columns(files.titles, [spec.item_col, spec.title_col], "--item-col/--title-col")
    if files.tags and has_header(files.tags, ","):
        _require_columns(files.tags, [spec.item_col, spec.tag_col], "--item-col/--tag-col")
    return files


def _header(path: Path, delimiter: str = ",") -> list[str]:
    """The fields of the first line. Only that line is decoded: a byte that is not UTF-8 further on fails Arrow's
    read, and :func:`first_not_utf8` names its line (before, one within the first 8 KiB was a UnicodeDecodeError
    traceback)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 20)
    except OSError as err:
        raise DataError(f"{path}: cannot read it ({err.strerror or type(err).__name__})") from None
    try:
        text = first.decode("utf-8-sig")  # a spreadsheet's byte-order mark is not a name
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: line 1: byte {first[err.start]:#04x} at position {err.start} is not UTF-8; "
                        f"expected UTF-8 text") from None
    return next(csv.reader([text], delimiter=delimiter), [])


def _require_columns(path: Path, names: list[str], flags: str) -> None:
    if path.is_file() and path.stat().st_size == 0:  # it said "missing column 'user' (header: empty ...)"
        raise DataError(f"{path}: empty file (0 bytes); expected a header line naming {', '.join(names)}, then the "
                        f"rows")
    header = _header(path)
    missing = [n for n in names if n not in header]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r} (header: {','.join(header) or 'empty'}; set {flags})")


_INT = r"^[+-]?[0-9]{1,18}$"  # an integer id or timestamp, once PADDING is trimmed (18 digits fit in int64)
PADDING = ' "\r\t'  # around a value: spaces, the quotes of a quoted field, a Windows line end, tabs


def has_header(path: Path, delimiter: str = "\t") -> bool:
    """A header-less MicroLens text file starts with a numeric id, as the readers take one (signed, quoted, padded:
    ``+5`` was taken for a header, and its line dropped without a word); anything else is a header line."""
    first = _header(path, delimiter)
    return bool(first) and re.fullmatch(r"[+-]?[0-9]+", first[0].strip(PADDING)) is None


def first_not_utf8(path: Path) -> str | None:
    """The message for the first line of ``path`` that is not UTF-8 (its number, the byte and where), or None.
    Streams the file; called only once a read has failed: Arrow's own error named no line ("CSV conversion error
    to string: invalid UTF8 data"; in a Ray Data task, "Failed to read CSV file" and its traceback)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f"{path}: line {number}: byte {line[err.start]:#04x} at position {err.start} is not UTF-8; "
                        f"expected UTF-8 text")
    return None


def _line_of(path: Path, text: str) -> int | None:
    """The number of the first line of ``path`` that reads ``text`` (Arrow names a bad row by its text only)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.decode("utf-8", "replace").rstrip("\r\n").lstrip("\ufeff") == text:
                return number
    return None


def _arrow_error(path: Path, err: Exception) -> DataError:
    """One line for Arrow's error reading ``path``, with the line it is about where Arrow named none: a byte that
    is not UTF-8, a row of the wrong field count (Arrow gives the row's text)."""
    said = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if "UTF8" in said or "UTF-8" in said:
        found = first_not_utf8(path)
        if found is not None:
            return DataError(found)
    fields = re.search(r"Expected (\d+) columns, got (\d+): (.*)$", said)
    if fields:
        number = _line_of(path, fields.group(3))
        if number is not None:
            return DataError(f"{path}: line {number}: {fields.group(3)!r} has {fields.group(2)} fields; expected "
                             f"{fields.group(1)}")
    return DataError(f"{path}: {said}")


def _read_csv(path: Path, columns: dict[str, pa.DataType], **kw) -> pa.Table:
    """``columns`` of a CSV file, the integer ones read as text and parsed as the interactions are
    (:func:`_int_column`): Arrow's own parsing refused ``+5``, which the interactions file takes as 5, and named
    neither the column nor the row of a bad value."""
    as_text = {name: pa.string() if pa.types.is_integer(kind) else kind for name, kind in columns.items()}
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types=as_text, include_columns=list(columns), strings_can_be_null=False), **kw)
    except (pa.ArrowInvalid, pa.ArrowKeyError) as err:
        raise _arrow_error(path, err) from None
    for name, kind in columns.items():
        if pa.types.is_integer(kind):
            table = table.set_column(table.schema.get_field_index(name), name,
                                     _int_column(table.column(name), name, path))
    return table


def _read_id_text(path: Path, id_name: str, text_name: str) -> pa.Table:
    """A header-less ``id,text`` file, as MicroLens-100K ships its titles (``MicroLens-100k_title_en.csv``) and
    categories (``tags_to_summary.csv``): the id is a line's first field and the text the rest of the line, commas
    included (those titles are not quoted: a CSV reader split them); a text quoted as CSV quotes it (between quotes,
    every quote inside doubled) is unquoted. A line with no comma has an empty text."""
    try:
        lines = pacsv.read_csv(path, read_options=pacsv.ReadOptions(column_names=["line"]), **LINE_OPTIONS)
    except (pa.ArrowInvalid, pa.ArrowKeyError) as err:
        raise _arrow_error(path, err) from None
    parts = pc.extract_regex(lines.column("line").combine_chunks(), r"^(?P<id>[^,]*)(?:,(?P<text>.*))?$")
    text = parts.field("text")
    inner = pc.utf8_slice_codeunits(text, 1, -1)
    quoted = pc.and_(pc.and_(pc.starts_with(text, '"'), pc.ends_with(text, '"')),
                     pc.greater_equal(pc.utf8_length(text), 2))  # and every quote inside doubled, as CSV quotes it:
    quoted = pc.and_(quoted, pc.invert(pc.match_substring(pc.replace_substring(inner, '""', ""), '"')))  # not so
    text = pc.if_else(quoted, pc.replace_substring(inner, '""', '"'), text)  # `"Frozen" vs "Tangled"`, a title
    ids = _int_column(pa.chunked_array([parts.field("id")]), f"{id_name} (the first field; no header line)", path)
    return pa.table({id_name: ids, text_name: text})


def _int_column(col: pa.ChunkedArray, name: str, path: Path) -> pa.Array:
    """int64 values of a text column as :func:`_ints` parses them, null where a value is empty (as Arrow reads an
    empty integer); a value that is not an integer is a one-line error naming the column, the data row and the
    value."""
    text = pc.utf8_trim(col.combine_chunks(), PADDING)
    values, bad = _ints(text)
    empty = np.asarray(pc.equal(text, "").to_numpy(zero_copy_only=False), dtype=bool)
    wrong = np.flatnonzero(bad & ~empty)
    if len(wrong):
        raise DataError(f"{path}: column {name}: {text[int(wrong[0])].as_py()!r} at data row {wrong[0] + 1} is not an "
                        f"integer of at most 18 digits")
    return pc.if_else(pa.array(empty), pa.scalar(None, pa.int64()), values)


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
    titles = (_read_csv(files.titles, {spec.item_col: pa.int64(), spec.title_col: pa.string()})
              if has_header(files.titles, ",") else _read_id_text(files.titles, spec.item_col, spec.title_col))
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
    for kind, what, path, so in (
            ("likes_views", "likes/views file", files.likes_views, "every item's likes_level and views_level are 0"),
            ("tags", "tags file", files.tags, "no item has tags"),
            ("covers", "covers folder", files.covers, "no item has a cover (`mmctr embed` counts them missing)")):
        if path is None:  # a misnamed file: only convert.json's counts said so
            log.warning("%s: no %s (looked for %s; pass --%s): %s", spec.raw, what, ", ".join(PATTERNS[kind]),
                        kind.replace("_", "-"), so)
    if files.likes_views:
        _read_likes_views(files.likes_views, items)
    if files.tags:
        _read_tags(spec, files.tags, items)
    return items


def _refuse_conflicts(path: Path, dense: np.ndarray, raw: np.ndarray, values: np.ndarray, names: str) -> None:
    """A catalogue item (``dense`` ids of the file's rows of known items, ``raw`` their raw ids) on two rows whose
    ``values`` (one row of numbers per file row, as they are used) disagree: the later row won without a word, and
    moved other items' decile levels too. The same values twice are harmless and pass."""
    order = np.argsort(dense, kind="stable")
    twice = np.flatnonzero(dense[order][1:] == dense[order][:-1])
    a, b = order[twice], order[twice + 1]
    differ = np.flatnonzero((values[a] != values[b]).any(axis=1))
    if len(differ):
        first, second = a[differ[0]], b[differ[0]]
        raise DataError(f"{path}: item {int(raw[first])} appears twice, with {names} {tuple(values[first].tolist())} "
                        f"and {tuple(values[second].tolist())}; expected one row per item")


def _read_likes_views(path: Path, items: RawItems) -> None:
    names = ["item", "likes", "views"]
    table = _read_csv(path, {n: pa.int64() for n in names}, parse_options=pacsv.ParseOptions(delimiter="\t"),
                      read_options=pacsv.ReadOptions(column_names=names, skip_rows=int(has_header(path))))
    raw = _ids(table, "item", path)
    dense, known = items.dense(raw)
    values = np.column_stack([pc.fill_null(table.column(n), 0).to_numpy()[known] for n in ("likes", "views")])
    _refuse_conflicts(path, dense[known], raw[known], values, "likes, views")  # items not in titles: ignored
    items.likes[dense[known] - 1], items.views[dense[known] - 1] = values[:, 0], values[:, 1]
    items.no_likes_views = len(items.raw_ids) - len(np.unique(dense[known]))
    _say_unmatched(path, raw, known, len(items.raw_ids), items.no_likes_views, "likes/views levels 0")


def _say_unmatched(path: Path, raw: np.ndarray, known: np.ndarray, items: int, without: int, so: str) -> None:
    """A warning for an item file's rows of items not in the catalogue (another id space: 0-based, or another
    release) and for the catalogue items it leaves out: they were dropped, and those items' features left at
    their default, with only a count in convert.json."""
    if not known.all():
        log.warning("%s: %d of %d rows are of items not in the titles file (first: item %d): ignored", path,
                    int((~known).sum()), len(known), int(raw[~known][0]))
    if without:
        log.warning("%s: %d of the %d items have no row here: %s", path, without, items, so)


def _read_tags(spec: RawSpec, path: Path, items: RawItems) -> None:
    table = (_read_csv(path, {spec.item_col: pa.int64(), spec.tag_col: pa.string()}) if has_header(path, ",")
             else _read_id_text(path, spec.item_col, spec.tag_col))
    raw = _ids(table, spec.item_col, path)
    dense, known = items.dense(raw)
    for i, text in zip(dense[known], np.asarray(table.column(spec.tag_col).to_pylist(), dtype=object)[known]):
        # an item on several rows (one per tag, say) has the tags of all, in file order: the later row replaced
        # the earlier ones without a word
        items.tags[i - 1] += [t.strip() for t in (text or "").split(spec.tag_sep) if t.strip()]
    _say_unmatched(path, raw, known, len(items.raw_ids), len(items.raw_ids) - len(np.unique(dense[known])),
                   "no tags")


LINE_OPTIONS = {  # one text column per line: structure and values are checked by parse(), not by Arrow
    "parse_options": pacsv.ParseOptions(delimiter="\x1f", quote_char=False),
    "convert_options": pacsv.ConvertOptions(column_types={"line": pa.string()}),
}


@dataclass(frozen=True)
class LineFormat:
    """How one line of the interaction file splits: delimiter, field count, and which fields hold what."""

    sequences: bool
    skip_rows: int
    fields: tuple[str, ...]  # names of the fields of a line (the header, for pairs)
    user: int
    item: int
    time: int  # -1 for sequences


def line_format(spec: RawSpec, files: RawFiles) -> LineFormat:
    if files.sequences:
        return LineFormat(True, int(has_header(files.pairs)), ("user", "items"), 0, 1, -1)
    header = tuple(_header(files.pairs))
    return LineFormat(False, 1, header, header.index(spec.user_col), header.index(spec.item_col),
                      header.index(spec.time_col))


def _read_options(fmt: LineFormat) -> pacsv.ReadOptions:
    return pacsv.ReadOptions(column_names=["line"], skip_rows=fmt.skip_rows,
                             block_size=TSV_BLOCK_BYTES if fmt.sequences else 1 << 20)


def read_interactions(fmt: LineFormat, files: RawFiles):
    """The interaction file as a Ray Dataset of text lines (never collected); :func:`parse` makes int64 ids."""
    import ray.data

    return ray.data.read_csv(str(files.pairs), read_options=_read_options(fmt), **LINE_OPTIONS)


@dataclass(frozen=True)
class BadValue:
    """The first bad line of a batch: its row in the batch, the field (or None: the line's shape), the text."""

    row: int
    field: str | None
    value: str
    count: int


def _ints(col: pa.ChunkedArray | pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(int64 values with 0 where invalid, invalid mask) of a text column."""
    text = pc.utf8_trim(col, PADDING)
    ok = pc.fill_null(pc.match_substring_regex(text, _INT), False)
    values = pc.cast(pc.if_else(ok, pc.utf8_ltrim(text, "+"), "0"), pa.int64())  # Arrow's cast refuses "+5"
    bad = np.asarray(pc.invert(ok).to_numpy(zero_copy_only=False), dtype=bool)
    return values, bad


def _unquoted(lines: pa.Array, bad: np.ndarray, n: int, used: set[int]) -> tuple[pa.Array, np.ndarray]:
    """Lines whose comma count is off because a quoted field the conversion does not read holds commas
    (``5,10,1,"a,b"``: valid CSV) read as CSV and written back with those commas dropped, so that splitting on
    commas finds their ``n`` fields; the other bad lines stay bad (a comma inside an id or a time: no integer). Only
    lines already counted bad are read here (rare), so the clean path stays vectorised."""
    rows = np.flatnonzero(bad & np.asarray(pc.match_substring(lines, '"').to_numpy(zero_copy_only=False), bool))
    if not len(rows):
        return lines, bad
    texts = lines.to_pylist()
    bad = bad.copy()
    for row in rows:
        try:
            fields = next(csv.reader([texts[row]], strict=True), [])
        except csv.Error:  # an unclosed quote: not CSV either
            continue
        if len(fields) == n and not any("," in fields[k] for k in used):
            texts[row] = ",".join(f.replace(",", " ") for f in fields)
            bad[row] = False
    return pa.array(texts, pa.string()), bad


def _split_lines(lines: pa.Array, fmt: LineFormat) -> tuple[pa.ListArray, np.ndarray]:
    """Lines split into their fields, and the mask of lines with the wrong number of fields (replaced by zeros)."""
    delim = "\t" if fmt.sequences else ","
    n = len(fmt.fields)
    count = pc.add(pc.count_substring(lines, delim), 1).to_numpy(zero_copy_only=False)
    bad = count < n if fmt.sequences else count != n  # a sequence's items may hold no tab; more tabs: bad
    if not fmt.sequences and bad.any():
        lines, bad = _unquoted(lines, bad, n, {fmt.user, fmt.item, fmt.time})
    safe = pc.if_else(pa.array(bad), delim.join(["0"] * n), lines)
    return pc.split_pattern(safe, delim, max_splits=n - 1), bad


def parse(batch: pa.Table, fmt: LineFormat) -> tuple[pa.Table, BadValue | None]:
    """Text lines → int64 ``user``, ``item``, ``ts`` (sequences: ``ts`` = position in the line).

    Lines with the wrong number of fields or a non-integer value are dropped and the first one is described by
    the returned BadValue (None when the batch is clean).
    """
    lines = batch.column("line").combine_chunks()
    parts, bad_shape = _split_lines(lines, fmt)
    if fmt.sequences:
        table, bad_value, where = _parse_sequences(parts, bad_shape)
    else:
        cols, bad_value, where = {}, np.zeros(len(lines), dtype=bool), {}
        for name, k in (("user", fmt.user), ("item", fmt.item), ("ts", fmt.time)):
            cols[name], bad = _ints(pc.list_element(parts, k))
            bad &= ~bad_shape
            for row in np.flatnonzero(bad)[:1]:
                where.setdefault(int(row), (fmt.fields[k], pc.list_element(parts, k)[row].as_py()))
            bad_value |= bad
        table = pa.table(cols).filter(pa.array(~(bad_value | bad_shape)))
    bad_any = bad_value | bad_shape
    if not bad_any.any():
        return table, None
    row = int(np.argmax(bad_any))
    field, value = (None, lines[row].as_py()) if bad_shape[row] else where[row]
    return table, BadValue(row, field, value, int(bad_any.sum()))


def _parse_sequences(parts: pa.ListArray, bad_shape: np.ndarray) -> tuple[pa.Table, np.ndarray, dict]:
    user, bad_user = _ints(pc.list_element(parts, 0))
    text = pc.utf8_trim_whitespace(pc.list_element(parts, 1))
    lists = pc.split_pattern(text, " ")  # ListArray, offset 0
    flat = pc.list_flatten(lists)
    parent = pc.list_parent_indices(lists).to_numpy()
    pos = np.arange(len(flat)) - lists.offsets.to_numpy()[:-1][parent]  # position of each item in its line
    nonempty = np.asarray(pc.not_equal(flat, "").to_numpy(zero_copy_only=False), dtype=bool)  # double spaces
    item, bad_item = _ints(flat)
    bad_item &= nonempty
    bad_line = bad_user & ~bad_shape
    bad_line[parent[bad_item]] |= ~bad_shape[parent[bad_item]]
    keep = nonempty & ~(bad_line | bad_shape)[parent]
    table = pa.table({"user": pc.take(user, pa.array(parent[keep])), "item": pc.filter(item, pa.array(keep)),
                      "ts": pa.array(pos[keep], pa.int64())})
    where = {}
    for row in np.flatnonzero(bad_line)[:1]:
        if bad_user[row]:
            where[int(row)] = ("user", pc.list_element(parts, 0)[row].as_py())
        else:
            where[int(row)] = ("items", flat[int(np.flatnonzero((parent == row) & bad_item)[0])].as_py())
    return table, bad_line, where


def _numbered_lines(fmt: LineFormat, files: RawFiles) -> Iterator[tuple[pa.RecordBatch, int]]:
    """The interaction file's lines on the driver (streamed), empty ones kept so that line numbers count them as
    an editor does: each batch with the number of the line before its first."""
    line = fmt.skip_rows
    options = {**LINE_OPTIONS, "parse_options": pacsv.ParseOptions(delimiter="\x1f", quote_char=False,
                                                                    ignore_empty_lines=False)}
    with pacsv.open_csv(files.pairs, read_options=_read_options(fmt), **options) as reader:
        for rb in reader:
            yield rb, line
            line += rb.num_rows


def first_repeated_user(fmt: LineFormat, files: RawFiles) -> str:
    """Scan a ``user<TAB>items`` file on the driver for the first user on a second line: the error message.

    Each line is one user's whole history, its positions the time; a user on two lines would have their items
    interleaved as ties. Runs only after the distributed pass counted more lines with items than distinct users,
    and holds 16 bytes a line (user and line number), so the normal path never reads the file here."""
    users, numbers = [], []
    for rb, line in _numbered_lines(fmt, files):
        parts, bad_shape = _split_lines(rb.column(0), fmt)  # an empty line has no tab: a bad shape, left out
        user, bad_user = _ints(pc.list_element(parts, 0))
        items = pc.utf8_trim_whitespace(pc.list_element(parts, 1))
        has_items = np.asarray(pc.not_equal(items, "").to_numpy(zero_copy_only=False), dtype=bool)
        kept = np.flatnonzero(has_items & ~bad_shape & ~bad_user)
        users.append(user.to_numpy()[kept])
        numbers.append(line + kept + 1)
    users_all = np.concatenate([np.zeros(0, np.int64), *users])
    order = np.argsort(users_all, kind="stable")  # each user's lines in file order
    u, n = users_all[order], np.concatenate([np.zeros(0, np.int64), *numbers])[order]
    again = np.flatnonzero(u[1:] == u[:-1]) + 1
    if not len(again):
        return f"{files.pairs}: a user on more than one line (not found again on a second read)"
    first = again[np.argmin(n[again])]  # the earliest second line of any user
    return (f"{files.pairs}: line {int(n[first])}: user {int(u[first])} again (first on line {int(n[first - 1])}); "
            f"expected one line per user holding all of their items in time order")


def first_bad_line(fmt: LineFormat, files: RawFiles) -> str:
    """Scan the interaction file on the driver (streamed) for the first bad line: the error message.

    Runs only after the distributed pass counted bad lines, so the normal path never reads the file here.
    """
    for rb, line in _numbered_lines(fmt, files):  # empty lines left out of the parse
        kept = np.flatnonzero(pc.not_equal(rb.column(0), "").to_numpy(zero_copy_only=False))
        _, bad = parse(pa.Table.from_batches([rb]).take(kept), fmt)
        if bad is not None:
            where = f"{files.pairs}: line {line + int(kept[bad.row]) + 1}"
            if bad.field is None:
                return f"{where}: {bad.value!r} does not have the fields {','.join(fmt.fields)}"
            what = "timestamp (ms)" if bad.field == fmt.fields[fmt.time] and fmt.time >= 0 else "id"
            return f"{where}: column {bad.field}: {bad.value!r} is not an integer {what} of at most 18 digits"  # as
            # read_items says it (99999999999999999999, 20 digits, was "not an integer")
    return f"{files.pairs}: bad lines (not found again on a second read)"
