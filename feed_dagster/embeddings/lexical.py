"""`LexicalEncoder` (the default): hashed word uni/bigrams + topic token, no model files."""

from __future__ import annotations

import hashlib
from functools import cached_property

import numpy as np
import polars as pl

from feed_dagster.embeddings.base import TEXT_COLUMNS, Encoder, l2_normalise, require_columns
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
        require_columns(articles, (*TEXT_COLUMNS, "topic"), "LexicalEncoder")
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
        return l2_normalise(self._project(n, doc, h, weight))

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
