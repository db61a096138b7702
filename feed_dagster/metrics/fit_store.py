"""Classic-peer fits kept on disk, so that the steps of one build that need the same fit
make it once.

At 100k users one fit of the four classic methods takes about two minutes, ALS most of it,
and three steps need the one at the held-out start: impressions_evaluation (the peers as
baselines), trained_models (the ranker's peer inputs on held-out impressions, and the
peers' rows of ranker_evaluation) and feed_quality (the ranker's inputs at its cut).

A fit is named by everything that decides it: the positive engagement rows before the cut
(hashed without regard to their order, which a warehouse scan does not keep), the cut, the
methods and the hyperparameters. Two processes asking for the same fit at once take turns
on a file lock, so the second loads what the first saved. Files are written beside and
renamed, so a reader sees a whole fit or none; only the newest few are kept.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pickle
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.data.warehouse import connect_read_only
from feed_dagster.metrics.classic import (
    CLASSIC_METHODS,
    HYPER_DEFAULTS,
    ClassicPeers,
    positive_rows,
    positive_rows_sql,
)

# Fits kept in a store: one build needs two or three (the held-out start, `now`).
KEEP = 3


def fit_name(
    engagements: pl.DataFrame, cut: datetime, methods: tuple[str, ...], **hyper: Any
) -> str:
    """The name of the fit ClassicPeers.fit(engagements, cut, methods, **hyper) makes."""
    keep = positive_rows(engagements.columns, cut)
    digest: tuple[int, ...] = (0,)
    if keep is not None:
        row = pl.struct(
            pl.col("user_id").cast(pl.Int64),
            pl.col("article_id").cast(pl.Int64),
            pl.col("engaged_at").dt.epoch("us"),
        ).hash(seed=0)
        # The count and two wrapping sums of the row hashes: the same for any order of the
        # same rows. Streamed, so naming a fit holds no copy of the rows (19M at 100k users).
        digest = (
            engagements.lazy()
            .filter(keep)
            .select(row.alias("h"))
            .select(pl.len(), pl.col("h").sum().alias("sum"), (pl.col("h") // 7).alias("s7").sum())
            .collect(engine="streaming")
            .row(0)
        )
    return _name(digest, cut, methods, hyper)


def fit_name_in_warehouse(
    path: Location, cut: datetime, methods: tuple[str, ...], **hyper: Any
) -> str:
    """The name of the fit of every engagement in the warehouse at `path`, from a digest
    DuckDB takes where the rows live: a feed shard reads its own users' rows only.

    DuckDB's row hash is not polars', so the same rows named from a frame (fit_name) get
    another name: the two never meet on the same fit (shards name the serving fit at
    `now` this way, every other step its fits from frames), and if they did, a fit would be
    made twice, never loaded for the wrong rows."""
    con = connect_read_only(path)
    try:
        columns = {r[0] for r in con.execute("describe main.engagements").fetchall()}
        positive = positive_rows_sql(columns)
        digest: tuple[int, ...] = (0,)
        if positive is not None:
            # Count and two sums of the row hashes, as in fit_name; DuckDB sums them
            # exactly (hugeint), so the digest does not depend on the scan's order either.
            digest = con.execute(
                "select count(*), sum(h), sum(h // 7) from (select hash(user_id::bigint, "
                "article_id::bigint, epoch_us(engaged_at)) as h from main.engagements "
                f"where ({positive}) and engaged_at < $cut)",
                {"cut": cut},
            ).fetchone()
    finally:
        con.close()
    return _name(tuple(int(d or 0) for d in digest), cut, methods, hyper)


def _name(digest: tuple[int, ...], cut: datetime, methods: tuple[str, ...], hyper: dict) -> str:
    h = {**HYPER_DEFAULTS, **hyper}
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
    if store is None:
        return ClassicPeers.fit(engagements, cut, methods, **hyper)
    path = store / f"fit-{fit_name(engagements, cut, methods, **hyper)}.pkl"
    peers = load(path, ClassicPeers)
    if peers is not None:
        return peers
    with exclusive(path.with_suffix(".lock")):
        peers = load(path, ClassicPeers)
        if peers is None:
            peers = ClassicPeers.fit(engagements, cut, methods, **hyper)
            save(peers, path, "fit-*.pkl")
    return peers


def store_again(peers: ClassicPeers, engagements: pl.DataFrame, store: Path | None) -> None:
    """Save `peers`, a fit from stored_fit that has since computed item-kNN rows, over its
    stored file: the next process that loads the fit gets the rows with it (trained_models
    scores the held-out posts impressions_evaluation scored)."""
    if store is None:
        return
    name = fit_name(engagements, peers.cut, peers.methods, **peers.hyper)
    path = store / f"fit-{name}.pkl"
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


def load(path: Path, kind: type) -> Any | None:
    """The `kind` object pickled at `path`; None when absent or unreadable (fit again)."""
    try:
        with path.open("rb") as f:
            value = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
        return None
    return value if isinstance(value, kind) else None


def save(value: object, path: Path, pattern: str, keep: int = KEEP) -> None:
    """Pickle `value` to `path`, written beside and renamed, then remove all but the `keep`
    newest files matching `pattern` beside it (and their locks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    old = sorted(path.parent.glob(pattern), key=lambda p: p.stat().st_mtime)[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
        p.with_suffix(".lock").unlink(missing_ok=True)
