"""Selector and post-selection filters: top k, conversation dedupe, the served cut."""

from __future__ import annotations

import polars as pl

from feed_dagster.pipeline.selection import dedupe_conversations, select_top_k, serve


def frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [2, 1, 1, 1, 1, 1, 2],
            "article_id": [9, 1, 2, 3, 4, 5, 8],
            "conversation_id": [9, 1, 1, None, 4, 4, 9],
            "score": [1.0, 0.9, 0.95, 0.5, 0.5, 0.7, 2.0],
        }
    )


def test_select_top_k_per_user_best_first() -> None:
    out = select_top_k(frame(), 3)
    # Ties (0.5, 0.5) break on the lower article id.
    assert out.select("user_id", "article_id").rows() == [(1, 2), (1, 1), (1, 5), (2, 8), (2, 9)]
    assert select_top_k(frame(), 10).height == frame().height


def test_dedupe_conversations_keeps_best_per_thread() -> None:
    out = dedupe_conversations(select_top_k(frame(), 10))
    # User 1: thread 1 keeps 2 (0.95) over 1, thread 4 keeps 5 over 4, 3 has no thread id.
    assert out.select("user_id", "article_id").rows() == [(1, 2), (1, 5), (1, 3), (2, 8)]


def test_serve_positions_and_cut() -> None:
    out = serve(dedupe_conversations(select_top_k(frame(), 10)), 2)
    assert out.select("user_id", "article_id", "position").rows() == [
        (1, 2, 1),
        (1, 5, 2),
        (2, 8, 1),
    ]


def network_frame() -> pl.DataFrame:
    """User 1: four in-network posts scoring above three out-of-network ones; user 2: one
    out-of-network post only; user 3: in-network posts only."""
    return pl.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 1, 1, 1, 2, 3, 3],
            "article_id": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            "in_network": [True, True, True, True, False, False, False, False, True, True],
            "score": [0.9, 0.8, 0.7, 0.6, 0.003, 0.002, 0.001, 0.5, 0.4, 0.3],
        }
    )


def test_reserved_slots_go_to_the_best_out_of_network_posts() -> None:
    out = select_top_k(network_frame(), 4, reserve=2)
    # User 1 keeps its two best in-network posts and its two best out-of-network ones,
    # still best first; users without enough out-of-network posts fill with the others.
    assert out.select("user_id", "article_id").rows() == [
        (1, 1),
        (1, 2),
        (1, 5),
        (1, 6),
        (2, 8),
        (3, 9),
        (3, 10),
    ]
    assert select_top_k(network_frame(), 4).filter(pl.col("user_id") == 1)[
        "article_id"
    ].to_list() == [1, 2, 3, 4]


def test_serve_keeps_the_reserved_slots() -> None:
    ranked = select_top_k(network_frame(), 10)
    out = serve(ranked, 3, reserve=1)
    assert out.select("user_id", "article_id", "position").rows() == [
        (1, 1, 1),
        (1, 2, 2),
        (1, 5, 3),
        (2, 8, 1),
        (3, 9, 1),
        (3, 10, 2),
    ]
    # A reserve as large as the feed serves the best out-of-network posts alone.
    assert serve(ranked, 2, reserve=2).filter(pl.col("user_id") == 1)["article_id"].to_list() == [
        5,
        6,
    ]
