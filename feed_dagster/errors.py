"""Errors shared by every data source and store of the project."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import polars as pl

# How many offending rows an error message quotes: enough to spot the pattern, short enough
# to read in a log line.
MAX_ROWS_SHOWN = 5


class DataValidationError(ValueError):
    """Input data that does not match the layout or the value rules it must follow.

    Attributes name where the problem is (`file`, `column`), what the rule wanted
    (`expected`), what the data had (`found`) and the first offending rows (`rows`, each a
    dict of identifying values, at most MAX_ROWS_SHOWN of them).
    """

    def __init__(
        self,
        file: str,
        column: str | None,
        expected: str,
        found: str,
        rows: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.file = file
        self.column = column
        self.expected = expected
        self.found = found
        self.rows = list(rows)[:MAX_ROWS_SHOWN]
        where = f"{file}, column '{column}'" if column else file
        message = f"{where}: expected {expected}, found {found}"
        if self.rows:
            message += f"; first offending rows: {self.rows}"
        super().__init__(message)

    @classmethod
    def from_frame(
        cls,
        file: str,
        column: str | None,
        expected: str,
        found: str,
        offending: pl.DataFrame,
    ) -> DataValidationError:
        """Build the error from a frame of offending rows (only the first few are quoted)."""
        return cls(file, column, expected, found, offending.head(MAX_ROWS_SHOWN).to_dicts())


class NoCandidatesError(RuntimeError):
    """A feed run in which most users with engagements got no candidate at all.

    Almost always the candidate window and the data disagree (every post older than the
    window at `now`, or `now` before every post): publishing such a run would replace
    working feeds with empty ones. The message names the window, `now` and the articles'
    publication range so the mismatch is visible at a glance.
    """

    def __init__(
        self,
        *,
        window: timedelta | None,
        now: datetime,
        published_min: datetime | None,
        published_max: datetime | None,
        in_window: int,
        active_users: int,
        without_candidates: int,
    ) -> None:
        self.window = window
        self.now = now
        self.published_min = published_min
        self.published_max = published_max
        self.in_window = in_window
        self.active_users = active_users
        self.without_candidates = without_candidates
        if window is None:
            span = "no age limit"
        else:
            span = f"{window.total_seconds() / 3600:g} h, posts published after {now - window}"
        published = (
            f"published between {published_min} and {published_max}"
            if published_min is not None
            else "none (the articles table is empty)"
        )
        super().__init__(
            f"no candidates for {without_candidates:,} of {active_users:,} users with "
            f"engagements (expected at most half): candidate window {span}; now {now}; "
            f"articles {published}, {in_window:,} of them inside the window. Widen the "
            "window (user_feeds config candidate_window_hours, or no_candidate_window: true "
            "for no age limit; or the source's world_info.candidate_window_hours) or check "
            "the source's `now`."
        )
