"""Per-user precomputed feeds (one partition per user shard) and their atomic publish."""

import dagster as dg
from pydantic import Field

from feed_dagster.artifacts import join
from feed_dagster.assets.conditions import publish_when_every_shard_is_fresh
from feed_dagster.assets.retry import IO_RETRY, fail_fast
from feed_dagster.feeds.build import PIPELINE_TABLES
from feed_dagster.feeds.precompute import precompute_shard, read_shard_tables
from feed_dagster.feeds.report import feed_preview_markdown, stage_timings_markdown
from feed_dagster.feeds.serving_inputs import prepare_serving_inputs
from feed_dagster.feeds.shard_files import write_shard
from feed_dagster.feeds.shards import shard_keys
from feed_dagster.generation import publish_generation
from feed_dagster.memory import StepMemory
from feed_dagster.resources.storage import StorageResource
from feed_dagster.resources.stores import LanceDBResource, ModelStoreResource, model_locations
from feed_dagster.serving.bucket import read_live_served
from feed_dagster.serving.guard import GuardConfig, GuardDecision

user_shards = dg.StaticPartitionsDefinition(shard_keys())
N_SHARDS = len(user_shards.get_partition_keys())

MODEL_DEPS = ["promoted_ranker", "article_vectors"]
# The warehouse tables the shards' shared inputs are built from (feeds.serving_inputs).
SERVING_INPUT_TABLES = ["world_info", "articles", "engagements", "impressions"]


# Intra-op torch threads of a feed step. Shard runs go side by side, one per core, and the
# ranker scores in cache-sized batches: with two threads per process on two busy cores every
# batch waits on a spinning partner thread (measured: a demo shard took 143 s with the
# default two threads next to another shard and other work, against 17 s alone).
FEED_TORCH_THREADS = Field(
    default=1,
    ge=1,
    description="torch intra-op threads for scoring; keep 1 when shards run side by side",
)


class WindowConfig(dg.Config):
    """The candidate window of a refresh: the source's unless overridden."""

    candidate_window_hours: float | None = Field(
        default=None,
        description="Oldest post (hours before now) a feed may hold; null = the source's "
        "window (world_info.candidate_window_hours). Must be > 0.",
    )
    no_candidate_window: bool = Field(
        default=False,
        description="True = no age limit (catalogs of long-lived items), whatever the source "
        "says; leave candidate_window_hours null then.",
    )


class FeedConfig(WindowConfig):
    batch_size: int = 512
    torch_threads: int = FEED_TORCH_THREADS
    exclude_previously_served: bool = True


class PublishConfig(dg.Config):
    """The publish guard's thresholds (feed_dagster/serving/guard.py), settable per run."""

    min_active_coverage: float = Field(
        default=0.9,
        ge=0.0,
        le=1.0,
        description="Refuse when fewer than this share of active users (users with "
        "engagements in the source) get a feed.",
    )
    min_share_of_live: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="Refuse when the new generation has fewer than this share of the live "
        "generation's users or rows.",
    )
    allow_shrink: bool = Field(
        default=False,
        description="True = publish even when the generation shrinks below min_share_of_live "
        "(an intended shrink); empty and coverage rules still apply.",
    )


PUBLISH_GUARD = dg.AssetCheckSpec(
    "publish_guard",
    asset="published_feeds",
    blocking=True,
    description="The new generation is not empty, covers enough active users and has not "
    "collapsed against the live one; otherwise nothing is published and the live file stays.",
)


@dg.asset(
    group_name="feeds",
    deps=["promoted_ranker", "article_embeddings", *SERVING_INPUT_TABLES],
    kinds={"python"},
    retry_policy=IO_RETRY,
    automation_condition=dg.AutomationCondition.eager(),
)
def serving_inputs(
    context: dg.AssetExecutionContext,
    config: WindowConfig,
    models: ModelStoreResource,
    lancedb: LanceDBResource,
    storage: StorageResource,
) -> dg.MaterializeResult:
    """What every shard of a refresh shares, built once before them: the catalog, everyone's
    engagement and impression counts at `now`, and the classic peers fitted at `now` with
    the item-kNN rows of the window's posts. Stored beside the peers' fits; a shard that
    finds none for its warehouse builds them itself. Use the shards' window settings."""
    memory = StepMemory().start()
    storage.check_artifacts()
    prepared = prepare_serving_inputs(
        model_locations(models, lancedb, storage),
        window_hours=config.candidate_window_hours,
        no_window=config.no_candidate_window,
        progress=context.log.info,
    )
    memory.stop()
    if prepared is None:
        # No promoted ranker (the table fallbacks share nothing), or a warehouse in a bucket.
        context.log.info("nothing to share: each shard builds what it needs")
        return dg.MaterializeResult(metadata={"prepared": False, **memory.metadata()})
    return dg.MaterializeResult(
        metadata={
            "prepared": True,
            "now": str(prepared.now),
            "ranker_version": prepared.ranker_version,
            "articles": prepared.articles,
            "window_posts": prepared.window_posts if prepared.window_posts is not None else -1,
            "peers_name": prepared.peers_name or "none (the ranker reads no peer features)",
            "seconds": dg.MetadataValue.json({k: round(v, 1) for k, v in prepared.seconds.items()}),
            **memory.metadata(),
        }
    )


@dg.asset(
    group_name="feeds",
    partitions_def=user_shards,
    deps=[*PIPELINE_TABLES, *MODEL_DEPS, serving_inputs],
    kinds={"polars", "parquet"},
    retry_policy=IO_RETRY,
    automation_condition=dg.AutomationCondition.eager(),
)
def user_feeds(
    context: dg.AssetExecutionContext,
    config: FeedConfig,
    models: ModelStoreResource,
    lancedb: LanceDBResource,
    storage: StorageResource,
) -> dg.MaterializeResult:
    """Ranked feeds for the users of one shard: candidates -> filters -> scores -> selection,
    written as one Parquet file per shard."""
    memory = StepMemory().start()
    storage.check_artifacts()  # a wrong bucket stops the step before the feeds are built
    shard = int(context.partition_key)
    tables = read_shard_tables(
        storage.warehouse_path(),
        shard,
        N_SHARDS,
        window_hours=config.candidate_window_hours,
        no_window=config.no_candidate_window,
    )
    served = (
        read_live_served(storage.serving_bucket(), storage.serving_path())
        if config.exclude_previously_served
        else None
    )
    # Raises NoCandidatesError before anything is written when the window misses the data.
    with fail_fast():
        built = precompute_shard(
            tables,
            shard,
            N_SHARDS,
            model_locations(models, lancedb, storage),
            warn=context.log.warning,
            served=served,
            window_hours=config.candidate_window_hours,
            no_window=config.no_candidate_window,
            batch_size=config.batch_size,
            threads=config.torch_threads,
            progress=lambda m: context.log.info(f"shard {shard}: {m}"),
        )
    feeds, stats, versions = built.feeds, built.stats, built.versions
    write_shard(storage.shard_dir(), context.partition_key, feeds, versions)
    memory.stop()
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": feeds.height,
            **memory.metadata(),
            "users": stats.users,
            "users_with_feed": stats.users_with_feed,
            "in_network_share": round(stats.in_network_share, 3),
            "retriever": stats.retriever,
            "scorer": stats.scorer,
            **versions,
            "now": str(built.now),
            "candidate_window_hours": stats.candidate_window_hours,
            "active_users_with_candidates": stats.active_users_with_candidates,
            "path": str(storage.shard_path(context.partition_key)),
            "feed_preview": dg.MetadataValue.md(
                feed_preview_markdown(feeds, tables["articles"], tables["users"])
            ),
            "stage_timings": dg.MetadataValue.md(stage_timings_markdown(stats)),
            "stage_seconds": dg.MetadataValue.json(
                {k: round(v, 3) for k, v in stats.seconds.items()}
            ),
            "filter_removed": dg.MetadataValue.json(stats.removed),
        }
    )


def _guard_result(decision: GuardDecision) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        check_name=PUBLISH_GUARD.name,
        passed=decision.passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=decision.description(),
        metadata=decision.metadata(),
    )


@dg.asset(
    group_name="feeds",
    deps=[user_feeds],
    kinds={"duckdb"},
    check_specs=[PUBLISH_GUARD],
    retry_policy=IO_RETRY,
    automation_condition=publish_when_every_shard_is_fresh(),
)
def published_feeds(
    context: dg.AssetExecutionContext, config: PublishConfig, storage: StorageResource
):
    """The serving DuckDB file, built beside the live one from every shard and renamed into
    place: readers never block the publish and never see a mix of two refreshes. The
    publish_guard check runs first; when it fails nothing is built and the live file stays."""
    guard = GuardConfig(config.min_active_coverage, config.min_share_of_live, config.allow_shrink)
    storage.check_artifacts()
    bucket = storage.serving_bucket()
    outcome = publish_generation(
        storage.shard_dir(),
        user_shards.get_partition_keys(),
        storage.serving_path(),
        storage.warehouse_path(),
        guard,
        serving_bucket=bucket,
    )
    decision, result = outcome.decision, outcome.published
    if result is None:
        # The check result first (the UI's check tab), then a failure nobody retries: the
        # same shards would be refused again.
        yield _guard_result(decision)
        context.log.error(decision.description())
        raise dg.Failure(
            description=decision.description(), metadata=decision.metadata(), allow_retries=False
        )
    context.log.info(decision.description())
    yield dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.rows,
            "users": result.users,
            "generation_id": result.generation_id,
            "path": str(result.path),
            "bytes": result.bytes,
            "model_version": result.model_version,
            "vector_table_version": result.vector_table_version,
            "publish_seconds": round(result.seconds, 3),
            **(
                {"bucket_generation": str(join(bucket, outcome.on_bucket.key))}
                if bucket is not None and outcome.on_bucket is not None
                else {}
            ),
        },
        check_results=[_guard_result(decision)],
    )
