"""The data source as a Dagster resource: switching data is configuration, not code."""

import os

import dagster as dg

from feed_dagster.data.schema import World
from feed_dagster.data.sources import SourceSpec, load_source


class SourceResource(dg.ConfigurableResource):
    """Where the canonical tables come from.

    `spec` is `synthetic[:scale]`, `ebnerd:/path` or `parquet:/path`; the environment
    variable FEED_DAGSTER_SOURCE, when set, overrides the default.
    """

    spec: str = "synthetic:demo"
    seed: int = 0

    def parsed(self) -> SourceSpec:
        return SourceSpec.parse(self.spec, seed=self.seed)

    def load(self) -> World:
        return load_source(self.parsed())


def default_source() -> SourceResource:
    return SourceResource(spec=os.environ.get("FEED_DAGSTER_SOURCE", "synthetic:demo"))
