"""Where the project keeps its files: one data root, overridable by FEED_DAGSTER_DATA."""

import os
from pathlib import Path


def data_root() -> Path:
    """The storage root (default ./data); every store lives below it unless configured."""
    return Path(os.environ.get("FEED_DAGSTER_DATA", "data")).resolve()


def warehouse_path() -> Path:
    return data_root() / "warehouse.duckdb"


# The two models' names in the model store (their directories under the store root).
TWO_TOWER, RANKER = "two_tower", "ranker"


def incoming_dir() -> Path:
    """Where new Parquet batches of posts and engagements are dropped for the sensor."""
    return data_root() / "incoming"


def shard_dir() -> Path:
    """One Parquet file of feeds per user shard."""
    return data_root() / "feeds" / "shards"


def serving_path() -> Path:
    """The serving DuckDB file readers query; replaced atomically on every publish."""
    return data_root() / "serving" / "feeds.duckdb"


SAFETY_SUFFIX = ".safety.parquet"


def safety_path_for(serving_path: str | Path) -> Path:
    """Where the safety list of a serving file lives: `feeds.duckdb` -> `feeds.safety.parquet`."""
    serving_path = Path(serving_path)
    return serving_path.with_name(serving_path.stem + SAFETY_SUFFIX)


def safety_path() -> Path:
    """Deleted posts and block/mute edges readers drop at read time, beside the serving file
    (written by the ingest; see feed_dagster/serving/safety.py)."""
    return safety_path_for(serving_path())
