"""Jobs, schedules and sensors.

The refresh chain, each link a separate run so that shards fan out on any executor:
    incoming batch -> ingest_incoming -> update_vectors -> refresh_feeds (one run per shard)
    -> publish_feeds (once every shard is newer than the last publish)
full_rebuild ends in the same refresh; retrain (daily) does when it promotes a new ranker.
"""

import json
import time
from datetime import UTC, datetime

import dagster as dg

from feed_dagster.assets.feeds import user_shards
from feed_dagster.incoming import pending_batches
from feed_dagster.jobs.ingest import ingest_incoming
from feed_dagster.paths import data_root, incoming_dir
from feed_dagster.resources.stores import ModelStoreResource

FEEDS = dg.AssetSelection.assets("user_feeds")
FEED_QUALITY = dg.AssetSelection.assets("feed_quality")
# Feed quality is evaluation, not a link of the refresh chain: a slow or failing
# evaluation must not stop the rebuild whose success starts the refresh.
UPSTREAM_OF_FEEDS = dg.AssetSelection.all() - FEEDS.downstream() - FEED_QUALITY

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
    ),
    description="Retrain both models, evaluate, promote the ranker only if the gate passes, "
    "and rebuild the item vectors with the new two-tower.",
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


def shard_requests(reason: str) -> list[dg.RunRequest]:
    """One refresh run per user shard; the run key makes a repeated tick a no-op."""
    stamp = f"{reason}-{int(time.time())}"
    return [
        dg.RunRequest(run_key=f"{stamp}-{key}", partition_key=key, tags={"refresh": reason})
        for key in user_shards.get_partition_keys()
    ]


@dg.schedule(
    cron_schedule="0 * * * *",
    job=refresh_feeds,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Hourly: recompute every shard's feeds (then the publish sensor swaps them in).",
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
    job=refresh_feeds,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="A newly promoted ranker triggers a refresh of every shard.",
)
def refresh_on_promotion(context: dg.SensorEvaluationContext, models: ModelStoreResource):
    promoted = models.store().promoted("ranker")
    if promoted is None or promoted == context.cursor:
        return dg.SkipReason(f"promoted ranker unchanged ({promoted})")
    first_look = context.cursor is None
    context.update_cursor(promoted)
    if first_look:
        # The sensor just started: whatever is promoted now is what feeds were built with.
        return dg.SkipReason(f"now watching the promoted ranker ({promoted})")
    return shard_requests(f"promoted-{promoted}")


@dg.sensor(
    job=ingest_incoming,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Ingests Parquet batches of posts/engagements dropped into data/incoming/.",
)
def incoming_batches(context: dg.SensorEvaluationContext):
    files = pending_batches(incoming_dir())
    if not files:
        return dg.SkipReason(f"no batch files in {incoming_dir()}")
    # Same files with the same size and mtime give the same run key: never ingested twice.
    key = "|".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)
    return dg.RunRequest(
        run_key=key,
        run_config={"ops": {"ingest_files": {"config": {"files": [p.name for p in files]}}}},
        tags={"batch_files": str(len(files))},
    )


def _latest_storage_id(instance: dg.DagsterInstance, key: str, partition: str | None = None):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None
        ),
        limit=1,
    ).records
    return records[0].storage_id if records else None


@dg.sensor(
    job=publish_feeds_job,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Publishes once every user shard has been recomputed since the last publish.",
)
def publish_when_shards_complete(context: dg.SensorEvaluationContext):
    published = _latest_storage_id(context.instance, "published_feeds") or 0
    shard_ids = [
        _latest_storage_id(context.instance, "user_feeds", key)
        for key in user_shards.get_partition_keys()
    ]
    stale = [i for i, sid in enumerate(shard_ids) if sid is None or sid <= published]
    if stale:
        return dg.SkipReason(f"waiting for shards {stale} to be recomputed")
    return dg.RunRequest(run_key=f"publish-{max(shard_ids)}")


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[ingest_incoming],
    request_job=update_vectors,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After new posts land, encode them and add them to the vector table.",
)
def vectors_after_ingest(context: dg.RunStatusSensorContext):
    return dg.RunRequest(run_key=f"vectors-after-{context.dagster_run.run_id}")


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[update_vectors, full_rebuild],
    request_job=refresh_feeds,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After the vectors are updated or a rebuild finishes, recompute every shard.",
)
def refresh_after_new_data(context: dg.RunStatusSensorContext):
    return shard_requests(f"after-{context.dagster_run.job_name}-{context.dagster_run.run_id}")


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
def record_run_failures(context: dg.RunFailureSensorContext):
    log = data_root() / "logs" / "run_failures.jsonl"
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
    refresh_on_promotion,
    vectors_after_ingest,
    publish_when_shards_complete,
    refresh_after_new_data,
    quality_after_new_models,
    record_run_failures,
]
