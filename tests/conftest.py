"""Shared fixtures: a tiny synthetic world (generated once per test session), a DuckDB
warehouse holding it, and the tiny world's feeds published and served over HTTP."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest

from feed_dagster.data.schema import World
from feed_dagster.data.world_tables import world_info
from feed_dagster.embeddings import LexicalEncoder
from feed_dagster.world import generate_world, world_config

# Real servers on loopback (PostgreSQL, ...) as fixtures: tests/servers.py.
pytest_plugins = ["servers"]

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout: real fixtures (EBNeRD sample, Wiki-Vote)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_world() -> World:
    return generate_world(world_config("tiny"))


def write_warehouse(path: Path, world: World) -> Path:
    """A DuckDB warehouse at `path` holding every table of `world` (and world_info)."""
    con = duckdb.connect(str(path))
    try:
        for name, df in {"world_info": world_info(world, "test"), **world.tables()}.items():
            con.register("df", df)
            con.execute(f"create table main.{name} as select * from df")
            con.unregister("df")
    finally:
        con.close()
    return path


def write_lexical_embeddings(path: Path, world: World) -> tuple[Path, np.ndarray]:
    """The world's lexical content vectors as an article_embeddings file at `path`."""
    vectors = LexicalEncoder().encode(world.articles)
    pl.DataFrame(
        {"article_id": world.articles["article_id"], "vector": vectors},
        schema={"article_id": pl.Int64, "vector": pl.Array(pl.Float32, vectors.shape[1])},
    ).write_parquet(path)
    return path, vectors


@pytest.fixture(scope="session")
def make_embeddings():
    """`write_lexical_embeddings(path, world)`, an embeddings file at the test's path."""
    return write_lexical_embeddings


@pytest.fixture(scope="session")
def make_warehouse():
    """`write_warehouse(path, world)`, for a warehouse at a path of the test's choosing."""
    return write_warehouse


@pytest.fixture()
def warehouse(tmp_path: Path, tiny_world: World) -> Path:
    """The tiny world in a fresh warehouse of this test's own."""
    return write_warehouse(tmp_path / "warehouse.duckdb", tiny_world)


@pytest.fixture(scope="session")
def feeds(tiny_world: World) -> pl.DataFrame:
    """Feeds of the tiny world's first users from the table-only pipeline (no models)."""
    from serving_helpers import tiny_feeds

    return tiny_feeds(tiny_world)


@pytest.fixture()
def serving(tmp_path: Path, feeds: pl.DataFrame, tiny_world: World) -> Path:
    """`feeds` published into a fresh serving file (model version m1)."""
    from serving_helpers import publish

    path = tmp_path / "serving" / "feeds.duckdb"
    publish(feeds, path, tiny_world)
    return path


@pytest.fixture()
def server(serving: Path):
    """The HTTP service over `serving` on a free loopback port; `.app` is the app."""
    from serving_helpers import ServerThread

    from feed_dagster.serving.http import create_app

    app = create_app(serving)
    with ServerThread(app) as srv:
        srv.app = app
        yield srv


@pytest.fixture()
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An isolated storage root for anything that materialises assets."""
    root = tmp_path / "data"
    monkeypatch.setenv("FEED_DAGSTER_DATA", str(root))
    monkeypatch.setenv("FEED_DAGSTER_SOURCE", "synthetic:tiny")
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    return root


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each phase's report on the test item, so a fixture can tell the test failed
    (the browser tests save a screenshot then)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
