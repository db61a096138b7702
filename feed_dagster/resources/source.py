"""The data source as a Dagster resource: switching data is configuration, not code."""

import os

import dagster as dg

from feed_dagster.data.schema import World
from feed_dagster.incoming import replay_done
from feed_dagster.paths import incoming_dir
from feed_dagster.sources import SourceSpec, load_source


class SourceResource(dg.ConfigurableResource):
    """Where the canonical tables come from.

    `spec` is `synthetic[:scale]`, `ebnerd:/path` or `parquet:/path`; the environment
    variable FEED_DAGSTER_SOURCE, when set, overrides the default.
    """

    spec: str = "synthetic:demo"
    seed: int = 0
    # Replay committed incoming batches (data/incoming/done) on top of the source, so a
    # full rebuild keeps the activity the sensor ingested.
    include_ingested: bool = True

    def parsed(self) -> SourceSpec:
        return SourceSpec.parse(self.spec, seed=self.seed)

    def load(self) -> World:
        world = load_source(self.parsed())
        if self.include_ingested:
            world = replay_done(world, incoming_dir() / "done")
        return world


def default_source() -> SourceResource:
    return SourceResource(spec=os.environ.get("FEED_DAGSTER_SOURCE", "synthetic:demo"))
