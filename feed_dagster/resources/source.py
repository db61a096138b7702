"""The data source as a Dagster resource: switching data is configuration, not code."""

import os

import dagster as dg
from dagster._config.pythonic_config import PartialResource

from feed_dagster.data.schema import World
from feed_dagster.incoming import replay_done
from feed_dagster.resources.storage import StorageResource
from feed_dagster.sources import SourceSpec, load_source


class SourceResource(dg.ConfigurableResource):
    """Where the canonical tables come from.

    `spec` is `synthetic[:scale]`, `ebnerd:/path` or `parquet:/path`; the environment
    variable FEED_DAGSTER_SOURCE, when set, overrides the default.
    """

    storage: StorageResource
    spec: str = "synthetic:demo"
    seed: int = 0
    # Replay committed incoming batches (incoming/done under the storage root) on top of
    # the source, so a full rebuild keeps the activity the sensor ingested.
    include_ingested: bool = True

    def parsed(self) -> SourceSpec:
        return SourceSpec.parse(self.spec, seed=self.seed)

    def load(self) -> World:
        world = load_source(self.parsed())
        if self.include_ingested:
            world = replay_done(world, self.storage.incoming_dir() / "done")
        return world


def default_source(
    storage: StorageResource | PartialResource[StorageResource],
) -> SourceResource:
    """The source FEED_DAGSTER_SOURCE names (default synthetic:demo), replaying the
    incoming batches under `storage`."""
    return SourceResource(
        storage=storage, spec=os.environ.get("FEED_DAGSTER_SOURCE", "synthetic:demo")
    )
