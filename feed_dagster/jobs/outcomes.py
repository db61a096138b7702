"""What a step of `feed-dagster run` reports and how it ends, without importing Dagster.

The CLI imports this at start-up (commands that only read feeds stay quick to start);
feed_dagster/jobs/step_runs.py, which runs the steps, imports Dagster."""

from __future__ import annotations

from typing import Any

from feed_dagster.progress import Progress


class BuildFailed(RuntimeError):
    """A step of `run` failed; its errors have been printed."""


class PublishRefused(BuildFailed):
    """The publish guard refused the new generation; the live serving file is unchanged."""


# (phase, kind, step, payload): kind "start" | "done" (payload (seconds, ok)) | "log" (text).
StepEvent = tuple[str, str, str, Any]


def dispatch(progress: Progress, event: StepEvent) -> None:
    """Show `event` on `progress`."""
    phase, kind, step, payload = event
    if kind == "start":
        progress.step_started(phase, step)
    elif kind == "done":
        progress.step_finished(phase, step, *payload)
    elif kind == "log":
        progress.step_message(phase, step, payload)


def error_text(error: object) -> str:
    """The message of a step's error and of the errors that caused it: Dagster wraps what
    the asset raised ("Error occurred while executing op ...") and keeps it as the cause."""
    parts = []
    while error is not None:
        parts.append(str(getattr(error, "message", "")).strip())
        error = getattr(error, "cause", None)
    return "\n    ".join(p for p in parts if p)
