"""The data source as a Dagster resource: switching data is configuration, not code."""

import os
from pathlib import Path

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
    # The incoming folder whose done/ is replayed; empty = the default data root's. The
    # definitions set it from the storage resource, so both always name the same folder.
    incoming_dir: str = ""

    def parsed(self) -> SourceSpec:
        return SourceSpec.parse(self.spec, seed=self.seed)

    def load(self) -> World:
        world = load_source(self.parsed())
        if self.include_ingested:
            folder = Path(self.incoming_dir) if self.incoming_dir else incoming_dir()
            world = replay_done(world, folder / "done")
        return world


def default_source(incoming: Path | None = None) -> SourceResource:
    return SourceResource(
        spec=os.environ.get("FEED_DAGSTER_SOURCE", "synthetic:demo"),
        incoming_dir=str(incoming) if incoming else "",
    )
