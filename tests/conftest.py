"""Shared fixtures: a tiny synthetic world, generated once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from feed_dagster.data.schema import World
from feed_dagster.world import generate_world, world_config

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout: real fixtures (EBNeRD sample, Wiki-Vote)."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_world() -> World:
    return generate_world(world_config("tiny"))


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
