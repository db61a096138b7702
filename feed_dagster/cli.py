"""The `feed-dagster` command: build everything, read feeds, write demo data."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import duckdb
import polars as pl


def _instance():
    import dagster as dg

    # With DAGSTER_HOME set (the Makefile sets it) runs show up in the UI's history.
    if os.environ.get("DAGSTER_HOME"):
        Path(os.environ["DAGSTER_HOME"]).mkdir(parents=True, exist_ok=True)
        return dg.DagsterInstance.get()
    return dg.DagsterInstance.ephemeral()


class BuildFailed(RuntimeError):
    """A step of `run` failed; its errors have been printed."""


class PublishRefused(BuildFailed):
    """The publish guard refused the new generation; the live serving file is unchanged."""


def _run_step(label: str, which: str, partition_key: str | None, log_level: str) -> str:
    """Materialise one step of `run` in this process; returns its report lines.

    `which`: "upstream" (everything upstream of the feeds), "shard" (one user_feeds
    partition), "publish" or "quality" (feed_quality). Raises BuildFailed(report) when
    anything fails.
    """
    import dagster as dg

    from feed_dagster.definitions import build_definitions
    from feed_dagster.jobs.automation import FEED_QUALITY, FEEDS, UPSTREAM_OF_FEEDS

    defs = build_definitions()
    selection = {
        "upstream": UPSTREAM_OF_FEEDS,
        "shard": FEEDS,
        "publish": dg.AssetSelection.assets("published_feeds"),
        "quality": FEED_QUALITY,
    }[which]
    t0 = time.perf_counter()
    result = dg.materialize(
        [*defs.assets, *defs.asset_checks],
        selection=selection,
        partition_key=partition_key,
        resources=defs.resources,
        instance=_instance(),
        run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
        raise_on_error=False,
    )
    built = [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()]
    lines = [f"- {label}: built {', '.join(built)} in {time.perf_counter() - t0:.1f}s"]
    lines += [
        f"  check {c.check_name} FAILED: {c.description}"
        for c in result.get_asset_check_evaluations()
        if not c.passed
    ]
    refused = [c for c in result.get_asset_check_evaluations() if c.check_name == "publish_guard"]
    fatal = False
    for event in result.get_step_failure_events():
        error = event.step_failure_data.error
        if error is not None and error.cls_name == "DagsterAssetCheckFailedError":
            # A blocking check did its job (e.g. the promotion gate refused a ranker): what
            # depends on it was skipped, and the rest of the build goes on.
            lines.append(f"  blocking check failed in {event.step_key}; dependants skipped")
            continue
        if event.step_key == "published_feeds" and any(not c.passed for c in refused):
            # The guard did its job: report it apart from a crash (the reasons are in the
            # check line above), so `run` can go on and show the live feeds.
            lines.append("  publish refused by publish_guard; the live serving file is unchanged")
            raise PublishRefused("\n".join(lines))
        fatal = True
        lines.append(f"  FAILED {event.step_key}: {error_text(error)}")
    if fatal:
        raise BuildFailed("\n".join(lines))
    return "\n".join(lines)


def error_text(error: object) -> str:
    """The message of a step's error and of the errors that caused it: Dagster wraps what
    the asset raised ("Error occurred while executing op ...") and keeps it as the cause."""
    parts = []
    while error is not None:
        parts.append(str(getattr(error, "message", "")).strip())
        error = getattr(error, "cause", None)
    return "\n    ".join(p for p in parts if p)


def materialize_everything(log_level: str = "WARNING", workers: int | None = None) -> str | None:
    """Materialise the whole asset graph: everything upstream of the feeds, then every user
    shard of user_feeds (shards in parallel worker processes, as an executor would fan them
    out), then the publish, then the feed-quality evaluation.

    Returns None, or the report of a publish the guard refused (the build goes on: the
    live generation stays served and feed quality is still measured)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from feed_dagster.assets.feeds import user_shards

    print("- sources, models and vectors (training takes a few minutes) ...", flush=True)
    print(_run_step("sources, models and vectors", "upstream", None, log_level), flush=True)
    shards = user_shards.get_partition_keys()
    workers = workers or min(len(shards), os.cpu_count() or 1)
    print(f"- user_feeds: {len(shards)} shards on {workers} worker processes ...", flush=True)
    # spawn, not fork: the parent has used torch's thread pool, which a fork can deadlock.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(_run_step, f"user_feeds shard {k}", "shard", k, log_level) for k in shards
        ]
        for future in futures:
            print(future.result(), flush=True)
    refused = None
    try:
        print(_run_step("publish", "publish", None, log_level), flush=True)
    except PublishRefused as exc:
        refused = str(exc)
        print(refused, flush=True)
    print("- feed quality (held-out recall vs chronological and popularity) ...", flush=True)
    try:
        print(_run_step("feed quality", "quality", None, log_level), flush=True)
    except BuildFailed as exc:
        # Evaluation only: the feeds are published already, so report and carry on.
        print(f"{exc}\n  feed quality failed; the published feeds are unaffected", flush=True)
    return refused


def print_warehouse_summary(path: Path) -> None:
    if not path.exists():
        print(f"no warehouse at {path}")
        return
    con = duckdb.connect(str(path), read_only=True)
    try:
        tables = con.execute(
            "select table_name from information_schema.tables where table_schema = 'main' "
            "order by table_name"
        ).fetchall()
        print(f"\nwarehouse {path}")
        for (name,) in tables:
            n = con.execute(f'select count(*) from main."{name}"').fetchone()[0]
            print(f"  {name:<22} {n:>12,} rows")
    finally:
        con.close()


def print_sample_feed(path: Path, user_id: int | None = None, limit: int = 10) -> bool:
    """One user's feed from the serving file (by default the user with the most engagement).

    Returns False, after saying what happened and what to do, when there is nothing to show:
    no serving file, a file without feeds, or a user without a feed.
    """
    from feed_dagster.serving.read import FeedNotPublishedError, connect, get_feed

    try:
        if user_id is None:
            con = connect(path)
            try:
                row = con.execute(
                    "select user_id from serving.feed_users "
                    "order by in_network > 0 desc, posts desc, user_id limit 1"
                ).fetchone()
            finally:
                con.close()
            if row is None:
                print(
                    f"\nthe serving file {path} holds no feeds: no user got a post. Check the "
                    "user_feeds candidate window against the articles' publication times "
                    "(world_info.candidate_window_hours, user_feeds config "
                    "candidate_window_hours) and rerun"
                )
                return False
            user_id = int(row[0])
        feed = get_feed(user_id, path, limit=limit)
    except FeedNotPublishedError as exc:
        print(f"\n{exc}")
        return False
    if feed.is_empty():
        print(f"\nuser {user_id} has no feed in {path}; try `feed-dagster feed` with another user")
        return False
    print(f"\nfeed of user {user_id} (first {limit} of the served posts) from {path}")
    print(format_feed(feed))
    print(f"\nmore: feed-dagster feed {user_id}   |   duckdb -readonly {path}")
    return True


def format_feed(feed: pl.DataFrame) -> str:
    cols = [
        c
        for c in ("position", "source", "score", "title", "author_handle", "reason")
        if c in feed.columns
    ]
    with pl.Config(
        tbl_rows=100,
        tbl_width_chars=160,
        fmt_str_lengths=48,
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
    ):
        return str(feed.select(cols))


def cmd_run(args: argparse.Namespace) -> int:
    from feed_dagster.resources.storage import serving_path, warehouse_path

    t0 = time.perf_counter()
    try:
        refused = materialize_everything(args.log_level)
    except BuildFailed as exc:
        print(f"{exc}\n\nrun stopped: a step failed (above); earlier outputs are intact")
        return 1
    print_warehouse_summary(warehouse_path())
    shown = print_sample_feed(serving_path())
    if refused:
        print(
            "\nrun finished, but the publish was refused (publish_guard, above): readers "
            "still get the previous generation, if any. Fix the cause, or publish an intended "
            "shrink with published_feeds config allow_shrink: true"
        )
        return 1
    if not shown:
        print("\nrun finished without a feed to show (above)")
        return 1
    print(f"\nmake run finished in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_make_ebnerd(args: argparse.Namespace) -> int:
    from feed_dagster.ebnerd import (
        article_first_seen,
        write_articles_for_ids,
        write_synthetic_ebnerd,
    )

    if args.articles_for:
        folder = Path(args.articles_for)
        behaviors = pl.read_parquet(folder / "behaviors.parquet")
        history = pl.read_parquet(folder / "history.parquet")
        seen = article_first_seen(behaviors, history)
        out = write_articles_for_ids(
            seen["article_id"], folder / "articles.parquet", seed=args.seed, first_seen=seen
        )
        print(f"wrote {out} ({seen.height:,} articles, exact EBNeRD articles schema)")
        return 0
    if not args.out:
        print("make-ebnerd: give --out DIR (or --articles-for DIR)", file=sys.stderr)
        return 2
    out = write_synthetic_ebnerd(
        args.out,
        users=args.users,
        articles=args.articles,
        impressions_per_user=args.impressions_per_user,
        seed=args.seed,
        with_test=args.with_test,
    )
    print(f"wrote a synthetic EBNeRD folder to {out}")
    print(f"use it with: FEED_DAGSTER_SOURCE=ebnerd:{out} make run")
    return 0


def cmd_feed(args: argparse.Namespace) -> int:
    import json

    from feed_dagster.resources.storage import serving_path
    from feed_dagster.serving.read import FeedNotPublishedError, get_feed

    path = Path(args.path) if args.path else serving_path()
    try:
        feed = get_feed(args.user_id, path, limit=args.limit)
    except FeedNotPublishedError as exc:
        print(f"feed-dagster feed: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(feed.to_dicts(), default=str, indent=1))
    elif feed.is_empty():
        print(f"user {args.user_id} has no feed in {path}")
        return 1
    else:
        print(format_feed(feed))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP service (feed_dagster/serving/http.py) under uvicorn."""
    import uvicorn

    from feed_dagster.resources.storage import serving_path
    from feed_dagster.serving.http import ENV_MEMORY, ENV_PATH, ENV_STALE

    path = Path(args.path).resolve() if args.path else serving_path()
    # Every worker process builds its own app (and its own FeedReader) through the
    # factory, which reads its configuration from the environment it inherits.
    os.environ[ENV_PATH] = str(path)
    os.environ[ENV_STALE] = str(args.stale_after_hours * 3600)
    os.environ[ENV_MEMORY] = args.memory_limit
    print(f"serving {path} on http://{args.host}:{args.port}/ ({args.workers} worker(s))")
    uvicorn.run(
        "feed_dagster.serving.http:app_from_env",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        # One log line per request costs a worker about a fifth of its throughput.
        access_log=args.access_log,
        log_level="info" if args.access_log else "warning",
    )
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from feed_dagster.atomic import atomic_path
    from feed_dagster.data.warehouse import read_tables
    from feed_dagster.resources.storage import incoming_dir, warehouse_path
    from feed_dagster.world.simulate import simulate_activity

    tables = read_tables(warehouse_path(), ["articles", "engagements", "world_info"])
    now = tables["world_info"]["now"][0]
    posts, engagements = simulate_activity(
        tables["articles"], tables["engagements"], now, hours=args.hours, seed=args.seed
    )
    folder = incoming_dir()
    folder.mkdir(parents=True, exist_ok=True)
    stamp = f"{now:%Y%m%dT%H%M%S}-{args.seed}"
    for name, df in (("articles", posts), ("engagements", engagements)):
        final = folder / f"{name}-{stamp}.parquet"
        # The temporary name does not end in .parquet, so the sensor ignores it.
        with atomic_path(final) as tmp:
            df.write_parquet(tmp)
        print(f"wrote {final} ({df.height:,} rows)")
    print("with `make ui` running, the incoming_batches sensor ingests them and refreshes feeds")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="feed-dagster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialise the whole asset graph and show what was built")
    run.add_argument("--log-level", default="WARNING", help="Dagster console log level")
    run.set_defaults(func=cmd_run)

    feed = sub.add_parser("feed", help="print one user's precomputed feed from the serving file")
    feed.add_argument("user_id", type=int)
    feed.add_argument("--limit", type=int, default=35)
    feed.add_argument("--json", action="store_true", help="all columns as JSON")
    feed.add_argument("--path", help="serving file (default data/serving/feeds.duckdb)")
    feed.set_defaults(func=cmd_feed)

    serve = sub.add_parser("serve", help="HTTP service and page over the serving file")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--path", help="serving file (default data/serving/feeds.duckdb)")
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes, each with its own reader"
    )
    serve.add_argument(
        "--stale-after-hours",
        type=float,
        default=2.0,
        help="/v1/health reports 'stale' when the live generation is older than this",
    )
    serve.add_argument(
        "--memory-limit",
        default="1GB",
        help="DuckDB buffer pool per worker; more keeps more of a large file decompressed",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.set_defaults(func=cmd_serve)

    sim = sub.add_parser(
        "simulate", help="write the next hours of synthetic activity into data/incoming/"
    )
    sim.add_argument("--hours", type=float, default=1.0)
    sim.add_argument("--seed", type=int, default=0)
    sim.set_defaults(func=cmd_simulate)

    eb = sub.add_parser(
        "make-ebnerd",
        help="write a synthetic EBNeRD folder (exact dtypes), or an articles file for real files",
    )
    eb.add_argument("--out", help="folder to write (articles.parquet, train/, validation/)")
    eb.add_argument("--users", type=int, default=200)
    eb.add_argument("--articles", type=int, default=1500)
    eb.add_argument("--impressions-per-user", type=int, default=10)
    eb.add_argument("--seed", type=int, default=0)
    eb.add_argument("--with-test", action="store_true", help="also write test/ (no labels)")
    eb.add_argument(
        "--articles-for",
        metavar="DIR",
        help="instead: write DIR/articles.parquet for the ids in DIR's behaviors/history files",
    )
    eb.set_defaults(func=cmd_make_ebnerd)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
