import hashlib
import io

import numpy as np
import polars as pl
import pytest

from feed_dagster.data.schema import ACTIONS, TABLE_SCHEMAS
from feed_dagster.graph.stats import account_stats, degree_summary, in_degrees, read_edge_list
from feed_dagster.world import generate_world, world_config
from feed_dagster.world.vocabulary import TOPICS


def _digest(world) -> str:
    h = hashlib.sha256()
    for name, df in sorted(world.tables().items()):
        buf = io.BytesIO()
        df.write_ipc(buf)
        h.update(name.encode() + buf.getvalue())
    return h.hexdigest()


def test_same_seed_gives_identical_bytes(tiny_world):
    again = generate_world(world_config("tiny"))
    assert _digest(again) == _digest(tiny_world)


def test_other_seed_gives_other_world(tiny_world):
    assert _digest(generate_world(world_config("tiny", seed=1))) != _digest(tiny_world)


def test_tables_follow_the_canonical_schema(tiny_world):
    for name, df in tiny_world.tables().items():
        assert dict(df.schema) == TABLE_SCHEMAS[name], name


def test_follow_in_degree_is_heavy_tailed(tiny_world):
    followers = account_stats(tiny_world.users, tiny_world.follows)["followers"].to_numpy()
    s = degree_summary(followers)
    assert s["max_over_mean"] > 8  # hubs exist
    assert s["gini"] > 0.5  # followers are concentrated
    assert s["median"] < s["mean"]  # right-skewed


def test_degree_shape_is_comparable_to_wiki_vote(shared_data):
    path = shared_data / "wiki_vote" / "wiki-vote.txt.gz"
    if not path.exists():
        pytest.skip("shared Wiki-Vote graph not present")
    src, dst = read_edge_list(str(path))
    real = degree_summary(in_degrees(src, dst))
    world = generate_world(world_config("demo", n_posts=2_000, sessions_per_user_day=0.1))
    synth = degree_summary(account_stats(world.users, world.follows)["followers"].to_numpy())
    # Both heavy-tailed: power-law tail exponents in the usual range of social graphs, and
    # strong concentration of in-links.
    for s in (real, synth):
        assert 1.8 < s["tail_alpha"] < 4.5
        assert s["gini"] > 0.6
        assert s["max_over_mean"] > 25


def test_engagement_rates_are_plausible(tiny_world):
    imp, eng = tiny_world.impressions, tiny_world.engagements
    rates = {a: eng[a].sum() / imp.height for a in ACTIONS}
    assert 0.1 < rates["click"] < 0.5
    assert rates["favorite"] > rates["reply"] > 0
    assert 0 < rates["report"] < rates["not_interested"] < 0.1
    # Engaged rows belong to a shown slate.
    joined = eng.join(imp, on=["impression_id", "article_id"], how="anti")
    assert joined.height == 0
    assert (eng.filter(pl.col("click"))["dwell_seconds"] > 0).all()


def test_ground_truth_kept_for_every_heldout_impression(tiny_world):
    held = tiny_world.impressions.filter("is_heldout")
    truth = tiny_world.impression_truth
    assert held.height == truth.height > 0
    assert held.join(truth, on=["impression_id", "article_id"], how="anti").height == 0
    p = truth["true_p_click"].to_numpy()
    assert np.all((p > 0) & (p < 1))
    # The truth explains outcomes: clicked rows had higher true click probability.
    lab = held.join(
        tiny_world.engagements.select("impression_id", "article_id", "click"),
        on=["impression_id", "article_id"],
        how="left",
    ).join(truth, on=["impression_id", "article_id"])
    clicked = lab.filter(pl.col("click").fill_null(False))["true_p_click"].mean()
    other = lab.filter(~pl.col("click").fill_null(False))["true_p_click"].mean()
    assert clicked > other + 0.05


def test_posts_threads_are_consistent(tiny_world):
    a = tiny_world.articles
    originals = a.filter(pl.col("kind") == "original")
    assert (originals["conversation_id"] == originals["article_id"]).all()
    assert originals["parent_id"].null_count() == originals.height
    replies = a.filter(pl.col("kind") == "reply")
    parents = replies.join(a, left_on="parent_id", right_on="article_id", suffix="_p")
    assert parents.height == replies.height
    assert (parents["published_at_p"] <= parents["published_at"]).all()
    reposts = a.filter(pl.col("kind") == "repost").join(
        a, left_on="parent_id", right_on="article_id", suffix="_p"
    )
    assert (reposts["kind_p"] != "repost").all()
    assert (reposts["text"] == reposts["text_p"]).all()


def test_post_texts_are_8_to_14_words_mostly_of_their_topic_with_a_title(tiny_world):
    a = tiny_world.articles
    words = a["text"].str.split(" ")
    assert words.list.len().min() >= 8 and words.list.len().max() <= 14
    first = words.list.head(5).list.join(" ")
    assert (a["title"] == first.str.slice(0, 1).str.to_uppercase() + first.str.slice(1)).all()
    vocabulary = pl.DataFrame(
        [(topic, w) for topic, ws in TOPICS.items() for w in ws],
        schema=["topic_name", "word"],
        orient="row",
    ).with_columns(pl.lit(True).alias("of_topic"))
    used = (
        a.filter(pl.col("kind") == "original")
        .select("topic_name", pl.col("text").str.split(" ").alias("word"))
        .explode("word")
        .join(vocabulary, on=["topic_name", "word"], how="left")
    )
    # 70% of the words are drawn from the topic's vocabulary, the rest from common words.
    assert 0.65 < used["of_topic"].fill_null(False).mean() < 0.75


def test_unknown_scale_and_setting_are_refused():
    with pytest.raises(ValueError, match="unknown scale"):
        world_config("huge")
    with pytest.raises(ValueError, match="unknown world settings"):
        world_config("tiny", n_userz=3)


def test_slates_only_show_posts_published_before_the_session(tiny_world):
    shown = tiny_world.impressions.join(
        tiny_world.articles.select("article_id", "published_at"), on="article_id"
    )
    assert (shown["published_at"] <= shown["shown_at"]).all()
    age = (shown["shown_at"] - shown["published_at"]).dt.total_hours()
    assert age.max() <= 48


def test_texts_joined_in_blocks_are_the_texts_joined_at_once(tiny_world, monkeypatch):
    import feed_dagster.world.generate as generate_module

    monkeypatch.setattr(generate_module, "TEXT_ROWS", 700)  # the tiny world's 3,000 posts in 5
    blocked = generate_world(world_config("tiny")).articles
    assert blocked.select("title", "text").equals(tiny_world.articles.select("title", "text"))
