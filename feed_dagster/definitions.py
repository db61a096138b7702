"""The one Definitions object: assets, checks, resources, jobs, schedules and sensors."""

from __future__ import annotations

import os

import dagster as dg

from feed_dagster.assets.checks import raw_table_checks
from feed_dagster.assets.embeddings import article_embeddings
from feed_dagster.assets.evaluation import impressions_evaluation
from feed_dagster.assets.feed_quality import feed_quality
from feed_dagster.assets.feeds import published_feeds, serving_inputs, user_feeds
from feed_dagster.assets.graph import follow_graph
from feed_dagster.assets.models import promoted_ranker, ranker_promotion_gate, trained_models
from feed_dagster.assets.raw import source_tables
from feed_dagster.assets.vectors import article_vectors, vector_index_recall, vectors_cover_articles
from feed_dagster.jobs.automation import JOBS, SCHEDULES, SENSORS
from feed_dagster.jobs.executors import default_executor
from feed_dagster.paths import data_root
from feed_dagster.resources.encoder import EncoderResource
from feed_dagster.resources.source import default_source
from feed_dagster.resources.storage import StorageResource, storage_at_launch
from feed_dagster.resources.stores import LanceDBResource, ModelStoreResource
from feed_dagster.resources.warehouse import WarehouseIOManager


def build_definitions(storage: StorageResource | None = None) -> dg.Definitions:
    """Definitions with one storage root: by default `storage`'s root, else the current data
    root (FEED_DAGSTER_DATA); a run's config (`resources.storage.config.root`) can set
    another. Every store the other resources use (warehouse, model store, vector table,
    replayed incoming batches) depends on the `storage` resource, so that one root moves
    them all."""
    shared = storage_at_launch(storage.root if storage else str(data_root()))
    return dg.Definitions(
        assets=[
            source_tables,
            follow_graph,
            impressions_evaluation,
            article_embeddings,
            trained_models,
            promoted_ranker,
            article_vectors,
            serving_inputs,
            user_feeds,
            published_feeds,
            feed_quality,
        ],
        asset_checks=[
            raw_table_checks,
            ranker_promotion_gate,
            vectors_cover_articles,
            vector_index_recall,
        ],
        jobs=JOBS,
        schedules=SCHEDULES,
        sensors=SENSORS,
        executor=default_executor(),
        resources={
            "storage": shared,
            "io_manager": WarehouseIOManager(storage=shared, schema="main"),
            "source": default_source(shared),
            "models": ModelStoreResource(storage=shared),
            "lancedb": LanceDBResource(storage=shared),
            "encoder": EncoderResource(kind=os.environ.get("FEED_DAGSTER_ENCODER", "lexical")),
        },
    )


defs = build_definitions()
