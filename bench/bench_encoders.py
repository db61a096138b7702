"""Article encoder throughput and the incremental re-encoding saving.

Articles are synthetic-world-like: ~30 words per text (70% from the topic's vocabulary),
a 5-word title and a topic id.

    python bench/bench_encoders.py                   # 100k articles, MiniLM on 1k if installed
    python bench/bench_encoders.py --n 20000 --no-write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import machine, markdown_table, median_time, peak_rss_mb, write_section  # noqa: E402

from feed_dagster.embeddings import (  # noqa: E402
    LexicalEncoder,
    MiniLMEncoder,
    update_embeddings,
)
from feed_dagster.world.vocabulary import COMMON, TOPICS  # noqa: E402


def synthetic_articles(n: int, words: int = 30, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    names = list(TOPICS)
    per_topic = len(TOPICS[names[0]])
    vocab = np.array([w for name in names for w in TOPICS[name]])
    common = np.array(COMMON)
    topic = rng.integers(0, len(names), n)
    picks = vocab[topic[:, None] * per_topic + rng.integers(0, per_topic, (n, words))]
    fillers = common[rng.integers(0, len(common), (n, words))]
    tokens = np.where(rng.random((n, words)) < 0.7, picks, fillers)
    text = pl.Series(tokens.tolist()).list.join(" ")
    return pl.DataFrame(
        {
            "article_id": np.arange(n, dtype=np.int64),
            "title": pl.Series(tokens[:, :5].tolist()).list.join(" ").str.to_titlecase(),
            "text": text,
            "topic": topic.astype(np.int32),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="articles for the lexical encoder")
    parser.add_argument("--minilm-n", type=int, default=1_000, help="articles for MiniLM (0: skip)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    articles = synthetic_articles(args.n)
    rows = []
    for dim in (64, 128):
        enc = LexicalEncoder(dim=dim)
        enc.encode(articles.head(1000))  # warm up polars' regex and thread pool
        seconds, _ = median_time(lambda e=enc: e.encode(articles), repeats=args.repeats)
        rows.append(
            [f"lexical, dim {dim}", f"{args.n:,}", f"{seconds:.2f}", f"{args.n / seconds:,.0f}"]
        )
        print(rows[-1], flush=True)

    # Incremental: a previous full table, then 1% of articles edited and 1% new.
    enc = LexicalEncoder()
    previous, _ = update_embeddings(articles, None, enc)
    n_new = max(1, args.n // 100)
    edited = articles.with_columns(
        pl.when(pl.col("article_id") % 100 == 0)
        .then(pl.col("text") + " update")
        .otherwise(pl.col("text"))
        .alias("text")
    )
    fresh = synthetic_articles(n_new, seed=1).with_columns(pl.col("article_id") + args.n)
    current = pl.concat([edited, fresh])
    seconds, _ = median_time(lambda: update_embeddings(current, previous, enc), repeats=3)
    _, stats = update_embeddings(current, previous, enc)
    rows.append(
        [
            f"incremental lexical ({stats.n_encoded:,} encoded, {stats.n_reused:,} reused)",
            f"{len(current):,}",
            f"{seconds:.2f}",
            f"{len(current) / seconds:,.0f}",
        ]
    )
    print(rows[-1], flush=True)

    if args.minilm_n:
        try:
            minilm = MiniLMEncoder()
        except ImportError as exc:
            print(f"skipping MiniLM: {exc}")
        else:
            sample = articles.head(args.minilm_n)
            minilm.encode(sample.head(32))  # load the model outside the timing
            seconds, _ = median_time(lambda: minilm.encode(sample), repeats=2)
            rows.append(
                [
                    "MiniLM-L6 (384-d, CPU)",
                    f"{args.minilm_n:,}",
                    f"{seconds:.2f}",
                    f"{args.minilm_n / seconds:,.0f}",
                ]
            )
            print(rows[-1], flush=True)

    body = "\n".join(
        [
            "## Article encoders (`bench/bench_encoders.py`)",
            "",
            f"Machine: {machine()} (shared with other jobs). Synthetic ~30-word articles; "
            f"median of {args.repeats} runs (lexical) or 2-3 runs (others). "
            f"Peak RSS {peak_rss_mb():,.0f} MiB.",
            "",
            markdown_table(["encoder", "articles", "seconds", "articles/s"], rows),
        ]
    )
    print(body)
    if not args.no_write:
        write_section("encoders", body)


if __name__ == "__main__":
    main()
