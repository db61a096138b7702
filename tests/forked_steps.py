"""A two-step job on the project's default executor, for tests/test_executor.py: each step
reports its process, its parent and whether the project was imported before it started."""

from __future__ import annotations

import os
import sys

import dagster as dg

from feed_dagster.jobs.executors import default_executor


def _process_facts() -> dict[str, object]:
    return {
        "pid": os.getpid(),
        "parent": os.getppid(),
        # This module never imports the definitions: only a preloaded server could have.
        "project_preloaded": "feed_dagster.definitions" in sys.modules,
    }


@dg.op
def first_step() -> dict[str, object]:
    return _process_facts()


@dg.op
def second_step(first: dict[str, object]) -> dict[str, object]:
    return _process_facts()


def two_steps() -> dg.JobDefinition:
    @dg.job(executor_def=default_executor() or dg.multiprocess_executor)
    def forked_steps() -> None:
        second_step(first_step())

    return forked_steps
