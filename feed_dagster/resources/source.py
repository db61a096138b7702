"""The data source as a Dagster resource: switching data is configuration, not code."""

import os
from collections.abc import Callable

import dagster as dg
from dagster._config.pythonic_config import PartialResource

from feed_dagster.data.world_stream import WorldStream
from feed_dagster.incoming import done_batches, replay_done
from feed_dagster.resources.storage import StorageResource
from feed_dagster.sources import SourceSpec, stream_source


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

    def stream(self, progress: Callable[[str], None] | None = None) -> WorldStream:
        """The source's world, its largest tables in parts where the source makes them so
        (`feed_dagster.sources.stream_source`)."""
        stream = stream_source(self.parsed(), progress)
        done = self.storage.incoming_dir() / "done"
        if self.include_ingested and done_batches(done):
            # A replayed batch adds to whole tables, engagements among them: the world is
            # collected first (ingested batches are small beside it).
            return WorldStream.whole(replay_done(stream.collect(), done))
        return stream


def default_source(
    storage: StorageResource | PartialResource[StorageResource],
) -> SourceResource:
    """The source FEED_DAGSTER_SOURCE names (default synthetic:demo), replaying the
    incoming batches under `storage`."""
    return SourceResource(
        storage=storage, spec=os.environ.get("FEED_DAGSTER_SOURCE", "synthetic:demo")
    )
