"""Sizes of the synthetic world: named scales plus per-field overrides."""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime


@dataclass(frozen=True)
class WorldConfig:
    n_users: int
    n_posts: int
    days: float
    heldout_days: float
    sessions_per_user_day: float
    slate_size: int
    mean_follows: float
    seed: int = 0
    # A follow goes to someone of the follower's own community with this probability,
    # otherwise to anyone, in both cases preferentially to accounts that already have many.
    community_follow_share: float = 0.7
    follow_back_prob: float = 0.2
    # Extra attractiveness in preferential attachment: weight = in-degree + this.
    attachment_offset: float = 1.0
    # Share of a slate's slots filled from followed accounts (the rest: topic or random).
    in_network_share: float = 0.45
    window_start: datetime = datetime(2026, 1, 1)

    def __post_init__(self) -> None:
        if self.n_users < 20 or self.n_posts < 20:
            raise ValueError("a world needs at least 20 users and 20 posts")
        if not 0 < self.heldout_days < self.days:
            raise ValueError(f"heldout_days must be in (0, days={self.days})")
        if self.slate_size < 2:
            raise ValueError("slate_size must be at least 2")


SCALES: dict[str, WorldConfig] = {
    "tiny": WorldConfig(
        n_users=300,
        n_posts=3_000,
        days=6,
        heldout_days=1,
        sessions_per_user_day=2.0,
        slate_size=10,
        mean_follows=12,
    ),
    "demo": WorldConfig(
        n_users=3_000,
        n_posts=30_000,
        days=10,
        heldout_days=1.5,
        sessions_per_user_day=2.0,
        slate_size=10,
        mean_follows=25,
    ),
    "m": WorldConfig(
        n_users=100_000,
        n_posts=1_000_000,
        days=14,
        heldout_days=2,
        sessions_per_user_day=3.8,
        slate_size=12,
        mean_follows=40,
    ),
    "l": WorldConfig(
        n_users=1_000_000,
        n_posts=10_000_000,
        days=14,
        heldout_days=2,
        sessions_per_user_day=3.0,
        slate_size=12,
        mean_follows=50,
    ),
}


def world_config(scale: str = "demo", **overrides: object) -> WorldConfig:
    """The named scale's configuration with any field overridden (None values ignored)."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    unknown = set(overrides) - set(WorldConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown world settings {sorted(unknown)}")
    return replace(SCALES[scale], **{k: v for k, v in overrides.items() if v is not None})
