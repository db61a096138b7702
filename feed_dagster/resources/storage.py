"""The storage root every asset, check, op and sensor reads and writes under.

All path decisions of the Dagster layer go through this one resource, so moving the
artifacts (to another directory today, to an object store later) is a change of this
resource's configuration or implementation, never of the asset code."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from dagster._config.pythonic_config import PartialResource

from feed_dagster import paths
from feed_dagster.feeds.shard_files import shard_path


class StorageResource(dg.ConfigurableResource):
    """Where the warehouse, models, vectors, shards, serving file and incoming drops live.

    `root` empty means FEED_DAGSTER_DATA (default ./data), read when a path is asked for,
    so a resource built before the environment changes still follows it."""

    root: str = ""

    def data_root(self) -> Path:
        return Path(self.root).resolve() if self.root else paths.data_root()

    def warehouse_path(self) -> Path:
        return self.data_root() / "warehouse.duckdb"

    def models_dir(self) -> Path:
        """The model store's root (weights + config per version, PROMOTED pointers)."""
        return self.data_root() / "models"

    def evaluation_dir(self) -> Path:
        """Held-out evaluation tables of every trained ranker, one Parquet per version."""
        return self.models_dir() / "evaluations"

    def serving_peers_dir(self) -> Path:
        """Cached classic-peer scores the ranker reads as inputs at serving time."""
        return self.models_dir() / "serving_peers"

    def lancedb_uri(self) -> str:
        return str(self.data_root() / "lancedb")

    def embeddings_path(self) -> Path:
        # A Parquet file, not a warehouse table: see feed_dagster/embeddings/stored.py.
        return self.data_root() / "embeddings" / "article_embeddings.parquet"

    def incoming_dir(self) -> Path:
        """Where new Parquet batches of posts and engagements are dropped for the sensor."""
        return self.data_root() / "incoming"

    def shard_dir(self) -> Path:
        """One Parquet file of feeds per user shard."""
        return self.data_root() / "feeds" / "shards"

    def shard_path(self, key: str) -> Path:
        return shard_path(self.shard_dir(), key)

    def serving_path(self) -> Path:
        """The serving DuckDB file readers query; replaced atomically on every publish."""
        return self.data_root() / "serving" / "feeds.duckdb"

    def safety_path(self) -> Path:
        """Deleted posts and block/mute edges readers drop at read time."""
        return paths.safety_path_for(self.serving_path())

    def run_failures_log(self) -> Path:
        return self.data_root() / "logs" / "run_failures.jsonl"


def storage_at_launch(root: str = "") -> PartialResource[StorageResource]:
    """The storage resource as the definitions bind it: `root` is only the default, and a
    run's config (`resources.storage.config.root`) can set another. The resources that
    depend on it (IO manager, source, models, LanceDB) are given this same object, so Dagster
    resolves them against the one configured `storage` resource instead of each keeping a
    copy of the root taken at load time."""
    return StorageResource.configure_at_launch(root=root)
