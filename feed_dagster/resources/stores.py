"""Where models and the vector table live: roots that could equally be object-store URIs."""

import dagster as dg

from feed_dagster.models.store import ModelStore
from feed_dagster.paths import data_root


class ModelStoreResource(dg.ConfigurableResource):
    """Weights (safetensors) + config per model version under `root/<name>/<version>/`,
    with an atomically replaced PROMOTED pointer per model. Empty root: data/models."""

    root: str = ""

    def store(self) -> ModelStore:
        return ModelStore(self.root or str(data_root() / "models"))


class LanceDBResource(dg.ConfigurableResource):
    """The LanceDB database holding the article-vector table (a path or an s3:// URI)."""

    uri: str = ""
    table: str = "article_vectors"

    def resolved_uri(self) -> str:
        return self.uri or str(data_root() / "lancedb")
