"""The lookup file: the served columns of one generation's `feeds` as flat arrays, so a
worker answers a page with two binary searches and a slice instead of a DuckDB scan.

Why a second copy
-----------------
DuckDB finds a user's rows by scanning the row group that holds them (122,880 rows) for
every column it returns: ~3 ms per page, which caps a 2-core service near 300 requests/s
(docs/BENCHMARKS.md, HTTP service). Within a generation the feeds never change and are
sorted by (user_id, position), so the same rows as arrays memory-mapped by every worker
answer in microseconds: `searchsorted` over the user_id column gives the user's row range,
`searchsorted` over its positions skips to the cursor, and the page is a slice. The pages
of the file stay in the OS page cache, shared by all worker processes.

The serving DuckDB file stays the source of truth and what people query. The lookup file
is derived from its `feeds` table by `publish_feeds`, inside the same publish, and a reader
that finds none for its generation (a file published before lookup files existed, or one a
later publish swept already) or a broken one answers from DuckDB instead, slower but
correct, and says so in /v1/health (see `FeedReader` in serving/read.py).

Where, and how a publish stays atomic
-------------------------------------
`feeds.lookup/<generation_id>.lookup` beside `feeds.duckdb`. The publish writes it under a
temporary name, renames it into place, and only then renames the new serving file into
place: a reader that opens the new serving file reads its generation id from `meta` and
finds the lookup file of exactly that generation. A reader keeps its memory map of the
generation it opened even after a later publish deletes the file (POSIX keeps an unlinked
file's pages until the last mapping goes), so a page never mixes two generations. For the
same reason a lookup file is never edited or truncated in place, only replaced by rename:
a worker touching a mapped page that a truncation cut off dies of SIGBUS.

Layout (one file, little-endian)
--------------------------------
    8 bytes   b"FEEDLKP1"
    8 bytes   header length H, uint64
    H bytes   header, JSON (see `_header`): generation id, row count, and per column its
              dtype, the byte offset of its values and of its validity bytes (1 = not
              null; only for a numeric column that has nulls). String columns are
              dictionary-encoded: their values are int32 codes into the header's list of
              that column's distinct strings, -1 for null. Titles, handles, sources and
              reasons repeat across users (per post, per author, a few phrases), so the
              lists stay small next to the rows.
    arrays    each at a 64-byte aligned offset, rows in (user_id, position) order
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from feed_dagster.atomic import TMP_MARKER, remove_temp, replace_atomically, temp_path_beside
from feed_dagster.data.schema import ACTIONS
from feed_dagster.serving.safety import SafetyList

# The columns of one page of a feed, as FeedReader.page returns them (tuples in this
# order). The version columns are left out: publish writes one value per generation into
# every row and into `meta`, which the page carries beside the rows.
PAGE_COLUMNS: tuple[str, ...] = (
    "position",
    "article_id",
    "title",
    "author_id",
    "author_handle",
    "source",
    "score",
    "reason",
    *(f"p_{a}" for a in ACTIONS),
    "dwell_seconds",
)
# user_id first: the file is searched by it; the page columns after it.
LOOKUP_COLUMNS: tuple[str, ...] = ("user_id", *PAGE_COLUMNS)

MAGIC = b"FEEDLKP1"
FORMAT_VERSION = 1
ALIGN = 64
SUFFIX = ".lookup"
# DuckDB column type -> array dtype; VARCHAR is dictionary-encoded into int32 codes.
DTYPES = {
    "BIGINT": "<i8",
    "INTEGER": "<i4",
    "SMALLINT": "<i2",
    "DOUBLE": "<f8",
    "FLOAT": "<f4",
    "BOOLEAN": "|b1",
    "VARCHAR": "<i4",
}
# Rows per batch streamed from DuckDB while writing: ~100 MB of Arrow at a time.
WRITE_BATCH_ROWS = 1 << 20
STALE_TMP_AFTER_SECONDS = 6 * 3600
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class LookupFileError(ValueError):
    """A lookup file that exists but cannot be used (truncated, another generation, ...)."""


def lookup_dir_for(serving_path: str | Path) -> Path:
    """`.../feeds.duckdb` -> `.../feeds.lookup/`: the lookup files of that serving file."""
    serving_path = Path(serving_path)
    return serving_path.with_name(serving_path.stem + ".lookup")


def lookup_path_for(serving_path: str | Path, generation_id: str) -> Path:
    """The lookup file of one generation of a serving file."""
    return lookup_dir_for(serving_path) / f"{generation_id}{SUFFIX}"


# --- writing ------------------------------------------------------------------------------


def write_lookup(
    con: duckdb.DuckDBPyConnection, table: str, path: Path, generation_id: str
) -> Path:
    """Write the lookup file of `table` (a `feeds` table, stored in (user_id, position)
    order) to a temporary file beside `path` and return it; the caller renames it into
    place (`publish_feeds` does so just before it swaps the serving file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(path.parent)
    cols = ", ".join(f'"{c}"' for c in LOOKUP_COLUMNS)
    types = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT {cols} FROM {table}").fetchall()}
    unsupported = {c: t for c, t in types.items() if t not in DTYPES}
    if unsupported:
        raise LookupFileError(f"cannot write {path}: unsupported column types {unsupported}")
    strings = {
        c: [
            r[0]
            for r in con.execute(
                f'SELECT DISTINCT "{c}" FROM {table} WHERE "{c}" IS NOT NULL ORDER BY 1'
            ).fetchall()
        ]
        for c, t in types.items()
        if t == "VARCHAR"
    }
    non_null = ", ".join(f'count("{c}")' for c in LOOKUP_COLUMNS)
    counts = con.execute(f"SELECT count(*), {non_null} FROM {table}").fetchone()
    assert counts is not None
    rows = int(counts[0])
    has_nulls = {c: n < rows for c, n in zip(LOOKUP_COLUMNS, counts[1:], strict=True)}
    if has_nulls["user_id"] or has_nulls["position"]:
        raise LookupFileError(f"cannot write {path}: {table} has null user_id or position")
    header, size = _header(generation_id, rows, types, strings, has_nulls)

    tmp = temp_path_beside(path)
    try:
        with open(tmp, "wb+") as f:
            f.truncate(size)
            head = orjson.dumps(header)
            f.write(MAGIC + struct.pack("<Q", len(head)) + head)
            f.flush()
            with mmap.mmap(f.fileno(), size) as mm:
                arrays = _views(mm, header)  # writable views: the map is opened for writing
                _fill(con, table, arrays, header, strings, rows)
                _check_sorted(arrays["user_id"], arrays["position"], path)
                del arrays  # release the buffer exports before the map closes
                mm.flush()
    except BaseException:
        remove_temp(tmp)
        raise
    return tmp


def _header(
    generation_id: str,
    rows: int,
    types: dict[str, str],
    strings: dict[str, list[str]],
    has_nulls: dict[str, bool],
) -> tuple[dict[str, Any], int]:
    """The header and the file size: each array's place, after the header."""
    # The header's own length depends on the offsets written into it; reserve room for
    # the longest offsets (20 digits each) first, then place the arrays after that.
    columns: dict[str, dict[str, Any]] = {
        c: {
            "dtype": DTYPES[types[c]],
            "offset": 10**19,
            "valid_offset": 10**19 if has_nulls[c] and types[c] != "VARCHAR" else None,
        }
        for c in LOOKUP_COLUMNS
    }
    header: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "generation_id": generation_id,
        "rows": rows,
        "columns": columns,
        "strings": strings,
    }
    at = _aligned(len(MAGIC) + 8 + len(orjson.dumps(header)))
    for spec in columns.values():
        spec["offset"] = at
        at = _aligned(at + rows * np.dtype(spec["dtype"]).itemsize)
        if spec["valid_offset"] is not None:
            spec["valid_offset"] = at
            at = _aligned(at + rows)
    return header, max(at, 1)


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _fill(
    con: duckdb.DuckDBPyConnection,
    table: str,
    arrays: dict[str, np.ndarray],
    header: dict[str, Any],
    strings: dict[str, list[str]],
    rows: int,
) -> None:
    """Stream the table into the arrays. No ORDER BY: DuckDB returns a plain scan in
    insertion order (preserve_insertion_order, on by default) and publish inserted the rows
    sorted; `_check_sorted` verifies it rather than paying for a second sort of every row."""
    con.execute("SET preserve_insertion_order = true")
    cols = ", ".join(f'"{c}"' for c in LOOKUP_COLUMNS)
    value_sets = {c: pa.array(v, pa.large_string()) for c, v in strings.items()}
    result = con.execute(f"SELECT {cols} FROM {table}")
    # to_arrow_reader is the newer name (DuckDB 1.4+) of fetch_record_batch.
    batches = getattr(result, "to_arrow_reader", result.fetch_record_batch)(WRITE_BATCH_ROWS)
    done = 0
    for batch in batches:
        n = batch.num_rows
        for c in LOOKUP_COLUMNS:
            column = batch.column(c)
            if c in value_sets:
                # Index of each string in the sorted distinct list; -1 for null.
                codes = pc.index_in(column.cast(pa.large_string()), value_set=value_sets[c])
                arrays[c][done : done + n] = codes.fill_null(-1).to_numpy()
                continue
            if header["columns"][c]["valid_offset"] is not None:
                arrays[f"{c}.valid"][done : done + n] = column.is_valid().to_numpy(
                    zero_copy_only=False
                )
                column = column.fill_null(0)
            arrays[c][done : done + n] = column.to_numpy(zero_copy_only=False)
        done += n
    if done != rows:
        raise LookupFileError(f"{table} returned {done:,} rows while writing, not {rows:,}")


def _check_sorted(user_ids: np.ndarray, positions: np.ndarray, path: Path) -> None:
    """Rows must be in strictly increasing (user_id, position) order: the reader's binary
    searches depend on it. Checked in chunks to keep memory flat on tens of millions."""
    step = 1 << 22
    for lo in range(0, max(user_ids.size - 1, 0), step):
        u0, u1 = user_ids[lo : lo + step], user_ids[lo + 1 : lo + step + 1]
        p0, p1 = positions[lo : lo + step], positions[lo + 1 : lo + step + 1]
        n = u1.size
        ok = (u1 > u0[:n]) | ((u1 == u0[:n]) & (p1 > p0[:n]))
        if not ok.all():
            bad = lo + int(np.argmin(ok))
            raise LookupFileError(
                f"cannot write {path}: rows not in (user_id, position) order at row {bad} "
                f"(user {int(user_ids[bad])} position {int(positions[bad])} is followed by "
                f"user {int(user_ids[bad + 1])} position {int(positions[bad + 1])})"
            )


def add_lookup_file(serving_path: str | Path) -> Path:
    """Write the lookup file of the generation a serving file holds, if it has none (a
    file published before lookup files existed): readers that open the file from then on
    use it. Returns its path."""
    # Imported here: read.py imports this module for its reader.
    from feed_dagster.serving.read import ALIAS, connect

    con = connect(serving_path)
    try:
        row = con.execute(f"SELECT generation_id FROM {ALIAS}.meta").fetchone()
        if row is None:
            raise LookupFileError(f"{serving_path}: the meta table is empty")
        generation = str(row[0])
        path = lookup_path_for(serving_path, generation)
        if not path.exists():
            replace_atomically(write_lookup(con, f"{ALIAS}.feeds", path, generation), path)
    finally:
        con.close()
    return path


def sweep_lookup_files(serving_path: str | Path, live_generation: str) -> None:
    """After a publish: delete the lookup files of older generations, except the newest
    other one (readers that opened the previous serving file a moment before the swap
    still find theirs). Readers that mapped a deleted file keep reading it."""
    folder = lookup_dir_for(serving_path)
    if not folder.is_dir():
        return
    live = lookup_path_for(serving_path, live_generation)
    others = []
    for p in folder.glob(f"*{SUFFIX}"):
        if p != live:
            try:
                others.append((p.stat().st_mtime_ns, p))
            except FileNotFoundError:
                pass
    for _, p in sorted(others, reverse=True)[1:]:
        p.unlink(missing_ok=True)


def _remove_stale_tmp(folder: Path) -> None:
    """Delete temporary files a killed publish left in the lookup folder."""
    cutoff = time.time() - STALE_TMP_AFTER_SECONDS
    for leftover in folder.glob(f"*{TMP_MARKER}*"):
        try:
            if leftover.stat().st_mtime < cutoff:
                remove_temp(leftover)
        except FileNotFoundError:
            pass


# --- reading ------------------------------------------------------------------------------


def _views(buffer: Any, header: dict[str, Any]) -> dict[str, np.ndarray]:
    """NumPy arrays over the file's bytes, one per column (and `<column>.valid`)."""
    rows = header["rows"]
    out: dict[str, np.ndarray] = {}
    for c, spec in header["columns"].items():
        arr = np.frombuffer(buffer, np.dtype(spec["dtype"]), rows, spec["offset"])
        out[c] = arr
        if spec["valid_offset"] is not None:
            out[f"{c}.valid"] = np.frombuffer(buffer, np.bool_, rows, spec["valid_offset"])
    return out


@dataclass(frozen=True)
class _Column:
    values: np.ndarray  # one per row: the value, or the string's code
    # String columns: the distinct strings, then None, as an object array, so a page's
    # codes turn into strings by one fancy index (a Python loop would cost several times
    # the whole search); code -1 (null) picks the None at the end.
    strings: np.ndarray | None
    valid: np.ndarray | None  # numeric columns with nulls: True where not null


class LookupFile:
    """One generation's lookup file, memory-mapped read-only. `page` returns the same
    tuples as the DuckDB page query, filtered by the safety list the same way. The map is
    released with the object (its arrays are views into it, so no explicit close)."""

    def __init__(self, path: Path, mm: mmap.mmap, header: dict[str, Any]) -> None:
        self.path = path
        self.generation_id: str = header["generation_id"]
        self.rows: int = header["rows"]
        self._mm = mm
        arrays = _views(mm, header)
        self.user_ids = arrays["user_id"]
        self.positions = arrays["position"]
        self.article_ids = arrays["article_id"]
        self._authors = arrays["author_id"]
        self._authors_valid = arrays.get("author_id.valid")
        self._columns = [
            _Column(
                arrays[c],
                _object_array([*header["strings"][c], None]) if c in header["strings"] else None,
                arrays.get(f"{c}.valid"),
            )
            for c in PAGE_COLUMNS
        ]

    @classmethod
    def open(cls, path: str | Path, generation_id: str, rows: int | None = None) -> LookupFile:
        """Map the lookup file at `path`, checking that it is whole and belongs to
        `generation_id` (and holds `rows` rows when given). FileNotFoundError when there
        is none, LookupFileError when it cannot be used."""
        path = Path(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < len(MAGIC) + 8:
                raise LookupFileError(f"{path}: {size} bytes, too short for a lookup file")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            header = _read_header(mm, path, size)
            if header["generation_id"] != generation_id:
                raise LookupFileError(
                    f"{path}: holds generation {header['generation_id']}, expected {generation_id}"
                )
            if rows is not None and header["rows"] != rows:
                raise LookupFileError(f"{path}: {header['rows']:,} rows, expected {rows:,}")
            return cls(path, mm, header)
        except BaseException:
            mm.close()
            raise

    def user_range(self, user_id: int) -> tuple[int, int]:
        """[lo, hi): the user's rows (lo == hi for a user without a feed)."""
        if not _INT64_MIN <= user_id <= _INT64_MAX:
            return 0, 0  # no BIGINT user id; NumPy would refuse to compare it
        ids = self.user_ids
        return int(ids.searchsorted(user_id, "left")), int(ids.searchsorted(user_id, "right"))

    def page(
        self, user_id: int, limit: int, after: int, safety: SafetyList | None = None
    ) -> tuple[list[tuple[Any, ...]], bool, bool]:
        """(rows, has_more, user_known): up to `limit` rows of PAGE_COLUMNS with position >
        `after`, without the rows the safety list hides from `user_id`, and whether more
        visible rows follow."""
        lo, hi = self.user_range(user_id)
        if lo == hi:
            return [], False, False
        start = lo + int(self.positions[lo:hi].searchsorted(after, "right"))
        if safety is None or safety.empty:
            stop = min(hi, start + limit)
            return self._rows(slice(start, stop)), stop < hi, True
        authors = self._authors[start:hi]
        if self._authors_valid is not None:
            authors = np.where(self._authors_valid[start:hi], authors, -1)
        keep = np.flatnonzero(~safety.hidden(user_id, self.article_ids[start:hi], authors)) + start
        return self._rows(keep[:limit]), keep.size > limit, True

    def _rows(self, rows: slice | np.ndarray) -> list[tuple[Any, ...]]:
        """Rows as tuples of Python values, built column by column (`tolist` converts a
        whole column slice at C speed; a Python loop per cell would cost more than the
        search)."""
        columns = []
        for col in self._columns:
            if col.strings is not None:
                columns.append(col.strings[col.values[rows]].tolist())
                continue
            values = col.values[rows].tolist()
            if col.valid is not None:
                values = [
                    v if ok else None
                    for v, ok in zip(values, col.valid[rows].tolist(), strict=True)
                ]
            columns.append(values)
        return list(zip(*columns, strict=True))


def _object_array(values: list[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values  # element by element: np.array would split equal-length strings
    return out


def _read_header(mm: mmap.mmap, path: Path, size: int) -> dict[str, Any]:
    if mm[: len(MAGIC)] != MAGIC:
        raise LookupFileError(f"{path}: not a lookup file (magic {mm[:8]!r})")
    (length,) = struct.unpack("<Q", mm[8:16])
    if 16 + length > size:
        raise LookupFileError(f"{path}: truncated header ({size} bytes, header {length})")
    try:
        header = orjson.loads(mm[16 : 16 + length])
    except orjson.JSONDecodeError as exc:
        raise LookupFileError(f"{path}: unreadable header: {exc}") from None
    if header.get("format") != FORMAT_VERSION:
        raise LookupFileError(
            f"{path}: format {header.get('format')!r}, this reader knows {FORMAT_VERSION}"
        )
    missing = [c for c in LOOKUP_COLUMNS if c not in header.get("columns", {})]
    if missing:
        raise LookupFileError(f"{path}: columns {missing} missing")
    rows = header["rows"]
    for c, spec in header["columns"].items():
        end = spec["offset"] + rows * np.dtype(spec["dtype"]).itemsize
        if spec["valid_offset"] is not None:
            end = max(end, spec["valid_offset"] + rows)
        if end > size:
            raise LookupFileError(f"{path}: truncated ({size:,} bytes; column {c} ends at {end:,})")
    return header
