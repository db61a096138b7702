"""Build the feeds of many users by running the candidate pipeline over user batches."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from feed_dagster.pipeline.config import PipelineConfig
from feed_dagster.pipeline.protocols import Retriever, Scorer
from feed_dagster.pipeline.run import FEED_SCHEMA, run_pipeline
from feed_dagster.pipeline.tables import Tables


def build_feeds(
    tables: Tables,
    user_ids: np.ndarray,
    now: datetime,
    retriever: Retriever,
    scorer: Scorer,
    config: PipelineConfig | None = None,
    served: pl.DataFrame | None = None,
    batch_size: int = 512,
    progress: Callable[[str], None] | None = None,
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Feeds for `user_ids` in batches of `batch_size` users; stats summed over batches."""
    parts: list[pl.DataFrame] = []
    total: dict[str, Any] = {
        "users": 0,
        "users_with_feed": 0,
        "feed_rows": 0,
        "in_network_rows": 0,
        "seconds": {},
        "rows": {},
        "removed": {},
    }
    for start in range(0, len(user_ids), batch_size):
        batch = user_ids[start : start + batch_size]
        feeds, stats = run_pipeline(tables, batch, now, retriever, scorer, config, served)
        parts.append(feeds)
        for key in ("users", "users_with_feed", "feed_rows", "in_network_rows"):
            total[key] += stats[key]
        for key in ("seconds", "rows", "removed"):
            for stage, value in stats[key].items():
                total[key][stage] = total[key].get(stage, 0) + value
        total["retriever"], total["scorer"] = stats["retriever"], stats["scorer"]
        if progress:
            progress(f"{min(start + batch_size, len(user_ids)):,}/{len(user_ids):,} users")
    feeds = pl.concat(parts) if parts else pl.DataFrame(schema=FEED_SCHEMA)
    return feeds, total
