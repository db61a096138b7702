"""Article content vectors: encoders and incremental (re)encoding."""

from feed_dagster.embeddings.encoders import (
    ENCODERS,
    Encoder,
    LexicalEncoder,
    MiniLMEncoder,
    PrecomputedEncoder,
    make_encoder,
)
from feed_dagster.embeddings.incremental import EmbeddingStats, content_hash, update_embeddings

__all__ = [
    "ENCODERS",
    "EmbeddingStats",
    "Encoder",
    "LexicalEncoder",
    "MiniLMEncoder",
    "PrecomputedEncoder",
    "content_hash",
    "make_encoder",
    "update_embeddings",
]
