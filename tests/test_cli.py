import json
from datetime import datetime

import polars as pl

from feed_dagster.cli import main


def test_run_builds_everything_and_prints_a_feed(data_dir, capsys, monkeypatch):
    import feed_dagster.cli as cli

    assert main(["run"]) == 0
    out = capsys.readouterr().out
    assert "warehouse" in out and "users" in out
    assert "feed of user" in out and "p_click" in out
    assert (data_dir / "serving" / "feeds.duckdb").exists()
    # Progress a person can follow (plain lines: the output is not a terminal): each step
    # with its time, every training epoch with loss and metric, every shard.
    assert "trained_models done in" in out
    assert "ranker epoch 1/" in out and "two_tower epoch 1/" in out and "train_loss" in out
    assert "user_feeds shard 0: built user_feeds" in out and "4/4 shards done" in out
    assert "- publish: built published_feeds" in out
    # The source's tables and the models are built in processes of their own, in order.
    assert 0 <= out.index("- sources: built") < out.index("- models and vectors: built")

    # --quiet: one line on stdout, nothing on stderr (the build itself is skipped here).
    monkeypatch.setattr(cli, "materialize_everything", lambda log_level, **kw: None)
    assert main(["run", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and "run finished in" in captured.out
    assert str(data_dir / "serving" / "feeds.duckdb") in captured.out
    assert captured.err == ""

    assert main(["feed", "0", "--limit", "3", "--json"]) in (0, 1)
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) <= 3
    if rows:
        assert [r["position"] for r in rows] == sorted(r["position"] for r in rows)
        assert {"source", "score", "reason", "title"} <= set(rows[0])


def test_feed_before_publish_says_what_to_do(data_dir, capsys):
    assert main(["feed", "1"]) == 1
    assert "make run" in capsys.readouterr().err


def test_make_ebnerd_writes_a_loadable_folder(tmp_path, capsys):
    from feed_dagster.ebnerd import load_ebnerd

    assert main(["make-ebnerd", "--out", str(tmp_path / "eb"), "--users", "30"]) == 0
    world = load_ebnerd(tmp_path / "eb")
    assert world.users.height == 30


def test_sample_feed_says_what_happened_instead_of_crashing(tmp_path, capsys, tiny_world):
    from feed_dagster.cli import print_sample_feed
    from feed_dagster.data.schema import FEED_SCHEMA
    from feed_dagster.serving import publish_feeds

    path = tmp_path / "serving" / "feeds.duckdb"
    assert print_sample_feed(path) is False
    assert "make run" in capsys.readouterr().out

    publish_feeds(
        pl.DataFrame(schema=FEED_SCHEMA),
        path,
        model_version="m",
        vector_table_version="v",
        generated_at=datetime(2026, 1, 1),
    )
    assert print_sample_feed(path) is False
    out = capsys.readouterr().out
    assert "holds no feeds" in out and "candidate_window_hours" in out
    assert print_sample_feed(path, user_id=1) is False
    assert "user 1 has no feed" in capsys.readouterr().out


def test_run_reports_a_failed_or_empty_build_with_exit_code_1(data_dir, capsys, monkeypatch):
    import feed_dagster.cli as cli

    def fail(log_level, **kw):
        raise cli.BuildFailed("  FAILED user_feeds: no candidates ... candidate window 48 h")

    monkeypatch.setattr(cli, "materialize_everything", fail)
    assert main(["run"]) == 1
    out = capsys.readouterr().out
    assert "candidate window 48 h" in out and "run stopped" in out

    monkeypatch.setattr(cli, "materialize_everything", lambda log_level, **kw: None)
    assert main(["run"]) == 1  # the graph "succeeded" but nothing was published
    assert "feeds have not been published" in capsys.readouterr().out

    # --quiet: the same outcomes, on stderr, and nothing else.
    assert main(["run", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "feeds have not been published" in captured.err
    monkeypatch.setattr(cli, "materialize_everything", fail)
    assert main(["run", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "candidate window 48 h" in captured.err and "run stopped" in captured.err


def test_the_commands_and_the_asset_graph_share_one_storage_layout(data_dir):
    """Every path a command reads or writes is the storage resource's path for the same
    root, so FEED_DAGSTER_DATA (or a root handed to `run`) decides both."""
    import feed_dagster.cli as cli
    from feed_dagster.resources.storage import StorageResource

    store, resource = cli.storage(), StorageResource(root=str(data_dir))
    assert store.data_root() == resource.data_root() == data_dir.resolve()
    for name in (
        "warehouse_path",
        "serving_path",
        "safety_path",
        "incoming_dir",
        "shard_dir",
        "models_dir",
        "lancedb_uri",
        "embeddings_path",
    ):
        assert getattr(store, name)() == getattr(resource, name)(), name
