"""Steps doing file and LanceDB I/O retry a transient failure; the instance watches runs."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
from dagster_helpers import definitions, materialize

from feed_dagster.assets.retry import IO_RETRY

ROOT = Path(__file__).resolve().parents[1]


def _retries(result) -> int:
    return sum(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)


def test_io_steps_carry_the_retry_policy(data_dir) -> None:
    defs = definitions()
    steps = ("article_embeddings", "article_vectors", "serving_inputs", "user_feeds")
    for name in (*steps, "published_feeds"):
        node = defs.resolve_assets_def(name).node_def
        assert node.retry_policy == IO_RETRY, name
    assert IO_RETRY.max_retries >= 1


def test_one_transient_failure_is_retried_and_the_run_succeeds(data_dir, monkeypatch) -> None:
    import feed_dagster.assets.feeds as feeds
    import feed_dagster.generation as generation
    from feed_dagster.serving.read import read_meta

    defs = definitions()
    assert materialize(dg.AssetSelection.groups("raw", "social_graph"), defs=defs).success

    calls = {"write": 0, "publish": 0}
    real_write, real_publish = feeds.write_shard, generation.publish_feeds

    def flaky_write(*args, **kwargs):
        calls["write"] += 1
        if calls["write"] == 1:
            raise OSError(28, "No space left on device (injected)")
        return real_write(*args, **kwargs)

    def flaky_publish(*args, **kwargs):
        calls["publish"] += 1
        if calls["publish"] == 1:
            raise OSError(5, "Input/output error (injected)")
        return real_publish(*args, **kwargs)

    monkeypatch.setattr(feeds, "write_shard", flaky_write)
    monkeypatch.setattr(generation, "publish_feeds", flaky_publish)
    for key in feeds.user_shards.get_partition_keys():
        result = materialize(dg.AssetSelection.assets("user_feeds"), key, defs=defs)
        assert result.success
        assert _retries(result) == (1 if key == "0" else 0)
    result = materialize(dg.AssetSelection.assets("published_feeds"), defs=defs)
    assert result.success and _retries(result) == 1
    assert calls == {"write": 5, "publish": 2}
    assert read_meta(data_dir / "serving" / "feeds.duckdb")["users"] == 300


def test_a_failure_that_repeats_is_not_retried(data_dir, monkeypatch) -> None:
    import feed_dagster.feeds.precompute as precompute
    from feed_dagster.errors import DataValidationError

    defs = definitions()
    assert materialize(dg.AssetSelection.groups("raw", "social_graph"), defs=defs).success
    calls = []

    def bad_build(*args, **kwargs):
        calls.append(1)
        raise DataValidationError("engagements", "dwell_seconds", ">= 0", "-3")

    monkeypatch.setattr(precompute, "build_feeds", bad_build)
    result = materialize(dg.AssetSelection.assets("user_feeds"), "0", defs=defs)
    assert not result.success and _retries(result) == 0 and len(calls) == 1


def test_the_instance_monitors_and_retries_runs(tmp_path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(ROOT / ".dagster_home" / "dagster.yaml", home / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings["start_timeout_seconds"] > 0
        assert instance.run_retries_enabled and instance.run_retries_max_retries >= 1
        # Step failures are the step retry policy's business, not a whole-run retry's.
        assert instance.run_retries_retry_on_asset_or_op_failure is False
        # What was there before stays: no telemetry, one warehouse writer, 4 runs at once.
        assert instance.get_settings("telemetry")["enabled"] is False
        config = instance.get_concurrency_config()
        assert config.pool_config.default_pool_limit == 1
        assert config.run_queue_config.max_concurrent_runs == 4
    finally:
        instance.dispose()
