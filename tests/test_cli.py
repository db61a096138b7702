import json

from feed_dagster.cli import main


def test_run_builds_everything_and_prints_a_feed(data_dir, capsys):
    assert main(["run"]) == 0
    out = capsys.readouterr().out
    assert "warehouse" in out and "users" in out
    assert "feed of user" in out
    assert (data_dir / "serving" / "feeds.duckdb").exists()

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
