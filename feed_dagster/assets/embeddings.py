"""Content vectors for every article, re-encoding only new or changed articles."""

import dagster as dg
import polars as pl

from feed_dagster.artifacts import exists, read_parquet, writing
from feed_dagster.assets.retry import IO_RETRY
from feed_dagster.embeddings.incremental import update_embeddings
from feed_dagster.resources.encoder import EncoderResource
from feed_dagster.resources.storage import StorageResource


@dg.asset(
    group_name="embeddings",
    kinds={"parquet", "numpy"},
    retry_policy=IO_RETRY,
    automation_condition=dg.AutomationCondition.eager(),
)
def article_embeddings(
    context: dg.AssetExecutionContext,
    articles: pl.DataFrame,
    encoder: EncoderResource,
    storage: StorageResource,
) -> dg.MaterializeResult:
    """article_id -> float32 content vector. Incremental: articles whose content hash and
    encoder version are unchanged keep their stored vector."""
    storage.check_artifacts()
    path = storage.embeddings_path()
    previous = read_parquet(path) if exists(path) else None
    enc = encoder.encoder()
    table, stats = update_embeddings(articles, previous, enc)
    # Written whole, then renamed into place or uploaded in one PUT; a unique temporary
    # name, so two overlapping runs never write into the same file.
    with writing(path) as tmp:
        table.write_parquet(tmp)
    context.log.info(f"encoded {stats.n_encoded:,}, reused {stats.n_reused:,}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": table.height,
            "path": str(path),
            **{k: float(v) if isinstance(v, float) else v for k, v in stats.as_dict().items()},
        }
    )
