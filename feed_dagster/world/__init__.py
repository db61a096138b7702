"""The embedded synthetic social world (core; no dagster)."""

from feed_dagster.world.config import SCALES, WorldConfig, world_config
from feed_dagster.world.generate import generate_world, stream_world

__all__ = ["SCALES", "WorldConfig", "generate_world", "stream_world", "world_config"]
