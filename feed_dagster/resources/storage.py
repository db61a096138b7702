"""The storage root every asset, check, op and sensor reads and writes under.

All path decisions of the Dagster layer go through this one resource, so moving the
artifacts (to another directory today, to an object store later) is a change of this
resource's configuration or implementation, never of the asset code. The layout below the
root is `feed_dagster.paths.StorageLayout`, shared with the commands that need no Dagster;
FEED_DAGSTER_ARTIFACTS_URI moves the vector table, the shard files, the embeddings and the
warehouse tables to a bucket."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from dagster._config.pythonic_config import PartialResource

from feed_dagster import paths
from feed_dagster.artifacts import Location
from feed_dagster.feeds.shard_files import shard_path


class StorageResource(dg.ConfigurableResource, paths.StorageLayout):
    """Where the warehouse, models, vectors, shards, serving file and incoming drops live.

    `root` empty means FEED_DAGSTER_DATA (default ./data), read when a path is asked for,
    so a resource built before the environment changes still follows it."""

    root: str = ""

    def data_root(self) -> Path:
        return Path(self.root).resolve() if self.root else paths.data_root()

    def shard_path(self, key: str) -> Location:
        return shard_path(self.shard_dir(), key)


def storage_at_launch(root: str = "") -> PartialResource[StorageResource]:
    """The storage resource as the definitions bind it: `root` is only the default, and a
    run's config (`resources.storage.config.root`) can set another. The resources that
    depend on it (IO manager, source, models, LanceDB) are given this same object, so Dagster
    resolves them against the one configured `storage` resource instead of each keeping a
    copy of the root taken at load time."""
    return StorageResource.configure_at_launch(root=root)
