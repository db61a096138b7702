"""The serving file (core; no dagster): one DuckDB file of precomputed feeds, built aside
and renamed into place by `publish_feeds`, read with `get_feed` / `FeedReader`."""

from feed_dagster.serving.publish import PublishResult, publish_feeds
from feed_dagster.serving.read import (
    FeedNotPublishedError,
    FeedReader,
    connect,
    get_feed,
    read_meta,
    read_served,
)

__all__ = [
    "FeedNotPublishedError",
    "FeedReader",
    "PublishResult",
    "connect",
    "get_feed",
    "publish_feeds",
    "read_meta",
    "read_served",
]
