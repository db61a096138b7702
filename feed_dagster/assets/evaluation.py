"""Ranking baselines on the held-out impressions of any source."""

import dagster as dg
import polars as pl

from feed_dagster.data.world_tables import world_from_tables
from feed_dagster.metrics.baselines import evaluate_baselines
from feed_dagster.plots import markdown_table, metric_bars


@dg.asset(group_name="evaluation", kinds={"duckdb", "polars"}, pool="warehouse")
def impressions_evaluation(
    world_info: pl.DataFrame,
    impressions: pl.DataFrame,
    engagements: pl.DataFrame,
    articles: pl.DataFrame,
    follows: pl.DataFrame,
):
    """AUC, MRR and nDCG@5/10 of the non-learned baselines on held-out impressions, scored
    as the EBNeRD benchmark does (label = inview article clicked), with no future leakage."""
    world = world_from_tables(
        {
            "impressions": impressions,
            "engagements": engagements,
            "articles": articles,
            "follows": follows,
        },
        world_info,
    )
    table = evaluate_baselines(world, heldout_only=True)
    return dg.Output(
        table,
        metadata={
            "dagster/row_count": table.height,
            "heldout_impressions": int(table["n_impressions"].max()) if table.height else 0,
            "metrics": dg.MetadataValue.md(markdown_table(table)),
            "chart": dg.MetadataValue.md(
                metric_bars(table, "baseline", ["auc", "mrr", "ndcg@10"], "Baselines (held out)")
            ),
        },
    )
