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
