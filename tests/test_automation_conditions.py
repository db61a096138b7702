"""The refresh chain's automation conditions, evaluated tick by tick as the daemon would.

Materialisations are reported without runs (nothing is computed), so each test is about what
the `keep_feeds_fresh` sensor asks for, not about the assets' bodies; the end-to-end chain with
real runs is `test_automation.py::test_drop_ingest_refresh_publish_chain`."""

from collections.abc import Iterable

import dagster as dg
import pytest

from feed_dagster.assets.conditions import publish_when_every_shard_is_fresh

SHARDS = ["0", "1", "2", "3"]
FED_BY_INGEST = ["articles", "engagements", "world_info"]


class Daemon:
    """An ephemeral instance and the automation cursor carried from one tick to the next."""

    def __init__(self, defs: dg.Definitions) -> None:
        self.defs = defs
        self.instance = dg.DagsterInstance.ephemeral()
        self.cursor = None
        graph = defs.resolve_asset_graph()
        self.partitioned = {k for k in graph.get_all_asset_keys() if graph.get(k).partitions_def}
        self.materializable = [
            k for k in graph.get_all_asset_keys() if graph.get(k).is_materializable
        ]

    def report(self, *keys: str, partitions: Iterable[str] | None = None) -> None:
        for key in keys:
            for partition in partitions or [None]:
                self.instance.report_runless_asset_event(
                    dg.AssetMaterialization(asset_key=key, partition=partition)
                )

    def build_everything(self) -> None:
        for key in self.materializable:
            parts = SHARDS if key in self.partitioned else None
            self.report(key.to_user_string(), partitions=parts)

    def tick(self) -> dict[str, list[str] | bool]:
        """One evaluation: {asset: its requested shards, or True when unpartitioned}."""
        result = dg.evaluate_automation_conditions(
            defs=self.defs, instance=self.instance, cursor=self.cursor
        )
        self.cursor = result.cursor
        return {
            key.to_user_string(): (
                sorted(result.get_requested_partitions(key)) if key in self.partitioned else True
            )
            for key in self.materializable
            if result.get_num_requested(key)
        }


@pytest.fixture()
def daemon(data_dir) -> Daemon:
    from feed_dagster.definitions import build_definitions

    return Daemon(build_definitions())


@pytest.fixture()
def built(daemon: Daemon) -> Daemon:
    """Everything built and published, and the daemon has looked once since."""
    daemon.tick()
    daemon.build_everything()
    assert daemon.tick() == {}
    return daemon


def test_the_sensors_left_watch_the_outside_world_and_one_evaluates_the_conditions(data_dir):
    from feed_dagster.definitions import build_definitions
    from feed_dagster.jobs.automation import keep_feeds_fresh

    defs = build_definitions()
    sensors = {s.name: s for s in defs.sensors}
    assert set(sensors) == {
        "incoming_batches",
        "keep_feeds_fresh",
        "quality_after_new_models",
        "record_run_failures",
    }
    assert sensors["incoming_batches"].job_name == "ingest_incoming"
    assert isinstance(keep_feeds_fresh, dg.AutomationConditionSensorDefinition)
    assert keep_feeds_fresh.default_status == dg.DefaultSensorStatus.RUNNING
    assert keep_feeds_fresh.emit_backfills
    graph = defs.resolve_asset_graph()
    with_condition = {
        k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).automation_condition
    }
    assert with_condition == {
        "article_embeddings",
        "article_vectors",
        "serving_inputs",
        "user_feeds",
        "published_feeds",
    }
    assert with_condition <= {
        k.to_user_string() for k in keep_feeds_fresh.asset_selection.resolve(graph)
    }


def test_nothing_is_requested_on_an_empty_instance(daemon: Daemon):
    assert daemon.tick() == {}
    assert daemon.tick() == {}


def test_nothing_is_requested_while_everything_is_up_to_date(built: Daemon):
    assert built.tick() == {}
    assert built.tick() == {}


def test_an_ingest_requests_embeddings_vectors_and_every_shard_but_not_the_publish(built: Daemon):
    built.report(*FED_BY_INGEST)
    assert built.tick() == {
        "article_embeddings": True,
        "article_vectors": True,
        "serving_inputs": True,
        "user_feeds": SHARDS,
    }
    assert built.tick() == {}  # asked for once, not on every tick


def test_blocks_and_mutes_reach_the_feeds_without_touching_the_vectors(built: Daemon):
    built.report("blocks", "mutes")
    assert built.tick() == {"user_feeds": SHARDS}


def test_a_promoted_ranker_refreshes_every_shard(built: Daemon):
    built.report("promoted_ranker")
    # What the shards share too (its catalog follows the ranker's features).
    assert built.tick() == {"serving_inputs": True, "user_feeds": SHARDS}


def test_a_new_two_tower_rebuilds_the_vectors_then_the_feeds(built: Daemon):
    built.report("retrieval_model")
    # A shard run cannot share a run with the unpartitioned vectors; it waits for them.
    assert built.tick() == {"article_vectors": True}
    built.report("article_vectors")
    assert built.tick() == {"user_feeds": SHARDS}


def test_the_publish_waits_until_every_shard_is_fresh(built: Daemon):
    built.report(*FED_BY_INGEST)
    built.tick()
    built.report("article_embeddings", "article_vectors")
    built.tick()
    built.report("user_feeds", partitions=SHARDS[:-1])
    assert "published_feeds" not in built.tick()  # shard 3 still holds the old data
    assert "published_feeds" not in built.tick()
    built.report("user_feeds", partitions=SHARDS[-1:])
    assert built.tick() == {"published_feeds": True}
    assert built.tick() == {}  # once
    built.report("published_feeds")
    assert built.tick() == {}


def test_an_input_updated_after_a_shard_was_rebuilt_holds_the_publish(built: Daemon):
    built.report("promoted_ranker")
    built.tick()
    built.report("user_feeds", partitions=SHARDS[:2])
    built.report("blocks")  # lands after shards 0 and 1 were rebuilt
    built.report("user_feeds", partitions=SHARDS[2:])
    assert "published_feeds" not in built.tick()
    built.report("user_feeds", partitions=SHARDS[:2])
    assert built.tick() == {"published_feeds": True}


def test_a_shard_never_built_holds_the_publish(daemon: Daemon):
    daemon.tick()
    for key in daemon.materializable:
        if key.to_user_string() not in ("user_feeds", "published_feeds"):
            daemon.report(key.to_user_string())
    daemon.report("user_feeds", partitions=SHARDS[:-1])
    assert "published_feeds" not in daemon.tick()
    daemon.report("user_feeds", partitions=SHARDS[-1:])
    assert daemon.tick() == {"published_feeds": True}


# A stand-in graph with the same shape and the real publish condition, small enough to run:
# what a failed shard run does to the condition.
_inputs = dg.AssetSpec("inputs")
_shards = dg.StaticPartitionsDefinition(SHARDS)
_failing: set[str] = set()


@dg.asset(
    name="user_feeds",
    deps=[_inputs],
    partitions_def=_shards,
    automation_condition=dg.AutomationCondition.eager(),
)
def _stub_feeds(context: dg.AssetExecutionContext) -> None:
    if context.partition_key in _failing:
        raise RuntimeError(f"shard {context.partition_key} fails")


@dg.asset(
    name="published_feeds",
    deps=[_stub_feeds],
    automation_condition=publish_when_every_shard_is_fresh(),
)
def _stub_publish() -> None:
    pass


@pytest.fixture()
def stub() -> Daemon:
    _failing.clear()
    daemon = Daemon(dg.Definitions(assets=[_inputs, _stub_feeds, _stub_publish]))
    daemon.tick()
    daemon.report("inputs")
    for shard in SHARDS:
        assert dg.materialize([_stub_feeds], partition_key=shard, instance=daemon.instance).success
    assert dg.materialize([_stub_publish], instance=daemon.instance).success
    assert daemon.tick() == {}
    return daemon


def test_a_shard_whose_last_run_failed_holds_the_publish(stub: Daemon):
    # The hourly refresh: no input changed, every shard is rebuilt, shard 2 fails.
    _failing.add("2")
    for shard in SHARDS:
        dg.materialize(
            [_stub_feeds], partition_key=shard, instance=stub.instance, raise_on_error=False
        )
    assert "published_feeds" not in stub.tick()
    assert "published_feeds" not in stub.tick()
    _failing.clear()
    assert dg.materialize([_stub_feeds], partition_key="2", instance=stub.instance).success
    assert stub.tick() == {"published_feeds": True}
