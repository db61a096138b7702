"""Where models and the vector table live: local paths or object-store URIs.

Both depend on the `storage` resource (a Dagster resource dependency), so the storage root
configured for a run moves them too; their own setting, when given, overrides it."""

import os

import dagster as dg

from feed_dagster.artifacts import check_reachable
from feed_dagster.feeds.model_backends import ModelLocations
from feed_dagster.models.store import ModelStore, ModelStoreUnavailable
from feed_dagster.paths import MODELS_URI_VARIABLE
from feed_dagster.resources.storage import StorageResource


class ModelStoreResource(dg.ConfigurableResource):
    """Weights (safetensors) + config per model version under `root/<name>/<version>/`,
    with a PROMOTED pointer per model replaced in one write. The root is `root`, else
    FEED_DAGSTER_MODELS_URI (read when the store is asked for, as FEED_DAGSTER_DATA is),
    else models/ under the storage root. An s3:// root takes its endpoint and credentials
    from the usual AWS_* variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)."""

    storage: StorageResource
    root: str = ""

    def uri(self) -> str:
        """The store's root: a local path or an fsspec URL."""
        return (
            self.root
            or os.environ.get(MODELS_URI_VARIABLE, "").strip()
            or str(self.storage.models_dir())
        )

    def setting(self) -> str:
        """Which setting chose the root, for error messages."""
        if self.root:
            return "resources.models.config.root"
        if os.environ.get(MODELS_URI_VARIABLE, "").strip():
            return MODELS_URI_VARIABLE
        return "the storage root (FEED_DAGSTER_DATA)"

    def store(self) -> ModelStore:
        """The store, after checking that its bucket answers: a wrong endpoint or a missing
        bucket stops the step here, naming the setting, not halfway through training."""
        store = ModelStore(self.uri())
        try:
            store.check()
        except ModelStoreUnavailable as exc:
            raise ModelStoreUnavailable(
                f"{exc}. The model store's root {store.root!r} comes from {self.setting()}; "
                "the endpoint and credentials from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or an AWS profile)"
            ) from exc
        return store


class LanceDBResource(dg.ConfigurableResource):
    """The LanceDB database holding the article-vector table (a path or an s3:// URI).
    Empty uri: lancedb/ under the artifacts root (FEED_DAGSTER_ARTIFACTS_URI, else the
    storage root). An s3:// database takes its endpoint and credentials from the usual
    AWS_* variables (feed_dagster/artifacts.py)."""

    storage: StorageResource
    uri: str = ""
    table: str = "article_vectors"

    def resolved_uri(self) -> str:
        return self.uri or self.storage.lancedb_uri()

    def setting(self) -> str:
        """Which setting chose the database, for error messages."""
        return "resources.lancedb.config.uri" if self.uri else self.storage.artifacts_setting()

    def checked_uri(self) -> str:
        """The database, after checking that its bucket answers. LanceDB fails to open a
        table in a missing or unreachable bucket the way it fails on a table not written
        yet, which the feeds treat as "no model yet" and serve fallbacks for."""
        uri = self.resolved_uri()
        check_reachable(uri, self.setting())
        return uri


def model_locations(
    models: ModelStoreResource, lancedb: LanceDBResource, storage: StorageResource
) -> ModelLocations:
    """Where the feed assets (user_feeds, feed_quality) find the served models: the model
    store, the vector table (its bucket checked first), the embeddings under the artifacts
    root and the peer scores under the storage root."""
    return ModelLocations(
        models.store(),
        lancedb.checked_uri(),
        lancedb.table,
        embeddings=storage.embeddings_path(),
        peers_dir=storage.serving_peers_dir(),
        warehouse=storage.warehouse_path(),
    )
