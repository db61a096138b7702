from datetime import datetime

import dagster as dg
import duckdb
import polars as pl
from dagster_helpers import definitions, materialize

from feed_dagster.world.simulate import simulate_activity


class _Ticks:
    """Evaluates the automation conditions as the keep_feeds_fresh sensor does, one tick per
    call: {asset: requested partitions} (an empty list for an unpartitioned asset)."""

    def __init__(self, defs, instance):
        self.defs, self.instance, self.cursor = defs, instance, None

    def __call__(self) -> dict[str, list[str]]:
        result = dg.evaluate_automation_conditions(
            defs=self.defs, instance=self.instance, cursor=self.cursor
        )
        self.cursor = result.cursor
        return {
            key.to_user_string(): sorted(result.get_requested_partitions(key) - {None})
            for key in self.defs.resolve_asset_graph().get_all_asset_keys()
            if result.get_num_requested(key)
        }


def test_hourly_schedule_requests_one_refresh_run_per_shard(data_dir):
    from feed_dagster.assets.feeds import user_shards
    from feed_dagster.jobs.automation import hourly_feed_refresh

    ctx = dg.build_schedule_context(scheduled_execution_time=datetime(2026, 1, 7, 5))
    requests = hourly_feed_refresh(ctx)
    assert [r.partition_key for r in requests] == user_shards.get_partition_keys()
    assert hourly_feed_refresh.job_name == "refresh_feeds"
    assert len({r.run_key for r in requests}) == len(requests)


def test_incoming_sensor_requests_an_ingest_run_for_dropped_files(data_dir):
    from feed_dagster.jobs.automation import incoming_batches
    from feed_dagster.resources.storage import StorageResource

    resources = {"storage": StorageResource()}
    ctx = dg.build_sensor_context(resources=resources)
    assert isinstance(incoming_batches(ctx), dg.SkipReason)
    incoming = data_dir / "incoming"
    incoming.mkdir(parents=True)
    pl.DataFrame({"article_id": [1]}).write_parquet(incoming / "articles-1.parquet")
    request = incoming_batches(dg.build_sensor_context(resources=resources))
    assert isinstance(request, dg.RunRequest)
    assert request.run_config["ops"]["ingest_files"]["config"]["files"] == ["articles-1.parquet"]
    assert incoming_batches.job_name == "ingest_incoming"


def test_drop_ingest_refresh_publish_chain(data_dir):
    """A dropped batch is ingested by the job the sensor asks for; the automation conditions
    then ask for the vectors and every shard, and for the publish only once every shard has
    been rebuilt; the ingested posts reach feeds."""
    from feed_dagster.assets.feeds import user_shards
    from feed_dagster.jobs.automation import UPSTREAM_OF_FEEDS, incoming_batches
    from feed_dagster.serving.read import connect

    defs = definitions()
    instance = dg.DagsterInstance.ephemeral()

    def build(selection: dg.AssetSelection, key: str | None = None) -> None:
        materialize(selection, key, defs=defs, instance=instance, raise_on_error=True)

    build(UPSTREAM_OF_FEEDS)
    tick = _Ticks(defs, instance)
    assert tick() == {}  # the daemon's first look requests nothing

    con = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    articles = con.execute("select * from articles").pl()
    engagements = con.execute("select * from engagements").pl()
    now = con.execute("select now from world_info").fetchone()[0]
    con.close()
    posts, eng = simulate_activity(articles, engagements, now, hours=2, posts_per_hour=200)
    incoming = data_dir / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    posts.write_parquet(incoming / "articles-sim.parquet")
    eng.write_parquet(incoming / "engagements-sim.parquet")

    # A context manager: the definitions' resources depend on the storage resource, and
    # Dagster builds such resources only inside one.
    with dg.build_sensor_context(instance=instance, resources=defs.resources) as ctx:
        request = incoming_batches(ctx)
    job = defs.resolve_job_def("ingest_incoming")
    assert job.execute_in_process(run_config=request.run_config, instance=instance).success
    keys = user_shards.get_partition_keys()
    # What the shards share is prepared again too (feeds.serving_inputs); shards that start
    # first build it themselves, one at a time, and the step then finds it stored.
    assert tick() == {
        "article_embeddings": [],
        "article_vectors": [],
        "serving_inputs": [],
        "user_feeds": keys,
    }
    assert sorted(p.name for p in (incoming / "done").iterdir()) == [
        "articles-sim.parquet",
        "engagements-sim.parquet",
    ]

    vectors = defs.resolve_job_def("update_vectors").execute_in_process(instance=instance)
    assert vectors.success
    # Only the ingested posts are encoded; every earlier vector is reused.
    meta = {
        e.asset_key.path[-1]: e.materialization.metadata
        for e in vectors.get_asset_materialization_events()
    }
    assert meta["article_embeddings"]["n_encoded"].value == posts.height
    assert meta["article_embeddings"]["n_reused"].value == articles.height
    assert meta["article_vectors"]["dagster/row_count"].value == articles.height + posts.height

    # (In the daemon the shards of that request are running now, so they are not asked
    # for again when the vectors land; here nothing runs between ticks.)
    assert "published_feeds" not in tick()
    for key in keys[:-1]:
        build(dg.AssetSelection.assets("user_feeds"), key)
    assert tick() == {}  # the last shard is still stale
    build(dg.AssetSelection.assets("user_feeds"), keys[-1])
    assert tick() == {"published_feeds": []}
    build(dg.AssetSelection.assets("published_feeds"))
    assert tick() == {}

    con = connect(data_dir / "serving" / "feeds.duckdb")
    new_ids = set(posts["article_id"].to_list())
    served = set(con.execute("select distinct article_id from serving.feeds").pl()["article_id"])
    con.close()
    assert served & new_ids, "ingested posts should reach some feeds"


def test_daily_retrain_schedule_targets_the_retrain_job(data_dir):
    from feed_dagster.jobs.automation import daily_retrain

    assert daily_retrain.job_name == "retrain"
    assert daily_retrain.cron_schedule == "0 3 * * *"
    job = definitions().resolve_job_def("retrain")
    keys = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert {"ranker_weights", "promoted_ranker", "article_vectors"} <= keys
