"""The `feed-dagster` command: build everything, read feeds, write demo data."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import textwrap
import time
from pathlib import Path

import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.cli.build import (
    EXECUTOR_VARIABLE,
    SHARD_RUNS_VARIABLE,
    BuildFailed,
    engine_problem,
    materialize_everything,
)
from feed_dagster.jobs.instance import POSTGRES_URL_FORM, POSTGRES_URL_VARIABLE, instance_problem
from feed_dagster.paths import ARTIFACTS_URI_VARIABLE, MODELS_URI_VARIABLE, DataRoot, data_root
from feed_dagster.progress import make_progress


def storage() -> DataRoot:
    """The one storage root of every command: FEED_DAGSTER_DATA (default ./data), resolved
    once. `run` builds the asset graph with a storage resource of this root, and the
    commands that only read (or drop files) take their paths from the same layout the
    resource uses, without importing Dagster (about 1.5 s, for `feed` more than its work)."""
    return DataRoot(data_root())


def print_warehouse_summary(path: Location) -> None:
    from feed_dagster.data.warehouse import connect_read_only

    try:
        con = connect_read_only(path)
    except FileNotFoundError:
        print(f"no warehouse at {path}")
        return
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
    # The weighted score orders the feed but, with the reference weights, mostly sits in a
    # narrow band (negative totals are squashed below the offset): the click probability
    # next to it is what a reader can interpret.
    cols = [
        c
        for c in ("position", "source", "score", "p_click", "title", "author_handle", "reason")
        if c in feed.columns
    ]
    if "p_click" in feed.columns:
        feed = feed.with_columns(pl.col("p_click").round(3))
    with pl.Config(
        tbl_rows=100,
        tbl_width_chars=160,
        fmt_str_lengths=48,
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
    ):
        return str(feed.select(cols))


REFUSED = (
    "run finished, but the publish was refused (publish_guard, above): readers still get "
    "the previous generation, if any. Fix the cause, or publish an intended shrink with "
    "published_feeds config allow_shrink: true"
)


def cmd_run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    store = storage()
    problem = instance_problem() or engine_problem()
    if problem:
        print(f"feed-dagster run: {problem}", file=sys.stderr)
        return 1
    # Quiet: Dagster's console logger shows errors only, like the rest of the output.
    log_level = args.log_level or ("ERROR" if args.quiet else "WARNING")
    with make_progress(args.quiet) as progress:
        try:
            refused = materialize_everything(log_level, progress=progress, root=store.data_root())
        except BuildFailed as exc:
            progress.error(
                f"{exc}\n\nrun stopped: a step failed (above); earlier outputs are intact"
            )
            return 1
    if args.quiet:
        # Only the outcome: the sample feed's notes matter only when there is no feed.
        with contextlib.redirect_stdout(io.StringIO()) as notes:
            shown = print_sample_feed(store.serving_path())
        if refused:
            print(REFUSED, file=sys.stderr)
            return 1
        if not shown:
            print(f"{notes.getvalue().strip()}\nrun finished without a feed", file=sys.stderr)
            return 1
        print(f"run finished in {time.perf_counter() - t0:.1f}s; feeds in {store.serving_path()}")
        return 0
    print_warehouse_summary(store.warehouse_path())
    shown = print_sample_feed(store.serving_path())
    if refused:
        print(f"\n{REFUSED}")
        return 1
    if not shown:
        print("\nrun finished without a feed to show (above)")
        return 1
    print(f"\nfeed-dagster run finished in {time.perf_counter() - t0:.1f}s")
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

    from feed_dagster.serving.read import FeedNotPublishedError, get_feed

    path = Path(args.path) if args.path else storage().serving_path()
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

    from feed_dagster.serving.http import ENV_MEMORY, ENV_PATH, ENV_STALE

    path = Path(args.path).resolve() if args.path else storage().serving_path()
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


def cmd_fetch_serving(args: argparse.Namespace) -> int:
    """Copy the bucket's current serving generation to a local serving file."""
    from feed_dagster.serving.bucket import (
        GenerationCorruptError,
        GenerationNotFoundError,
        fetch_current,
    )

    store = storage()
    bucket = store.serving_bucket()
    if bucket is None:
        print(
            f"feed-dagster fetch-serving: {ARTIFACTS_URI_VARIABLE} does not name a bucket "
            "(s3://...); the serving file is only local",
            file=sys.stderr,
        )
        return 1
    target = Path(args.path).resolve() if args.path else store.serving_path()
    try:
        current = fetch_current(bucket, target)
    except (GenerationNotFoundError, GenerationCorruptError) as exc:
        print(f"feed-dagster fetch-serving: {exc}", file=sys.stderr)
        return 1
    print(f"generation {current.generation_id} ({current.bytes:,} bytes) in {target}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from feed_dagster.atomic import atomic_path
    from feed_dagster.data.warehouse import read_tables
    from feed_dagster.world.simulate import simulate_activity

    store = storage()
    tables = read_tables(store.warehouse_path(), ["articles", "engagements", "world_info"])
    now = tables["world_info"]["now"][0]
    posts, engagements = simulate_activity(
        tables["articles"], tables["engagements"], now, hours=args.hours, seed=args.seed
    )
    folder = store.incoming_dir()
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


# Every variable the command and the code it runs read, with its default.
ENVIRONMENT = {
    "FEED_DAGSTER_DATA": "storage root: warehouse, embeddings, models, vectors, shard files, "
    "serving file, incoming batches (default: ./data)",
    MODELS_URI_VARIABLE: "the model store's root, a local path or s3://bucket/prefix (endpoint "
    "and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) "
    "(default: models/ under the storage root)",
    ARTIFACTS_URI_VARIABLE: "the root of the vector table, the shard files and the article "
    "embeddings, a local path or s3://bucket/prefix (endpoint and credentials as for the "
    "model store; on a bucket, the warehouse tables too, as Parquet, and a copy of each "
    "published serving generation) (default: the storage root)",
    "FEED_DAGSTER_SOURCE": "where the tables come from: synthetic[:scale] (tiny, demo, ...), "
    "ebnerd:DIR (a folder or the official zip) or parquet:DIR (default: synthetic:demo)",
    "DAGSTER_HOME": "Dagster instance folder; set, runs of `run` are kept and show in the UI "
    "(the Makefile sets .dagster_home: SQLite files in that folder; deploy/postgres: run "
    "storage in PostgreSQL); unset, they are kept in memory only",
    POSTGRES_URL_VARIABLE: "the PostgreSQL database of the run, event log and schedule "
    f"storage when DAGSTER_HOME is deploy/postgres: {POSTGRES_URL_FORM} (the database must "
    "exist; Dagster creates its tables)",
    EXECUTOR_VARIABLE: "executor of jobs started from the UI, schedules and sensors: "
    "multiprocess (one process per step, forked from a server that imported the project), "
    "spawn (one freshly started process per step), in_process or celery (steps on Celery "
    "workers) (default: multiprocess); with celery, `run` also sends each user shard as a run of "
    "refresh_feeds to the workers; otherwise it runs its steps in its own process and its "
    "shards in worker processes",
    "FEED_DAGSTER_CELERY_BROKER": "with FEED_DAGSTER_EXECUTOR=celery, the Redis broker the "
    "workers listen on, e.g. redis://HOST:6379/0 (no default)",
    SHARD_RUNS_VARIABLE: "with FEED_DAGSTER_EXECUTOR=celery, how many shard runs `run` keeps "
    "in flight at once (default: the number of Celery workers that answer a ping)",
    "FEED_DAGSTER_SHARDS": "number of user shards of user_feeds (default: 4; 16 for "
    "synthetic:m, 64 for synthetic:l)",
    "FEED_DAGSTER_ENCODER": "article content encoder: lexical, minilm (needs the [text] "
    "extra) or precomputed (default: lexical)",
    "FEED_DAGSTER_COMPILE_RANKER": "1: feed shards compile the ranker's candidate blocks "
    "with torch.compile (the same scores; pays off where a shard has cores of its own); 0 "
    "or unset: not compiled (default: unset)",
}
# Set by `serve` for its worker processes (from its options), read by the app factory.
SERVE_ENVIRONMENT = {
    "FEED_DAGSTER_SERVING_FILE": "the serving file (from --path)",
    "FEED_DAGSTER_STALE_AFTER_SECONDS": "from --stale-after-hours",
    "FEED_DAGSTER_READER_MEMORY": "from --memory-limit",
}


def _environment_help(variables: dict[str, str], title: str = "environment variables") -> str:
    lines = [f"{title}:"]
    for name, text in variables.items():
        lines.append(f"  {name}")
        lines += textwrap.wrap(text, 76, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and the environment list."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def build_parser() -> argparse.ArgumentParser:
    """The `feed-dagster` parser: every command, option, default and variable it reads."""
    env = _environment_help(ENVIRONMENT)
    parser = argparse.ArgumentParser(
        prog="feed-dagster",
        description=textwrap.fill(
            "Build the precomputed 'For You' feeds (a Dagster asset graph) and read them: "
            "`run` builds everything, `feed` prints one user's feed, `serve` answers over "
            "HTTP, `fetch-serving` copies the published feeds from the artifacts bucket, "
            "`simulate` and `make-ebnerd` write data to try it on.",
            88,
        ),
        epilog=f"{env}\n\n`feed-dagster COMMAND --help` describes a command.",
        formatter_class=_HelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=summary,
            description=textwrap.fill(description, 88),
            epilog=env,
            formatter_class=_HelpFormatter,
        )

    run = command(
        "run",
        "materialise the whole asset graph and show what was built",
        "Materialise every asset: sources, models and vectors, what the shards share "
        "(serving_inputs), then each user shard of "
        "user_feeds in worker processes (with FEED_DAGSTER_EXECUTOR=celery: one run per "
        "shard on the Celery workers), then the publish and the feed-quality evaluation. "
        "Shows each step with its elapsed time, training epochs and shard progress (a live "
        "display on a terminal, plain lines otherwise), then the warehouse's tables and "
        "one user's feed. Exit status 1 when the Dagster instance (DAGSTER_HOME) or the "
        "Celery broker cannot be used, a step failed, the publish was refused or there is no "
        "feed to show.",
    )
    run.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
        type=str.upper,
        help="Dagster console log level (default: WARNING, or ERROR with --quiet); step "
        "log lines below it appear in the progress display",
    )
    run.add_argument(
        "--quiet",
        action="store_true",
        help="for scripts: no progress, warehouse summary or sample feed; errors on stderr "
        "and one final line on stdout (default: off)",
    )
    run.set_defaults(func=cmd_run)

    feed = command(
        "feed",
        "print one user's precomputed feed from the serving file",
        "Print USER_ID's feed from the live serving file as a table (position, source, "
        "score, title, author, reason), best first. Posts deleted and authors blocked or "
        "muted since the publish are left out. Exit status 1 when the user has no feed or "
        "nothing is published yet.",
    )
    feed.add_argument("user_id", type=int, help="the user whose feed to print")
    feed.add_argument(
        "--limit", type=int, default=35, help="at most this many posts (default: %(default)s)"
    )
    feed.add_argument(
        "--json", action="store_true", help="print all columns as JSON (default: a table)"
    )
    feed.add_argument(
        "--path",
        help="serving file to read (default: serving/feeds.duckdb under FEED_DAGSTER_DATA)",
    )
    feed.set_defaults(func=cmd_feed)

    serve = command(
        "serve",
        "HTTP service and page over the serving file",
        "Serve the precomputed feeds over HTTP with uvicorn: GET /v1/feeds/USER_ID "
        "(?limit=, ?cursor=), GET /v1/health and a page at / to read a user's feed. Each "
        "worker holds one read-only connection and follows publishes.",
    )
    serve.epilog = f"{env}\n\n{_environment_help(SERVE_ENVIRONMENT, 'set for the workers')}"
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--port", type=int, default=8080, help="port to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--path",
        help="serving file to serve (default: serving/feeds.duckdb under FEED_DAGSTER_DATA)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes, each with its own reader (default: %(default)s)",
    )
    serve.add_argument(
        "--stale-after-hours",
        type=float,
        default=2.0,
        help="/v1/health reports 'stale' when the live generation is older than this "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--memory-limit",
        default="1GB",
        help="DuckDB buffer pool per worker; more keeps more of a large file decompressed "
        "(default: %(default)s)",
    )
    serve.add_argument("--access-log", action="store_true", help="log every request (default: off)")
    serve.set_defaults(func=cmd_serve)

    fetch = command(
        "fetch-serving",
        "copy the current serving generation from the artifacts bucket to a local file",
        "Download the serving generation the last publish put on the bucket "
        f"({ARTIFACTS_URI_VARIABLE}/serving/CURRENT names it), check its size and SHA-256, "
        "and swap it into the local serving file atomically, with its lookup file: for "
        "`feed` and `serve` on a machine other than the one that published. Nothing is "
        "downloaded when the file already holds that generation. Exit status 1 when the "
        "artifacts are not on a bucket, nothing is published there, or the copy is damaged.",
    )
    fetch.add_argument(
        "--path",
        help="serving file to write (default: serving/feeds.duckdb under FEED_DAGSTER_DATA)",
    )
    fetch.set_defaults(func=cmd_fetch_serving)

    sim = command(
        "simulate",
        "write the next hours of synthetic activity into the incoming folder",
        "Write the next HOURS of synthetic posts and engagements after the warehouse's "
        "`now` as Parquet batches into incoming/ under FEED_DAGSTER_DATA, where the "
        "incoming_batches sensor (with `make ui` running) ingests them and refreshes feeds. "
        "Needs a built warehouse (`run` first).",
    )
    sim.add_argument(
        "--hours", type=float, default=1.0, help="hours of activity to write (default: %(default)s)"
    )
    sim.add_argument(
        "--seed", type=int, default=0, help="random seed of the activity (default: %(default)s)"
    )
    sim.set_defaults(func=cmd_simulate)

    eb = command(
        "make-ebnerd",
        "write a synthetic EBNeRD folder (exact dtypes), or an articles file for real files",
        "Write a synthetic EBNeRD folder with the exact schema and dtypes of the real "
        "dataset (articles.parquet, train/, validation/, optionally test/), to use as "
        "FEED_DAGSTER_SOURCE=ebnerd:DIR; or, with --articles-for DIR, an articles.parquet "
        "for the article ids in real behaviors/history files.",
    )
    eb.add_argument("--out", help="folder to write (required unless --articles-for is given)")
    eb.add_argument(
        "--users", type=int, default=200, help="users to generate (default: %(default)s)"
    )
    eb.add_argument(
        "--articles", type=int, default=1500, help="articles to generate (default: %(default)s)"
    )
    eb.add_argument(
        "--impressions-per-user",
        type=int,
        default=10,
        help="impressions per user (default: %(default)s)",
    )
    eb.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    eb.add_argument(
        "--with-test", action="store_true", help="also write test/ (no labels) (default: off)"
    )
    eb.add_argument(
        "--articles-for",
        metavar="DIR",
        help="instead: write DIR/articles.parquet for the ids in DIR's behaviors/history files",
    )
    eb.set_defaults(func=cmd_make_ebnerd)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
