"""What every feed shard of one refresh computes alike: built by the first shard, loaded
by the others.

A shard scores its own users, but part of what its models read is the same in every
shard of a refresh: the catalog (every post's features, content vector and first
engagement), everyone's positive engagements per post and per author at `now`, everyone's
impressions per post and per author before it, and the name of the classic peers' fit at
`now`. Building them took each shard at 100k users about 20 s of its set-up, and at 1M
users about three minutes and most of its memory (a catalog of 10M posts, a scan of 165M
engagements and one of 497M impressions), 16 or 64 times over. The first shard builds
them and stores them beside the peers' fits; a shard that finds them loads them.

They are named by what decides them: the warehouse file and the embeddings file as they
are on disk (any write changes them), the time, the models' feature config and the
source of the code that builds them. A warehouse in a bucket has no such cheap identity:
there each shard builds its own, as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl

from feed_dagster.artifacts import Location, filesystem, is_remote
from feed_dagster.data.warehouse import read_tables
from feed_dagster.embeddings.stored import content_vectors
from feed_dagster.metrics.fit_store import load_or_make, source_digest
from feed_dagster.models import catalog as catalog_module
from feed_dagster.models import counts as counts_module
from feed_dagster.models import engagement_log as engagement_log_module
from feed_dagster.models import exposures as exposures_module
from feed_dagster.models import warehouse_engagements as warehouse_engagements_module
from feed_dagster.models.catalog import CATALOG_COLUMNS, FeatureConfig, ItemCatalog, to_micros
from feed_dagster.models.engagement_log import EveryonesPositives
from feed_dagster.models.exposures import ExposureTotals
from feed_dagster.models.peers import PEER_METHODS
from feed_dagster.models.ranker_data import POST_RECENT_US
from feed_dagster.models.warehouse_engagements import WarehouseEngagements

# The newest few kept: a refresh needs one; a second is a refresh that raced a write.
KEEP = 2


@dataclass(frozen=True)
class SharedInputs:
    """The inputs every shard of a refresh at `at_us` shares (see the module)."""

    catalog: ItemCatalog
    everyone: EveryonesPositives  # positive engagements per post and author, at the times
    exposures: ExposureTotals  # impressions per post and author before `at_us`
    peers_name: str  # the classic peers' fit at `at_us` (metrics.fit_store)
    at_us: int


def count_times(at: datetime) -> tuple[int, ...]:
    """The times a ranker scoring at `at` asks everyone's engagement counts at."""
    at_us = to_micros(at)
    return (at_us, at_us - POST_RECENT_US)


def build_shared_inputs(
    features: FeatureConfig, warehouse: Location, at: datetime, embeddings: Location | None
) -> SharedInputs:
    """The shared inputs at `at`, from the warehouse's articles, engagements and impressions
    and the posts' content vectors in `embeddings` (default: the artifacts root's file).

    What is known at `at` only, as models.serve builds it from tables cut there (an
    evaluation's cut is days before the warehouse's last event): the posts published by
    then, whose authors' profiles the catalog holds, and first engagements before it."""
    articles = read_tables(warehouse, ["articles"], columns={"articles": CATALOG_COLUMNS})
    articles = articles["articles"].filter(pl.col("published_at").dt.epoch("us") <= to_micros(at))
    everyone = WarehouseEngagements(warehouse)
    counts = everyone.post_counts(count_times(at))
    firsts = counts.firsts.filter(pl.col("first_us") < to_micros(at))
    catalog = ItemCatalog.build(
        articles, content_vectors(articles, embeddings), features, firsts=firsts
    )
    return SharedInputs(
        catalog=catalog,
        everyone=EveryonesPositives.from_counts(counts.positives, catalog),
        exposures=ExposureTotals.from_warehouse(warehouse, catalog, at),
        peers_name=everyone.fit_name(at, PEER_METHODS),
        at_us=to_micros(at),
    )


def shared_inputs(
    features: FeatureConfig,
    warehouse: Location,
    at: datetime,
    store: Path | None,
    embeddings: Location | None,
) -> SharedInputs:
    """The shared inputs at `at`: loaded from `store` when a shard of the same refresh (or
    the step before the shards, feeds.serving_inputs) built them, else built (and stored,
    when they can be named). Shards asking at once take turns on a lock, so the second
    loads what the first stored."""
    name = inputs_name(warehouse, embeddings, features, at)
    if store is None or name is None:
        return build_shared_inputs(features, warehouse, at, embeddings)
    return load_or_make(
        store / f"inputs-{name}.pkl",
        SharedInputs,
        lambda: build_shared_inputs(features, warehouse, at, embeddings),
        "inputs-*.pkl",
        keep=KEEP,
    )


def inputs_name(
    warehouse: Location,
    embeddings: Location | None,
    features: FeatureConfig,
    at: datetime,
) -> str | None:
    """The name the shared inputs are stored under, or None when the warehouse has no
    cheap identity (a bucket) or the embeddings file is not known."""
    if embeddings is None or is_remote(warehouse):
        return None
    files = [Path(warehouse), Path(f"{warehouse}.wal")]
    stats = [
        (s.st_ino, s.st_size, s.st_mtime_ns) for s in (os.stat(f) for f in files if f.exists())
    ]
    fs, path = filesystem(embeddings)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None  # building them says what is missing
    embedded = [
        str(info.get(k)) for k in ("size", "mtime", "LastModified", "ETag", "created") if k in info
    ]
    code = source_digest(
        sys.modules[__name__],
        catalog_module,
        counts_module,
        engagement_log_module,
        exposures_module,
        warehouse_engagements_module,
    )
    key = {
        "warehouse": [str(Path(warehouse).resolve()), stats],
        "embeddings": [str(embeddings), embedded],
        "features": features.to_dict(),
        "at": at.isoformat(),
        "code": code,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
