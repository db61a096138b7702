"""Faults with real processes: killed with SIGKILL mid-write, racing, or reading damaged files.

A child process runs the real code with one function wrapped so that it stops at the
interesting point (half a file written, a build half done), tells the test through a file,
and waits there; the test then kills it with SIGKILL and looks at what a reader would see.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest
import torch
from dagster_helpers import instance_with_ranker_candidate, materialize

from feed_dagster.jobs.outcomes import error_text
from feed_dagster.models.store import CorruptModelError, ModelStore

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# Prepended to every child script: `hold()` signals the test and waits to be killed.
HOLD = """
import os, sys, time
from pathlib import Path
READY = Path(sys.argv[1])
def hold():
    READY.write_text(str(os.getpid()))
    time.sleep(600)
"""


def _start(code: str, ready: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", HOLD + code, str(ready), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_ready(proc: subprocess.Popen, ready: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            err = proc.stderr.read()
            pytest.fail(f"child exited with {proc.returncode} before the kill:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("child never reached the point to kill it at")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


RUN_ASSET = """
import dagster as dg
from feed_dagster.definitions import build_definitions
defs = build_definitions()
dg.materialize(
    [*defs.assets, *defs.asset_checks],
    selection=dg.AssetSelection.assets(sys.argv[2]),
    partition_key=sys.argv[3] if len(sys.argv) > 3 else None,
    resources=defs.resources,
    instance=dg.DagsterInstance.ephemeral(),
)
"""

# The shard run writes half of its Parquet bytes, flushed to disk, and stops there.
HALF_WRITTEN_PARQUET = """
import io
import polars as pl
_write = pl.DataFrame.write_parquet
def half_write(self, file, *args, **kwargs):
    buf = io.BytesIO()
    _write(self, buf, *args, **kwargs)
    data = buf.getvalue()
    with open(file, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    hold()
pl.DataFrame.write_parquet = half_write
"""


def test_a_shard_run_killed_mid_write_leaves_no_partial_shard(data_dir, tmp_path) -> None:
    from feed_dagster.resources.storage import StorageResource

    _shard_path = StorageResource().shard_path

    assert materialize(dg.AssetSelection.groups("raw", "social_graph")).success
    assert materialize(dg.AssetSelection.assets("user_feeds"), "0").success
    shard = _shard_path("0")
    previous = shard.read_bytes()

    ready = tmp_path / "ready"
    proc = _start(HALF_WRITTEN_PARQUET + RUN_ASSET, ready, "user_feeds", "0")
    _wait_ready(proc, ready)
    _kill(proc)

    # The half-written file exists, under a temporary name no reader looks at.
    (partial,) = shard.parent.glob("shard-0.parquet.tmp-*")
    with pytest.raises(Exception):  # noqa: B017 - any Parquet error: it is half a file
        pl.read_parquet(partial)
    assert shard.read_bytes() == previous
    assert pl.read_parquet(shard).height == 75 * 35

    # The next run of the shard succeeds and sweeps the leftover away.
    assert materialize(dg.AssetSelection.assets("user_feeds"), "0").success
    assert not list(shard.parent.glob("shard-0.parquet.tmp-*"))
    assert pl.read_parquet(shard).height == 75 * 35


# The publish stops after the new file's feeds table is loaded, before views, meta, rename.
PUBLISH_STOPS_MID_BUILD = """
import feed_dagster.serving.publish as publish
publish._create_views = lambda con: hold()
"""


def test_a_publish_killed_mid_build_leaves_the_previous_generation_served(
    data_dir, tmp_path
) -> None:
    from feed_dagster.assets.feeds import user_shards
    from feed_dagster.serving.read import FeedReader, read_meta

    assert materialize(dg.AssetSelection.groups("raw", "social_graph")).success
    for key in user_shards.get_partition_keys():
        assert materialize(dg.AssetSelection.assets("user_feeds"), key).success
    assert materialize(dg.AssetSelection.assets("published_feeds")).success
    live = data_dir / "serving" / "feeds.duckdb"
    before = read_meta(live)
    reader = FeedReader(live)
    user = int(pl.read_parquet(next(live.parent.parent.glob("feeds/shards/*.parquet")))[0, 0])
    feed = reader.get_feed(user)

    ready = tmp_path / "ready"
    proc = _start(PUBLISH_STOPS_MID_BUILD + RUN_ASSET, ready, "published_feeds")
    _wait_ready(proc, ready)
    assert list(live.parent.glob("feeds.duckdb.tmp-*")), "the build was under way"
    _kill(proc)

    assert read_meta(live)["generation_id"] == before["generation_id"]
    assert reader.get_feed(user).equals(feed)
    assert FeedReader(live).get_feed(user).equals(feed)

    # The next publish succeeds and serves a new generation.
    assert materialize(dg.AssetSelection.assets("published_feeds")).success
    after = read_meta(live)
    assert after["generation_id"] != before["generation_id"]
    assert after["rows"] == before["rows"]
    assert reader.get_feed(user)["article_id"].equals(feed["article_id"])
    reader.close()


# --- the model store --------------------------------------------------------------------


def _state(seed: int, n: int = 200_000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g), "b": torch.randn(8, generator=g)}


SAVE_STOPS_MID_WRITE = """
import feed_dagster.models.store as store_mod
_save = store_mod.save_file
def half_save(tensors, path):
    _save(tensors, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    hold()
store_mod.save_file = half_save
import torch
store = store_mod.ModelStore(sys.argv[2])
store.save("ranker", {"w": torch.randn(200_000), "b": torch.randn(8)}, {"kind": "ranker"})
"""


def test_a_truncated_safetensors_file_is_named_and_never_promoted(tmp_path) -> None:
    store = ModelStore(tmp_path / "models")
    v1 = store.save("ranker", _state(1), {"kind": "ranker"})
    store.promote("ranker", v1)

    # A save killed mid-write leaves no version behind, and the promoted one stays.
    ready = tmp_path / "ready"
    proc = _start(SAVE_STOPS_MID_WRITE, ready, str(tmp_path / "models"))
    _wait_ready(proc, ready)
    _kill(proc)
    assert store.versions("ranker") == [v1] and store.promoted("ranker") == v1

    # A stored version whose weights were truncated afterwards (a damaged copy, a full disk).
    v2 = store.save("ranker", _state(2), {"kind": "ranker"})
    weights = tmp_path / "models" / "ranker" / v2 / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(CorruptModelError) as err:
        store.load("ranker", v2)
    assert str(weights.parent) in str(err.value) and "truncated" in str(err.value)
    assert f"promoted now: {v1}" in str(err.value)
    with pytest.raises(CorruptModelError):
        store.promote("ranker", v2)
    assert store.promoted("ranker") == v1
    assert torch.equal(store.load("ranker")[0]["w"], _state(1)["w"])

    # Same bytes length, different content: the content hash catches it.
    v3 = store.save("ranker", _state(3), {"kind": "ranker"})
    config = tmp_path / "models" / "ranker" / v3 / "config.json"
    config.write_text(json.dumps({"kind": "rankex"}))
    with pytest.raises(CorruptModelError, match="expected " + v3):
        store.promote("ranker", v3)
    assert store.promoted("ranker") == v1


def test_the_promotion_asset_keeps_the_incumbent_over_a_damaged_candidate(data_dir) -> None:
    store = ModelStore(data_dir / "models")
    v1 = store.save("ranker", _state(1, 1000), {"kind": "ranker"})
    store.promote("ranker", v1)
    v2 = store.save("ranker", _state(2, 1000), {"kind": "ranker"})
    (data_dir / "models" / "ranker" / v2 / "model.safetensors").write_bytes(b"\x08\x00")
    # The candidate as trained_models records it: ranker_evaluation's metadata.
    instance = instance_with_ranker_candidate(v2, v1)

    result = materialize(dg.AssetSelection.assets("promoted_ranker"), instance=instance)
    assert not result.success
    (failure,) = result.get_step_failure_events()
    assert "unreadable" in error_text(failure.step_failure_data.error)
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert store.promoted("ranker") == v1


# --- the LanceDB vector table -----------------------------------------------------------


def _vectors(n: int, seed: int, dim: int = 16) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return pl.DataFrame(
        {
            "article_id": np.arange(n, dtype=np.int64),
            "vector": v,
            "author_id": np.arange(n, dtype=np.int64) % 97,
            "published_at": [datetime(2026, 1, 1)] * n,
            "topic": np.zeros(n, dtype=np.int32),
            "is_reply": [False] * n,
            "is_repost": [False] * n,
        }
    )


def _feed_models_with(tmp_path: Path, tables=None):
    """Call the feeds' model loader with both models marked promoted and the table at
    tmp_path/lancedb; returns (models, warnings) or raises what the loader raised."""
    from feed_dagster.feeds.model_backends import feed_models
    from feed_dagster.models.store import ModelStore

    for name in ("ranker", "two_tower"):
        (tmp_path / "models" / name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "models" / name / "PROMOTED").write_text("0123456789abcdef\n")
    warnings: list[str] = []
    store = ModelStore(str(tmp_path / "models"))
    uri = str(tmp_path / "lancedb")
    return feed_models(tables or {}, store, uri, "article_vectors", warnings.append), warnings


def test_a_missing_vector_table_falls_back_with_a_warning(tmp_path, tiny_world) -> None:
    (retriever, scorer, versions), warnings = _feed_models_with(tmp_path, tiny_world.tables())
    assert versions == {"model_version": "fallback", "vector_table_version": "none"}
    assert type(retriever).__name__ == "PopularityRetriever"
    assert any("no LanceDB table 'article_vectors'" in w for w in warnings)
    assert any("using table fallbacks" in w for w in warnings)


@pytest.mark.parametrize("damage", ["truncated data file", "deleted data file", "bad manifest"])
def test_a_damaged_vector_table_fails_clearly(tmp_path, damage) -> None:
    from feed_dagster.vectors import VectorTableError, write_vectors

    write_vectors(tmp_path / "lancedb", "article_vectors", _vectors(2000, 0))
    folder = tmp_path / "lancedb" / "article_vectors.lance"
    data = sorted((folder / "data").iterdir())[0]
    if damage == "truncated data file":
        with data.open("r+b") as f:
            f.truncate(data.stat().st_size // 2)
    elif damage == "deleted data file":
        data.unlink()
    else:
        for manifest in (folder / "_versions").iterdir():
            manifest.write_bytes(b"garbage")
    with pytest.raises(VectorTableError) as err:
        _feed_models_with(tmp_path)
    message = str(err.value)
    assert "'article_vectors'" in message and str(tmp_path / "lancedb") in message
    assert "rematerialise article_vectors" in message


UPSERT_FOREVER = """
import numpy as np
sys.path.insert(0, sys.argv[3])
from test_faults import _vectors
from feed_dagster.vectors import write_vectors
frames = [_vectors(40_000, 1), _vectors(40_000, 2)]
hold_written = False
for i in range(1000):
    write_vectors(sys.argv[2], "article_vectors", frames[i % 2])
    if not hold_written:
        READY.write_text("writing")
        hold_written = True
"""


def test_a_vector_write_killed_at_any_moment_leaves_a_readable_table(tmp_path) -> None:
    from feed_dagster.vectors import open_verified, read_vectors, write_vectors

    uri = tmp_path / "lancedb"
    write_vectors(uri, "article_vectors", _vectors(20_000, 0))
    ready = tmp_path / "ready"
    proc = _start(UPSERT_FOREVER, ready, str(uri), str(Path(__file__).parent))
    _wait_ready(proc, ready)
    time.sleep(0.7)  # somewhere inside one of the next upserts, whatever the timing
    _kill(proc)

    # Every committed version is whole: the table holds exactly one of the frames.
    table = open_verified(uri, "article_vectors")
    ids, matrix = read_vectors(table)
    order = np.argsort(ids)
    candidates = [_vectors(20_000, 0), _vectors(40_000, 1), _vectors(40_000, 2)]
    assert any(
        len(ids) == c.height and np.allclose(matrix[order], c["vector"].to_numpy())
        for c in candidates
    )
    # And the next write works.
    write_vectors(uri, "article_vectors", _vectors(20_000, 0))
    assert open_verified(uri, "article_vectors").count_rows() == 20_000


# --- two refreshes of one shard at once -------------------------------------------------

WRITE_SHARD_LOOP = """
import polars as pl
from feed_dagster.feeds.shard_files import write_shard
tag, directory = sys.argv[2], Path(sys.argv[3])
n = 150_000 if tag == "a" else 90_000
frame = pl.DataFrame({"user_id": range(n), "tag": [tag] * n})
READY.write_text("go")
for i in range(25):
    write_shard(directory, "0", frame, {"model_version": tag, "vector_table_version": str(i)})
"""


def test_two_concurrent_refreshes_of_one_shard_do_not_interleave(tmp_path) -> None:
    from feed_dagster.feeds.shard_files import VERSIONS_KEY, read_versions, shard_path

    directory = tmp_path / "shards"
    procs = [
        _start(WRITE_SHARD_LOOP, tmp_path / f"ready-{tag}", tag, str(directory))
        for tag in ("a", "b")
    ]
    seen, checked = set(), 0
    while any(p.poll() is None for p in procs):
        path = shard_path(directory, "0")
        if path.exists():
            # Whatever instant we look: one complete file from one writer, its versions
            # in the same file. (One read of the bytes: a reader opening the path twice
            # could itself straddle a rename.)
            snapshot = path.read_bytes()
            frame = pl.read_parquet(io.BytesIO(snapshot))
            (tag,) = frame["tag"].unique().to_list()
            assert frame.height == (150_000 if tag == "a" else 90_000)
            versions = json.loads(pl.read_parquet_metadata(io.BytesIO(snapshot))[VERSIONS_KEY])
            assert versions["model_version"] == tag
            seen.add(tag)
            checked += 1
        time.sleep(0.01)
    for p in procs:
        _, err = p.communicate()
        assert p.returncode == 0, err
    final = pl.read_parquet(shard_path(directory, "0"))
    (tag,) = final["tag"].unique().to_list()
    assert read_versions(directory, "0") == {"model_version": tag, "vector_table_version": "24"}
    assert sorted(p.name for p in directory.iterdir()) == ["shard-0.lock", "shard-0.parquet"]
    assert checked > 0 and seen
