"""Choosing and loading a data source by one setting (core; no dagster).

A source spec is a string: `synthetic` / `synthetic:demo` (the embedded world at a scale),
`ebnerd:/path/to/ebnerd_small` (a folder or the official zip), or `parquet:/path/to/folder`
(canonical tables as `<table>.parquet` files, plus `world_info.parquet`).

This module sits above `data`, `world` and `ebnerd`: it is the one place that knows every
kind of source, so the lower packages never import each other to dispatch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from feed_dagster.data.schema import World
from feed_dagster.data.world_stream import WorldStream
from feed_dagster.data.world_tables import load_parquet_world
from feed_dagster.ebnerd.load import load_ebnerd
from feed_dagster.world import stream_world, world_config
from feed_dagster.world.catalog import CATALOG_SCALES, catalog_config, generate_catalog

SOURCE_KINDS = ("synthetic", "ebnerd", "parquet")


@dataclass(frozen=True)
class SourceSpec:
    kind: str
    scale: str = "demo"
    path: str | None = None
    seed: int = 0

    @classmethod
    def parse(cls, spec: str, seed: int = 0) -> SourceSpec:
        kind, _, arg = spec.partition(":")
        kind = kind.strip().lower()
        if kind not in SOURCE_KINDS:
            raise ValueError(f"unknown source {spec!r}: expected one of {SOURCE_KINDS}")
        if kind == "synthetic":
            return cls(kind, scale=arg or "demo", seed=seed)
        if not arg:
            raise ValueError(f"source {spec!r} needs a path, e.g. '{kind}:/data/ebnerd_small'")
        return cls(kind, path=arg, seed=seed)

    def describe(self) -> str:
        return (
            f"synthetic:{self.scale} (seed {self.seed})"
            if self.kind == "synthetic"
            else (f"{self.kind}:{self.path}")
        )


def load_source(spec: SourceSpec) -> World:
    return stream_source(spec).collect()


def stream_source(spec: SourceSpec, progress: Callable[[str], None] | None = None) -> WorldStream:
    """The source's world as a stream: the synthetic social world generates its largest
    tables chunk by chunk as the stream is read; the other sources arrive whole."""
    if spec.kind == "synthetic":
        if spec.scale in CATALOG_SCALES:
            return WorldStream.whole(generate_catalog(catalog_config(spec.scale, seed=spec.seed)))
        return stream_world(world_config(spec.scale, seed=spec.seed), progress)
    if spec.kind == "ebnerd":
        return WorldStream.whole(load_ebnerd(spec.path))
    return WorldStream.whole(load_parquet_world(Path(spec.path)))
