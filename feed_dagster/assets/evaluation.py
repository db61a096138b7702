"""Ranking baselines on the held-out impressions of any source."""

import dagster as dg
from pydantic import Field

from feed_dagster.data.warehouse import read_heldout_sample
from feed_dagster.data.world_tables import world_from_tables
from feed_dagster.metrics.baselines import evaluate_baselines
from feed_dagster.models.budget import TrainingBudget
from feed_dagster.plots import markdown_table, metric_bars
from feed_dagster.resources.storage import StorageResource
from feed_dagster.resources.warehouse import WAREHOUSE_POOL

EVALUATION_TABLES = ["world_info", "impressions", "engagements", "articles", "follows"]
# The baselines read an article's author and publication time only: its texts, the bulk
# of the table (about 2 GiB at 10M posts), are left in the warehouse.
EVALUATION_COLUMNS = {"articles": ["article_id", "author_id", "published_at"]}


class EvaluationConfig(dg.Config):
    max_users: int = Field(
        default=TrainingBudget().heldout_users,
        ge=0,
        description="Held-out users evaluated: a seeded random sample of this many (the "
        "training budget's held-out users); 0 evaluates every user.",
    )
    seed: int = Field(default=0, description="Seed of the user sample.")


@dg.asset(
    group_name="evaluation",
    kinds={"duckdb", "polars"},
    pool=WAREHOUSE_POOL,
    deps=EVALUATION_TABLES,
)
def impressions_evaluation(config: EvaluationConfig, storage: StorageResource):
    """AUC, MRR and nDCG@5/10 of the non-learned baselines on held-out impressions, scored
    as the EBNeRD benchmark does (label = inview article clicked), with no future leakage.
    Only the sampled users' held-out impressions, the engagements on the posts they show
    and their follows are read (SQL); what every user's engagements decide (the classic
    peers' fit, read_time's fallback) is taken where they are, so the step holds the
    sample, not the world."""
    tables, sample = read_heldout_sample(
        storage.warehouse_path(),
        EVALUATION_TABLES,
        config.max_users,
        config.seed,
        columns=EVALUATION_COLUMNS,
        scoped=True,
    )
    world = world_from_tables(tables, tables["world_info"])
    table = evaluate_baselines(
        world,
        heldout_only=True,
        peer_fits=storage.serving_peers_dir(),
        warehouse=storage.warehouse_path(),
    )
    return dg.Output(
        table,
        metadata={
            "dagster/row_count": table.height,
            "heldout_impressions": int(table["n_impressions"].max()) if table.height else 0,
            **sample,
            "metrics": dg.MetadataValue.md(markdown_table(table)),
            "chart": dg.MetadataValue.md(
                metric_bars(table, "baseline", ["auc", "mrr", "ndcg@10"], "Baselines (held out)")
            ),
        },
    )
