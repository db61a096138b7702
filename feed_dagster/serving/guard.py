"""The publish guard: a new generation of feeds replaces the live one only when it is sane.

A refresh that went wrong upstream (a candidate window that misses every post, a source that
lost most of its users, a shard built from a half-loaded table) still produces well-formed
shard files. Published, it would replace every reader's feed with an empty or a much smaller
one. The guard compares the new generation with the source and with the live generation
before anything is built, and refuses when:

- the new generation holds no rows;
- it covers less than `min_active_coverage` of the *active users*: users with at least one
  engagement in the source (the warehouse `engagements` table) who still have a post inside
  the source's candidate window that they have not been shown or engaged with. Users who
  never engaged are left out because an empty feed is expected for them; users who have
  seen every fresh post are left out because no refresh can serve them anything (on a small
  catalog a heavy reader exhausts it). An engaged user with something left to see but no
  feed is a failure somebody notices;
- it holds fewer than `min_share_of_live` of the live generation's users or rows (a collapse
  against what readers see now). `allow_shrink` lifts this rule for an intended shrink
  (users deleted, a smaller feed size); the empty and coverage rules stay.

The guard only reads: shard files (two columns), the warehouse and the live file's `meta`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.data.warehouse import connect_read_only
from feed_dagster.data.world_tables import window_from_info


@dataclass(frozen=True)
class GuardConfig:
    min_active_coverage: float = 0.9
    min_share_of_live: float = 0.5
    allow_shrink: bool = False

    def __post_init__(self) -> None:
        for name in ("min_active_coverage", "min_share_of_live"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"publish guard: {name} must lie in [0, 1], got {value}")


@dataclass(frozen=True)
class GenerationStats:
    rows: int
    users: int


@dataclass(frozen=True)
class GuardDecision:
    passed: bool
    reasons: list[str]
    new: GenerationStats
    live: GenerationStats | None
    active_users: int
    active_covered: int
    notes: list[str] = field(default_factory=list)

    @property
    def coverage(self) -> float:
        return self.active_covered / self.active_users if self.active_users else 1.0

    def description(self) -> str:
        if self.passed:
            head = "publish allowed"
            body = [
                f"{self.new.users:,} users / {self.new.rows:,} rows; "
                f"{self.coverage:.1%} of {self.active_users:,} active users covered"
            ]
        else:
            head = "publish refused, the live serving file stays as it was"
            body = self.reasons
        return f"{head}: " + "; ".join(body + self.notes)

    def metadata(self) -> dict[str, Any]:
        return {
            "new_rows": self.new.rows,
            "new_users": self.new.users,
            "live_rows": self.live.rows if self.live else -1,
            "live_users": self.live.users if self.live else -1,
            "active_users": self.active_users,
            "active_users_covered": self.active_covered,
            "active_coverage": round(self.coverage, 4),
        }


def decide(
    new: GenerationStats,
    live: GenerationStats | None,
    active_users: int,
    active_covered: int,
    config: GuardConfig,
    notes: Sequence[str] = (),
) -> GuardDecision:
    """Apply the three rules to figures already measured (pure; the unit under test)."""
    reasons: list[str] = []
    notes = list(notes)
    if new.rows == 0:
        reasons.append(
            "the new generation holds 0 feed rows (expected at least one); look at the "
            "user_feeds runs: their candidate window may miss every post"
        )
    coverage = active_covered / active_users if active_users else 1.0
    if new.rows and coverage < config.min_active_coverage:
        reasons.append(
            f"it covers {active_covered:,} of {active_users:,} active users "
            f"({coverage:.1%}; users with engagements and an unseen post in the candidate "
            f"window), expected at least "
            f"{config.min_active_coverage:.0%} (published_feeds config min_active_coverage)"
        )
    if new.rows and live is not None:
        shrunk = [
            f"{what} {n_new:,} < {config.min_share_of_live:.0%} of the live {n_live:,}"
            for what, n_new, n_live in (
                ("users", new.users, live.users),
                ("rows", new.rows, live.rows),
            )
            if n_new < config.min_share_of_live * n_live
        ]
        if shrunk and config.allow_shrink:
            notes.append(f"shrink allowed by allow_shrink ({', '.join(shrunk)})")
        elif shrunk:
            reasons.append(
                f"it shrinks against the live generation: {', '.join(shrunk)}; set "
                "published_feeds config allow_shrink: true if the shrink is intended"
            )
    return GuardDecision(
        passed=not reasons,
        reasons=reasons,
        new=new,
        live=live,
        active_users=active_users,
        active_covered=active_covered,
        notes=notes,
    )


def generation_users(shard_paths: Sequence[str | Path]) -> tuple[int, pl.Series]:
    """(rows, distinct user ids) of the shard files, reading only the user_id column."""
    if not shard_paths:
        return 0, pl.Series("user_id", [], dtype=pl.Int64)
    users = pl.scan_parquet([str(p) for p in shard_paths]).select("user_id").collect()
    return users.height, users["user_id"].unique()


# Users with engagements who have not seen every post inside the candidate window (`?` =
# now, then the window's lower bound or NULL for no age limit). "Seen" is what the
# pipeline's previously-seen filter drops: shown in an impression or engaged with, before now.
ACTIVE_USERS_SQL = """
WITH fresh AS (
    SELECT article_id FROM main.articles
    WHERE published_at <= $now AND ($after IS NULL OR published_at > $after)
),
seen AS (
    SELECT user_id, article_id FROM main.impressions WHERE shown_at < $now
    UNION
    SELECT user_id, article_id FROM main.engagements WHERE engaged_at < $now
),
seen_fresh AS (
    SELECT s.user_id, count(*) AS k FROM seen s JOIN fresh f ON f.article_id = s.article_id
    GROUP BY s.user_id
)
SELECT DISTINCT e.user_id FROM main.engagements e
LEFT JOIN seen_fresh sf ON sf.user_id = e.user_id
WHERE coalesce(sf.k, 0) < (SELECT count(*) FROM fresh)
"""


def active_user_ids(warehouse: Location) -> pl.Series:
    """Users who must get a feed: engaged, with a fresh post they have not seen."""
    con = connect_read_only(warehouse)
    try:
        info = con.execute("SELECT * FROM main.world_info").pl().row(0, named=True)
        window = window_from_info(info)
        now = info["now"]
        after = None if window is None else now - window
        return con.execute(ACTIVE_USERS_SQL, {"now": now, "after": after}).pl()["user_id"]
    finally:
        con.close()


def live_generation(serving_path: Path) -> tuple[GenerationStats | None, str | None]:
    """(rows, users) of the live serving file from its `meta`; None before the first
    publish. An unreadable live file is no yardstick (a note says so): the new generation
    then only has to pass the empty and coverage rules, which lets a good publish repair it."""
    from feed_dagster.serving.read import read_meta

    if not serving_path.exists():
        return None, None
    try:
        meta = read_meta(serving_path)
        return GenerationStats(rows=int(meta["rows"]), users=int(meta["users"])), None
    except Exception as exc:  # any DuckDB error: a damaged or foreign file
        return None, f"the live file {serving_path} is unreadable ({type(exc).__name__}: {exc})"


def check_publish(
    shard_paths: Sequence[str | Path],
    serving_path: Path,
    warehouse: Location,
    config: GuardConfig,
) -> GuardDecision:
    """Measure the new generation (shard files), the active users (warehouse) and the live
    generation (serving file), then decide."""
    rows, users = generation_users(shard_paths)
    active = active_user_ids(warehouse)
    covered = int(active.is_in(users.implode()).sum()) if active.len() else 0
    live, note = live_generation(serving_path)
    stats = GenerationStats(rows, users.len())
    return decide(stats, live, active.len(), covered, config, [note] if note else [])
