"""Asset checks on every raw table: keys, references, self-follows, time window.

All rules run in one step as SQL over the warehouse (feed_dagster.data.checks), so no table
is loaded into Python: at 100k users the impressions alone are 60M rows. The checks are
blocking, so a corrupt table never reaches models or feeds.
"""

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import dagster as dg
import duckdb

from feed_dagster.data import checks as C
from feed_dagster.data.warehouse import connect_read_only
from feed_dagster.resources.storage import StorageResource
from feed_dagster.resources.warehouse import WAREHOUSE_POOL


@dataclass(frozen=True)
class Rule:
    table: str
    name: str
    description: str
    needs: tuple[str, ...]
    run: Callable[[duckdb.DuckDBPyConnection], C.CheckOutcome]


def _ref(table: str, column: str, target: str, target_column: str) -> Rule:
    return Rule(
        table,
        f"{column}_references_{target}",
        f"every {table}.{column} exists in {target}.{target_column}",
        (target,),
        lambda con: C.references(con, table, column, target, target_column),
    )


def _window(table: str, column: str, bounded_below: bool = True) -> Rule:
    def run(con: duckdb.DuckDBPyConnection) -> C.CheckOutcome:
        start, now = con.execute("select window_start, now from main.world_info").fetchone()
        return C.within_window(con, table, column, start if bounded_below else None, now)

    return Rule(
        table,
        f"{column}_in_window",
        f"{table}.{column} lies inside the world's time window",
        ("world_info",),
        run,
    )


def _unique(table: str, key: list[str], nullable: tuple[str, ...] = ()) -> Rule:
    return Rule(
        table,
        f"{'_'.join(key)}_unique",
        f"{table} key ({', '.join(key)}) is unique and non-null"
        + (f" (except {', '.join(nullable)})" if nullable else ""),
        (),
        lambda con: C.unique_non_null(con, table, key, nullable),
    )


RULES: list[Rule] = [
    _unique("users", ["user_id"]),
    _unique("articles", ["article_id"]),
    _ref("articles", "author_id", "users", "user_id"),
    _ref("articles", "conversation_id", "articles", "article_id"),
    # Articles may be published before the window opens (EBNeRD), never after `now`.
    _window("articles", "published_at", bounded_below=False),
    _unique("impressions", ["impression_id", "article_id"]),
    _ref("impressions", "user_id", "users", "user_id"),
    _ref("impressions", "article_id", "articles", "article_id"),
    _window("impressions", "shown_at"),
    # One engagement row per shown article (impression_id) or history read (no impression).
    _unique(
        "engagements", ["user_id", "article_id", "impression_id", "engaged_at"], ("impression_id",)
    ),
    _ref("engagements", "user_id", "users", "user_id"),
    _ref("engagements", "article_id", "articles", "article_id"),
    _window("engagements", "engaged_at"),
    Rule(
        "follows",
        "no_self_follows",
        "nobody follows themselves",
        (),
        C.no_self_follows,
    ),
    _unique("follows", ["follower_id", "followee_id"]),
    _ref("follows", "follower_id", "users", "user_id"),
    _ref("follows", "followee_id", "users", "user_id"),
    _ref("blocks", "user_id", "users", "user_id"),
    _ref("mutes", "user_id", "users", "user_id"),
    _unique("deleted_posts", ["article_id"]),
    _ref("deleted_posts", "article_id", "articles", "article_id"),
]


def _spec(rule: Rule) -> dg.AssetCheckSpec:
    extra = [n for n in dict.fromkeys(rule.needs) if n != rule.table]
    return dg.AssetCheckSpec(
        rule.name,
        asset=rule.table,
        description=rule.description,
        additional_deps=extra,
        blocking=True,
    )


@dg.multi_asset_check(
    specs=[_spec(rule) for rule in RULES],
    name="raw_table_checks",
    description="Keys, references, self-follows and time windows of the raw tables (SQL).",
    can_subset=True,
    pool=WAREHOUSE_POOL,
)
def raw_table_checks(
    context: dg.AssetCheckExecutionContext, storage: StorageResource
) -> Iterator[dg.AssetCheckResult]:
    selected = context.selected_asset_check_keys
    con = connect_read_only(storage.warehouse_path())
    try:
        for rule in RULES:
            key = dg.AssetCheckKey(dg.AssetKey(rule.table), rule.name)
            if key not in selected:
                continue
            outcome = rule.run(con)
            yield dg.AssetCheckResult(
                asset_key=rule.table,
                check_name=rule.name,
                passed=outcome.passed,
                severity=dg.AssetCheckSeverity.ERROR,
                description=outcome.description,
                metadata=outcome.metadata(),
            )
    finally:
        con.close()
