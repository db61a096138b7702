"""Small markdown tables about a feed build, for run metadata: one user's feed and the
time each pipeline stage took."""

from __future__ import annotations

import polars as pl

from feed_dagster.pipeline.stages import FILTER
from feed_dagster.pipeline.stats import PipelineStats

PREVIEW_ROWS = 10
TITLE_CHARS = 60


def _cell(value: object) -> str:
    """A table cell: pipes escaped and line breaks flattened, which would end the row."""
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> str:
    align = ["---:" if i in right else "---" for i in range(len(header))]
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _short(title: str | None) -> str:
    if not title:
        return ""
    return title if len(title) <= TITLE_CHARS else title[: TITLE_CHARS - 1].rstrip() + "…"


def feed_preview_markdown(
    feeds: pl.DataFrame,
    articles: pl.DataFrame,
    users: pl.DataFrame,
    user_id: int | None = None,
    limit: int = PREVIEW_ROWS,
) -> str:
    """One user's feed (FEED_SCHEMA rows) as a markdown table: position, post (id and
    title), author, source, score, reason; the first `limit` positions.

    `user_id` None = the lowest user id in `feeds`, so reruns preview the same user.
    """
    if user_id is None:
        if feeds.is_empty():
            return "No feed rows."
        user_id = int(feeds["user_id"].min())
    rows = (
        feeds.filter(pl.col("user_id") == user_id)
        .sort("position")
        .head(limit)
        .join(articles.select("article_id", "title"), on="article_id", how="left")
        .join(
            users.select(pl.col("user_id").alias("author_id"), pl.col("handle")),
            on="author_id",
            how="left",
        )
        .sort("position")
    )
    if rows.is_empty():
        return f"No feed for user {user_id}."
    body = [
        [
            str(r["position"]),
            _cell(f"#{r['article_id']} {_short(r['title'])}".rstrip()),
            _cell(f"@{r['handle']}" if r["handle"] else "-"),
            _cell(r["source"]),
            f"{r['score']:.4f}",
            _cell(r["reason"]),
        ]
        for r in rows.iter_rows(named=True)
    ]
    header = ["position", "post", "author", "source", "score", "reason"]
    return f"Feed of user {user_id}:\n\n" + _table(header, body, right={0, 4})


def stage_timings_markdown(stats: PipelineStats) -> str:
    """Every stage of `stats` in run order: rows out, rows removed (filters), seconds summed
    over batches and share of the total, with a total row."""
    total = stats.total_seconds
    prefix = f"{FILTER}."
    body = []
    for stage, seconds in stats.seconds.items():
        name = stage.removeprefix(prefix)
        removed = stats.removed.get(name) if stage.startswith(prefix) else None
        body.append(
            [
                _cell(stage),
                f"{stats.rows.get(stage, 0):,}",
                "" if removed is None else f"{removed:,}",
                f"{seconds:.3f}",
                f"{seconds / total:.1%}" if total > 0 else "",
            ]
        )
    body.append(["**total**", "", "", f"{total:.3f}", "100.0%" if total > 0 else ""])
    header = ["stage", "rows out", "removed", "seconds", "share"]
    return _table(header, body, right={1, 2, 3, 4})
