"""Loading EBNeRD folders (official, flat, zipped, the real sample) into the canonical World."""

from __future__ import annotations

import io
import shutil
import zipfile
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from feed_dagster.data.schema import TABLE_SCHEMAS, World
from feed_dagster.ebnerd import (
    article_first_seen,
    inspect_layout,
    list_artifacts,
    load_ebnerd,
    read_ebnerd,
    write_articles_for_ids,
    write_synthetic_ebnerd,
)
from feed_dagster.ebnerd.layout import BEHAVIORS_SCHEMA, HISTORY_SCHEMA, same_logical_type
from feed_dagster.ebnerd.mapping import derive_topic_follows
from feed_dagster.metrics import evaluate_baselines

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "ebnerd_sample"


@pytest.fixture(scope="module")
def official(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_ebnerd(
        tmp_path_factory.mktemp("official"), users=40, articles=300, impressions_per_user=5
    )


@pytest.fixture(scope="module")
def world(official: Path) -> World:
    return load_ebnerd(official)


def world_bytes(world: World) -> dict[str, bytes]:
    out = {}
    for name, table in world.tables().items():
        buf = io.BytesIO()
        table.write_ipc(buf)
        out[name] = buf.getvalue()
    out["times"] = repr((world.window_start, world.heldout_start, world.now)).encode()
    return out


def test_tables_have_canonical_schemas(world: World) -> None:
    for name, table in world.tables().items():
        assert dict(table.schema) == TABLE_SCHEMAS[name], name
    for name in ("impression_truth", "follows", "blocks", "mutes", "muted_keywords"):
        assert getattr(world, name).height == 0


def test_impressions_follow_inview_lists(official: Path, world: World) -> None:
    beh = pl.concat(
        [
            pl.read_parquet(official / s / "behaviors.parquet").with_columns(
                heldout=pl.lit(s == "validation")
            )
            for s in ("train", "validation")
        ]
    )
    expected = (
        beh.select(
            pl.col("impression_id").cast(pl.Int64),
            pl.col("article_ids_inview").alias("article_id"),
            pl.int_ranges(pl.col("article_ids_inview").list.len()).alias("position"),
            "heldout",
        )
        .explode("article_id", "position")
        .sort("impression_id", "position")
    )
    got = world.impressions.sort("impression_id", "position")
    assert got["article_id"].to_list() == expected["article_id"].to_list()
    assert got["position"].to_list() == expected["position"].to_list()
    assert got["is_heldout"].to_list() == expected["heldout"].to_list()
    val = pl.read_parquet(official / "validation" / "behaviors.parquet")
    assert world.heldout_start == val["impression_time"].min()
    assert world.now == val["impression_time"].max()


def test_every_click_is_one_engagement(official: Path, world: World) -> None:
    clicks = (
        pl.concat(
            [pl.read_parquet(official / s / "behaviors.parquet") for s in ("train", "validation")]
        )
        .select(
            pl.col("impression_id").cast(pl.Int64),
            pl.col("article_ids_clicked").alias("article_id"),
            "read_time",
        )
        .explode("article_id")
    )
    got = world.engagements.filter(pl.col("impression_id").is_not_null())
    assert got.height == clicks.height
    joined = clicks.with_columns(pl.col("article_id").cast(pl.Int64)).join(
        got, on=["impression_id", "article_id"], how="inner"
    )
    assert joined.height == clicks.height
    assert (joined["read_time"] == joined["dwell_seconds"]).all()
    assert world.engagements["click"].all()
    assert not world.engagements["favorite"].any()


def test_history_reads_deduplicated_and_before_heldout(official: Path, world: World) -> None:
    eng = world.engagements
    assert eng.select("user_id", "article_id", "engaged_at").is_duplicated().sum() == 0
    reads = eng.filter(pl.col("impression_id").is_null())
    assert reads["engaged_at"].max() < world.heldout_start
    # Every split's history ends before that split's behaviours.
    for split in ("train", "validation"):
        hist = pl.read_parquet(official / split / "history.parquet")
        beh = pl.read_parquet(official / split / "behaviors.parquet")
        assert hist["impression_time_fixed"].list.max().max() < beh["impression_time"].min()
    # The validation history repeats train-period reads; they appear once, not twice.
    val_hist = pl.read_parquet(official / "validation" / "history.parquet")
    train_hist = pl.read_parquet(official / "train" / "history.parquet")
    all_reads = (
        pl.concat([train_hist, val_hist])
        .select("user_id", "article_id_fixed", "impression_time_fixed")
        .explode("article_id_fixed", "impression_time_fixed")
        .unique()
    )
    assert all_reads.height > reads.height  # some of them are behaviour clicks instead


def test_users_articles_mapping(official: Path, world: World) -> None:
    arts = pl.read_parquet(official / "articles.parquet")
    assert world.articles.height == arts.height
    a = world.articles.join(arts.with_columns(pl.col("article_id").cast(pl.Int64)), on="article_id")
    assert (a["text"] == a["subtitle"] + " " + a["body"]).all()
    assert (a["topic"] == a["category"].cast(pl.Int32)).all()
    assert (a["topic_name"] == a["category_str"]).all()
    assert (a["published_at"] == a["published_time"]).all()
    assert (a["conversation_id"] == a["article_id"]).all()
    assert a["author_id"].is_null().all() and (a["kind"] == "original").all()

    first_seen = (
        pl.concat(
            [
                world.engagements.select("user_id", pl.col("engaged_at").alias("t")),
                world.impressions.select("user_id", pl.col("shown_at").alias("t")),
            ]
        )
        .group_by("user_id")
        .agg(pl.col("t").min())
    )
    u = world.users.join(first_seen, on="user_id")
    assert u.height == world.users.height
    assert (u["created_at"] == u["t"]).all()
    assert (u["handle"] == "user" + u["user_id"].cast(pl.String)).all()
    assert world.window_start == u["t"].min()


def test_future_columns_never_reach_the_world(official: Path, world: World, tmp_path: Path) -> None:
    wild = tmp_path / "wild"
    shutil.copytree(official, wild)
    rng = np.random.default_rng(1)
    path = wild / "articles.parquet"
    t = pq.read_table(path)
    n = t.num_rows
    arts = pl.from_arrow(t).with_columns(
        # Wild but inside each column's domain (out-of-domain values are refused, see
        # test_ebnerd_broken.py::test_out_of_domain_values).
        total_inviews=pl.Series(rng.integers(0, 10**9, n)).cast(pl.Int32),
        total_pageviews=pl.lit(None, dtype=pl.Int32),
        total_read_time=pl.Series(np.abs(rng.normal(0, 1e9, n))).cast(pl.Float32),
    )
    pq.write_table(arts.to_arrow().cast(t.schema), path)  # type: ignore[union-attr]
    for split in ("train", "validation"):
        path = wild / split / "behaviors.parquet"
        t = pq.read_table(path)
        beh = pl.from_arrow(t).with_columns(
            next_read_time=pl.Series(np.abs(rng.normal(0, 1e6, t.num_rows))).cast(pl.Float32),
            next_scroll_percentage=pl.Series(rng.uniform(0, 100, t.num_rows)).cast(pl.Float32),
        )
        pq.write_table(beh.to_arrow().cast(t.schema), path)  # type: ignore[union-attr]
    assert pl.read_parquet(wild / "articles.parquet")["total_inviews"].to_list() != (
        pl.read_parquet(official / "articles.parquet")["total_inviews"].to_list()
    )
    assert world_bytes(load_ebnerd(wild)) == world_bytes(world)


def test_test_split_is_ignored(tmp_path: Path) -> None:
    folder = write_synthetic_ebnerd(
        tmp_path / "with_test", users=20, articles=150, impressions_per_user=3, with_test=True
    )
    layout = inspect_layout(folder)
    assert layout.has_test and layout.splits == ("train", "validation")
    test_ids = pl.read_parquet(folder / "test" / "behaviors.parquet")["impression_id"]
    w = load_ebnerd(folder)
    assert not w.impressions["impression_id"].is_in(test_ids.cast(pl.Int64).implode()).any()


def test_zip_with_macos_junk_matches_folder(official: Path, world: World, tmp_path: Path) -> None:
    archive = tmp_path / "ebnerd_demo.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        # Junk first, as shallow as the real root, so only ignoring it can pick the right root.
        zf.writestr("__MACOSX/articles.parquet", b"junk")
        for p in sorted(official.rglob("*.parquet")):
            rel = p.relative_to(official).as_posix()
            zf.write(p, f"ebnerd_demo/{rel}")
            zf.writestr(f"__MACOSX/ebnerd_demo/{Path(rel).parent}/._{p.name}", b"junk")
        zf.writestr("ebnerd_demo/train/._behaviors.parquet", b"junk")
    assert world_bytes(load_ebnerd(archive)) == world_bytes(world)


def test_artifacts_are_listed_and_ignored(official: Path, world: World, tmp_path: Path) -> None:
    folder = tmp_path / "with_artifact"
    shutil.copytree(official, folder)
    vec = folder / "contrastive_vector" / "contrastive_vector.parquet"
    vec.parent.mkdir()
    ids = pl.read_parquet(folder / "articles.parquet")["article_id"]
    pl.DataFrame({"article_id": ids, "contrastive_vector": [[0.0] * 4] * len(ids)}).write_parquet(
        vec
    )
    assert list_artifacts(folder) == {
        "contrastive_vector": "contrastive_vector/contrastive_vector.parquet"
    }
    assert world_bytes(load_ebnerd(folder)) == world_bytes(world)


def make_flat(official: Path, out: Path) -> Path:
    out.mkdir()
    shutil.copy(official / "articles.parquet", out / "articles.parquet")
    shutil.copy(official / "train" / "behaviors.parquet", out / "behaviors.parquet")
    shutil.copy(official / "train" / "history.parquet", out / "history.parquet")
    return out


@pytest.mark.parametrize("fraction", [0.2, 0.5])
def test_flat_folder_holds_out_the_last_fraction(
    official: Path, tmp_path: Path, fraction: float
) -> None:
    flat = make_flat(official, tmp_path / "flat")
    assert inspect_layout(flat).kind == "flat"
    w = load_ebnerd(flat, heldout_fraction=fraction)
    beh = pl.read_parquet(flat / "behaviors.parquet")
    t0, t1 = beh["impression_time"].min(), beh["impression_time"].max()
    cutoff = t0 + (t1 - t0) * (1 - fraction)
    per_imp = w.impressions.group_by("impression_id").agg(
        pl.col("shown_at").first(),
        pl.col("is_heldout").all(),
        pl.col("is_heldout").any().alias("a"),
    )
    assert (per_imp["is_heldout"] == per_imp["a"]).all()  # whole impressions, never halves
    assert (per_imp["is_heldout"] == (per_imp["shown_at"] >= cutoff)).all()
    assert w.heldout_start == per_imp.filter("is_heldout")["shown_at"].min()
    assert w.heldout_start >= cutoff


def test_heldout_fraction_must_be_a_fraction(official: Path) -> None:
    with pytest.raises(ValueError, match="heldout_fraction"):
        read_ebnerd(official, heldout_fraction=1.0)


def test_topic_follow_rule() -> None:
    articles = pl.DataFrame(
        {"article_id": [1, 2, 3, 4], "topic": [10, 20, 30, 40]},
        schema={"article_id": pl.Int64, "topic": pl.Int32},
    )
    # user 1: 20 reads; topic 10 x3 (15%: follows, the share bound is inclusive), topic 20
    # x2 (10%), topic 30 x15. user 2: topic 40 x2 only (100% but under 3 reads).
    reads = pl.DataFrame(
        {
            "user_id": [1] * 20 + [2] * 2,
            "article_id": [1] * 3 + [2] * 2 + [3] * 15 + [4] * 2,
        }
    )
    got = derive_topic_follows(reads, articles, min_share=0.15, min_reads=3)
    assert got.rows() == [(1, 10), (1, 30)]
    got = derive_topic_follows(reads, articles, min_share=0.2, min_reads=2)
    assert got.rows() == [(1, 30), (2, 40)]


def test_world_topic_follows_come_from_history(world: World) -> None:
    reads = world.engagements.filter(pl.col("impression_id").is_null())
    expected = derive_topic_follows(reads, world.articles)
    assert world.topic_follows.sort("user_id", "topic").rows() == expected.rows()
    assert world.topic_follows.height > 0


@pytest.mark.skipif(not SAMPLE.is_dir(), reason="real EBNeRD sample not present")
def test_real_sample(tmp_path: Path) -> None:
    for name in ("behaviors.parquet", "history.parquet"):
        schema = pq.read_schema(SAMPLE / name)
        layout = BEHAVIORS_SCHEMA if name.startswith("behaviors") else HISTORY_SCHEMA
        for f in layout:
            assert same_logical_type(schema.field(f.name).type, f.type), f.name
        shutil.copy(SAMPLE / name, tmp_path / name)
    beh = pl.read_parquet(tmp_path / "behaviors.parquet")
    hist = pl.read_parquet(tmp_path / "history.parquet")
    seen = article_first_seen(beh, hist)
    write_articles_for_ids(seen["article_id"], tmp_path / "articles.parquet", first_seen=seen)

    w = load_ebnerd(tmp_path)
    assert w.impressions["impression_id"].n_unique() == 1046
    assert w.impressions.height == beh["article_ids_inview"].list.len().sum()
    assert w.impressions["user_id"].n_unique() == 38
    assert w.users.height == 44  # six users have history but no logged impression
    assert w.window_start == datetime(2023, 2, 2, 7, 0, 31)
    # No impression shows an article before it was published.
    pub = w.impressions.join(w.articles, on="article_id")
    assert (pub["published_at"] < pub["shown_at"]).all()

    result = evaluate_baselines(w)
    heldout = w.impressions.filter("is_heldout")["impression_id"].n_unique()
    assert set(result["baseline"]) == {
        *("random", "popularity", "recency", "read_time"),
        *("popularity_all_time", "item_knn", "als", "ease"),
    }
    assert (result["n_impressions"] == heldout).all()
    for col in ("auc", "mrr", "ndcg@5", "ndcg@10"):
        assert result[col].is_between(0.0, 1.0).all()
    by_name = {r["baseline"]: r for r in result.to_dicts()}
    assert by_name["popularity"]["auc"] > 0.5


def test_candidate_window_rule() -> None:
    from datetime import timedelta

    from feed_dagster.ebnerd.mapping import derive_candidate_window

    t0 = datetime(2026, 1, 10)
    articles = pl.DataFrame(
        {"article_id": list(range(100)), "published_at": [t0] * 100}
    ).with_columns(pl.col("published_at").cast(pl.Datetime("us")))

    def shown(hours: list[float]) -> pl.DataFrame:
        return pl.DataFrame(
            {
                "article_id": list(range(len(hours))),
                "shown_at": [t0 + timedelta(hours=h) for h in hours],
            }
        ).with_columns(pl.col("shown_at").cast(pl.Datetime("us")))

    # Fresh news keeps the 48 h floor.
    assert derive_candidate_window(shown([1.0] * 100), articles) == timedelta(hours=48)
    # 96% of shown articles at most 100.2 h old, 4 ancient outliers: 101 h (rounded up),
    # not the outliers' 10,000 h.
    ages = [100.2] * 96 + [10_000.0] * 4
    assert derive_candidate_window(shown(ages), articles) == timedelta(hours=101)
    # Shown before their stated publication time: ignored; nothing usable: the floor.
    assert derive_candidate_window(shown([-5.0] * 10), articles) == timedelta(hours=48)


def test_world_carries_the_derived_window(world: World) -> None:
    from feed_dagster.data.world_tables import window_from_info, world_info

    assert world.candidate_window is not None
    assert world.candidate_window.total_seconds() >= 48 * 3600
    assert world.candidate_window.total_seconds() % 3600 == 0
    info = world_info(world, "ebnerd").row(0, named=True)
    assert window_from_info(info) == world.candidate_window
