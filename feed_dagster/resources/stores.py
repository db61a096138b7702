"""Where models and the vector table live: roots that could equally be object-store URIs.

Both depend on the `storage` resource (a Dagster resource dependency), so the storage root
configured for a run moves them too; their own setting, when given, overrides it."""

from pathlib import Path

import dagster as dg

from feed_dagster.feeds.model_backends import ModelLocations
from feed_dagster.models.store import ModelStore
from feed_dagster.resources.storage import StorageResource


class ModelStoreResource(dg.ConfigurableResource):
    """Weights (safetensors) + config per model version under `root/<name>/<version>/`,
    with an atomically replaced PROMOTED pointer per model. Empty root: models/ under the
    storage root."""

    storage: StorageResource
    root: str = ""

    def models_dir(self) -> Path:
        return Path(self.root) if self.root else self.storage.models_dir()

    def store(self) -> ModelStore:
        return ModelStore(str(self.models_dir()))


class LanceDBResource(dg.ConfigurableResource):
    """The LanceDB database holding the article-vector table (a path or an s3:// URI).
    Empty uri: lancedb/ under the storage root."""

    storage: StorageResource
    uri: str = ""
    table: str = "article_vectors"

    def resolved_uri(self) -> str:
        return self.uri or self.storage.lancedb_uri()


def model_locations(
    models: ModelStoreResource, lancedb: LanceDBResource, storage: StorageResource
) -> ModelLocations:
    """Where the feed assets (user_feeds, feed_quality) find the served models: the model
    store, the vector table, and the embeddings and peer scores under the storage root."""
    return ModelLocations(
        models.store(),
        lancedb.resolved_uri(),
        lancedb.table,
        embeddings=storage.embeddings_path(),
        peers_dir=storage.serving_peers_dir(),
        warehouse=storage.warehouse_path(),
    )
