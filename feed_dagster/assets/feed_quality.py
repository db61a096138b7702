"""Held-out recall of the served feed against the classic feeds, built through one pipeline.

Evaluation only: nothing downstream of the feeds depends on it, so a failure here never
holds back a publish.
"""

import os

import dagster as dg
import polars as pl
from pydantic import Field

from feed_dagster.feeds.build import PIPELINE_TABLES
from feed_dagster.feeds.evaluation import (
    LEARNED,
    beats_classics,
    evaluate_feeds,
    read_evaluation_tables,
    tables_before,
)
from feed_dagster.models.train import torch_threads
from feed_dagster.plots import markdown_table
from feed_dagster.resources.storage import StorageResource
from feed_dagster.resources.stores import LanceDBResource, ModelStoreResource, model_locations

FALLBACK = "table_fallbacks"


class FeedQualityConfig(dg.Config):
    # Smaller than the benchmark's sample (1,000 users): this runs after every model
    # refresh and inside `make run`, where it is a sizeable share of the time.
    sample_size: int = 600
    seed: int = 0
    batch_size: int = 512
    # One step on its own (not side by side like the shards): every core helps. Measured on
    # the demo world: 21.8 s with two threads against 33.0 s with one (2 cores, quiet).
    torch_threads: int = Field(
        default=os.cpu_count() or 1, ge=1, description="torch intra-op threads for scoring"
    )


@dg.asset(
    group_name="evaluation",
    deps=[*PIPELINE_TABLES, "promoted_ranker", "article_vectors"],
    kinds={"duckdb", "polars"},
    pool="warehouse",
)
def feed_quality(
    context: dg.AssetExecutionContext,
    config: FeedQualityConfig,
    models: ModelStoreResource,
    lancedb: LanceDBResource,
    storage: StorageResource,
) -> dg.Output[pl.DataFrame]:
    """Recall@35 of held-out positives for feeds built at heldout_start from the data before
    it: the promoted models' feed (the table fallbacks while none is promoted) against the
    chronological-following and popularity feeds, all with the same filters and selection,
    on a fixed seeded sample of users with a held-out positive."""
    tables, users, cut = read_evaluation_tables(
        storage.warehouse_path(), config.sample_size, config.seed
    )
    # The models' serving context is built from the data before the cut only; the tables
    # hold the sample's rows, and what every user shares (exposure and engagement counts)
    # comes from the warehouse, cut there too.
    retriever, scorer, versions = model_locations(models, lancedb, storage).load(
        tables_before(tables, cut),
        context.log.warning,
        users=users,
        at=cut,
        engagements_of_users=True,
    )
    fallback = versions["model_version"] == "fallback"
    name = FALLBACK if fallback else LEARNED
    with torch_threads(config.torch_threads):
        result = evaluate_feeds(
            tables,
            cut,
            {name: lambda known: (retriever, scorer)},
            users,
            batch_size=config.batch_size,
            progress=context.log.info,
        )
    # Which models were judged, in the table itself: a reader of the warehouse alone can
    # tell whether the figures belong to the feeds being served.
    result = result.with_columns(
        model_version=pl.lit(versions["model_version"]),
        vector_table_version=pl.lit(versions["vector_table_version"]),
    )
    k = int(result["k"][0])
    recall = {
        f"recall@{k} {feed}": dg.MetadataValue.float(float(value))
        for feed, value in result.select("feed", "recall_macro").iter_rows()
    }
    table = result.drop("cut", "k", "model_version", "vector_table_version").with_columns(
        pl.col("seconds").round(1)
    )
    return dg.Output(
        result,
        metadata={
            "dagster/row_count": result.height,
            "comparison": dg.MetadataValue.md(markdown_table(table, float_digits=3)),
            **recall,
            "sample_users": int(result["users"][0]),
            "eligible_users": int(result["eligible_users"][0]),
            "beats_classic_feeds": beats_classics(result, name),
            "models": (
                "none promoted: evaluated the table fallbacks"
                if fallback
                else versions["model_version"]
            ),
            "cut": str(cut),
        },
    )
