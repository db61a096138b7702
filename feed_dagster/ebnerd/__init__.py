"""The EBNeRD news-recommendation dataset: exact layout, validated loader, synthetic writer."""

from feed_dagster.ebnerd.load import (
    EbnerdFrames,
    EbnerdLayout,
    inspect_layout,
    list_artifacts,
    load_ebnerd,
    read_ebnerd,
    to_world,
)
from feed_dagster.ebnerd.synth import (
    article_first_seen,
    write_articles_for_ids,
    write_synthetic_ebnerd,
)

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
