"""The publish guard: empty, low-coverage and collapsed generations never replace live feeds."""

from __future__ import annotations

import logging

import dagster as dg
import polars as pl
import pytest
from dagster_helpers import materialize

from feed_dagster.jobs.outcomes import error_text
from feed_dagster.serving.guard import GenerationStats, GuardConfig, decide

LIVE = GenerationStats(rows=1000, users=100)


def test_a_healthy_generation_passes() -> None:
    d = decide(GenerationStats(990, 99), LIVE, 100, 95, GuardConfig())
    assert d.passed and d.reasons == []
    assert "publish allowed" in d.description() and "95.0% of 100 active users" in d.description()


def test_an_empty_generation_is_refused_even_with_the_override() -> None:
    d = decide(GenerationStats(0, 0), LIVE, 100, 0, GuardConfig(allow_shrink=True))
    assert not d.passed
    assert "0 feed rows" in d.description() and "stays as it was" in d.description()


def test_low_coverage_of_active_users_is_refused() -> None:
    d = decide(GenerationStats(890, 89), LIVE, 100, 89, GuardConfig())
    assert not d.passed
    assert "89 of 100 active users (89.0%" in d.reasons[0] and "min_active_coverage" in d.reasons[0]
    assert decide(GenerationStats(890, 89), LIVE, 100, 89, GuardConfig(0.85)).passed


@pytest.mark.parametrize(
    ("new", "what"), [(GenerationStats(1000, 49), "users 49"), (GenerationStats(499, 100), "rows")]
)
def test_a_shrink_against_the_live_generation_needs_the_override(new, what) -> None:
    d = decide(new, LIVE, 40, 40, GuardConfig())
    assert not d.passed and "shrinks against the live generation" in d.reasons[0]
    assert what in d.reasons[0] and "allow_shrink" in d.reasons[0]
    allowed = decide(new, LIVE, 40, 40, GuardConfig(allow_shrink=True))
    assert allowed.passed and "shrink allowed by allow_shrink" in allowed.description()
    # No live generation: nothing to shrink against.
    assert decide(new, None, 40, 40, GuardConfig()).passed


def test_thresholds_are_checked() -> None:
    from feed_dagster.assets.feeds import PublishConfig

    with pytest.raises(ValueError, match="min_active_coverage"):
        GuardConfig(min_active_coverage=90)
    with pytest.raises(ValueError, match="min_share_of_live"):
        PublishConfig(min_share_of_live=1.5)


def test_an_unreadable_live_file_is_no_yardstick(tmp_path) -> None:
    from feed_dagster.serving.guard import live_generation

    assert live_generation(tmp_path / "none.duckdb") == (None, None)
    damaged = tmp_path / "feeds.duckdb"
    damaged.write_bytes(b"not a database")
    live, note = live_generation(damaged)
    assert live is None and str(damaged) in note and "unreadable" in note
    d = decide(GenerationStats(10, 1), live, 1, 1, GuardConfig(), [note])
    assert d.passed and "unreadable" in d.description()


# --- the guard in the asset graph ---------------------------------------------------------


@pytest.fixture()
def published(data_dir):
    """Raw tables and four shards on the tiny world (table fallbacks), published once."""
    from feed_dagster.assets.feeds import user_shards

    assert materialize(dg.AssetSelection.groups("raw", "social_graph")).success
    for key in user_shards.get_partition_keys():
        assert materialize(dg.AssetSelection.assets("user_feeds"), key).success
    assert materialize(dg.AssetSelection.assets("published_feeds")).success
    return data_dir / "serving" / "feeds.duckdb"


def _rewrite_shards(keep: pl.Expr) -> None:
    from feed_dagster.assets.feeds import user_shards
    from feed_dagster.feeds.shard_files import read_versions, write_shard
    from feed_dagster.resources.storage import StorageResource

    storage = StorageResource()
    for key in user_shards.get_partition_keys():
        feeds = pl.read_parquet(storage.shard_path(key)).filter(keep)
        write_shard(storage.shard_dir(), key, feeds, read_versions(storage.shard_dir(), key))


def _guard(result) -> dg.AssetCheckEvaluation:
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "publish_guard"]
    return check


def _publish(config: dict | None = None, instance=None):
    run_config = {"ops": {"published_feeds": {"config": config}}} if config else None
    return materialize(
        dg.AssetSelection.assets("published_feeds"), run_config=run_config, instance=instance
    )


def test_a_collapsed_generation_is_refused_and_the_live_file_stays(published) -> None:
    from feed_dagster.serving.read import read_meta

    live = read_meta(published)
    assert live["users"] == 300
    _rewrite_shards(pl.col("position") <= 10)  # every user keeps a feed, rows fall to 10/35

    instance = dg.DagsterInstance.ephemeral()
    result = _publish(instance=instance)
    assert not result.success
    check = _guard(result)
    assert not check.passed and "shrinks against the live generation" in check.description
    assert "rows 3,000 < 50% of the live 10,500" in check.description
    assert check.metadata["live_rows"].value == 10_500
    # Said in the run log and in the step's failure too, and a refusal is not retried.
    logged = [
        e.user_message
        for e in instance.all_logs(result.run_id)
        if e.level == logging.ERROR and "publish refused" in e.user_message
    ]
    assert logged and "rows 3,000" in logged[0]
    (failure,) = result.get_step_failure_events()
    assert "shrinks against" in error_text(failure.step_failure_data.error)
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert read_meta(published)["generation_id"] == live["generation_id"]

    # The explicit override publishes the intended shrink.
    result = _publish({"allow_shrink": True})
    assert result.success and _guard(result).passed
    assert "shrink allowed" in _guard(result).description
    meta = read_meta(published)
    assert meta["generation_id"] != live["generation_id"] and meta["rows"] == 3000


def test_low_coverage_is_refused(published) -> None:
    from feed_dagster.serving.read import read_meta

    before = read_meta(published)["generation_id"]
    _rewrite_shards(pl.col("user_id") % 5 != 0)  # a fifth of the users lose their feed
    result = _publish()
    assert not result.success
    check = _guard(result)
    assert "active users" in check.description and "expected at least 90%" in check.description
    assert check.metadata["active_coverage"].value < 0.9
    assert read_meta(published)["generation_id"] == before
    # The threshold is configuration: a lower one lets the same generation through.
    assert _publish({"min_active_coverage": 0.5}).success


def test_the_cli_reports_a_refused_publish_and_keeps_serving(published, capsys, monkeypatch):
    import feed_dagster.cli as cli
    import feed_dagster.cli.build as run_build

    _rewrite_shards(pl.col("position") <= 5)
    with pytest.raises(run_build.PublishRefused) as err:
        run_build._run_step("publish", "publish", None, "WARNING", cli.storage().data_root())
    report = str(err.value)
    assert "check publish_guard FAILED" in report and "shrinks against" in report
    assert "live serving file is unchanged" in report

    monkeypatch.setattr(cli, "materialize_everything", lambda log_level, **kw: report)
    assert cli.main(["run"]) == 1
    out = capsys.readouterr().out
    assert "feed of user" in out  # the live generation is still shown
    assert "publish was refused" in out and "allow_shrink: true" in out


def test_active_users_are_engaged_users_with_something_left_to_see(tmp_path) -> None:
    import duckdb

    from feed_dagster.serving.guard import active_user_ids

    path = tmp_path / "warehouse.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE world_info AS SELECT TIMESTAMP '2026-01-03' AS now, "
        "48.0 AS candidate_window_hours"
    )
    # Posts 1 and 2 are inside the 48 h window, post 3 is older.
    con.execute(
        "CREATE TABLE articles AS SELECT * FROM (VALUES (1, TIMESTAMP '2026-01-02'), "
        "(2, TIMESTAMP '2026-01-02 12:00'), (3, TIMESTAMP '2025-12-01')) "
        "t(article_id, published_at)"
    )
    # User 10 engaged with an old post; 11 read post 1 and was shown post 2 (nothing left);
    # 12 read both fresh posts (nothing left); 13 only saw impressions (not engaged); 14 read
    # post 1 and has post 2 left.
    con.execute(
        "CREATE TABLE engagements AS SELECT * FROM (VALUES (10, 3, TIMESTAMP '2025-12-02'), "
        "(11, 1, TIMESTAMP '2026-01-02 13:00'), (12, 1, TIMESTAMP '2026-01-02 14:00'), "
        "(12, 2, TIMESTAMP '2026-01-02 15:00'), (14, 1, TIMESTAMP '2026-01-02 16:00')) "
        "t(user_id, article_id, engaged_at)"
    )
    con.execute(
        "CREATE TABLE impressions AS SELECT * FROM (VALUES (11, 2, TIMESTAMP '2026-01-02 13:00'), "
        "(13, 1, TIMESTAMP '2026-01-02 13:00')) t(user_id, article_id, shown_at)"
    )
    con.close()
    assert sorted(active_user_ids(path).to_list()) == [10, 14]
