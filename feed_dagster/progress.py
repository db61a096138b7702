"""What `feed-dagster run` shows while it works: the phase and step running, their elapsed
time, shard progress and the log lines steps emit (training epochs among them).

Three reporters share one interface: `RichProgress` (a live display, for a terminal),
`PlainProgress` (one line per event, for logs and pipes, with a periodic "still running"
line so a long step is never silent) and `QuietProgress` (errors only, for scripts).
No dagster import: feed_dagster/jobs/step_runs.py turns Dagster's events into these calls.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

# What the shards of `run` are fanned out over unless it says otherwise.
WORKER_PROCESSES = "worker processes"


def format_seconds(seconds: float) -> str:
    """12.3s, 4m05s, 1h02m."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


# A finished step gets its own line only from this long on (or when it failed): the
# dozens of sub-second table checks would bury the steps a person waits for; the phase's
# report still names every asset built.
SHOW_STEPS_FROM_SECONDS = 1.0


def _shown(seconds: float, ok: bool) -> bool:
    return not ok or seconds >= SHOW_STEPS_FROM_SECONDS


class Progress:
    """The interface, and the quiet reporter: it shows errors only (on stderr).

    `phase`: one of run's runs ("sources, models and vectors", "user_feeds shard 2", ...);
    `step`: a Dagster step inside it ("trained_models", "user_feeds").
    """

    def __init__(self, err: IO[str] | None = None) -> None:
        self._err = err

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop any live display or background thread."""

    def phase_started(self, phase: str, note: str = "") -> None:
        """A phase begins; `note` says what to expect ("training takes a few minutes")."""

    def phase_finished(self, phase: str, report: str) -> None:
        """A phase ended; `report` holds its summary lines."""

    def step_started(self, phase: str, step: str) -> None:
        """A step of `phase` began."""

    def step_finished(self, phase: str, step: str, seconds: float, ok: bool) -> None:
        """A step of `phase` ended after `seconds` (ok: succeeded)."""

    def step_message(self, phase: str, step: str, text: str) -> None:
        """A line a running step logged (an epoch's loss and metric, a shard's progress)."""

    def shards_started(self, total: int, workers: int, where: str = WORKER_PROCESSES) -> None:
        """`total` shards are fanned out, `workers` at a time; `where` says over what."""

    def shard_finished(self, phase: str, report: str, done: int, total: int) -> None:
        """A shard's run ended; `done` of `total` are finished."""

    def note(self, text: str) -> None:
        """Information that is not an error (skipped in quiet mode)."""

    def error(self, text: str) -> None:
        """A failure or a refusal: always shown."""
        print(text, file=self._err or sys.stderr, flush=True)


QuietProgress = Progress


class PlainProgress(Progress):
    """One line per event on `out`; every `heartbeat` seconds a line naming the steps still
    running, so a log shows the run is alive during long training."""

    def __init__(self, out: IO[str] | None = None, heartbeat: float = 30.0) -> None:
        super().__init__()
        self._out = out
        self._lock = threading.Lock()
        self._running: dict[tuple[str, str], float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if heartbeat > 0:
            self._thread = threading.Thread(target=self._beat, args=(heartbeat,), daemon=True)
            self._thread.start()

    def _print(self, text: str) -> None:
        with self._lock:
            print(text, file=self._out or sys.stdout, flush=True)

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            now = time.monotonic()
            with self._lock:
                running = sorted(self._running.items(), key=lambda kv: kv[1])
            if running:
                steps = ", ".join(
                    f"{_name(phase, step)} {format_seconds(now - t0)}"
                    for (phase, step), t0 in running
                )
                self._print(f"  ... running: {steps}")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)

    def phase_started(self, phase: str, note: str = "") -> None:
        self._print(f"- {phase}{f' ({note})' if note else ''} ...")

    def phase_finished(self, phase: str, report: str) -> None:
        self._print(report)

    def step_started(self, phase: str, step: str) -> None:
        with self._lock:
            self._running[(phase, step)] = time.monotonic()

    def step_finished(self, phase: str, step: str, seconds: float, ok: bool) -> None:
        with self._lock:
            self._running.pop((phase, step), None)
        if _shown(seconds, ok):
            mark = "done" if ok else "FAILED"
            self._print(f"  {_name(phase, step)} {mark} in {format_seconds(seconds)}")

    def step_message(self, phase: str, step: str, text: str) -> None:
        self._print(f"  {_name(phase, step)}: {text}")

    def shards_started(self, total: int, workers: int, where: str = WORKER_PROCESSES) -> None:
        self._print(f"- user_feeds: {total} shards on {workers} {where} ...")

    def shard_finished(self, phase: str, report: str, done: int, total: int) -> None:
        self._print(report)
        self._print(f"  {done}/{total} shards done")

    def note(self, text: str) -> None:
        self._print(text)

    def error(self, text: str) -> None:
        self._print(text)


def _name(phase: str, step: str) -> str:
    """A step as a person reads it: "trained_models", "user_feeds shard 2"."""
    return phase if phase.startswith(step) else step


class RichProgress(Progress):
    """A live display on a terminal: the running phase and each running step with a
    spinner and elapsed time, a bar of finished shards, and the last line each step
    logged; finished steps and reports scroll above it."""

    def __init__(self, console: Any = None) -> None:
        from rich.console import Console
        from rich.progress import Progress as Live
        from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn

        super().__init__()
        self.console = console or Console()
        self._live = Live(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._lock = threading.Lock()
        self._phase_task: Any = None
        self._shard_task: Any = None
        self._workers = ""
        self._steps: dict[tuple[str, str], Any] = {}
        self._live.start()

    def close(self) -> None:
        self._live.stop()

    def _print(self, text: str, style: str | None = None) -> None:
        # Redraw first: a line printed above the display repeats its last frame, which
        # may predate the change that caused the line (a finished step still "running").
        self._live.refresh()
        # markup=False: step logs and reports are data, not rich markup.
        self._live.console.print(text, style=style, markup=False, highlight=False)

    def phase_started(self, phase: str, note: str = "") -> None:
        with self._lock:
            if self._phase_task is not None:
                self._live.remove_task(self._phase_task)
            label = f"[bold]{phase}[/bold]" + (f" ({note})" if note else "")
            self._phase_task = self._live.add_task(label, total=None)

    def phase_finished(self, phase: str, report: str) -> None:
        with self._lock:
            if self._phase_task is not None:
                self._live.remove_task(self._phase_task)
                self._phase_task = None
        self._print(report)

    def step_started(self, phase: str, step: str) -> None:
        with self._lock:
            self._steps[(phase, step)] = self._live.add_task(f"  {_name(phase, step)}", total=None)

    def step_finished(self, phase: str, step: str, seconds: float, ok: bool) -> None:
        with self._lock:
            task = self._steps.pop((phase, step), None)
            if task is not None:
                self._live.remove_task(task)
        if _shown(seconds, ok):
            mark = "done" if ok else "FAILED"
            self._print(
                f"  {_name(phase, step)} {mark} in {format_seconds(seconds)}",
                style=None if ok else "red",
            )

    def step_message(self, phase: str, step: str, text: str) -> None:
        with self._lock:
            task = self._steps.get((phase, step))
            if task is not None:
                short = text if len(text) <= 60 else text[:57] + "..."
                self._live.update(task, description=f"  {_name(phase, step)}: {short}")
        self._print(f"  {_name(phase, step)}: {text}", style="dim")

    def shards_started(self, total: int, workers: int, where: str = WORKER_PROCESSES) -> None:
        with self._lock:
            self._workers = f"{workers} {where}"
            self._shard_task = self._live.add_task(self._shards_label(0, total), total=total)

    def _shards_label(self, done: int, total: int) -> str:
        return f"[bold]user_feeds[/bold]: {done}/{total} shards ({self._workers})"

    def shard_finished(self, phase: str, report: str, done: int, total: int) -> None:
        with self._lock:
            if self._shard_task is not None:
                self._live.update(
                    self._shard_task, completed=done, description=self._shards_label(done, total)
                )
                if done >= total:
                    self._live.remove_task(self._shard_task)
                    self._shard_task = None
        self._print(report)

    def note(self, text: str) -> None:
        self._print(text)

    def error(self, text: str) -> None:
        self._print(text, style="red")


def make_progress(quiet: bool = False, out: IO[str] | None = None) -> Progress:
    """Quiet: errors only. Otherwise a live display when `out` (default stdout) is a
    terminal, plain lines when it is a file or a pipe."""
    if quiet:
        return QuietProgress()
    stream = out or sys.stdout
    if stream.isatty():
        from rich.console import Console

        return RichProgress(Console(file=stream))
    return PlainProgress(stream)
