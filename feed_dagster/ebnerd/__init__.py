"""The EBNeRD news-recommendation dataset: exact layout, validated loader, synthetic writer."""

from feed_dagster.ebnerd.archive import EbnerdLayout, inspect_layout, list_artifacts
from feed_dagster.ebnerd.load import load_ebnerd
from feed_dagster.ebnerd.mapping import to_world
from feed_dagster.ebnerd.synth import (
    article_first_seen,
    write_articles_for_ids,
    write_synthetic_ebnerd,
)
from feed_dagster.ebnerd.validation import EbnerdFrames, read_ebnerd

__all__ = [
    "EbnerdFrames",
    "EbnerdLayout",
    "article_first_seen",
    "inspect_layout",
    "list_artifacts",
    "load_ebnerd",
    "read_ebnerd",
    "to_world",
    "write_articles_for_ids",
    "write_synthetic_ebnerd",
]
