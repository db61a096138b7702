"""Readers during publishes: reader processes look feeds up while publishes swap the file.

    .venv/bin/python bench/bench_readers.py                 # 4 readers, 10,000 lookups, 3 publishes
    .venv/bin/python bench/bench_readers.py --readers 8 --lookups 40000 --no-write

Each generation's rows say which generation they belong to twice: `model_version` is
`gen-<g>` and every article id is `g * 1e9 + user * 100 + position`, so a response mixing
two generations, or missing rows, is detected row by row. Every reader is a separate
process holding one `FeedReader` (which reopens after a rename) and asks each user twice:
`get_feed` (a DuckDB query) and `page` (the HTTP service's read, from the generation's
lookup file); the publishes are the real `publish_feeds`. Writes the "readers" section of
docs/BENCHMARKS.md (unless --no-write). tests/test_readers_during_publishes.py runs the
same function.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timedelta
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

from feed_dagster.data.schema import FEED_SCHEMA  # noqa: E402
from feed_dagster.serving import FeedReader, publish_feeds  # noqa: E402
from feed_dagster.serving.lookup import PAGE_COLUMNS  # noqa: E402
from feed_dagster.serving.read import Page  # noqa: E402

PER_USER = 35
GEN_STRIDE = 1_000_000_000
_ARTICLE = PAGE_COLUMNS.index("article_id")


def generation_frame(generation: int, n_users: int) -> pl.DataFrame:
    """n_users x 35 feed rows whose ids and scores carry the generation number."""
    users = np.repeat(np.arange(n_users, dtype=np.int64), PER_USER)
    positions = np.tile(np.arange(1, PER_USER + 1, dtype=np.int32), n_users)
    frame = pl.DataFrame(
        {
            "user_id": users,
            "position": positions,
            "article_id": generation * GEN_STRIDE + users * 100 + positions,
            "author_id": users % 50,
            "score": np.full(len(users), float(generation)),
            "source": ["in_network"] * len(users),
        }
    )
    missing = {c: pl.lit(None, dtype=t) for c, t in FEED_SCHEMA.items() if c not in frame.columns}
    return frame.with_columns(**missing).select([pl.col(c).cast(t) for c, t in FEED_SCHEMA.items()])


def publish_generation(path: Path, generation: int, n_users: int) -> float:
    t0 = time.perf_counter()
    publish_feeds(
        generation_frame(generation, n_users),
        path,
        model_version=f"gen-{generation}",
        vector_table_version="bench",
        generated_at=datetime(2026, 1, 1) + timedelta(hours=generation),
        memory_limit="512MB",
    )
    return time.perf_counter() - t0


def response_generation(feed: pl.DataFrame, user_id: int) -> int | None:
    """The one generation a response comes from, or None if it mixes generations, misses
    rows or holds rows of another user."""
    if feed.height != PER_USER:
        return None
    versions = feed["model_version"].unique().to_list()
    if len(versions) != 1 or not versions[0].startswith("gen-"):
        return None
    generation = int(versions[0].removeprefix("gen-"))
    expected = generation * GEN_STRIDE + user_id * 100 + np.arange(1, PER_USER + 1)
    if not np.array_equal(feed["article_id"].to_numpy(), expected):
        return None
    return generation


def page_generation(page: Page, user_id: int) -> int | None:
    """Like `response_generation`, for a page of PAGE_COLUMNS tuples and its meta."""
    version = str(page.meta.get("model_version", ""))
    if len(page.rows) != PER_USER or not version.startswith("gen-"):
        return None
    generation = int(version.removeprefix("gen-"))
    expected = generation * GEN_STRIDE + user_id * 100 + np.arange(1, PER_USER + 1)
    if [r[_ARTICLE] for r in page.rows] != expected.tolist():
        return None
    return generation


def reader(path: str, control: str, n_users: int, min_lookups: int, seed: int) -> dict:
    """One reader process: random users until it has made `min_lookups` lookups and the
    publisher has finished (control/stop exists)."""
    rng = np.random.default_rng(seed)
    stop, ready = Path(control) / "stop", Path(control) / f"ready-{seed}"
    lookups = errors = mixed = 0
    generations: dict[int, int] = {}
    first_error = ""
    read_paths: set[str] = set()
    t0 = time.perf_counter()
    with FeedReader(path, memory_limit="256MB") as feeds:
        while lookups < min_lookups or not stop.exists():
            user = int(rng.integers(n_users))
            try:
                found = [
                    response_generation(feeds.get_feed(user), user),
                    page_generation(feeds.page(user, PER_USER), user),
                ]
                read_paths.add(feeds.read_path.split(" ")[0])
            except Exception as exc:  # counted, and the first one kept for the report
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
            else:
                for generation in found:
                    if generation is None:
                        mixed += 1
                    else:
                        generations[generation] = generations.get(generation, 0) + 1
            lookups += 2
            if lookups == 2:
                ready.touch()
    return {
        "lookups": lookups,
        "errors": errors,
        "mixed_or_incomplete": mixed,
        "generations": generations,
        "seconds": time.perf_counter() - t0,
        "first_error": first_error,
        "read_paths": sorted(read_paths),
    }


def readers_during_publishes(
    folder: Path,
    readers: int = 4,
    lookups: int = 10_000,
    publishes: int = 3,
    n_users: int = 2_000,
    pause: float = 0.5,
) -> dict:
    """Publish generation 0, start `readers` reader processes, publish generations
    1..`publishes` while they read, and return the figures."""
    folder.mkdir(parents=True, exist_ok=True)
    path, control = folder / "feeds.duckdb", folder / "control"
    control.mkdir(exist_ok=True)
    for f in control.iterdir():
        f.unlink()
    publish_seconds = [publish_generation(path, 0, n_users)]
    per_reader = -(-lookups // readers)
    with ProcessPoolExecutor(readers, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(reader, str(path), str(control), n_users, per_reader, seed)
            for seed in range(readers)
        ]
        deadline = time.monotonic() + 120
        while len(list(control.glob("ready-*"))) < readers:
            if time.monotonic() > deadline or any(f.done() for f in futures):
                break
            time.sleep(0.05)
        for generation in range(1, publishes + 1):
            time.sleep(pause)
            publish_seconds.append(publish_generation(path, generation, n_users))
        time.sleep(pause)
        (control / "stop").touch()
        results = [f.result() for f in futures]
    seen: dict[int, int] = {}
    for r in results:
        for g, n in r["generations"].items():
            seen[g] = seen.get(g, 0) + n
    return {
        "readers": readers,
        "publishes": publishes,
        "lookups": sum(r["lookups"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "mixed_or_incomplete": sum(r["mixed_or_incomplete"] for r in results),
        "generations_seen": dict(sorted(seen.items())),
        "generations_per_reader": [sorted(r["generations"]) for r in results],
        "first_error": next((r["first_error"] for r in results if r["first_error"]), ""),
        "publish_seconds": publish_seconds,
        "lookups_per_second": sum(r["lookups"] / r["seconds"] for r in results),
        "users": n_users,
        "read_paths": sorted({p for r in results for p in r["read_paths"]}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--lookups", type=int, default=10_000)
    parser.add_argument("--publishes", type=int, default=3)
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        r = readers_during_publishes(
            Path(tmp), args.readers, args.lookups, args.publishes, args.users
        )
    rows = [
        ["reader processes", r["readers"]],
        ["publishes during the reads", r["publishes"]],
        ["lookups (half `get_feed`, half `page`)", f"{r['lookups']:,}"],
        ["errors", r["errors"]],
        ["responses mixing generations or missing rows", r["mixed_or_incomplete"]],
        [
            "generations seen (lookups each)",
            ", ".join(f"{g}: {n:,}" for g, n in r["generations_seen"].items()),
        ],
        ["generations seen per reader", "; ".join(str(g) for g in r["generations_per_reader"])],
        ["`page` read paths used", ", ".join(r["read_paths"])],
    ]
    table = markdown_table(["", "value"], rows)
    print(table)
    # Timings depend on what else the machine runs; printed, not written to the docs.
    print(
        f"lookups/s (all readers) {r['lookups_per_second']:,.0f}; publish seconds "
        + ", ".join(f"{s:.2f}" for s in r["publish_seconds"])
    )
    if r["first_error"]:
        print(f"first error: {r['first_error']}")
    if not args.no_write:
        body = (
            "## Readers during publishes\n\n"
            f"`bench/bench_readers.py`: {r['readers']} reader processes, each holding a "
            f"`FeedReader`, look up random users among {r['users']:,} (35 rows each) while "
            f"{r['publishes']} publishes replace the serving file; generation 0 is live "
            "before they start. Each lookup asks `get_feed` (a DuckDB query) and `page` "
            "(the HTTP service's read, from the lookup file). "
            "A response counts as one generation when its 35 rows all "
            f"carry that generation's model_version and article ids. {machine()}.\n\n" + table
        )
        write_section("readers", body)


if __name__ == "__main__":
    main()
