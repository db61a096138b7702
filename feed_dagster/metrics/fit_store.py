"""Classic-peer fits kept on disk, so that the steps of one build that need the same fit
make it once.

At 100k users one fit of the four classic methods takes about two minutes, ALS most of it,
and three steps need the one at the held-out start: impressions_evaluation (the peers as
baselines), trained_models (the ranker's peer inputs on held-out impressions, and the
peers' rows of ranker_evaluation) and feed_quality (the ranker's inputs at its cut).

A fit is named by everything that decides it: the positive engagement rows before the cut
(hashed without regard to their order, which a warehouse scan does not keep), the cut, the
methods and the hyperparameters. The rows are hashed by one query wherever they are, in a
frame or in the warehouse, so a step that reads the table and one that leaves it where it
is find the same fit. Two processes asking for the same fit at once take turns
on a file lock, so the second loads what the first saved. Files are written beside and
renamed, so a reader sees a whole fit or none; only the newest few are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import pickle
import struct
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import duckdb
import polars as pl

from feed_dagster import mapped_pickle
from feed_dagster.artifacts import Location
from feed_dagster.data.schema import POSITIVE_ACTIONS
from feed_dagster.data.warehouse import connect_read_only
from feed_dagster.metrics import classic
from feed_dagster.metrics.classic import (
    CLASSIC_METHODS,
    HYPER_DEFAULTS,
    ClassicPeers,
    positive_rows_sql,
)

# Fits kept in a store: one build needs two or three (the held-out start, `now`).
KEEP = 3

T = TypeVar("T")


def fit_name(
    engagements: pl.DataFrame, cut: datetime, methods: tuple[str, ...], **hyper: Any
) -> str:
    """The name of the fit ClassicPeers.fit(engagements, cut, methods, **hyper) makes: the
    name fit_name_in_warehouse gives the same rows in a warehouse, as the same query takes
    the digest of both."""
    positive = positive_rows_sql(engagements.columns)
    digest: tuple[int, ...] = (0,)
    if positive is not None:
        used = [
            "user_id",
            "article_id",
            "engaged_at",
            *(a for a in POSITIVE_ACTIONS if a in engagements.columns),
        ]
        con = duckdb.connect()
        try:
            con.register("rows", engagements.select(used))
            digest = con.execute(_digest_sql("rows", positive), {"cut": cut}).fetchone()
        finally:
            con.close()
    return _name(digest, cut, methods, hyper)


def fit_name_in_warehouse(
    path: Location, cut: datetime, methods: tuple[str, ...], **hyper: Any
) -> str:
    """The name of the fit of every engagement in the warehouse at `path`, from a digest
    DuckDB takes where the rows live (a feed shard reads its own users' rows only): the
    name fit_name gives the same rows in a frame."""
    con = connect_read_only(path)
    try:
        positive = _positive_sql(con)
        digest: tuple[int, ...] = (0,)
        if positive is not None:
            digest = con.execute(_digest_sql("main.engagements", positive), {"cut": cut}).fetchone()
    finally:
        con.close()
    return _name(digest, cut, methods, hyper)


def _positive_sql(con: duckdb.DuckDBPyConnection) -> str | None:
    """positive_rows_sql of the warehouse's engagements table."""
    return positive_rows_sql({r[0] for r in con.execute("describe main.engagements").fetchall()})


def _digest_sql(source: str, positive: str) -> str:
    """The count and two sums of the hashes of the positive rows before $cut: the same for
    any order of the same rows (DuckDB sums them exactly, as hugeint), and streamed, so
    naming a fit holds no copy of the rows."""
    return (
        "select count(*), sum(h), sum(h // 7) from (select hash(user_id::bigint, "
        f"article_id::bigint, epoch_us(engaged_at)) as h from {source} "
        f"where ({positive}) and engaged_at < $cut)"
    )


def _name(digest: tuple[int, ...], cut: datetime, methods: tuple[str, ...], hyper: dict) -> str:
    h = {**HYPER_DEFAULTS, **hyper}
    digest = tuple(int(d or 0) for d in digest)
    key = f"{cut.isoformat()}|{sorted(methods)}|{sorted(h.items())}|{digest}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def stored_fit(
    engagements: pl.DataFrame,
    cut: datetime,
    store: Path | None,
    methods: tuple[str, ...] = CLASSIC_METHODS,
    **hyper: Any,
) -> ClassicPeers:
    """ClassicPeers.fit(engagements, cut, methods, **hyper), loaded from `store` when a
    process fitted the same peers before (and saved there after fitting otherwise). With
    `store` None it is the plain fit."""
    return stored_fit_named(cut, store, methods, engagements=engagements, **hyper)[0]


def stored_fit_in_warehouse(
    path: Location,
    cut: datetime,
    store: Path | None,
    methods: tuple[str, ...] = CLASSIC_METHODS,
    **hyper: Any,
) -> ClassicPeers:
    """stored_fit of every engagement in the warehouse at `path`: named there
    (fit_name_in_warehouse) and, when no process fitted it before, fitted on the positive
    pairs the warehouse hands over, never on the whole table (at 1M users 165M rows of ten
    columns, 5.7 GiB as a frame, against 3.6 GiB for the pairs)."""
    return stored_fit_named(cut, store, methods, warehouse=path, **hyper)[0]


def stored_fit_named(
    cut: datetime,
    store: Path | None,
    methods: tuple[str, ...] = CLASSIC_METHODS,
    *,
    engagements: pl.DataFrame | None = None,
    warehouse: Location | None = None,
    **hyper: Any,
) -> tuple[ClassicPeers, str]:
    """(the stored fit, its name in `store`) of `engagements`, or, without them, of every
    engagement in `warehouse`; the name is "" without a store. The name is what
    store_again needs, so the rows are hashed once."""
    if engagements is None and warehouse is None:
        raise ValueError("a fit needs the engagements or the warehouse that keeps them")

    def fit() -> ClassicPeers:
        if engagements is not None:
            return ClassicPeers.fit(engagements, cut, methods, **hyper)
        return ClassicPeers.fit_pairs(read_positive_pairs(warehouse, cut), cut, methods, **hyper)

    if store is None:
        return fit(), ""
    name = (
        fit_name(engagements, cut, methods, **hyper)
        if engagements is not None
        else fit_name_in_warehouse(warehouse, cut, methods, **hyper)
    )
    return load_or_fit(store, name, fit), name


def read_positive_pairs(path: Location, cut: datetime) -> pl.DataFrame:
    """positive_pairs of the warehouse's engagements: (user_id, article_id, engaged_at) of
    the positive rows before `cut`, selected where they live."""
    con = connect_read_only(path)
    try:
        positive = _positive_sql(con) or "false"
        return con.execute(
            "select user_id::bigint as user_id, article_id::bigint as article_id, engaged_at "
            f"from main.engagements where ({positive}) and engaged_at < $cut",
            {"cut": cut},
        ).pl()
    finally:
        con.close()


def load_or_fit(store: Path, name: str, fit: Callable[[], ClassicPeers]) -> ClassicPeers:
    """The fit stored as `name` in `store`; made by `fit` and stored when absent."""
    return load_or_make(fit_file(store, name), ClassicPeers, fit, "fit-*.pkl")


def load_or_make(
    path: Path, kind: type[T], make: Callable[[], T], pattern: str, keep: int = KEEP
) -> T:
    """The `kind` object stored at `path`; made by `make` and stored (keeping the `keep`
    newest files matching `pattern`) when absent. Two processes asking at once take turns
    on a lock, so the second loads what the first stored."""
    value = load(path, kind)
    if value is not None:
        return value
    with exclusive(path.with_suffix(".lock")):
        value = load(path, kind)
        if value is None:
            value = make()
            save(value, path, pattern, keep=keep)
    return value


def fit_file(store: Path, name: str) -> Path:
    """Where the fit named `name` is kept in `store`."""
    return store / f"fit-{name}.pkl"


def store_again(peers: ClassicPeers, store: Path | None, name: str) -> None:
    """Save `peers`, the fit stored as `name` that has since computed item-kNN rows, over
    its stored file: the next process that loads the fit gets the rows with it
    (trained_models scores the held-out posts impressions_evaluation scored)."""
    if store is None:
        return
    path = fit_file(store, name)
    with exclusive(path.with_suffix(".lock")):
        save(peers, path, "fit-*.pkl")


@contextlib.contextmanager
def exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file `lock` (created if need be) for the block. The
    lock is the kernel's, so a process that dies lets go of it."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def code_version(kind: type) -> str:
    """A digest of the source that defines a stored `kind`: its own module's and the
    classic fits' (which every stored kind holds). A file pickled by other code loads
    without error but may lack what this code reads (an attribute added since): it is
    refitted rather than used."""
    return source_digest(sys.modules[kind.__module__], classic)


def source_digest(*modules: ModuleType) -> str:
    """A digest of the source files of `modules` (each once)."""
    digest = hashlib.sha256()
    for module in dict.fromkeys(modules):
        digest.update(Path(inspect.getfile(module)).read_bytes())
    return digest.hexdigest()[:16]


def load(path: Path, kind: type) -> Any | None:
    """The `kind` object stored at `path`, its arrays mapped from the file (shared by the
    processes that load it, see mapped_pickle); None when absent, unreadable or written by
    other code (see code_version): fit again."""
    try:
        stored = mapped_pickle.load(path)
    except (
        OSError,
        ValueError,  # mapped_pickle.NotMappedPickle: a plain pickle of older code, or cut short
        struct.error,
        pickle.UnpicklingError,
        EOFError,
        AttributeError,
        ImportError,
    ):
        return None
    if not (isinstance(stored, tuple) and len(stored) == 2):
        return None  # a bare object, as files were written before they carried a version
    version, value = stored
    if version != code_version(kind) or not isinstance(value, kind):
        return None
    return value


def save(value: object, path: Path, pattern: str, keep: int = KEEP) -> None:
    """Store `value` with its code_version at `path` (a mapped_pickle, written beside and
    renamed), then remove all but the `keep` newest files matching `pattern` beside it (and
    their locks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mapped_pickle.dump((code_version(type(value)), value), path)
    old = sorted(path.parent.glob(pattern), key=lambda p: p.stat().st_mtime)[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
        p.with_suffix(".lock").unlink(missing_ok=True)
