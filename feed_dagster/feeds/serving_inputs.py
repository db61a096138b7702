"""What the feed shards of a refresh share, prepared once before them in a step of its own.

Every shard scores at the warehouse's `now` against the same catalog, everyone's counts
(models.shared_inputs) and the same classic peers fitted on every engagement before `now`
with the item-kNN rows of the candidate window's posts. A shard that finds them stored
loads them; one that does not builds and stores them itself, the others waiting on its
lock. Built here, before the shards, they cost no shard a wait (at 100k users the first
two shards waited about two minutes for the peers, one core idle) and their memory is
not a shard's: at 1M users the peers' fit alone holds 12.7 GiB, the catalog and counts
14 GiB, and a shard with both passed 20 GiB.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from feed_dagster.artifacts import is_remote
from feed_dagster.data.warehouse import read_tables
from feed_dagster.feeds.model_backends import ModelLocations, serving_features
from feed_dagster.models.ranker import load_ranker
from feed_dagster.models.serve import fit_serving_peers, stored_serving_peers
from feed_dagster.models.shared_inputs import shared_inputs
from feed_dagster.paths import RANKER
from feed_dagster.pipeline.config import resolve_window
from feed_dagster.pipeline.tables import candidate_window, published_between


@dataclass(frozen=True)
class PreparedInputs:
    """What `prepare_serving_inputs` left for the shards: the time they score at, the
    ranker they serve, the posts of the window and the peers' fit name (None when the
    ranker reads no peer features), with the seconds each part took."""

    now: datetime
    ranker_version: str
    articles: int
    window_posts: int | None
    peers_name: str | None
    seconds: dict[str, float]


def prepare_serving_inputs(
    models: ModelLocations,
    *,
    window_hours: float | None = None,
    no_window: bool = False,
    progress: Callable[[str], None] = lambda message: None,
) -> PreparedInputs | None:
    """Build and store what the shards of a refresh at the warehouse's `now` share: the
    shared inputs of the promoted ranker's features and the serving peers with the window's
    item-kNN rows (window: the source's unless `window_hours` or `no_window` overrides it, as
    for the shards). Stored ones are kept, not rebuilt. None while no ranker is promoted
    (the shards' table fallbacks share nothing), or when the warehouse is in a bucket: the
    stored inputs are named by the warehouse file and the peers kept on this machine's disk,
    so there each shard builds its own."""
    if models.warehouse is None or models.peers_dir is None:
        raise ValueError("serving inputs are built from a warehouse into a peers store")
    if is_remote(models.warehouse):
        return None
    version = models.store.promoted(RANKER)
    if version is None:
        return None
    ranker = load_ranker(*models.store.load(RANKER, version))
    features = serving_features(ranker.cfg.features)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    tables = read_tables(
        models.warehouse,
        ["articles", "world_info"],
        columns={"articles": ["article_id", "published_at"]},
    )
    articles, now = tables["articles"], tables["world_info"]["now"][0]
    window = resolve_window(candidate_window(tables), window_hours, no_window)
    posts = None
    if window is not None:
        posts = articles.filter(published_between(now - window, now))["article_id"].to_numpy()
    n_articles = articles.height
    del tables, articles
    seconds["read"] = time.perf_counter() - t0
    progress(f"{n_articles:,} posts, {0 if posts is None else len(posts):,} in the window")

    t0 = time.perf_counter()
    shared = shared_inputs(features, models.warehouse, now, models.peers_dir, models.embeddings)
    peers_name = shared.peers_name if ranker.cfg.peer_features else None
    # The catalog and counts go before the peers are fitted: their peaks do not add up.
    del shared
    gc.collect()
    seconds["shared_inputs"] = time.perf_counter() - t0
    progress(f"shared inputs ready in {seconds['shared_inputs']:.1f}s")

    if peers_name is not None:
        t0 = time.perf_counter()
        stored_serving_peers(
            models.peers_dir,
            peers_name,
            lambda: fit_serving_peers(models.warehouse, now, models.peers_dir, posts),
        )
        seconds["peers"] = time.perf_counter() - t0
        progress(f"serving peers ready in {seconds['peers']:.1f}s")
    return PreparedInputs(
        now=now,
        ranker_version=version,
        articles=n_articles,
        window_posts=None if posts is None else len(posts),
        peers_name=peers_name,
        seconds=seconds,
    )
