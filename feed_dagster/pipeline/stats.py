"""What a pipeline run reports: counts, and rows and seconds per stage, summable over batches."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import TypeVar

# The counters summed over batches (the per-stage dicts are summed key by key).
COUNTS: tuple[str, ...] = (
    "users",
    "users_with_feed",
    "feed_rows",
    "in_network_rows",
    "active_users",
    "active_users_with_candidates",
)


def window_hours(window: timedelta | None) -> float | None:
    """A candidate window in hours; None = no age limit."""
    return None if window is None else window.total_seconds() / 3600


N = TypeVar("N", int, float)


def _sum_by_key(a: dict[str, N], b: dict[str, N]) -> dict[str, N]:
    # Keys keep their first-seen order, which is run order: a stage one batch skipped
    # (disabled) lands where its first batch ran it.
    out = dict(a)
    for key, value in b.items():
        out[key] = out[key] + value if key in out else value
    return out


@dataclass
class PipelineStats:
    """Stats of one batch, or of many summed with `+`.

    retriever, scorer and candidate_window_hours describe the run, not a batch: a sum
    keeps the left operand's, so add the batches of one run only.
    """

    retriever: str = ""
    scorer: str = ""
    # None = no age limit (catalogs of long-lived items).
    candidate_window_hours: float | None = None
    users: int = 0
    users_with_feed: int = 0
    feed_rows: int = 0
    in_network_rows: int = 0
    # Users with engagements before now, and how many of them the sources found posts for.
    active_users: int = 0
    active_users_with_candidates: int = 0
    # Per stage label ("filter.duplicates"), in run order: rows out of it, seconds in it.
    rows: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # Per filter name ("duplicates"): rows it removed.
    removed: dict[str, int] = field(default_factory=dict)

    def record(self, stage: str, rows: int, seconds: float) -> None:
        """One stage's output rows and time (added to any earlier record of the stage)."""
        self.rows[stage] = self.rows.get(stage, 0) + rows
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def __add__(self, other: PipelineStats) -> PipelineStats:
        if not isinstance(other, PipelineStats):
            return NotImplemented
        counts = {name: getattr(self, name) + getattr(other, name) for name in COUNTS}
        return PipelineStats(
            retriever=self.retriever,
            scorer=self.scorer,
            candidate_window_hours=self.candidate_window_hours,
            rows=_sum_by_key(self.rows, other.rows),
            seconds=_sum_by_key(self.seconds, other.seconds),
            removed=_sum_by_key(self.removed, other.removed),
            **counts,
        )

    @property
    def in_network_share(self) -> float:
        """Share of served rows that came from the in-network source."""
        return self.in_network_rows / max(1, self.feed_rows)

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())

    def as_dict(self) -> dict[str, object]:
        """Plain values (for JSON or a log line)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
