"""`feed-dagster --help` and every command's help: each command described, each argument
explained with its default, and every environment variable the code reads listed."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

import feed_dagster
from feed_dagster.cli import (
    ENVIRONMENT,
    POSTGRES_URL_VARIABLE,
    SERVE_ENVIRONMENT,
    SHARD_RUNS_VARIABLE,
    build_parser,
    main,
)
from feed_dagster.jobs.executors import CELERY_BROKER_VARIABLE, EXECUTOR_VARIABLE
from feed_dagster.models.compiled import COMPILE_ENV
from feed_dagster.paths import ARTIFACTS_URI_VARIABLE, MODELS_URI_VARIABLE


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_command_is_described_and_every_argument_has_help() -> None:
    parser = build_parser()
    assert parser.description
    commands = _subparsers(parser)
    assert set(commands) == {"run", "feed", "serve", "fetch-serving", "simulate", "make-ebnerd"}
    (sub_action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    summaries = {a.dest: a.help for a in sub_action._choices_actions}
    for name, command in commands.items():
        assert summaries[name], f"{name} has no one-line summary in the command list"
        assert command.description and len(command.description) > 40, name
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = "/".join(action.option_strings) or action.dest
            assert action.help, f"{name} {flag} has no help"
            if action.default not in (None, False, argparse.SUPPRESS):
                assert "%(default)s" in action.help or str(action.default) in action.help, (
                    f"{name} {flag} does not state its default {action.default!r}"
                )
            elif action.default is False:
                assert "default" in action.help, f"{name} {flag} does not say it is off by default"


@pytest.mark.parametrize("argv", [[], ["run"], ["feed"], ["serve"], ["simulate"], ["make-ebnerd"]])
def test_help_lists_the_environment_variables(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for name in ENVIRONMENT:
        assert name in out
    if argv == ["serve"]:
        for name in SERVE_ENVIRONMENT:
            assert name in out


def test_the_list_holds_every_variable_the_code_reads() -> None:
    """A new os.environ read in feed_dagster/ must be documented in the CLI help."""
    from feed_dagster.serving import http

    constants = {"ENV_PATH": http.ENV_PATH, "ENV_STALE": http.ENV_STALE}
    constants["ENV_MEMORY"] = http.ENV_MEMORY
    constants["POSTGRES_URL_VARIABLE"] = POSTGRES_URL_VARIABLE
    constants["MODELS_URI_VARIABLE"] = MODELS_URI_VARIABLE
    constants["ARTIFACTS_URI_VARIABLE"] = ARTIFACTS_URI_VARIABLE
    constants["EXECUTOR_VARIABLE"] = EXECUTOR_VARIABLE
    constants["CELERY_BROKER_VARIABLE"] = CELERY_BROKER_VARIABLE
    constants["SHARD_RUNS_VARIABLE"] = SHARD_RUNS_VARIABLE
    constants["COMPILE_ENV"] = COMPILE_ENV
    read = set()
    pattern = re.compile(r"""os\.(?:environ\.get|environ\[|getenv)\(?\s*["']?([A-Za-z_]+)""")
    for path in Path(feed_dagster.__file__).parent.rglob("*.py"):
        for name in pattern.findall(path.read_text()):
            read.add(constants.get(name, name))
    assert read, "the pattern found no environment reads at all"
    assert read <= set(ENVIRONMENT) | set(SERVE_ENVIRONMENT), read - set(ENVIRONMENT)
    assert {"FEED_DAGSTER_SOURCE", "FEED_DAGSTER_DATA", "DAGSTER_HOME"} <= read
    assert "FEED_DAGSTER_EXECUTOR" in read
    assert POSTGRES_URL_VARIABLE in read
    assert MODELS_URI_VARIABLE in read
    assert ARTIFACTS_URI_VARIABLE in read
    assert CELERY_BROKER_VARIABLE in read
    assert SHARD_RUNS_VARIABLE in read
