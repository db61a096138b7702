"""What `feed-dagster run` shows while it works, without running the whole graph."""

from __future__ import annotations

import io
import time
import uuid

import dagster as dg

from feed_dagster.assets.models import epoch_line
from feed_dagster.jobs.outcomes import dispatch
from feed_dagster.jobs.step_runs import step_listener
from feed_dagster.progress import (
    PlainProgress,
    Progress,
    RichProgress,
    format_seconds,
    make_progress,
)


def _walk(progress: Progress) -> None:
    """One of everything `run` reports."""
    progress.phase_started("sources, models and vectors", "training takes a few minutes")
    progress.step_started("sources, models and vectors", "trained_models")
    progress.step_message("sources, models and vectors", "trained_models", "ranker epoch 1/2")
    progress.step_finished("sources, models and vectors", "trained_models", 75.0, True)
    progress.step_started("sources, models and vectors", "users_user_id_unique")
    progress.step_finished("sources, models and vectors", "users_user_id_unique", 0.01, True)
    progress.phase_finished("sources, models and vectors", "- sources: built users")
    progress.shards_started(2, 2)
    progress.step_started("user_feeds shard 0", "user_feeds")
    progress.step_finished("user_feeds shard 0", "user_feeds", 3.0, False)
    progress.shard_finished("user_feeds shard 0", "- user_feeds shard 0: built", 1, 2)
    progress.shard_finished("user_feeds shard 1", "- user_feeds shard 1: built", 2, 2)
    progress.note("a note")
    progress.error("a failure")


def test_plain_lines_name_steps_times_epochs_and_shards() -> None:
    out = io.StringIO()
    with PlainProgress(out, heartbeat=0) as progress:
        _walk(progress)
    text = out.getvalue()
    assert "- sources, models and vectors (training takes a few minutes) ..." in text
    assert "  trained_models: ranker epoch 1/2" in text
    assert "  trained_models done in 1m15s" in text
    assert "- user_feeds: 2 shards on 2 worker processes ..." in text
    assert "  user_feeds shard 0 FAILED in 3.0s" in text
    assert "  1/2 shards done" in text and "  2/2 shards done" in text
    assert "a note" in text and "a failure" in text
    assert "users_user_id_unique" not in text  # a sub-second step is no line of its own


def test_plain_heartbeat_names_the_running_step() -> None:
    out = io.StringIO()
    with PlainProgress(out, heartbeat=0.05) as progress:
        progress.step_started("sources, models and vectors", "trained_models")
        time.sleep(0.3)
        progress.step_finished("sources, models and vectors", "trained_models", 0.3, True)
    assert "  ... running: trained_models" in out.getvalue()


def test_rich_display_renders_on_a_terminal() -> None:
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    with RichProgress(console) as progress:
        _walk(progress)
    text = out.getvalue()
    assert "trained_models done in 1m15s" in text
    assert "trained_models: ranker epoch 1/2" in text
    assert "- user_feeds shard 1: built" in text and "a failure" in text
    assert "user_feeds: 1/2 shards (2 worker processes)" in text


def test_quiet_shows_errors_only(capsys) -> None:
    with make_progress(quiet=True) as progress:
        _walk(progress)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "a failure\n"


def test_plain_lines_when_the_output_is_not_a_terminal() -> None:
    progress = make_progress(out=io.StringIO())
    assert isinstance(progress, PlainProgress)
    progress.close()


def test_format_seconds() -> None:
    assert [format_seconds(s) for s in (4.25, 75, 3725)] == ["4.2s", "1m15s", "1h02m"]


def test_epoch_line_has_loss_metric_and_time() -> None:
    row = {"epoch": 2, "train_loss": 0.41201, "valid_auc": 0.70112, "seconds": 12.34}
    assert epoch_line("ranker", row, 3, best_epoch=2) == (
        "ranker epoch 2/3: train_loss 0.4120, valid_auc 0.7011 (12.3s), best"
    )


def test_listener_follows_a_dagster_run_as_it_happens() -> None:
    @dg.asset
    def trained(context) -> None:  # a string annotation (future import) confuses dagster
        context.log.info("ranker epoch 1/2: train_loss 0.5")
        context.log.warning("the console logger prints this one")
        context.log.debug("too detailed to show")

    job = dg.Definitions(assets=[trained], jobs=[dg.define_asset_job("j")]).resolve_job_def("j")
    instance = dg.DagsterInstance.ephemeral()
    run_id = str(uuid.uuid4())
    events: list = []
    instance.add_event_listener(run_id, step_listener("models", events.append, "WARNING"))
    assert job.execute_in_process(instance=instance, run_id=run_id).success
    assert [(e[1], e[2]) for e in events] == [
        ("start", "trained"),
        ("log", "trained"),
        ("done", "trained"),
    ]
    assert events[1][3] == "ranker epoch 1/2: train_loss 0.5"
    seconds, ok = events[2][3]
    assert ok and seconds >= 0

    out = io.StringIO()
    with PlainProgress(out, heartbeat=0) as progress:
        for event in events:
            dispatch(progress, event)
    assert "trained: ranker epoch 1/2" in out.getvalue()
