"""Everyone's engagements where the warehouse keeps them, for serving contexts that hold
only some users' rows.

A feed shard scores 1/16 of the users at 100k users, but a few of its inputs are shared by
every user: each post's first engagement (the catalog), everyone's positive engagements
per post and author at the scoring time (the ranker's post counts) and the classic peers,
fitted on every engagement. Reading all 20.8M engagement rows into each shard to derive
them took about 5 s of its set-up and 0.7 GiB of its memory; DuckDB aggregates the first
two in one scan where the rows live, names the peers' fit the same way, and the rows are
read whole only by the one shard of a refresh that fits the peers.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import polars as pl

from feed_dagster.artifacts import Location
from feed_dagster.data.warehouse import connect_read_only
from feed_dagster.metrics.classic import positive_rows_sql
from feed_dagster.metrics.fit_store import fit_name_in_warehouse
from feed_dagster.models.catalog import ItemCatalog
from feed_dagster.models.engagement_log import EveryonesPositives
from feed_dagster.models.exposures import (
    catalog_frame,
    micros_sql,
    post_and_author_counts,
    spilling,
    time_bounds,
)


@dataclass(frozen=True)
class PostCounts:
    """What every user's engagements say about each post, as of a feed run."""

    # (article_id, first_us): as models.catalog.post_firsts makes it from a frame.
    firsts: pl.DataFrame
    # Per time (microseconds): (article_id, n) positive engagements strictly before it, as
    # EveryonesPositives.of counts them from a frame.
    positives: dict[int, pl.DataFrame]


@dataclass(frozen=True)
class WarehouseEngagements:
    """The warehouse's `engagements` table, every user's rows."""

    path: Location

    def post_counts(self, times_us: tuple[int, ...]) -> PostCounts:
        """Each post's first engagement and its positive engagements before each of
        `times_us`, from one scan. A missing time reads as 0, as the frame code reads it."""
        times = sorted({int(t) for t in times_us})
        con = connect_read_only(self.path)
        try:
            columns = {r[0] for r in con.execute("describe main.engagements").fetchall()}
            positive = positive_rows_sql(columns) or "false"
            t = micros_sql("engaged_at")
            counts = "".join(
                f", count(*) filter (where ({positive}) and {t} < {at}) as n{i}"
                for i, at in enumerate(times)
            )
            frame = con.execute(
                "select article_id::bigint as article_id, case when count(engaged_at) < "
                "count(*) then 0 else epoch_us(min(engaged_at)) end::bigint as first_us"
                f"{counts} from main.engagements group by article_id"
            ).pl()
        finally:
            con.close()
        return PostCounts(
            firsts=frame.select("article_id", "first_us"),
            positives={
                at: frame.select("article_id", pl.col(f"n{i}").alias("n")).filter(pl.col("n") > 0)
                for i, at in enumerate(times)
            },
        )

    def positives_at(
        self, catalog: ItemCatalog, item: np.ndarray, time_us: np.ndarray
    ) -> EveryonesPositives:
        """Everyone's positive engagements with catalog row `item[i]`, and with its author,
        strictly before `time_us[i]`, kept at those points only (CountsAtPoints): what
        EveryonesPositives.of counts from every row, for a trainer whose slates, and so
        whose points, are known up front. DuckDB hands over the events of the asked posts
        and of their authors' posts only, in one pass."""
        item = np.asarray(item, dtype=np.int64)
        time_us = np.asarray(time_us, dtype=np.int64)
        # Rows of unknown authors ask author 0, as EngagementLog.author_counts does.
        author = np.maximum(catalog.author_id[item], 0)
        con = connect_read_only(self.path)
        try:
            with spilling(con, "positives-"):
                columns = {r[0] for r in con.execute("describe main.engagements").fetchall()}
                positive = positive_rows_sql(columns) or "false"
                bounds = time_bounds(con, "main.engagements", "engaged_at")
                events = (
                    f"select article_id, {micros_sql('engaged_at')} as t "
                    f"from main.engagements where {positive}"
                )
                return EveryonesPositives(
                    *post_and_author_counts(
                        con, events, catalog_frame(catalog), item, author, time_us, bounds
                    )
                )
        finally:
            con.close()

    def fit_name(self, cut: datetime, methods: tuple[str, ...], **hyper: Any) -> str:
        """The name a fit of every engagement before `cut` is stored under (see
        metrics.fit_store.fit_name_in_warehouse)."""
        return fit_name_in_warehouse(self.path, cut, methods, **hyper)

    def read(self) -> pl.DataFrame:
        """Every row: what fitting the classic peers, or the table fallbacks, need."""
        con = connect_read_only(self.path)
        try:
            return con.execute("select * from main.engagements").pl()
        finally:
            con.close()
