"""Dagster's run, event log and schedule storage in PostgreSQL, chosen by configuration only:
DAGSTER_HOME pointing at a folder with deploy/postgres/dagster.yaml and the database URL in
FEED_DAGSTER_POSTGRES_URL. Proven against a real server (tests/servers.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from servers import PostgresServer, free_port

import feed_dagster.cli as cli
import feed_dagster.cli.build as run_build
from feed_dagster.cli import POSTGRES_URL_VARIABLE, main

ROOT = Path(__file__).resolve().parents[1]
POSTGRES_YAML = ROOT / "deploy" / "postgres" / "dagster.yaml"
DEFAULT_YAML = ROOT / ".dagster_home" / "dagster.yaml"


def postgres_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str | None) -> Path:
    """A DAGSTER_HOME holding the shipped Postgres instance config, as a user sets it up."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(POSTGRES_YAML, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    if url is None:
        monkeypatch.delenv(POSTGRES_URL_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(POSTGRES_URL_VARIABLE, url)
    return home


def test_the_postgres_instance_differs_from_the_default_only_in_its_storage() -> None:
    """Telemetry, concurrency pools, run monitoring and run retries stay what they are on
    one machine; only where runs are kept changes."""
    postgres = yaml.safe_load(POSTGRES_YAML.read_text())
    default = yaml.safe_load(DEFAULT_YAML.read_text())
    storage = postgres.pop("storage")
    assert postgres == default
    assert storage == {"postgres": {"postgres_url": {"env": POSTGRES_URL_VARIABLE}}}


def test_run_names_the_missing_variable(data_dir, tmp_path, monkeypatch, capsys) -> None:
    home = postgres_home(tmp_path, monkeypatch, url=None)

    def build(*args, **kwargs):
        raise AssertionError("run must stop before building anything")

    monkeypatch.setattr(cli, "materialize_everything", build)
    assert main(["run"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert POSTGRES_URL_VARIABLE in captured.err and "is not set" in captured.err
    assert str(home / "dagster.yaml") in captured.err
    assert not (home / "history").exists()  # no SQLite run storage in its place


def test_run_names_the_setting_when_postgres_is_unreachable(
    data_dir, tmp_path, monkeypatch, capsys
) -> None:
    # A port on loopback nothing listens on: refused at once (Dagster retries a few times).
    url = f"postgresql+psycopg2://feed:s3cret@127.0.0.1:{free_port()}/dagster"
    home = postgres_home(tmp_path, monkeypatch, url=url)
    monkeypatch.setattr(cli, "materialize_everything", lambda *a, **k: pytest.fail("built"))
    assert main(["run", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "cannot connect to its run storage database" in err
    assert "refused" in err.lower()
    assert POSTGRES_URL_VARIABLE in err and str(home / "dagster.yaml") in err
    assert "s3cret" not in err  # the password never reaches the terminal


def test_run_asks_for_the_psycopg2_driver_in_the_url(
    data_dir, tmp_path, monkeypatch, capsys
) -> None:
    """A plain postgresql:// URL means psycopg 3 to SQLAlchemy 2.1, on which dagster-postgres
    fails (first at import, else at its first NOTIFY): say so before anything runs."""
    home = postgres_home(tmp_path, monkeypatch, url="postgresql://feed:s3cret@db.invalid/dagster")
    monkeypatch.setattr(cli, "materialize_everything", lambda *a, **k: pytest.fail("built"))
    assert main(["run"]) == 1
    err = capsys.readouterr().err
    assert POSTGRES_URL_VARIABLE in err and str(home / "dagster.yaml") in err
    assert "postgresql+psycopg2://USER:PASSWORD@HOST:5432/DATABASE" in err
    assert "postgresql://feed:***@db.invalid/dagster" in err and "s3cret" not in err


@pytest.mark.slow
def test_runs_and_materializations_are_kept_in_postgres(
    data_dir, tmp_path, monkeypatch, postgres_server: PostgresServer, postgres_database: str
) -> None:
    import dagster as dg

    url = postgres_server.url(postgres_database, scheme="postgresql+psycopg2")
    home = postgres_home(tmp_path, monkeypatch, url=url)
    assert cli.instance_problem() is None  # opens, and creates Dagster's tables

    # `feed-dagster run`'s first phase, as it runs it: the instance comes from DAGSTER_HOME.
    report = run_build._run_step("sources", "sources", None, "WARNING", data_dir)
    assert "- sources: built" in report
    built = set(report.split("built ", 1)[1].split(" in ")[0].split(", "))
    assert {"users", "articles", "engagements", "follows"} <= built

    # Then one asset through the `dagster` command in a process of its own: the same
    # instance loading as `dagster dev` and its daemon, from the same environment.
    done = subprocess.run(
        [
            str(Path(sys.executable).with_name("dagster")),
            "asset",
            "materialize",
            "-m",
            "feed_dagster.definitions",
            "--select",
            "follow_graph",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    # What Postgres holds, read with a plain client.
    con = postgres_server.connect(postgres_database)
    try:
        with con.cursor() as cur:
            cur.execute("select status, count(*) from runs group by status")
            assert dict(cur.fetchall()) == {"SUCCESS": 2}
            cur.execute(
                "select distinct asset_key from event_logs "
                "where dagster_event_type = 'ASSET_MATERIALIZATION'"
            )
            keys = {dg.AssetKey.from_db_string(k).to_user_string() for (k,) in cur.fetchall()}
    finally:
        con.close()
    assert keys == built | {"follow_graph"}

    # A new instance object, as another process (the UI, a worker) would open it, sees both
    # runs and the latest materialization of each asset.
    instance = dg.DagsterInstance.get()
    try:
        runs = instance.get_runs()
        assert len(runs) == 2 and {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
        for key in ("users", "follow_graph"):
            assert instance.get_latest_materialization_event(dg.AssetKey(key)) is not None
    finally:
        instance.dispose()

    # Nothing was kept in SQLite files beside the config (Dagster's default storage
    # writes history/runs.db, history/runs/*.db and schedules/schedules.db).
    assert sorted(p.relative_to(home).as_posix() for p in home.rglob("*.db")) == []
    assert not (home / "history").exists() and not (home / "schedules").exists()
