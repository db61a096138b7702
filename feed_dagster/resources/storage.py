"""Where the project keeps its files: one data root, overridable by FEED_DAGSTER_DATA."""

import os
from pathlib import Path


def data_root() -> Path:
    """The storage root (default ./data); every store lives below it unless configured."""
    return Path(os.environ.get("FEED_DAGSTER_DATA", "data")).resolve()


def warehouse_path() -> Path:
    return data_root() / "warehouse.duckdb"
