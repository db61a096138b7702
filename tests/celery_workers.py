"""`dagster-celery` worker processes for tests, and what a run's event log says about them:
which worker took each step and which process wrote the step's events."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def children(pid: int) -> set[int]:
    """The processes `pid` started (Linux), recursively: dagster-celery's command starts the
    `celery` worker as a child process. Every thread's children: a process started from a
    thread other than the main one (the daemon's) is listed under that thread."""
    found: set[int] = set()
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            for child in listing.read_text().split():
                found |= {int(child), *children(int(child))}
    return found


def stop_session(proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    """SIGTERM the session `proc` leads (it and what it started), SIGKILL after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def celery_workers(
    names: list[str],
    env: Mapping[str, str],
    logs: Path,
    own_env: Mapping[str, Mapping[str, str]] | None = None,
) -> Iterator[dict[str, int]]:
    """One `dagster-celery worker start` per name, each a single process (solo pool) in a
    session of its own, in `env` plus `own_env[name]` (what differs per machine); yields
    {name: pid of the process that runs the tasks} once every worker says it is ready, and
    stops them all after, also when the test failed."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in names:
            with (logs / f"{name}.log").open("wb") as out:
                procs[name] = subprocess.Popen(
                    [
                        str(BIN / "dagster-celery"),
                        "worker",
                        "start",
                        "-A",
                        "dagster_celery.app",
                        "-y",
                        str(ROOT / "deploy" / "celery" / "celery.yaml"),
                        "-n",
                        name,
                        "-l",
                        "INFO",
                        "--",
                        "--pool=solo",
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env={**env, **(own_env or {}).get(name, {})},
                    cwd=ROOT,
                    start_new_session=True,
                )
        deadline = time.monotonic() + 90
        waiting = set(names)
        while waiting:
            for name in list(waiting):
                assert procs[name].poll() is None, (logs / f"{name}.log").read_text()
                if " ready." in (logs / f"{name}.log").read_text():
                    waiting.discard(name)
            assert time.monotonic() < deadline, f"workers {waiting} not ready in 90 s"
            time.sleep(0.3)
        yield {name: max(children(proc.pid)) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            stop_session(proc)


@dataclass(frozen=True)
class CeleryStep:
    """A step of a run as its events tell it: the worker dagster-celery's task says took it
    (`name@host`, its name part) and the process that wrote the step's success event."""

    step_key: str
    worker: str
    pid: int


def celery_steps(instance: Any, run_id: str) -> dict[str, CeleryStep]:
    """Every succeeded step of the run `run_id`, by step key."""
    events = [e.dagster_event for e in instance.all_logs(run_id) if e.dagster_event]
    handed = {
        e.step_key: e.engine_event_data.metadata["Celery worker"].value.split("@")[0]
        for e in events
        if e.event_type_value == "ENGINE_EVENT" and "Celery worker" in e.engine_event_data.metadata
    }
    return {
        e.step_key: CeleryStep(e.step_key, handed.get(e.step_key, ""), e.pid)
        for e in events
        if e.event_type_value == "STEP_SUCCESS"
    }
