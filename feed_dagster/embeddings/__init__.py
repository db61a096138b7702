"""Article content vectors: encoders and incremental (re)encoding."""

from feed_dagster.embeddings.base import Encoder
from feed_dagster.embeddings.encoders import ENCODERS, make_encoder
from feed_dagster.embeddings.incremental import EmbeddingStats, content_hash, update_embeddings
from feed_dagster.embeddings.lexical import LexicalEncoder
from feed_dagster.embeddings.minilm import MiniLMEncoder
from feed_dagster.embeddings.precomputed import PrecomputedEncoder

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
