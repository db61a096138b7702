"""Choosing and loading a data source by one setting (core; no dagster).

A source spec is a string: `synthetic` / `synthetic:demo` (the embedded world at a scale),
`ebnerd:/path/to/ebnerd_small` (a folder or the official zip), or `parquet:/path/to/folder`
(canonical tables as `<table>.parquet` files, plus `world_info.parquet`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import polars as pl

from feed_dagster.data.schema import DEFAULT_CANDIDATE_WINDOW, TABLE_SCHEMAS, World, conform

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
    if spec.kind == "synthetic":
        from feed_dagster.world import generate_world, world_config
        from feed_dagster.world.catalog import CATALOG_SCALES, catalog_config, generate_catalog

        if spec.scale in CATALOG_SCALES:
            return generate_catalog(catalog_config(spec.scale, seed=spec.seed))
        return generate_world(world_config(spec.scale, seed=spec.seed))
    if spec.kind == "ebnerd":
        from feed_dagster.ebnerd.load import load_ebnerd

        return load_ebnerd(spec.path)
    return load_parquet_world(Path(spec.path))


def world_info(world: World, source: str) -> pl.DataFrame:
    """The one-row table that carries a world's time frame to downstream assets."""
    return pl.DataFrame(
        {
            "source": [source],
            "window_start": [world.window_start],
            "heldout_start": [world.heldout_start],
            "now": [world.now],
            "candidate_window_hours": [window_hours(world.candidate_window)],
        },
        schema={
            "source": pl.String,
            **{k: pl.Datetime("us") for k in ("window_start", "heldout_start", "now")},
            "candidate_window_hours": pl.Float64,
        },
    )


def window_hours(window: timedelta | None) -> float | None:
    return None if window is None else window.total_seconds() / 3600.0


def window_from_info(row: dict) -> timedelta | None:
    """The candidate window of a world_info row; tables written before the column existed
    carry the news default."""
    if "candidate_window_hours" not in row:
        return DEFAULT_CANDIDATE_WINDOW
    hours = row["candidate_window_hours"]
    return None if hours is None else timedelta(hours=float(hours))


def save_parquet_world(world: World, folder: Path, source: str = "parquet") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in world.tables().items():
        df.write_parquet(folder / f"{name}.parquet")
    world_info(world, source).write_parquet(folder / "world_info.parquet")


def load_parquet_world(folder: Path) -> World:
    """Canonical tables from `<table>.parquet` files; missing optional tables are empty."""
    if not folder.is_dir():
        raise FileNotFoundError(f"parquet source folder {folder} does not exist")
    required = ("users", "articles", "impressions", "engagements")
    missing = [t for t in required if not (folder / f"{t}.parquet").exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(t + '.parquet' for t in missing)}")
    tables = {}
    for name, schema in TABLE_SCHEMAS.items():
        path = folder / f"{name}.parquet"
        df = pl.read_parquet(path) if path.exists() else pl.DataFrame(schema=schema)
        tables[name] = conform(name, df)
    info_path = folder / "world_info.parquet"
    if info_path.exists():
        info = pl.read_parquet(info_path).row(0, named=True)
        start, heldout, now = info["window_start"], info["heldout_start"], info["now"]
        window = window_from_info(info)
    else:
        window = DEFAULT_CANDIDATE_WINDOW
        times = tables["impressions"]["shown_at"]
        start, now = times.min(), times.max()
        heldout = start + (now - start) * 0.8
    return World(
        **tables, window_start=start, heldout_start=heldout, now=now, candidate_window=window
    )


def world_from_tables(tables: dict[str, pl.DataFrame], info: pl.DataFrame) -> World:
    """A World from warehouse tables (missing ones empty) and the one-row world_info."""
    row = info.row(0, named=True)
    full = {
        name: conform(name, tables[name]) if name in tables else pl.DataFrame(schema=schema)
        for name, schema in TABLE_SCHEMAS.items()
    }
    return World(
        **full,
        window_start=row["window_start"],
        heldout_start=row["heldout_start"],
        now=row["now"],
        candidate_window=window_from_info(row),
    )
