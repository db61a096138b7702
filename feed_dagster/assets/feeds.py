"""Per-user precomputed feeds (one partition per user shard) and their atomic publish."""

import os
from datetime import UTC, datetime

import dagster as dg
from pydantic import Field

from feed_dagster.assets.conditions import publish_when_every_shard_is_fresh
from feed_dagster.assets.retry import IO_RETRY, fail_fast
from feed_dagster.data.warehouse import read_tables
from feed_dagster.feeds.build import OPTIONAL_TABLES, PIPELINE_TABLES, build_feeds
from feed_dagster.feeds.model_backends import feed_models
from feed_dagster.feeds.report import feed_preview_markdown, stage_timings_markdown
from feed_dagster.feeds.shard_files import read_versions, write_shard
from feed_dagster.feeds.shards import default_shard_count, users_in_shard
from feed_dagster.memory import StepMemory
from feed_dagster.models.train import torch_threads
from feed_dagster.pipeline.config import PipelineConfig, resolve_window
from feed_dagster.pipeline.tables import candidate_window
from feed_dagster.resources.storage import StorageResource
from feed_dagster.resources.stores import LanceDBResource, ModelStoreResource
from feed_dagster.serving.guard import GuardConfig, GuardDecision, check_publish
from feed_dagster.serving.publish import publish_feeds
from feed_dagster.serving.read import read_served

N_SHARDS = default_shard_count(
    os.environ.get("FEED_DAGSTER_SOURCE", "synthetic:demo"), os.environ.get("FEED_DAGSTER_SHARDS")
)
user_shards = dg.StaticPartitionsDefinition([str(i) for i in range(N_SHARDS)])

MODEL_DEPS = ["promoted_ranker", "article_vectors"]


# Intra-op torch threads of a feed step. Shard runs go side by side, one per core, and the
# ranker scores in cache-sized batches: with two threads per process on two busy cores every
# batch waits on a spinning partner thread (measured: a demo shard took 143 s with the
# default two threads next to another shard and other work, against 17 s alone).
FEED_TORCH_THREADS = Field(
    default=1,
    ge=1,
    description="torch intra-op threads for scoring; keep 1 when shards run side by side",
)


class FeedConfig(dg.Config):
    batch_size: int = 512
    torch_threads: int = FEED_TORCH_THREADS
    exclude_previously_served: bool = True
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
    partitions_def=user_shards,
    deps=[*PIPELINE_TABLES, *MODEL_DEPS],
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
    shard = int(context.partition_key)
    tables = read_tables(storage.warehouse_path(), PIPELINE_TABLES, OPTIONAL_TABLES)
    now = tables["world_info"]["now"][0]
    window = resolve_window(
        candidate_window(tables), config.candidate_window_hours, config.no_candidate_window
    )
    user_ids = users_in_shard(tables["users"], shard, N_SHARDS)
    retriever, scorer, versions = feed_models(
        tables,
        models.store(),
        lancedb.resolved_uri(),
        lancedb.table,
        context.log.warning,
        embeddings=storage.embeddings_path(),
        peers_dir=storage.serving_peers_dir(),
    )
    served = read_served(storage.serving_path()) if config.exclude_previously_served else None
    # Raises NoCandidatesError before anything is written when the window misses the data.
    with fail_fast(), torch_threads(config.torch_threads):
        feeds, stats = build_feeds(
            tables,
            user_ids,
            now,
            retriever,
            scorer,
            PipelineConfig().with_max_age(window),
            served=served,
            batch_size=config.batch_size,
            progress=lambda m: context.log.info(f"shard {shard}: {m}"),
        )
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
            "now": str(now),
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
    keys = user_shards.get_partition_keys()
    paths = [storage.shard_path(k) for k in keys]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f"cannot publish: shard files {missing} are missing; materialise every "
            "user_feeds partition first"
        )
    guard = GuardConfig(config.min_active_coverage, config.min_share_of_live, config.allow_shrink)
    decision = check_publish(paths, storage.serving_path(), storage.warehouse_path(), guard)
    if not decision.passed:
        # The check result first (the UI's check tab), then a failure nobody retries: the
        # same shards would be refused again.
        yield _guard_result(decision)
        context.log.error(decision.description())
        raise dg.Failure(
            description=decision.description(), metadata=decision.metadata(), allow_retries=False
        )
    context.log.info(decision.description())
    tables = read_tables(storage.warehouse_path(), ["articles", "users"])
    versions = [read_versions(storage.shard_dir(), k) for k in keys]
    # Shards built with different models (a promotion between shard runs) are published
    # together but say so: both versions are recorded.
    model_version = ";".join(sorted({v["model_version"] for v in versions}))
    vector_version = ";".join(sorted({v["vector_table_version"] for v in versions}))
    result = publish_feeds(
        [str(p) for p in paths],
        storage.serving_path(),
        model_version=model_version,
        vector_table_version=vector_version,
        generated_at=datetime.now(UTC).replace(tzinfo=None),
        articles=tables["articles"],
        users=tables["users"],
    )
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
        },
        check_results=[_guard_result(decision)],
    )
