"""Where the project keeps its files: one data root, overridable by FEED_DAGSTER_DATA."""

import os
from pathlib import Path


def data_root() -> Path:
    """The storage root (default ./data); every store lives below it unless configured."""
    return Path(os.environ.get("FEED_DAGSTER_DATA", "data")).resolve()


def warehouse_path() -> Path:
    return data_root() / "warehouse.duckdb"


def incoming_dir() -> Path:
    """Where new Parquet batches of posts and engagements are dropped for the sensor."""
    return data_root() / "incoming"
