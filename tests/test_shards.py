"""Shard counts per world tier and the FEED_DAGSTER_SHARDS override."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from feed_dagster.feeds.shards import default_shard_count


def test_shard_count_follows_the_tier_unless_overridden():
    assert default_shard_count("synthetic:demo") == 4
    assert default_shard_count("synthetic:tiny") == 4
    assert default_shard_count("synthetic:m") == 16
    assert default_shard_count("synthetic:l") == 64
    assert default_shard_count("ebnerd:/data/x") == 4
    assert default_shard_count("synthetic:l", "8") == 8
    for bad in ("zero", "0", "-3"):
        with pytest.raises(ValueError, match="FEED_DAGSTER_SHARDS"):
            default_shard_count("synthetic:demo", bad)


@pytest.mark.parametrize(
    ("source", "override", "expected"), [("synthetic:m", "", 16), ("synthetic:m", "6", 6)]
)
def test_the_user_feeds_partitions_follow_the_source(tmp_path, source, override, expected):
    env = {**os.environ, "FEED_DAGSTER_SOURCE": source, "FEED_DAGSTER_DATA": str(tmp_path)}
    env.pop("FEED_DAGSTER_SHARDS", None)
    if override:
        env["FEED_DAGSTER_SHARDS"] = override
    code = (
        "from feed_dagster.assets.feeds import user_shards; "
        "print(len(user_shards.get_partition_keys()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert int(out.stdout.strip()) == expected


@pytest.mark.parametrize(("override", "expected"), [("", 16), ("6", 6)])
def test_run_builds_the_partitions_the_assets_define_without_importing_them(
    tmp_path, override, expected
):
    """`feed-dagster run`'s process waits beside every phase: it takes the shard keys from
    the same settings as the user_feeds partitions, without the assets and torch, which
    would stay in its memory for the whole run."""
    env = {**os.environ, "FEED_DAGSTER_SOURCE": "synthetic:m", "FEED_DAGSTER_DATA": str(tmp_path)}
    env.pop("FEED_DAGSTER_SHARDS", None)
    if override:
        env["FEED_DAGSTER_SHARDS"] = override
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import feed_dagster.cli.build as build\n"
        "seen = []\n"
        "build._materialize_phases = lambda level, workers, progress, shards, root: "
        "seen.extend(shards)\n"
        f"build.materialize_everything(root=Path({str(tmp_path)!r}))\n"
        "print(len(seen), seen[0], seen[-1], 'torch' in sys.modules, "
        "'feed_dagster.assets' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [str(expected), "0", str(expected - 1), "False", "False"]
