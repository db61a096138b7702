"""The LanceDB article-vector table that out-of-network retrieval searches."""

import dagster as dg
import numpy as np
import polars as pl

from feed_dagster.assets.retry import IO_RETRY
from feed_dagster.assets.upstream import upstream_metadata
from feed_dagster.data.warehouse import read_tables
from feed_dagster.embeddings.stored import content_vectors
from feed_dagster.models.catalog import CATALOG_COLUMNS, ItemCatalog
from feed_dagster.models.serve import item_vectors_of
from feed_dagster.models.two_tower import load_two_tower
from feed_dagster.models.warehouse_engagements import WarehouseEngagements
from feed_dagster.paths import TWO_TOWER
from feed_dagster.resources.storage import StorageResource
from feed_dagster.resources.stores import LanceDBResource, ModelStoreResource
from feed_dagster.vectors import (
    DEFAULT_INDEX_THRESHOLD,
    ensure_index,
    measure_recall,
    open_vectors,
    optimize,
    retrieval_frame,
    vector_index,
    write_vectors,
)
from feed_dagster.vectors.index import proxy_queries
from feed_dagster.vectors.search import read_vectors

# The item tower reads a post's content, author, topic and first engagement time only.
VECTOR_TABLES = ["articles", "engagements"]
# What the catalog and the vector table's filter columns read of the articles.
ARTICLE_COLUMNS = [*CATALOG_COLUMNS, "kind"]


@dg.asset(
    group_name="retrieval",
    # The retrieval vector is the two-tower item-tower output; switching back to raw
    # content vectors would be this one dependency (and the function below) changing.
    deps=["retrieval_model", "article_embeddings", *VECTOR_TABLES],
    kinds={"lancedb"},
    retry_policy=IO_RETRY,
    automation_condition=dg.AutomationCondition.eager(),
)
def article_vectors(
    context: dg.AssetExecutionContext,
    models: ModelStoreResource,
    lancedb: LanceDBResource,
    storage: StorageResource,
) -> dg.MaterializeResult:
    """Item-tower vectors of every article plus filter columns, upserted into LanceDB, with
    exact search below 10k rows and a recall-calibrated IVF index above."""
    store = models.store()
    uri, name = lancedb.checked_uri(), lancedb.table
    version = upstream_metadata(
        context.instance, "retrieval_model", ["two_tower_version"], produced_by="trained_models"
    )["two_tower_version"]
    model = load_two_tower(*store.load(TWO_TOWER, version))
    # Only the catalog, not a serving context: the engagement log and follow tables a
    # context builds are the user tower's (a minute at 100k users, unused here). The
    # columns the catalog and the filters read, not the texts; each post's first
    # engagement aggregated where the engagements are (165M rows, 2.6 GB at 1M users).
    articles = read_tables(
        storage.warehouse_path(), ["articles"], columns={"articles": ARTICLE_COLUMNS}
    )["articles"]
    firsts = WarehouseEngagements(storage.warehouse_path()).post_counts(()).firsts
    catalog = ItemCatalog.build(
        articles,
        content_vectors(articles, storage.embeddings_path()),
        model.cfg.features,
        firsts=firsts,
    )
    frame = retrieval_frame(item_vectors_of(model, catalog), articles)
    # The index is built from the frame alone: at 10M posts the catalog (content vectors
    # of every post) and the articles would otherwise stay beside it.
    del catalog, articles, firsts
    try:
        table_version = write_vectors(uri, name, frame)
    except ValueError:  # the vector dimension changed with a new model configuration
        context.log.warning("vector dimension changed: rewriting the table")
        table_version = write_vectors(uri, name, frame, mode="overwrite")
    table = open_vectors(uri, name)
    report = ensure_index(table)
    opt = optimize(table)
    table = open_vectors(uri, name)
    # Feeds use the user tower that matches these item vectors.
    store.promote(TWO_TOWER, version)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": int(table.count_rows()),
            "table_version": int(table.version),
            "written_version": table_version,
            "uri": uri,
            "two_tower_version": version,
            "index_type": report.kind,
            "index_recall@100": float(report.recall) if report.recall is not None else 1.0,
            "index": dg.MetadataValue.json(report.as_dict()),
            "optimize": dg.MetadataValue.json(
                {k: v if isinstance(v, int | float | str) else str(v) for k, v in vars(opt).items()}
            ),
        }
    )


def _table(lancedb: LanceDBResource):
    return open_vectors(lancedb.checked_uri(), lancedb.table)


@dg.asset_check(asset=article_vectors, description="one vector per article, none NaN or zero")
def vectors_cover_articles(
    lancedb: LanceDBResource, storage: StorageResource
) -> dg.AssetCheckResult:
    table = _table(lancedb)
    ids, matrix = read_vectors(table)
    articles = read_tables(storage.warehouse_path(), ["articles"])["articles"]
    missing = articles.join(pl.DataFrame({"article_id": ids}), on="article_id", how="anti")
    norms = np.linalg.norm(matrix, axis=1)
    bad = ~np.isfinite(matrix).all(axis=1) | (norms == 0)
    passed = missing.height == 0 and len(ids) == articles.height and not bad.any()
    return dg.AssetCheckResult(
        passed=passed,
        description=f"{len(ids):,} vectors for {articles.height:,} articles; "
        f"{missing.height} articles without a vector (e.g. "
        f"{missing['article_id'].head(3).to_list()}); {int(bad.sum())} NaN/zero vectors",
        metadata={"vectors": len(ids), "articles": articles.height, "bad": int(bad.sum())},
    )


@dg.asset_check(
    asset=article_vectors,
    blocking=True,
    description="ANN recall@100 against exact search >= 0.95, and an index exists above the "
    "size threshold",
)
def vector_index_recall(lancedb: LanceDBResource) -> dg.AssetCheckResult:
    table = _table(lancedb)
    n = int(table.count_rows())
    index = vector_index(table)
    if n < DEFAULT_INDEX_THRESHOLD:
        return dg.AssetCheckResult(
            passed=index is None,
            description=f"{n:,} rows < {DEFAULT_INDEX_THRESHOLD:,}: exact search (recall 1.0)",
            metadata={"rows": n, "recall@100": 1.0},
        )
    if index is None:
        return dg.AssetCheckResult(
            passed=False, description=f"{n:,} rows but no vector index", metadata={"rows": n}
        )
    recall = measure_recall(table, proxy_queries(table, 256, seed=1), k=100, sample=256)
    return dg.AssetCheckResult(
        passed=recall >= 0.95,
        description=f"recall@100 {recall:.3f} on 256 held-out proxy queries ({n:,} rows)",
        metadata={"rows": n, "recall@100": float(recall)},
    )
