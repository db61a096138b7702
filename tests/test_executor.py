"""FEED_DAGSTER_EXECUTOR picks the executor of jobs that name none (UI materialisations)."""

from __future__ import annotations

import pytest


def test_executor_follows_the_environment(data_dir, monkeypatch) -> None:
    import dagster as dg

    from feed_dagster.definitions import build_definitions, default_executor

    monkeypatch.delenv("FEED_DAGSTER_EXECUTOR", raising=False)
    assert default_executor() is None  # Dagster's default: a process per step
    default_job = build_definitions().resolve_implicit_global_asset_job_def()
    assert default_job.executor_def.name == "multi_or_in_process_executor"

    monkeypatch.setenv("FEED_DAGSTER_EXECUTOR", "in_process")
    job = build_definitions().resolve_implicit_global_asset_job_def()
    assert job.executor_def is dg.in_process_executor

    monkeypatch.setenv("FEED_DAGSTER_EXECUTOR", "threads")
    with pytest.raises(ValueError, match="FEED_DAGSTER_EXECUTOR"):
        default_executor()
