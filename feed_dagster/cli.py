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


def materialize_everything(log_level: str = "WARNING") -> list[str]:
    """Materialise the whole asset graph in-process; returns the asset keys built, in order."""
    import dagster as dg

    from feed_dagster.definitions import build_definitions

    defs = build_definitions()
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    unpartitioned = [a for a in defs.assets if getattr(a, "partitions_def", None) is None]
    partitioned = [a for a in defs.assets if getattr(a, "partitions_def", None) is not None]
    built: list[str] = []
    instance = _instance()
    t0 = time.perf_counter()
    print("building the asset graph ...", flush=True)
    result = (
        dg.materialize(
            [*unpartitioned, *defs.asset_checks],
            resources=defs.resources,
            instance=instance,
            run_config=run_config,
            selection=[k for a in unpartitioned for k in a.keys],
        )
        if not partitioned
        else None
    )
    if result is not None:
        built += [e.asset_key.to_user_string() for e in result.get_asset_materialization_events()]
    print(f"built {len(built)} assets in {time.perf_counter() - t0:.1f}s", flush=True)
    return built


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


def cmd_run(args: argparse.Namespace) -> int:
    from feed_dagster.resources.storage import warehouse_path

    t0 = time.perf_counter()
    materialize_everything(args.log_level)
    print_warehouse_summary(warehouse_path())
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="feed-dagster", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="materialise the whole asset graph and show what was built")
    run.add_argument("--log-level", default="WARNING", help="Dagster console log level")
    run.set_defaults(func=cmd_run)

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
