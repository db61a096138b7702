"""Follow-graph statistics per account, with a degree-distribution plot."""

import dagster as dg
import polars as pl

from feed_dagster.graph.stats import account_stats, degree_summary
from feed_dagster.plots import degree_ccdf


@dg.asset(group_name="social_graph", kinds={"duckdb", "polars"}, pool="warehouse")
def follow_graph(users: pl.DataFrame, follows: pl.DataFrame):
    """Per-account followers (in-degree), following (out-degree) and mutual follows."""
    stats = account_stats(users, follows)
    followers = stats["followers"].to_numpy()
    summary = degree_summary(followers)
    return dg.Output(
        stats,
        metadata={
            "dagster/row_count": stats.height,
            "edges": follows.height,
            "accounts_with_mutuals": int((stats["mutual_follows"] > 0).sum()),
            **{f"in_degree_{k}": dg.MetadataValue.float(float(v)) for k, v in summary.items()},
            "in_degree_ccdf": dg.MetadataValue.md(
                degree_ccdf({"followers": followers}, "Follower distribution")
            ),
        },
    )
