"""The table-fallback feed pipeline at a baseline revision and at the working tree, measured
in the same run: wall time, users/s and peak memory of `build_feeds`, and a content digest
of the feeds that must be equal at both.

    .venv/bin/python bench/bench_revisions.py                  # d103819 vs working tree
    .venv/bin/python bench/bench_revisions.py --baseline HEAD~3 --scales tiny --no-write

The baseline's `feed_dagster` package is exported with `git archive` into a temporary
directory (removed at the end, also on error). Every measurement is a fresh child process
(this script with --child) whose PYTHONPATH is the tree under test, so the two versions of
the package never share an interpreter; the child checks where `feed_dagster` came from.
A child generates the world and builds `PopularityRetriever` + `TopicAffinityScorer` from
its tables (neither timed), times one `build_feeds` over every user at `world.now`, and
reports the time, its own peak RSS, the feed rows and the feeds' digest. Revisions alternate
(baseline first in odd repeats, current first in even ones) so that load drift on a shared
machine falls on both alike.

Exits 1, and writes nothing, if the feeds' digest differs between revisions or repeats.
Otherwise writes the "revisions" section of docs/BENCHMARKS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import compileall
import gc
import hashlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "d103819"  # the last commit before the pipeline's stages became typed classes
PACKAGE = "feed_dagster"
# The child prints its result on one line behind this marker; anything else it prints
# (progress, warnings) is passed through.
MARKER = "bench-revisions-result "


# -- the child: one measurement with the tree on PYTHONPATH ------------------------------


def feed_digest(feeds: pl.DataFrame) -> str:
    """sha256 over user_id, position, article_id, source and the scores rounded to 1e-6,
    sorted by user and position (the digest of tests/test_pipeline_golden.py)."""
    from feed_dagster.pipeline import ACTION_COLUMNS

    scores = ["score", *ACTION_COLUMNS, "dwell_seconds"]
    frame = feeds.select(
        "user_id",
        "position",
        "article_id",
        "source",
        *[pl.col(c).cast(pl.Float64).round(6) for c in scores],
    ).sort("user_id", "position")
    return hashlib.sha256(frame.write_csv().encode()).hexdigest()


def world_digest(tables: dict[str, pl.DataFrame]) -> str:
    """A digest of the world's tables, to tell a pipeline difference from an input one.
    Row hashes are stable within one Polars version, which both children share."""
    h = hashlib.sha256()
    for name in sorted(tables):
        h.update(name.encode())
        h.update(tables[name].hash_rows(seed=0).to_numpy().tobytes())
    return h.hexdigest()


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (Polars runs a pool)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mib() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(tree: Path, scale: str, batch_size: int) -> dict[str, Any]:
    """One build_feeds over every user of the `scale` world, with feed_dagster from `tree`."""
    import feed_dagster

    origin = Path(feed_dagster.__file__).resolve()
    if not origin.is_relative_to(tree.resolve()):
        raise SystemExit(f"feed_dagster imported from {origin}, not from {tree}")
    from feed_dagster.feeds.build import build_feeds
    from feed_dagster.pipeline import PopularityRetriever, TopicAffinityScorer
    from feed_dagster.world import generate_world, world_config

    t0 = time.perf_counter()
    world = generate_world(world_config(scale))
    world_seconds = time.perf_counter() - t0
    tables = world.tables()
    users = world.users["user_id"].to_numpy()
    retriever = PopularityRetriever.from_tables(world)
    scorer = TopicAffinityScorer.from_tables(world)
    gc.collect()
    rss_before = rss_mib()
    t0, c0 = time.perf_counter(), cpu_seconds()
    feeds = build_feeds(tables, users, world.now, retriever, scorer, batch_size=batch_size)[0]
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {
        "package": str(origin.parent),
        "users": len(users),
        "world_seconds": world_seconds,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "peak_rss_mib": rss_mib(),
        "peak_rss_before_build_mib": rss_before,
        "feed_rows": feeds.height,
        "digest": feed_digest(feeds),
        "world_digest": world_digest(tables),
    }


def child_main(args: argparse.Namespace) -> None:
    result = measure(Path(args.tree), args.child, args.batch_size)
    print(MARKER + json.dumps(result), flush=True)


# -- the parent: trees, alternation, report ------------------------------------------------


@dataclass
class Revision:
    label: str
    tree: Path
    runs: list[dict[str, Any]] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.runs)

    def digests(self) -> set[str]:
        return {r["digest"] for r in self.runs}


def git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"git {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def export_tree(rev: str, dest: Path) -> None:
    """The package as of `rev`, extracted under `dest` (only the package: nothing else of
    the tree is imported, and the repository's worktree list stays untouched)."""
    tar = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", rev, PACKAGE],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(dest, filter="data")
    # Byte-compiled now, so that no timed run pays for compiling a lazily imported module
    # (the working tree's are already compiled).
    compileall.compile_dir(dest / PACKAGE, quiet=1)


def run_child(tree: Path, scale: str, batch_size: int) -> dict[str, Any]:
    """Measure in a fresh interpreter whose only path to feed_dagster is `tree`."""
    # PYTHONPATH is replaced, not extended: an inherited entry could shadow the tree.
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", scale]
    cmd += ["--tree", str(tree), "--batch-size", str(batch_size)]
    proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    results = [line[len(MARKER) :] for line in lines if line.startswith(MARKER)]
    if proc.returncode != 0 or not results:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child for {tree} ({scale}) failed with exit code {proc.returncode}")
    return json.loads(results[-1])


def describe_worktree() -> str:
    head = git("rev-parse", "--short", "HEAD")
    dirty = git("status", "--porcelain", "--", PACKAGE)
    return f"working tree ({head}{' + uncommitted changes' if dirty else ''})"


def section(
    scales: list[str],
    revisions: dict[str, dict[str, Revision]],
    args: argparse.Namespace,
    loads: tuple[float, float],
) -> tuple[str, bool]:
    """The markdown section and whether the feeds were equal everywhere."""
    rows, ratios, same = [], [], True
    for scale in scales:
        base, cur = revisions[scale]["baseline"], revisions[scale]["current"]
        for rev in (base, cur):
            samples = ", ".join(f"{r['seconds']:.2f}" for r in rev.runs)
            digests = rev.digests()
            rows.append(
                [
                    scale,
                    rev.label,
                    f"{rev.median('seconds'):.2f} s ({samples})",
                    f"**{rev.runs[0]['users'] / rev.median('seconds'):,.0f}**",
                    f"{rev.median('cpu_seconds'):.2f} s",
                    f"{rev.median('peak_rss_mib'):,.0f} MiB "
                    f"({rev.median('peak_rss_before_build_mib'):,.0f} before)",
                    f"{rev.runs[0]['feed_rows']:,}",
                    "`" + "`, `".join(sorted(d[:12] for d in digests)) + "`",
                    "`" + "`, `".join(sorted({r["world_digest"][:12] for r in rev.runs})) + "`",
                ]
            )
        equal = len(base.digests() | cur.digests()) == 1
        same &= equal
        # users/s ratio = baseline time / current time, from the medians and per pair (each
        # pair ran back to back, so a pair's ratio is less exposed to drift in the load).
        pairs = [b["seconds"] / c["seconds"] for b, c in zip(base.runs, cur.runs, strict=True)]
        cpu_pairs = [
            b["cpu_seconds"] / c["cpu_seconds"] for b, c in zip(base.runs, cur.runs, strict=True)
        ]
        ratio = base.median("seconds") / cur.median("seconds")
        cpu_ratio = base.median("cpu_seconds") / cur.median("cpu_seconds")
        ratios.append(
            f"- `{scale}`: current / baseline users/s **{ratio:.3f}** from the medians, "
            f"{statistics.median(pairs):.3f} as the median over the {len(pairs)} pairs "
            f"({', '.join(f'{p:.2f}' for p in pairs)}); by CPU time {cpu_ratio:.3f} and "
            f"{statistics.median(cpu_pairs):.3f} ({', '.join(f'{p:.2f}' for p in cpu_pairs)}); "
            "feeds " + ("identical (same digest in every run)" if equal else "**DIFFER**")
        )
    table = markdown_table(
        [
            "world",
            "revision",
            f"build_feeds (median of {args.repeats})",
            "users/s",
            "CPU time (median)",
            "peak RSS of the child",
            "feed rows",
            "feeds digest",
            "world digest",
        ],
        rows,
    )
    body = "\n".join(
        [
            "## Pipeline plumbing before and after a revision (`bench/bench_revisions.py`)",
            "",
            f"Command: `.venv/bin/python bench/bench_revisions.py --baseline {args.baseline} "
            f"--scales {','.join(scales)} --repeats {args.repeats}"
            + (f" --batch-size {args.batch_size}`" if args.batch_size != 512 else "`"),
            "",
            "`build_feeds` with the table fallbacks (`popularity` / `topic_affinity`) for every "
            f"user at `world.now`, batches of {args.batch_size}, at the baseline revision and "
            "at the working tree in the same run. Each run is a fresh process with only that "
            "tree's `feed_dagster` importable; world generation and the fallbacks' setup are "
            "not timed; revisions alternate run by run, each going first in every other pair. "
            "CPU time (user + system, all threads) of `build_feeds` is less sensitive than "
            "wall time to other jobs on the machine. Peak RSS is the child's whole lifetime "
            "(world included), with its peak before `build_feeds` in brackets. Digests are "
            "sha256 prefixes: the feeds' as in `tests/test_pipeline_golden.py`, the world's "
            "over its tables' row hashes.",
            "",
            table,
            "",
            *ratios,
            "",
            f"Machine: {machine()}; load average {loads[0]:.1f} at start, {loads[1]:.1f} at "
            "the end (shared box).",
        ]
    )
    return body, same


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default=BASELINE, help="git revision to compare against")
    parser.add_argument("--scales", default="demo,tiny", help="comma-separated world scales")
    parser.add_argument("--repeats", type=int, default=3, help="runs per revision and scale")
    parser.add_argument("--batch-size", type=int, default=512, help="users per pipeline run")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    # Internal: run one measurement (the scale) and print its result.
    parser.add_argument("--child", metavar="SCALE", help=argparse.SUPPRESS)
    parser.add_argument("--tree", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args)
        return 0
    scales = [s for s in args.scales.split(",") if s]
    commit = git("rev-parse", "--short", f"{args.baseline}^{{commit}}")
    subject = git("log", "-1", "--format=%s", commit)
    print(f"baseline {commit}: {subject}")
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-revisions-") as tmp:
        export_tree(commit, Path(tmp))
        revisions = {
            scale: {
                "baseline": Revision(f"baseline {commit}", Path(tmp)),
                "current": Revision(describe_worktree(), ROOT),
            }
            for scale in scales
        }
        for scale in scales:
            for i in range(args.repeats):
                # Which revision goes first swaps every repeat, so that neither always runs
                # right after the other (counterbalanced against drift within a pair).
                order = ("baseline", "current") if i % 2 == 0 else ("current", "baseline")
                for key in order:
                    rev = revisions[scale][key]
                    result = run_child(rev.tree, scale, args.batch_size)
                    rev.runs.append(result)
                    print(
                        f"{scale} #{i + 1} {key:<8} build_feeds {result['seconds']:.2f} s "
                        f"({result['cpu_seconds']:.2f} s CPU), "
                        f"peak RSS {result['peak_rss_mib']:,.0f} MiB, "
                        f"{result['feed_rows']:,} rows, digest {result['digest'][:12]} "
                        f"({result['package']})",
                        flush=True,
                    )
    body, same = section(scales, revisions, args, (load_start, os.getloadavg()[0]))
    print(body)
    if not same:
        print("feeds differ between revisions or runs: nothing written", file=sys.stderr)
        return 1
    if not args.no_write:
        write_section("revisions", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
