"""Asset checks on every raw table: keys, references, self-follows, time window.

Blocking checks stop downstream assets in the same run, so a corrupt table never reaches
models or feeds. Every check's logic lives in feed_dagster.data.checks.
"""

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import dagster as dg
import polars as pl

from feed_dagster.data import checks as C

Tables = dict[str, pl.DataFrame]


@dataclass(frozen=True)
class Rule:
    table: str
    name: str
    description: str
    needs: tuple[str, ...]
    run: Callable[[Tables], C.CheckOutcome]
    blocking: bool = True


def _info(t: Tables) -> dict:
    return t["world_info"].row(0, named=True)


def _ref(table: str, column: str, target: str, target_column: str) -> Rule:
    return Rule(
        table,
        f"{column}_references_{target}",
        f"every {table}.{column} exists in {target}.{target_column}",
        (target,),
        lambda t: C.references(t[table], table, column, t[target], target_column, target),
    )


def _window(table: str, column: str, bounded_below: bool = True) -> Rule:
    def run(t: Tables) -> C.CheckOutcome:
        info = _info(t)
        start = info["window_start"] if bounded_below else None
        return C.within_window(t[table], table, column, start, info["now"])

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
        lambda t: C.unique_non_null(t[table], table, key, nullable),
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
        lambda t: C.no_self_follows(t["follows"]),
    ),
    _unique("follows", ["follower_id", "followee_id"]),
    _ref("follows", "follower_id", "users", "user_id"),
    _ref("follows", "followee_id", "users", "user_id"),
    _ref("blocks", "user_id", "users", "user_id"),
    _ref("mutes", "user_id", "users", "user_id"),
    _unique("deleted_posts", ["article_id"]),
    _ref("deleted_posts", "article_id", "articles", "article_id"),
]


def _build(rule: Rule) -> dg.AssetChecksDefinition:
    extra = [n for n in dict.fromkeys(rule.needs) if n != rule.table]

    def _check(**inputs: pl.DataFrame) -> dg.AssetCheckResult:
        outcome = rule.run(inputs)
        return dg.AssetCheckResult(
            passed=outcome.passed,
            severity=dg.AssetCheckSeverity.ERROR,
            description=outcome.description,
            metadata=outcome.metadata(),
        )

    # Dagster maps inputs by parameter name; one generic body serves every rule, so give it
    # the signature (checked table first, then the extra tables) that this rule needs.
    _check.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=pl.DataFrame)
            for n in [rule.table, *extra]
        ],
        return_annotation=dg.AssetCheckResult,
    )
    return dg.asset_check(
        asset=rule.table,
        name=rule.name,
        description=rule.description,
        blocking=rule.blocking,
        additional_ins={n: dg.AssetIn(n) for n in extra},
    )(_check)


raw_table_checks = [_build(rule) for rule in RULES]
