"""The HTTP service under load: requests/s and latency at 1, 8 and 32 concurrent clients on
a serving file of 1M users x 35 rows, outside and during a publish.

    .venv/bin/python bench/bench_serve.py                 # reuses data/bench/lookup/
    .venv/bin/python bench/bench_serve.py --workers 1 --seconds 5 --no-baseline

The serving file is the one `bench_lookup.py` builds (same generator, same place); it is
built here when missing, and a file published before lookup files existed gets its lookup
file added (serving/lookup.py). The service runs as `feed-dagster serve` in its own
process group; the clients are one asyncio process on 127.0.0.1 with keep-alive
connections, bounded in number (at most --max-clients) and in time (--seconds per
measurement).
"Baseline": the same app with the lookup file turned off, every page a DuckDB query (the
read path before lookup files), measured first in the same run, since the machine is
shared and figures from another hour carry another load.
"During a publish": a second process runs the real `publish_feeds` over the live path
(35M rows and their lookup file, built aside and renamed into place) while the clients
run, and one more measurement spans the moment of the swap, so a reader reopening
mid-load is measured too.
Writes the "serve" section of docs/BENCHMARKS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from starlette.applications import Starlette

# This checkout's package first, whichever checkout the environment was installed from.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lookup import articles_frame, generate_shard  # noqa: E402
from report import machine, markdown_table, write_section  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # never anything but loopback
LEVELS = (1, 8, 32)
_LENGTH = re.compile(rb"content-length:\s*(\d+)", re.IGNORECASE)


@dataclass
class Result:
    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def row(self, label: str) -> list[object]:
        ms = np.array(self.latencies) * 1000 if self.latencies else np.zeros(1)
        return [
            label,
            self.clients,
            f"{len(self.latencies):,}",
            f"{len(self.latencies) / self.seconds:,.0f}" if self.seconds else "-",
            f"{np.percentile(ms, 50):.2f}",
            f"{np.percentile(ms, 99):.2f}",
            f"{ms.max():.1f}",
            self.errors,
        ]


async def _client(port: int, users: int, deadline: float, result: Result, seed: int) -> None:
    rng = random.Random(seed)
    reader = writer = None
    while time.perf_counter() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(HOST, port)
            request = f"GET /v1/feeds/{rng.randrange(users)} HTTP/1.1\r\nHost: b\r\n\r\n"
            t = time.perf_counter()
            writer.write(request.encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = _LENGTH.search(head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            result.latencies.append(time.perf_counter() - t)
            status = int(head[9:12])
            result.statuses[status] = result.statuses.get(status, 0) + 1
            if status != 200:
                result.errors += 1
        except (OSError, asyncio.IncompleteReadError, ValueError):
            result.errors += 1
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _load(port: int, users: int, clients: int, seconds: float) -> Result:
    result = Result(clients)
    deadline = time.perf_counter() + seconds
    t0 = time.perf_counter()
    await asyncio.gather(*(_client(port, users, deadline, result, k) for k in range(clients)))
    result.seconds = time.perf_counter() - t0
    return result


def load(port: int, users: int, clients: int, seconds: float) -> Result:
    """`clients` keep-alive connections asking random users' feeds for `seconds`."""
    return asyncio.run(_load(port, users, clients, seconds))


def duckdb_app() -> Starlette:
    """The service with the lookup file turned off: every page is a DuckDB query (uvicorn
    calls this in each worker)."""
    from feed_dagster.serving.http import ENV_MEMORY, ENV_PATH, create_app

    return create_app(os.environ[ENV_PATH], memory_limit=os.environ[ENV_MEMORY], use_lookup=False)


def start_server(
    path: Path, port: int, workers: int, memory: str, lookup: bool = True
) -> subprocess.Popen:
    if lookup:
        # `python -m feed_dagster.cli` from the checkout: the code under test, whichever
        # checkout the environment's `feed-dagster` script was installed from.
        cmd = [sys.executable, "-m", "feed_dagster.cli", "serve", "--host", HOST]
        cmd += ["--port", str(port), "--path", str(path), "--workers", str(workers)]
        cmd += ["--memory-limit", memory]
        env = None
    else:
        # The same uvicorn settings as `serve` (httptools and uvloop when installed, no
        # access log), with the baseline app from this file.
        cmd = [sys.executable, "-m", "uvicorn", "--factory", "bench_serve:duckdb_app"]
        cmd += ["--app-dir", str(Path(__file__).resolve().parent), "--host", HOST]
        cmd += ["--port", str(port), "--workers", str(workers)]
        cmd += ["--log-level", "warning", "--no-access-log"]
        from feed_dagster.serving.http import ENV_MEMORY, ENV_PATH

        env = {**os.environ, ENV_PATH: str(path), ENV_MEMORY: memory}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL, env=env
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/v1/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    stop(proc)
    raise RuntimeError("the service did not answer /v1/health within 60 s")


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def profile_lookup(path: Path, users: int, memory: str, lookup: bool) -> tuple[float, float, float]:
    """p50 / p99 ms of the reader's page alone and µs to encode one page, in-process."""
    from feed_dagster.serving.http import _json, item_json
    from feed_dagster.serving.read import FeedReader

    rng = random.Random(7)
    reader = FeedReader(path, memory, use_lookup=lookup)
    assert reader.read_path.startswith("lookup file" if lookup else "duckdb"), reader.read_path
    for _ in range(300):
        reader.page(rng.randrange(users))
    samples = []
    for _ in range(1000 if lookup else 300):
        t = time.perf_counter()
        page = reader.page(rng.randrange(users))
        samples.append(time.perf_counter() - t)
    t = time.perf_counter()
    for _ in range(1000):
        _json({"items": [item_json(r, page.meta) for r in page.rows]})
    encode_us = (time.perf_counter() - t) * 1000
    reader.close()
    ms = np.array(samples) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), encode_us


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


PUBLISH = """
import sys, time
from datetime import datetime
sys.path.insert(0, {bench!r})
from bench_lookup import articles_frame
from feed_dagster.serving import publish_feeds
a, u = articles_frame({articles}, {users})
r = publish_feeds({shard!r}, {serving!r}, model_version="bench-2", vector_table_version="bench",
                  generated_at=datetime(2026, 1, 8), articles=a, users=u)
print(f"publish_seconds={{r.seconds:.1f}}")
"""


def measure(port: int, users: int, levels: list[int], seconds: float, label: str) -> list:
    """Rows of the table for `levels` clients after a warm-up of the workers."""
    load(port, users, 8, 2.0)  # warm the workers (and their buffer pools or mapped pages)
    rows = []
    for c in levels:
        rows.append([label, *load(port, users, c, seconds).row("no publish")])
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--users", type=int, default=1_000_000)
    ap.add_argument("--per-user", type=int, default=35)
    ap.add_argument("--articles", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes")
    ap.add_argument("--memory-limit", default="2GB", help="DuckDB buffer pool per worker")
    ap.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    ap.add_argument("--max-clients", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=ROOT / "data" / "bench" / "lookup")
    ap.add_argument("--no-publish", action="store_true", help="skip the during-publish runs")
    ap.add_argument(
        "--no-baseline", action="store_true", help="skip the DuckDB-query read path (baseline)"
    )
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    levels = [c for c in LEVELS if c <= args.max_clients]

    args.dir.mkdir(parents=True, exist_ok=True)
    name = f"feeds-{args.users}x{args.per_user}"
    serving, shard = args.dir / f"{name}.duckdb", args.dir / f"{name}.parquet"
    if not shard.exists():
        print(f"generating {shard} ...", flush=True)
        generate_shard(shard, args.users, args.per_user, args.articles)
    if not serving.exists():
        from datetime import datetime

        from feed_dagster.serving import publish_feeds

        print(f"publishing {serving} ...", flush=True)
        a, u = articles_frame(args.articles, args.users)
        publish_feeds(
            shard,
            serving,
            model_version="bench",
            vector_table_version="bench",
            generated_at=datetime(2026, 1, 7),
            articles=a,
            users=u,
        )
    from feed_dagster.serving.lookup import add_lookup_file

    t0 = time.perf_counter()
    lookup_file = add_lookup_file(serving)  # no-op when the publish wrote it
    print(f"lookup file {lookup_file} ({time.perf_counter() - t0:.1f} s)", flush=True)

    load_start = os.getloadavg()
    fast = profile_lookup(serving, args.users, args.memory_limit, lookup=True)
    slow = (
        None if args.no_baseline else profile_lookup(serving, args.users, args.memory_limit, False)
    )
    rows: list[list[object]] = []
    if not args.no_baseline:
        port = free_port()
        server = start_server(serving, port, args.workers, args.memory_limit, lookup=False)
        try:
            rows += measure(port, args.users, levels, args.seconds, "DuckDB query (baseline)")
        finally:
            stop(server)
    port = free_port()
    server = start_server(serving, port, args.workers, args.memory_limit)
    publish_note = "not run (--no-publish)"
    path_label = "lookup file"
    try:
        rows += measure(port, args.users, levels, args.seconds, path_label)
        if not args.no_publish:
            script = PUBLISH.format(
                bench=str(Path(__file__).resolve().parent),
                articles=args.articles,
                users=args.users,
                shard=str(shard),
                serving=str(serving),
            )
            t0 = time.perf_counter()
            # Its output goes to a file: DuckDB draws a progress bar on stdout, and a pipe
            # nobody reads until the end would fill up and stall the publish.
            pub_log = tempfile.TemporaryFile("w+")
            pub = subprocess.Popen(
                [sys.executable, "-c", script], stdout=pub_log, stderr=subprocess.STDOUT, cwd=ROOT
            )
            for c in levels:
                if pub.poll() is not None:
                    break
                rows.append(
                    [path_label, *load(port, args.users, c, args.seconds).row("during a publish")]
                )
                print(rows[-1], flush=True)
            # Across the swap: one client asks without pause until the publish is done (the
            # rename happens at its very end), then 8 clients for 3 s on the new generation.
            swap = Result(1)
            while pub.poll() is None:
                part = load(port, args.users, 1, 1.0)
                swap.latencies += part.latencies
                swap.errors += part.errors
                swap.seconds += part.seconds
            rows.append([path_label, *swap.row("rest of the publish, through the swap")])
            print(rows[-1], flush=True)
            after = load(port, args.users, 8, 3.0)
            rows.append([path_label, *after.row("first 3 s after the swap")])
            print(rows[-1], flush=True)
            pub.wait()
            pub_log.seek(0)
            found = re.search(r"publish_seconds=([0-9.]+)", pub_log.read())
            out = found.group(1) if found else "?"
            pub_log.close()
            if pub.returncode != 0:
                raise RuntimeError("the publish failed")
            publish_note = (
                f"`publish_feeds` of {args.users * args.per_user:,} rows and their lookup "
                f"file in a second process: {out.strip()} s inside the function, "
                f"{time.perf_counter() - t0:.0f} s with process start"
            )
            with urllib.request.urlopen(f"http://{HOST}:{port}/v1/health", timeout=5) as r:
                health = r.read()
            assert b"bench-2" in health, "the service did not follow the publish"
            assert b'"read_path":"lookup file' in health, health
    finally:
        stop(server)

    load_end = os.getloadavg()
    size_gib = lookup_file.stat().st_size / 2**30 if lookup_file.exists() else float("nan")
    where = [
        f"Where the time goes (one process, no HTTP): a page from the lookup file "
        f"(`FeedReader.page`) takes {fast[0]:.3f} ms p50 / {fast[1]:.2f} ms p99"
    ]
    if slow is not None:
        where.append(
            f", from a DuckDB query {slow[0]:.2f} ms p50 / {slow[1]:.2f} ms p99 (the query "
            "scans the user's row group, 122,880 rows, for every column it returns)"
        )
    where.append(
        f"; encoding the page as JSON takes {fast[2]:.0f} µs. The lookup file of the "
        f"generation benchmarked here is {size_gib:.1f} GiB, memory-mapped and shared by "
        "the workers through the page cache."
    )
    body = "\n".join(
        [
            "## HTTP service (`bench/bench_serve.py`)",
            "",
            f"Command: `{' '.join(['.venv/bin/python', 'bench/bench_serve.py', *sys.argv[1:]])}`",
            "",
            f"`feed-dagster serve --workers {args.workers} --memory-limit {args.memory_limit}` "
            f"over the lookup benchmark's serving file ({args.users:,} users x "
            f"{args.per_user} rows). Clients: one asyncio process on 127.0.0.1 with keep-alive "
            "connections, each asking random users' feeds (`GET /v1/feeds/{id}`, 35 rows of "
            f"JSON) for {args.seconds:.0f} s per row; clients, server workers and the publish "
            "share the same 2 cores. Read path: `lookup file` is the service as shipped "
            "(pages from the generation's memory-mapped lookup file); `DuckDB query "
            "(baseline)` is the same app with the lookup file turned off, measured first in "
            "the same run. Latency in ms, measured by the client (queueing included):",
            "",
            markdown_table(
                [
                    "read path",
                    "when",
                    "clients",
                    "requests",
                    "requests/s",
                    "p50",
                    "p99",
                    "max",
                    "errors",
                ],
                rows,
            ),
            "",
            f"Publish: {publish_note}. Errors count non-200 answers and broken connections.",
            "",
            "".join(where),
            "",
            f"{machine()}; load average {load_start[0]:.1f} / {load_start[1]:.1f} (1 / 5 min) "
            f"at the start, {load_end[0]:.1f} / {load_end[1]:.1f} at the end: the machine is "
            "shared, so figures carry other processes' load.",
        ]
    )
    print(body)
    if not args.no_write:
        write_section("serve", body)


if __name__ == "__main__":
    main()
