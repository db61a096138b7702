"""Read, validate and map an EBNeRD folder (or zip) into the canonical `World`.

Supported shapes
----------------
* official: `articles.parquet`, `train/` and `validation/` (each with `behaviors.parquet`
  and `history.parquet`), optionally `test/` and artifact folders `<name>/<name>.parquet`.
  Validation impressions are the held-out period. `test/` is listed but never read: it has
  no clicked lists, so it can neither train nor evaluate anything.
* flat: `articles.parquet`, `behaviors.parquet`, `history.parquet` in one folder (the shape
  of the real sample). The held-out period is then cut by time: an impression is held out
  when its `impression_time >= t_min + (1 - heldout_fraction) * (t_max - t_min)` over the
  behaviour file, i.e. it lies in the last `heldout_fraction` (default 20%) of the
  behaviour time span.
* either of the above packed in a zip; `__MACOSX/` and `._*` entries are ignored and the
  folder holding the shallowest `articles.parquet` is the root.

Validation
----------
Every file is checked against `layout.py` (missing file, missing column, wrong type), then
its values: null ids, duplicate impression ids (within and across splits), duplicate
article or history user ids, empty inview lists, clicked articles not in the inview list,
history lists of unequal length, history times not ascending, history not strictly before
the first impression of its split, and article ids (inview, clicked, history) missing from
`articles.parquet`. Value domains: read times, counts, ids and codes >= 0, scroll
percentages in 0-100, sentiment in 0-1, age in 0-120, every timestamp inside the
plausible window of `feed_dagster.data.validate`; articles, behaviours and history must
each hold at least one row. A file that is not readable Parquet, a zip that is not a
readable archive, or a zip member that fails to inflate is named as such. Any failure
raises one `DataValidationError` naming file and column.

Mapping to canonical tables
---------------------------
* users: every user id in history or behaviours; `created_at` = first time seen.
* articles: `published_at = published_time`, topic = `category` (`topic_name` =
  `category_str`), text = subtitle + " " + body, no author (news has none), kind original.
* engagements: every history read (no impression id, dwell = `read_time_fixed`) and every
  behaviour click (its impression id, `engaged_at = impression_time`, dwell = the
  behaviour's `read_time`). The official validation history repeats train-period reads,
  so history reads are deduplicated on (user, article, time), and a history read that
  coincides exactly with a behaviour click of the same user and article is kept only as
  the click.
* impressions: one row per inview article, position = index in the inview list.
* topic_follows: derived from history reads only (all of which precede every behaviour of
  their split, hence the held-out period): a user follows a category when it makes up at
  least `topic_follow_min_share` (default 15%) of the user's history reads and at least
  `topic_follow_min_reads` (default 3) reads.
* follows, blocks, mutes, muted_keywords, impression_truth: empty.
* window_start = earliest history or behaviour time, heldout_start = first held-out
  impression time, now = latest impression time; the candidate window from the ages at
  which articles were shown (`derive_candidate_window`).

Columns that describe the future (`layout.FUTURE_COLUMNS`: article totals over the whole
period, the next page's read time and scroll) are validated but never mapped.
"""

from __future__ import annotations

import io
import math
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from feed_dagster.data.schema import DEFAULT_CANDIDATE_WINDOW, TABLE_SCHEMAS, World, conform
from feed_dagster.data.validate import (
    check_not_empty,
    check_range,
    check_time_window,
    read_parquet,
)
from feed_dagster.ebnerd.layout import (
    ARTICLES_FILE,
    ARTICLES_SCHEMA,
    BEHAVIORS_FILE,
    BEHAVIORS_SCHEMA,
    HISTORY_FILE,
    HISTORY_LIST_COLUMNS,
    HISTORY_SCHEMA,
    LABELLED_SPLITS,
    TEST_SPLIT,
    same_logical_type,
)
from feed_dagster.errors import MAX_ROWS_SHOWN, DataValidationError

FLAT_SPLIT = "flat"


@dataclass(frozen=True)
class EbnerdLayout:
    """What an EBNeRD folder or zip contains (as relative POSIX paths)."""

    location: str
    kind: str  # "official" or "flat"
    splits: tuple[str, ...]  # labelled splits read; ("flat",) for the flat shape
    has_test: bool  # test/ present (and ignored)
    artifacts: dict[str, str] = field(default_factory=dict)  # name -> relative parquet path

    def behaviors_file(self, split: str) -> str:
        return BEHAVIORS_FILE if split == FLAT_SPLIT else f"{split}/{BEHAVIORS_FILE}"

    def history_file(self, split: str) -> str:
        return HISTORY_FILE if split == FLAT_SPLIT else f"{split}/{HISTORY_FILE}"


@dataclass(frozen=True)
class EbnerdFrames:
    """The validated EBNeRD files as polars frames.

    `behaviors` concatenates the labelled splits with two added columns: `split` and
    `is_heldout`. `history` maps each split to its history frame.
    """

    layout: EbnerdLayout
    articles: pl.DataFrame
    behaviors: pl.DataFrame
    history: dict[str, pl.DataFrame]


class _Source:
    """Uniform read access to a folder or a zip archive, by relative POSIX path."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._members: dict[str, str] = {}
        self._root = PurePosixPath(".")
        if self.path.is_file():
            # A truncated or corrupt archive has no readable central directory: say so,
            # rather than "no such folder", since the file is right there.
            try:
                if not zipfile.is_zipfile(self.path):
                    raise zipfile.BadZipFile("no zip end-of-archive record")
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataValidationError(
                    str(self.path),
                    None,
                    "an EBNeRD folder or a readable zip archive",
                    f"a file that is not a readable zip archive ({exc})",
                ) from exc
            self._index_zip()
        elif not self.path.is_dir():
            raise DataValidationError(
                str(self.path), None, "an EBNeRD folder or zip", "no such folder or zip"
            )

    def _index_zip(self) -> None:
        assert self._zip is not None
        names = [
            n
            for n in self._zip.namelist()
            if not n.endswith("/")
            and not n.startswith("__MACOSX/")
            and not PurePosixPath(n).name.startswith("._")
        ]
        roots = sorted(
            (PurePosixPath(n).parent for n in names if PurePosixPath(n).name == ARTICLES_FILE),
            key=lambda p: len(p.parts),
        )
        root = roots[0] if roots else PurePosixPath(".")
        self._root = root
        for n in names:
            p = PurePosixPath(n)
            if root == PurePosixPath(".") or p.is_relative_to(root):
                rel = p if root == PurePosixPath(".") else p.relative_to(root)
                self._members[rel.as_posix()] = n

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def display(self, rel: str) -> str:
        """How a file is named in error messages."""
        if self._zip is not None:
            # A missing member is named where it should be, below the archive's root.
            where = self._members.get(rel, (self._root / rel).as_posix())
            return f"{self.path}!{where}"
        return str(self.path / rel)

    def exists(self, rel: str) -> bool:
        if self._zip is not None:
            return rel in self._members
        return (self.path / rel).is_file()

    def relative_files(self) -> list[str]:
        if self._zip is not None:
            return sorted(self._members)
        return sorted(p.relative_to(self.path).as_posix() for p in self.path.rglob("*.parquet"))

    def schema(self, rel: str) -> pa.Schema:
        try:
            return pq.read_schema(self._open(rel))
        except DataValidationError:
            raise
        except Exception as exc:  # truncated, empty or not Parquet at all
            raise DataValidationError(
                self.display(rel),
                None,
                "a readable Parquet file",
                f"not a readable Parquet file ({exc})",
            ) from exc

    def read(self, rel: str) -> pl.DataFrame:
        return read_parquet(self._open(rel), self.display(rel))

    def _open(self, rel: str) -> str | io.BytesIO:
        if self._zip is not None:
            # A member whose bytes fail their CRC or do not inflate is a damaged archive,
            # not a bad Parquet file: name the member and the zip.
            try:
                return io.BytesIO(self._zip.read(self._members[rel]))
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
                raise DataValidationError(
                    self.display(rel),
                    None,
                    "a readable zip member",
                    f"a damaged zip member ({exc})",
                ) from exc
        return str(self.path / rel)


def inspect_layout(path: str | Path) -> EbnerdLayout:
    """Describe the shape of an EBNeRD folder or zip without reading any rows."""
    src = _Source(path)
    try:
        return _layout(src)
    finally:
        src.close()


def list_artifacts(path: str | Path) -> dict[str, str]:
    """Artifact files (`<name>/<name>.parquet`, e.g. contrastive vectors) by name.

    Values are paths relative to the dataset root (inside the zip for a zip).
    """
    return inspect_layout(path).artifacts


def _layout(src: _Source) -> EbnerdLayout:
    if not src.exists(ARTICLES_FILE):
        raise DataValidationError(
            src.display(ARTICLES_FILE), None, "the EBNeRD articles file", "missing file"
        )
    if src.exists(f"train/{BEHAVIORS_FILE}") or src.exists(f"validation/{BEHAVIORS_FILE}"):
        kind, splits = "official", LABELLED_SPLITS
    elif src.exists(BEHAVIORS_FILE):
        kind, splits = "flat", (FLAT_SPLIT,)
    else:
        raise DataValidationError(
            src.display(BEHAVIORS_FILE),
            None,
            f"train/{BEHAVIORS_FILE} (official layout) or {BEHAVIORS_FILE} (flat layout)",
            "missing file",
        )
    reserved = {*LABELLED_SPLITS, TEST_SPLIT}
    artifacts = {}
    for rel in src.relative_files():
        parts = PurePosixPath(rel).parts
        if len(parts) == 2 and parts[0] not in reserved and parts[1] == f"{parts[0]}.parquet":
            artifacts[parts[0]] = rel
    return EbnerdLayout(
        location=str(src.path),
        kind=kind,
        splits=splits,
        has_test=src.exists(f"{TEST_SPLIT}/{BEHAVIORS_FILE}"),
        artifacts=artifacts,
    )


# --------------------------------------------------------------------------------------
# schema and value checks


def _read_checked(src: _Source, rel: str, schema: pa.Schema) -> pl.DataFrame:
    name = src.display(rel)
    if not src.exists(rel):
        raise DataValidationError(name, None, "the file to exist", "missing file")
    found = src.schema(rel)
    for f in schema:
        idx = found.get_field_index(f.name)
        if idx < 0:
            raise DataValidationError(name, f.name, f"a column of type {f.type}", "no column")
        if not same_logical_type(found.field(idx).type, f.type):
            raise DataValidationError(
                name, f.name, f"type {f.type}", f"type {found.field(idx).type}"
            )
    return src.read(rel)


def _printable(df: pl.DataFrame) -> pl.DataFrame:
    """Offending rows in short form: times as text, lists cut to their first 8 elements
    (with the full length beside them when cut)."""
    df = df.head(MAX_ROWS_SHOWN)
    exprs: list[pl.Expr] = []
    for name, dtype in df.schema.items():
        col = pl.col(name)
        if isinstance(dtype, pl.List):
            inner = dtype.inner
            shown = col.list.head(8)
            if inner is not None and inner.is_temporal():
                shown = shown.cast(pl.List(pl.String))
            exprs.append(shown.alias(name))
            if (df[name].list.len() > 8).any():
                exprs.append(col.list.len().alias(f"{name}_len"))
        elif dtype.is_temporal():
            exprs.append(col.cast(pl.String))
        else:
            exprs.append(col)
    return df.select(exprs)


def _fail_if(bad: pl.DataFrame, file: str, column: str, expected: str, found: str) -> None:
    if bad.height:
        raise DataValidationError.from_frame(
            file, column, expected, f"{bad.height} {found}", _printable(bad)
        )


def _check_not_null(df: pl.DataFrame, file: str, columns: list[str], keys: list[str]) -> None:
    for col in columns:
        bad = df.filter(pl.col(col).is_null())
        _fail_if(bad.select("row", *keys), file, col, "no null values", "rows with null")
        if isinstance(df.schema[col], pl.List):
            bad = df.filter(pl.col(col).list.eval(pl.element().is_null().any()).list.first())
            _fail_if(bad.select("row", *keys, col), file, col, "no null elements", "rows")


def _check_unique(df: pl.DataFrame, file: str, column: str) -> None:
    bad = df.filter(pl.col(column).is_duplicated()).sort(column, "row")
    _fail_if(bad.select("row", column), file, column, "unique values", "rows with duplicate ids")


# Value domains (inclusive; None = open). Percentages are EBNeRD's 0-100 scroll depths,
# times are seconds, `sentiment_score` is a classifier probability, codes and ids are
# non-negative. Nulls are allowed where EBNeRD has them (e.g. scroll depth not measured).
PERCENT = (0.0, 100.0)
NON_NEGATIVE = (0.0, None)
ARTICLE_RANGES: dict[str, tuple[float | None, float | None]] = {
    "article_id": NON_NEGATIVE,
    "image_ids": NON_NEGATIVE,
    "category": NON_NEGATIVE,
    "subcategory": NON_NEGATIVE,
    "total_inviews": NON_NEGATIVE,
    "total_pageviews": NON_NEGATIVE,
    "total_read_time": NON_NEGATIVE,
    "sentiment_score": (0.0, 1.0),
}
BEHAVIOR_RANGES: dict[str, tuple[float | None, float | None]] = {
    "article_id": NON_NEGATIVE,
    "read_time": NON_NEGATIVE,
    "scroll_percentage": PERCENT,
    "device_type": NON_NEGATIVE,
    "gender": NON_NEGATIVE,
    "postcode": NON_NEGATIVE,
    "age": (0.0, 120.0),
    "next_read_time": NON_NEGATIVE,
    "next_scroll_percentage": PERCENT,
}
HISTORY_RANGES: dict[str, tuple[float | None, float | None]] = {
    "scroll_percentage_fixed": PERCENT,
    "read_time_fixed": NON_NEGATIVE,
}
TIME_COLUMNS: dict[str, tuple[str, ...]] = {
    ARTICLES_FILE: ("published_time", "last_modified_time"),
    BEHAVIORS_FILE: ("impression_time",),
    HISTORY_FILE: ("impression_time_fixed",),
}


def _check_values(
    df: pl.DataFrame,
    file: str,
    ranges: dict[str, tuple[float | None, float | None]],
    times: tuple[str, ...],
    keys: list[str],
) -> None:
    """Domain ranges and the plausible time window (feed_dagster.data.validate)."""
    for column, (low, high) in ranges.items():
        check_range(df, file, column, low, high, keys=keys)
    for column in times:
        check_time_window(df, file, column, keys=keys)


def _check_articles(df: pl.DataFrame, file: str) -> None:
    check_not_empty(df, file, "the articles every impression refers to")
    _check_values(df, file, ARTICLE_RANGES, TIME_COLUMNS[ARTICLES_FILE], ["article_id"])
    df = df.with_row_index("row")
    _check_not_null(df, file, ["article_id"], [])
    _check_unique(df, file, "article_id")


def _check_behaviors(df: pl.DataFrame, file: str) -> None:
    check_not_empty(df, file, "the impressions to train and evaluate on")
    keys = ["impression_id", "user_id"]
    _check_values(df, file, BEHAVIOR_RANGES, TIME_COLUMNS[BEHAVIORS_FILE], keys)
    df = df.with_row_index("row")
    _check_not_null(
        df,
        file,
        [
            "impression_id",
            "user_id",
            "impression_time",
            "article_ids_inview",
            "article_ids_clicked",
        ],
        keys,
    )
    _check_unique(df, file, "impression_id")
    bad = df.filter(pl.col("article_ids_inview").list.len() == 0)
    _fail_if(bad.select("row", *keys), file, "article_ids_inview", "non-empty lists", "empty lists")
    bad = df.filter(
        pl.col("article_ids_clicked").list.set_difference("article_ids_inview").list.len() > 0
    )
    _fail_if(
        bad.select("row", *keys, "article_ids_clicked", "article_ids_inview"),
        file,
        "article_ids_clicked",
        "every clicked article in article_ids_inview",
        "rows with clicks outside the inview list",
    )


def _check_history(df: pl.DataFrame, file: str, behaviors_start: datetime | None) -> None:
    check_not_empty(df, file, "the reading history of the split's users")
    _check_values(df, file, HISTORY_RANGES, TIME_COLUMNS[HISTORY_FILE], ["user_id"])
    df = df.with_row_index("row")
    _check_not_null(df, file, ["user_id", "impression_time_fixed", "article_id_fixed"], ["user_id"])
    _check_unique(df, file, "user_id")
    n = pl.col("article_id_fixed").list.len()
    for col in HISTORY_LIST_COLUMNS:
        if col == "article_id_fixed":
            continue
        bad = df.filter(pl.col(col).is_null() | (pl.col(col).list.len() != n))
        _fail_if(
            bad.select(
                "row",
                "user_id",
                pl.col(col).list.len().alias(f"len_{col}"),
                n.alias("len_article_id_fixed"),
            ),
            file,
            col,
            "as many elements as article_id_fixed in every row",
            "rows of unequal length",
        )
    times = pl.col("impression_time_fixed")
    bad = df.filter(times.list.eval(pl.element().diff() < pl.duration(microseconds=0)).list.any())
    _fail_if(
        bad.select("row", "user_id", times),
        file,
        "impression_time_fixed",
        "ascending times in every row",
        "rows with times out of order",
    )
    if behaviors_start is not None:
        bad = df.filter(times.list.max() >= behaviors_start)
        _fail_if(
            bad.select("row", "user_id", times.list.max().alias("last_history_time")),
            file,
            "impression_time_fixed",
            f"every time before the split's first impression ({behaviors_start})",
            "rows reaching into the behaviour window",
        )


def _check_dangling(
    ids: pl.DataFrame, known: pl.Series, file: str, column: str, articles_file: str
) -> None:
    bad = ids.filter(~pl.col("article_id").is_in(known.implode()))
    _fail_if(
        bad,
        file,
        column,
        f"article ids present in {articles_file}",
        "references to unknown articles",
    )


def read_ebnerd(path: str | Path, *, heldout_fraction: float = 0.2) -> EbnerdFrames:
    """Read and validate every file EBNeRD training and evaluation need.

    Raises DataValidationError on the first layout or value problem found.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    src = _Source(path)
    try:
        layout = _layout(src)
        articles_file = src.display(ARTICLES_FILE)
        articles = _read_checked(src, ARTICLES_FILE, ARTICLES_SCHEMA)
        _check_articles(articles, articles_file)
        known = articles["article_id"]

        behaviors_parts: list[pl.DataFrame] = []
        history: dict[str, pl.DataFrame] = {}
        for split in layout.splits:
            bfile = src.display(layout.behaviors_file(split))
            hfile = src.display(layout.history_file(split))
            beh = _read_checked(src, layout.behaviors_file(split), BEHAVIORS_SCHEMA)
            _check_behaviors(beh, bfile)
            hist = _read_checked(src, layout.history_file(split), HISTORY_SCHEMA)
            start = beh["impression_time"].min() if beh.height else None
            _check_history(hist, hfile, start)  # type: ignore[arg-type]

            for column in ("article_ids_inview", "article_ids_clicked"):
                ids = (
                    beh.with_row_index("row")
                    .select("row", "impression_id", pl.col(column).alias("article_id"))
                    .explode("article_id")
                )
                _check_dangling(ids, known, bfile, column, articles_file)
            ids = (
                hist.with_row_index("row")
                .select("row", "user_id", pl.col("article_id_fixed").alias("article_id"))
                .explode("article_id")
            )
            _check_dangling(ids, known, hfile, "article_id_fixed", articles_file)

            if split == FLAT_SPLIT:
                heldout = _time_heldout(beh, heldout_fraction)
            else:
                heldout = pl.lit(split == "validation")
            behaviors_parts.append(beh.with_columns(split=pl.lit(split), is_heldout=heldout))
            history[split] = hist

        behaviors = pl.concat(behaviors_parts, how="vertical")
        if len(behaviors_parts) > 1:
            dup = (
                behaviors.with_row_index("row")
                .filter(pl.col("impression_id").is_duplicated())
                .sort("impression_id", "split")
                .select("impression_id", "split")
            )
            _fail_if(
                dup,
                src.display(layout.behaviors_file(layout.splits[-1])),
                "impression_id",
                "impression ids unique across splits",
                "rows sharing an id with another split",
            )
        return EbnerdFrames(layout=layout, articles=articles, behaviors=behaviors, history=history)
    finally:
        src.close()


def _time_heldout(beh: pl.DataFrame, fraction: float) -> pl.Expr:
    t_min, t_max = beh["impression_time"].min(), beh["impression_time"].max()
    if t_min is None or t_max is None:
        return pl.lit(False)
    cutoff = t_min + (t_max - t_min) * (1.0 - fraction)  # type: ignore[operator]
    return pl.col("impression_time") >= cutoff


# --------------------------------------------------------------------------------------
# mapping


def to_world(
    frames: EbnerdFrames,
    *,
    topic_follow_min_share: float = 0.15,
    topic_follow_min_reads: int = 3,
) -> World:
    """Map validated EBNeRD frames into the canonical tables (rules in the module doc)."""
    beh = frames.behaviors
    if not beh["is_heldout"].any():
        raise ValueError(f"{frames.layout.location}: no held-out impressions to evaluate on")

    articles = frames.articles.select(
        pl.col("article_id"),
        pl.col("published_time").alias("published_at"),
        pl.lit("original").alias("kind"),
        pl.col("article_id").alias("conversation_id"),
        pl.col("category").alias("topic"),
        pl.col("category_str").alias("topic_name"),
        pl.col("title"),
        pl.concat_str(
            [pl.col("subtitle").fill_null(""), pl.col("body").fill_null("")], separator=" "
        )
        .str.strip_chars()
        .alias("text"),
    )

    clicks = beh.select(
        "impression_id",
        "user_id",
        pl.col("article_ids_clicked").alias("article_id"),
        pl.col("impression_time").alias("engaged_at"),
        pl.col("read_time").alias("dwell_seconds"),
    ).explode("article_id")

    reads = (
        pl.concat(
            [
                h.select(
                    "user_id",
                    pl.col("article_id_fixed").alias("article_id"),
                    pl.col("impression_time_fixed").alias("engaged_at"),
                    pl.col("read_time_fixed").alias("dwell_seconds"),
                ).explode("article_id", "engaged_at", "dwell_seconds")
                for h in frames.history.values()
            ],
            how="vertical",
        )
        .unique(["user_id", "article_id", "engaged_at"], keep="first", maintain_order=True)
        .join(clicks, on=["user_id", "article_id", "engaged_at"], how="anti")
        .with_columns(impression_id=pl.lit(None, dtype=pl.UInt32))
    )
    engagements = (
        pl.concat([reads.select(clicks.columns), clicks], how="vertical")
        .with_columns(click=pl.lit(True))
        .sort("engaged_at", "user_id", "article_id", nulls_last=True, maintain_order=True)
    )

    impressions = (
        beh.select(
            "impression_id",
            "user_id",
            pl.col("article_ids_inview").alias("article_id"),
            pl.int_ranges(pl.col("article_ids_inview").list.len(), dtype=pl.Int32).alias(
                "position"
            ),
            pl.col("impression_time").alias("shown_at"),
            "is_heldout",
        )
        .explode("article_id", "position")
        .sort("shown_at", "impression_id", "position")
    )

    seen = pl.concat(
        [
            reads.select("user_id", pl.col("engaged_at").alias("t")),
            beh.select("user_id", pl.col("impression_time").alias("t")),
        ]
    )
    users = (
        seen.group_by("user_id")
        .agg(pl.col("t").min().alias("created_at"))
        .with_columns(handle=pl.format("user{}", pl.col("user_id")))
        .sort("user_id")
    )

    topic_follows = derive_topic_follows(
        reads, articles, min_share=topic_follow_min_share, min_reads=topic_follow_min_reads
    )

    candidate_window = derive_candidate_window(impressions, articles)
    window_start = seen["t"].min()
    heldout_start = beh.filter("is_heldout")["impression_time"].min()
    now = beh["impression_time"].max()
    empty = {
        name: pl.DataFrame(schema=TABLE_SCHEMAS[name])
        for name in ("impression_truth", "follows", "blocks", "mutes", "muted_keywords")
    }
    return World(
        users=conform("users", users),
        articles=conform("articles", articles),
        engagements=conform("engagements", engagements),
        impressions=conform("impressions", impressions),
        topic_follows=conform("topic_follows", topic_follows),
        window_start=window_start,  # type: ignore[arg-type]
        heldout_start=heldout_start,  # type: ignore[arg-type]
        now=now,  # type: ignore[arg-type]
        candidate_window=candidate_window,
        **empty,
    )


# The candidate window covers the ages at which EBNeRD's own platform showed articles: the
# WINDOW_QUANTILE of (impression time - published time) over every inview article, rounded
# up to whole hours, never below the news default of 48 h. A high quantile rather than the
# maximum, so a handful of very old articles in some slates do not open the window to the
# whole archive; at least 48 h, so a sample of fresh news keeps the usual window.
WINDOW_QUANTILE = 0.95


def derive_candidate_window(
    impressions: pl.DataFrame,
    articles: pl.DataFrame,
    quantile: float = WINDOW_QUANTILE,
    minimum: timedelta = DEFAULT_CANDIDATE_WINDOW,
) -> timedelta:
    """The candidate window of an EBNeRD world (rule above). `impressions` needs article_id
    and shown_at, `articles` article_id and published_at. Ages below zero (an article shown
    before its stated publication) are ignored; with no usable age the window is `minimum`."""
    ages = (
        impressions.select("article_id", "shown_at")
        .join(articles.select("article_id", "published_at"), on="article_id")
        .select(
            ((pl.col("shown_at") - pl.col("published_at")).dt.total_seconds() / 3600).alias("h")
        )
        .filter(pl.col("h") >= 0)
    )
    if ages.is_empty():
        return minimum
    hours = math.ceil(float(ages["h"].quantile(quantile, interpolation="higher")))  # type: ignore[arg-type]
    return max(minimum, timedelta(hours=hours))


def derive_topic_follows(
    reads: pl.DataFrame,
    articles: pl.DataFrame,
    *,
    min_share: float = 0.15,
    min_reads: int = 3,
) -> pl.DataFrame:
    """Topics a user follows: >= `min_share` of their reads and >= `min_reads` reads.

    `reads` needs user_id and article_id; `articles` needs article_id and topic.
    """
    per_topic = (
        reads.select("user_id", "article_id")
        .join(articles.select("article_id", "topic"), on="article_id", how="inner")
        .filter(pl.col("topic").is_not_null())
        .group_by("user_id", "topic")
        .agg(pl.len().alias("n"))
        .with_columns(share=pl.col("n") / pl.col("n").sum().over("user_id"))
    )
    return (
        per_topic.filter((pl.col("share") >= min_share) & (pl.col("n") >= min_reads))
        .select("user_id", "topic")
        .sort("user_id", "topic")
    )


def load_ebnerd(
    path: str | Path,
    *,
    heldout_fraction: float = 0.2,
    topic_follow_min_share: float = 0.15,
    topic_follow_min_reads: int = 3,
) -> World:
    """Read, validate and map an EBNeRD folder or zip into the canonical `World`.

    `heldout_fraction` only applies to the flat shape (see the module doc).
    """
    frames = read_ebnerd(path, heldout_fraction=heldout_fraction)
    return to_world(
        frames,
        topic_follow_min_share=topic_follow_min_share,
        topic_follow_min_reads=topic_follow_min_reads,
    )
