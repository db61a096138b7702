"""Jobs, schedules and sensors.

The refresh chain: sensors where something outside Dagster is watched (files dropped into
data/incoming/, failed runs), declarative automation conditions on the assets for the rest
(feed_dagster/assets/conditions.py), evaluated by the `keep_feeds_fresh` sensor:
    incoming batch -> ingest_incoming -> article_embeddings, article_vectors
    -> user_feeds (every shard; one run each) -> published_feeds (once every shard is fresh)
The hourly schedule, full_rebuild and retrain (daily) update inputs of the same chain, so
each ends in a refresh and a publish in the same way.
"""

import json
from datetime import UTC, datetime

import dagster as dg

from feed_dagster.assets.feeds import user_shards
from feed_dagster.assets.raw import RAW_TABLES
from feed_dagster.incoming import pending_batches
from feed_dagster.jobs.ingest import ingest_incoming
from feed_dagster.resources.storage import StorageResource

FEEDS = dg.AssetSelection.assets("user_feeds")
FEED_QUALITY = dg.AssetSelection.assets("feed_quality")
# Feed quality is evaluation, not a link of the refresh chain: a slow or failing
# evaluation must not stop the rebuild whose success starts the refresh.
UPSTREAM_OF_FEEDS = dg.AssetSelection.all() - FEEDS.downstream() - FEED_QUALITY
# The source's tables (one multi-asset) and everything else upstream of the feeds: `run`
# builds them in separate processes, so the memory the source step leaves behind is
# returned to the system before the models train.
SOURCE_TABLES = dg.AssetSelection.assets(*RAW_TABLES)
# What the shards share, built in a process of its own too: at 1M users its peak (the
# classic peers' fit) would add to what training left behind.
SERVING_INPUTS = dg.AssetSelection.assets("serving_inputs")
DERIVED_UPSTREAM = UPSTREAM_OF_FEEDS - SOURCE_TABLES - SERVING_INPUTS

refresh_feeds = dg.define_asset_job(
    "refresh_feeds",
    selection=FEEDS,
    description="Recompute the feeds of one user shard with the promoted models.",
)
publish_feeds_job = dg.define_asset_job(
    "publish_feeds",
    selection=dg.AssetSelection.assets("published_feeds"),
    description="Swap a new serving file built from every shard into place.",
)
update_vectors = dg.define_asset_job(
    "update_vectors",
    selection=dg.AssetSelection.assets("article_embeddings", "article_vectors"),
    description="Encode new or changed articles and upsert their vectors into LanceDB.",
)
retrain = dg.define_asset_job(
    "retrain",
    selection=dg.AssetSelection.assets(
        "retrieval_model",
        "ranker_weights",
        "ranker_evaluation",
        "promoted_ranker",
        "article_vectors",
        "serving_inputs",
    ),
    description="Retrain both models, evaluate, promote the ranker only if the gate passes, "
    "rebuild the item vectors with the new two-tower and what the shards share.",
)
evaluate_feeds_job = dg.define_asset_job(
    "evaluate_feeds",
    selection=FEED_QUALITY,
    description="Held-out recall of the promoted models' feed against the chronological and "
    "popularity feeds, all through the same pipeline.",
)
full_rebuild = dg.define_asset_job(
    "full_rebuild",
    selection=UPSTREAM_OF_FEEDS,
    description="Reload the source and rebuild everything upstream of the feeds; the "
    "refresh chain then recomputes and publishes every shard.",
)


@dg.schedule(
    cron_schedule="0 * * * *",
    job=refresh_feeds,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly: recompute every shard's feeds (then keep_feeds_fresh publishes them).",
)
def hourly_feed_refresh(context: dg.ScheduleEvaluationContext):
    tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return [
        dg.RunRequest(run_key=f"hourly-{tick}-{key}", partition_key=key)
        for key in user_shards.get_partition_keys()
    ]


daily_retrain = dg.ScheduleDefinition(
    name="daily_retrain",
    job=retrain,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily at 03:00: retrain, evaluate and (if the gate passes) promote.",
)


@dg.sensor(
    job=ingest_incoming,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Ingests Parquet batches of posts/engagements dropped into data/incoming/.",
)
def incoming_batches(context: dg.SensorEvaluationContext, storage: StorageResource):
    files = pending_batches(storage.incoming_dir())
    if not files:
        return dg.SkipReason(f"no batch files in {storage.incoming_dir()}")
    # Same files with the same size and mtime give the same run key: never ingested twice.
    key = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return dg.RunRequest(
        run_key=key,
        run_config={"ops": {"ingest_files": {"config": {"files": [p.name for p in files]}}}},
        tags={"batch_files": str(len(files))},
    )


# Running by default, as every hand-written sensor it replaces was: `make ui` keeps feeds
# fresh unattended. Emitting backfills (Dagster's default, spelled out because the chain
# depends on it): a tick that asks for the vectors and the shards together becomes one backfill
# that builds the vectors before it starts the shard runs, instead of separate runs racing.
keep_feeds_fresh = dg.AutomationConditionSensorDefinition(
    "keep_feeds_fresh",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    emit_backfills=True,
    description="Evaluates the assets' automation conditions: new data or models rebuild the "
    "embeddings, vectors and every feed shard; the publish follows once every shard is fresh.",
)


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[retrain, full_rebuild],
    request_job=evaluate_feeds_job,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After new models or a rebuild, re-measure feed quality (in its own run).",
)
def quality_after_new_models(context: dg.RunStatusSensorContext):
    return dg.RunRequest(run_key=f"quality-after-{context.dagster_run.run_id}")


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Records every failed run in data/logs/run_failures.jsonl.",
)
def record_run_failures(context: dg.RunFailureSensorContext, storage: StorageResource):
    log = storage.run_failures_log()
    log.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "at": datetime.now(UTC).isoformat(),
        "run_id": context.dagster_run.run_id,
        "job": context.dagster_run.job_name,
        "error": context.failure_event.message,
    }
    with log.open("a") as fh:
        fh.write(json.dumps(entry) + "\n")
    context.log.error(f"run {entry['run_id']} of {entry['job']} failed: {entry['error']}")


JOBS = [
    refresh_feeds,
    publish_feeds_job,
    update_vectors,
    retrain,
    full_rebuild,
    ingest_incoming,
    evaluate_feeds_job,
]
SCHEDULES = [hourly_feed_refresh, daily_retrain]
SENSORS = [
    incoming_batches,
    keep_feeds_fresh,
    quality_after_new_models,
    record_run_failures,
]
