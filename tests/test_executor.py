"""FEED_DAGSTER_EXECUTOR picks the executor of jobs that name none (UI materialisations)."""

from __future__ import annotations

import importlib
import os

import pytest


def test_executor_follows_the_environment(data_dir, monkeypatch) -> None:
    import dagster as dg

    from feed_dagster.definitions import build_definitions, default_executor

    monkeypatch.delenv("FEED_DAGSTER_EXECUTOR", raising=False)
    # A process per step, forked from a server that imported the project once per run.
    default_job = build_definitions().resolve_implicit_global_asset_job_def()
    assert default_job.executor_def.name == "multiprocess_preloaded"

    monkeypatch.setenv("FEED_DAGSTER_EXECUTOR", "spawn")
    assert default_executor() is dg.multiprocess_executor

    monkeypatch.setenv("FEED_DAGSTER_EXECUTOR", "in_process")
    job = build_definitions().resolve_implicit_global_asset_job_def()
    assert job.executor_def is dg.in_process_executor

    monkeypatch.setenv("FEED_DAGSTER_EXECUTOR", "threads")
    with pytest.raises(ValueError, match="FEED_DAGSTER_EXECUTOR"):
        default_executor()


def test_default_steps_are_forked_from_a_server_that_preloaded_the_project(
    tmp_path, monkeypatch
) -> None:
    import dagster as dg
    import forked_steps

    from feed_dagster.jobs.executors import PRELOADED_MODULES

    monkeypatch.delenv("FEED_DAGSTER_EXECUTOR", raising=False)
    # Every preloaded module exists in this Dagster: the server skips a missing one quietly.
    for module in PRELOADED_MODULES:
        importlib.import_module(module)
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        job = dg.build_reconstructable_job(
            "forked_steps",
            "two_steps",
            reconstructor_working_directory=os.path.dirname(forked_steps.__file__),
        )
        with dg.execute_job(job, instance=instance) as result:
            assert result.success
            first = result.output_for_node("first_step")
            second = result.output_for_node("second_step")
    # Each step ran in a process of its own, both children of the same server (not of the
    # run's process, which spawn would make their parent), with the project already imported.
    assert first["pid"] != second["pid"] != os.getpid()
    assert first["parent"] == second["parent"] != os.getpid()
    assert first["project_preloaded"] and second["project_preloaded"]
