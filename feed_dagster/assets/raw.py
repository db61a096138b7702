"""The canonical tables, loaded from the configured source into the DuckDB warehouse."""

import dagster as dg

from feed_dagster.data.world_tables import world_info, write_world
from feed_dagster.memory import StepMemory
from feed_dagster.resources.source import SourceResource
from feed_dagster.resources.warehouse import WAREHOUSE_POOL

RAW_GROUP = "raw"
SOCIAL_GROUP = "social_graph"

RAW_TABLES: dict[str, tuple[str, str]] = {
    "world_info": (RAW_GROUP, "The source and time frame: window start, held-out start, now."),
    "users": (RAW_GROUP, "Accounts (social world) or readers (EBNeRD)."),
    "articles": (RAW_GROUP, "Posts or news articles with author, kind, thread, topic, text."),
    "engagements": (
        RAW_GROUP,
        "One row per (user, article, impression) with any action: multi-hot actions + dwell.",
    ),
    "impressions": (RAW_GROUP, "One row per article shown in a slate, with its position."),
    "impression_truth": (
        RAW_GROUP,
        "Hidden ground-truth action probabilities of held-out impressions (synthetic only).",
    ),
    "follows": (SOCIAL_GROUP, "Directed follow edges between accounts."),
    "topic_follows": (SOCIAL_GROUP, "Topics a user follows."),
    "blocks": (SOCIAL_GROUP, "Accounts a user blocked."),
    "mutes": (SOCIAL_GROUP, "Accounts a user muted."),
    "muted_keywords": (SOCIAL_GROUP, "Words a user never wants to see."),
    "deleted_posts": (
        RAW_GROUP,
        "Tombstones of deleted posts (from incoming batches): feeds and readers never show them.",
    ),
}


@dg.multi_asset(
    specs=[
        dg.AssetSpec(name, group_name=group, description=desc, kinds={"duckdb", "polars"})
        for name, (group, desc) in RAW_TABLES.items()
    ],
    pool=WAREHOUSE_POOL,
    can_subset=False,
)
def source_tables(context: dg.AssetExecutionContext, source: SourceResource):
    """Load every canonical table from the source in one pass (one consistent snapshot).

    The tables are written here rather than handed to the IO manager one frame each: the
    largest arrive in parts (1M users' impressions would not fit in memory whole), the
    warehouse appends each part as it comes, and the new tables replace the old ones
    together, in one transaction (`warehouse_store.write_tables`)."""
    spec = source.parsed()
    context.log.info(f"loading source {spec.describe()}")
    with StepMemory() as memory:
        stream = source.stream(progress=context.log.info)
        rows = write_world(source.storage.warehouse_path(), stream, spec.describe())
    # The head's frames carry every table's columns (a streamed one's first rows, or none).
    frames = {"world_info": world_info(stream.head, spec.describe()), **stream.head.tables()}
    for name in RAW_TABLES:
        yield dg.MaterializeResult(
            asset_key=name,
            metadata={
                "dagster/row_count": rows[name],
                "source": spec.describe(),
                "columns": ", ".join(frames[name].columns),
                **memory.metadata(),
            },
        )
