"""A world whose largest tables arrive in parts, so that it can be written to the warehouse
without ever being whole in memory (core; no dagster).

At 1M users the synthetic world holds about 500M impressions: some 18 GiB as frames, more
than the whole run may use. Its generator hands them over chunk by chunk instead, and the
warehouse appends each chunk as it comes (`warehouse_store.write_tables`). Every other
table, and every other source, is small enough to arrive whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

import polars as pl

from feed_dagster.data.schema import World

# The tables a stream may deliver in parts; all the others arrive whole, in `head`.
STREAMED_TABLES = ("impressions", "engagements", "impression_truth")


@dataclass(frozen=True)
class WorldStream:
    """`head` is the world with every table whole, except that the streamed tables hold only
    their first rows (often none); `tail` yields, in order, more rows for them, each part a
    mapping of table name to frame. Iterating `tail` is what generates those rows, so a
    stream is read once."""

    head: World
    tail: Iterable[Mapping[str, pl.DataFrame]] = ()

    @classmethod
    def whole(cls, world: World) -> WorldStream:
        """A world that is already in memory, as a stream with no tail."""
        return cls(world)

    def parts(self) -> Iterator[Mapping[str, pl.DataFrame]]:
        """The tail's parts, each checked to name streamed tables only."""
        for part in self.tail:
            unknown = set(part) - set(STREAMED_TABLES)
            if unknown:
                raise ValueError(f"a stream's parts may hold only {STREAMED_TABLES}: {unknown}")
            yield part

    def collect(self) -> World:
        """The whole world in memory: each streamed table is its head rows then its parts'."""
        pieces: dict[str, list[pl.DataFrame]] = {
            name: [getattr(self.head, name)] for name in STREAMED_TABLES
        }
        for part in self.parts():
            for name, df in part.items():
                pieces[name].append(df)
        return replace(self.head, **{name: _concat(dfs) for name, dfs in pieces.items()})


def _concat(dfs: list[pl.DataFrame]) -> pl.DataFrame:
    """The frames one after the other, leaving out empty ones (an empty chunk would still
    show in the result's chunk layout)."""
    rows = [df for df in dfs if df.height]
    return pl.concat(rows, rechunk=False) if rows else dfs[0]
