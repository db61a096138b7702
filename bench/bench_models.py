"""Benchmark of the learned models: training time, retrieval recall, held-out ranking quality.

Usage: .venv/bin/python bench/bench_models.py [--scale demo] [--seeds 3] [--no-ebnerd]
       [--no-catalog] [--no-write]

Three data shapes, each with the same protocol: the news/social world (`synthetic:demo`),
the catalog world (`synthetic:catalog`: long-lived items, collaborative signal) and a
synthetic EBNeRD folder (clicks only, no authors, no follows). On each it trains the two-tower
model and the ranker, evaluates them on the held-out impressions against the baselines, the
classic collaborative-filtering peers (all-time popularity, item-kNN, ALS, EASE) fitted in
the same run, and the oracle (true click probabilities) where the data has one, and runs the
promotion gate. The catalog and EBNeRD shapes train quickly, so they run over several seeds
(world and training) and report medians. Wall and CPU seconds are both reported: on a shared
machine wall time includes waiting for the cores.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from report import machine, markdown_table, peak_rss_mb, write_section  # noqa: E402

from feed_dagster.data.schema import World  # noqa: E402
from feed_dagster.ebnerd.load import load_ebnerd  # noqa: E402
from feed_dagster.ebnerd.synth import write_synthetic_ebnerd  # noqa: E402
from feed_dagster.embeddings import LexicalEncoder  # noqa: E402
from feed_dagster.models.evaluate import evaluate_models  # noqa: E402
from feed_dagster.models.promotion import promotion_decision  # noqa: E402
from feed_dagster.models.ranker import load_ranker  # noqa: E402
from feed_dagster.models.train import (  # noqa: E402
    TWO_TOWER_TRAIN,
    TrainConfig,
    TrainResult,
    prepare_training_data,
    train_ranker,
    train_two_tower,
    two_tower_recall,
)
from feed_dagster.models.two_tower import load_two_tower  # noqa: E402
from feed_dagster.world import generate_world, world_config  # noqa: E402
from feed_dagster.world.catalog import catalog_config, generate_catalog  # noqa: E402


class Clock:
    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def run(
    name: str,
    world: World,
    ranker_train: TrainConfig,
    tt_train: TrainConfig,
    recent_hours: float | None,
) -> dict:
    print(f"\n== {name}: {world.impressions.height:,} impression rows, "
          f"{world.users.height:,} users, {world.articles.height:,} articles")  # fmt: skip
    c = Clock()
    vectors = LexicalEncoder().encode(world.articles)
    data = prepare_training_data(world, vectors)
    prep = c.read()
    print(f"encode + training data: {prep[0]:.1f} s wall; ranker groups train/valid/held-out "
          f"{len(data.ranker_train):,}/{len(data.ranker_valid):,}/{len(data.ranker_heldout):,}; "
          f"retrieval positives {len(data.retrieval_train):,}; actions {data.actions}; "
          f"dropped impossible rows {data.dropped_rows:,}")  # fmt: skip

    c = Clock()
    tt: TrainResult = train_two_tower(data, train=tt_train, recent_hours=recent_hours)
    tt_time = c.read()
    print(f"two-tower: {tt_time[0]:.1f} s wall, {tt_time[1]:.1f} s CPU, {tt.n_params:,} params, "
          f"epochs {len(tt.history)} (best {tt.best_epoch})")  # fmt: skip
    c = Clock()
    rk: TrainResult = train_ranker(data, train=ranker_train)
    rk_time = c.read()
    print(f"ranker: {rk_time[0]:.1f} s wall, {rk_time[1]:.1f} s CPU, {rk.n_params:,} params, "
          f"epochs {len(rk.history)} (best {rk.best_epoch})")  # fmt: skip
    for h in rk.history:
        print("  ranker epoch", {k: round(v, 4) for k, v in h.items()})

    two_tower = load_two_tower(tt.state_dict, tt.config)
    ranker = load_ranker(rk.state_dict, rk.config)
    recall = two_tower_recall(two_tower, data.retrieval_heldout, data.catalog,
                              recent_hours=recent_hours)  # fmt: skip
    print(f"two-tower held-out recall: {recall}")
    c = Clock()
    table = evaluate_models(world, data, ranker=ranker, two_tower=two_tower)
    eval_time = c.read()
    with pl.Config(tbl_cols=20, tbl_width_chars=200, tbl_rows=20):
        print(table.select("method", "auc", "mrr", "ndcg@5", "ndcg@10", "ne_click"))
    passed, reasons = promotion_decision(table)
    print("promotion:", "PASS" if passed else "REFUSED", reasons)
    return {
        "name": name,
        "world": world,
        "data": data,
        "prep": prep,
        "tt": tt,
        "tt_time": tt_time,
        "rk": rk,
        "rk_time": rk_time,
        "recall": recall,
        "table": table,
        "eval_time": eval_time,
        "promotion": (passed, reasons),
        "recent_hours": recent_hours,
    }


CLASSIC = ("popularity_all_time", "item_knn", "als", "ease")


def margins(table: pl.DataFrame) -> dict[str, float]:
    """Ranker minus the best classic peer (AUC, nDCG@10), and the oracle gap when known."""
    rows = {r["method"]: r for r in table.iter_rows(named=True)}
    out = {"ranker_auc": rows["ranker"]["auc"], "ranker_ndcg": rows["ranker"]["ndcg@10"]}
    peers = [rows[m] for m in CLASSIC if m in rows]
    best_auc = max(peers, key=lambda r: r["auc"])
    best_ndcg = max(peers, key=lambda r: r["ndcg@10"])
    out.update(
        best_peer_auc=best_auc["auc"],
        best_peer_ndcg=best_ndcg["ndcg@10"],
        auc_margin=out["ranker_auc"] - best_auc["auc"],
        ndcg_margin=out["ranker_ndcg"] - best_ndcg["ndcg@10"],
        oracle_gap=rows["oracle"]["auc"] - out["ranker_auc"] if "oracle" in rows else math.nan,
    )
    out["best_peer"] = f"{best_auc['method']} / {best_ndcg['method']}"
    return out


def summary(results: list[dict]) -> list[str]:
    """One row per data shape: medians over its seeds."""
    by_shape: dict[str, list[dict]] = {}
    for r in results:
        by_shape.setdefault(r["shape"], []).append(r)
    rows = []
    for shape, rs in by_shape.items():
        ms = [margins(r["table"]) for r in rs]

        def med(key: str, ms: list[dict] = ms) -> float:
            return statistics.median(m[key] for m in ms)

        gates = sum(r["promotion"][0] for r in rs)
        rows.append(
            [
                shape,
                str(len(rs)),
                f"{med('ranker_auc'):.4f}",
                f"{med('best_peer_auc'):.4f}",
                f"**{med('auc_margin'):+.4f}**",
                f"{med('ranker_ndcg'):.4f}",
                f"{med('best_peer_ndcg'):.4f}",
                f"**{med('ndcg_margin'):+.4f}**",
                "" if math.isnan(med("oracle_gap")) else f"{med('oracle_gap'):.4f}",
                f"{gates}/{len(rs)}",
                ms[0]["best_peer"],
            ]
        )
    header = [
        *("shape", "seeds", "ranker AUC", "best peer AUC", "margin", "ranker nDCG@10"),
        *("best peer nDCG@10", "margin", "oracle gap (AUC)", "gate passed", "best peer"),
    ]
    return [
        "### Summary: the ranker against the best classic peer (medians over seeds)",
        "",
        markdown_table(header, rows),
        "",
    ]


def window_text(hours: float | None) -> str:
    return "before" if hours is None else f"in the {hours:.0f} h before"


def _fmt(x: object) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def section(results: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "## Models: two-tower retrieval and transformer ranker",
        "",
        f"`.venv/bin/python bench/bench_models.py` on {machine()}; torch threads "
        f"{args.threads}; load average at the end {os.getloadavg()[0]:.1f} (the machine is "
        f"shared, so wall time includes waiting for a core; CPU seconds are the work). "
        f"Peak RSS {peak_rss_mb():.0f} MiB.",
        "",
        *summary(results),
        "The full tables below are for seed 0 of each shape.",
        "",
    ]
    for r in results:
        if r["seed"] != 0:
            continue
        d = r["data"]
        total_wall = r["tt_time"][0] + r["rk_time"][0]
        total_cpu = r["tt_time"][1] + r["rk_time"][1]
        lines += [
            f"### {r['name']}",
            "",
            f"{r['world'].impressions.height:,} impression rows; ranker groups train/valid/"
            f"held-out {len(d.ranker_train):,}/{len(d.ranker_valid):,}/"
            f"{len(d.ranker_heldout):,}; heads: {', '.join(d.actions)}.",
            "",
            markdown_table(
                ["step", "wall s", "CPU s", "params", "epochs (best)"],
                [
                    [
                        "encode + build training data",
                        f"{r['prep'][0]:.1f}",
                        f"{r['prep'][1]:.1f}",
                        "",
                        "",
                    ],
                    [
                        "train two-tower",
                        f"{r['tt_time'][0]:.1f}",
                        f"{r['tt_time'][1]:.1f}",
                        f"{r['tt'].n_params:,}",
                        f"{len(r['tt'].history)} ({r['tt'].best_epoch})",
                    ],
                    [
                        "train ranker",
                        f"{r['rk_time'][0]:.1f}",
                        f"{r['rk_time'][1]:.1f}",
                        f"{r['rk'].n_params:,}",
                        f"{len(r['rk'].history)} ({r['rk'].best_epoch})",
                    ],
                    ["**both models**", f"**{total_wall:.1f}**", f"**{total_cpu:.1f}**", "", ""],
                    [
                        "evaluate all methods",
                        f"{r['eval_time'][0]:.1f}",
                        f"{r['eval_time'][1]:.1f}",
                        "",
                        "",
                    ],
                ],
            ),  # fmt: skip
            "",
            "Two-tower held-out recall (exact dot-product top-k over the articles published "
            f"{window_text(r['recent_hours'])} each engagement): "
            f"recall@100 {r['recall']['recall@100']:.3f}, "
            f"recall@1000 {r['recall']['recall@1000']:.3f} "
            f"({int(r['recall']['n_queries']):,} held-out positives; a mean corpus of "
            f"{r['recall']['corpus_mean']:,.0f} articles, where random order would get "
            f"{r['recall']['chance@100']:.3f} / {r['recall']['chance@1000']:.3f}).",
            "",
        ]
        t = r["table"]
        cols = ["method", "auc", "mrr", "ndcg@5", "ndcg@10", "ne_click"]
        cols += [c for c in t.columns if c.startswith("auc_") and c != "auc_click"][:3]
        rows = [[_fmt(v) for v in row] for row in t.select(cols).rows()]
        lines.append(markdown_table(cols, rows))
        auc = dict(zip(t["method"], t["auc"], strict=True))
        notes = []
        if "oracle" in auc:
            notes.append(f"ranker AUC {auc['ranker']:.4f} vs oracle {auc['oracle']:.4f}: gap "
                         f"{auc['oracle'] - auc['ranker']:.4f}")  # fmt: skip
        best_base = max((v, k) for k, v in auc.items() if k not in ("ranker", "oracle"))
        notes.append(f"best other method: {best_base[1]} {best_base[0]:.4f}")
        passed, reasons = r["promotion"]
        notes.append(f"promotion gate: {'PASS' if passed else 'REFUSED'}")
        lines += ["", "; ".join(notes) + ".", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", default="demo")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ranker-epochs", type=int, default=TrainConfig().epochs)
    ap.add_argument("--tt-epochs", type=int, default=TWO_TOWER_TRAIN.epochs)
    ap.add_argument("--no-ebnerd", action="store_true")
    ap.add_argument("--no-catalog", action="store_true")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the catalog and EBNeRD runs")
    ap.add_argument("--ebnerd-users", type=int, default=1000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    ranker_train = replace(TrainConfig(), epochs=args.ranker_epochs, threads=args.threads)
    tt_train = replace(TWO_TOWER_TRAIN, epochs=args.tt_epochs, threads=args.threads)

    results = []

    def add(shape: str, name: str, world: World, seed: int, recent_hours: float | None) -> None:
        rk, tt = replace(ranker_train, seed=seed), replace(tt_train, seed=seed)
        r = run(name, world, rk, tt, recent_hours)
        results.append({**r, "shape": shape, "seed": seed})

    world = generate_world(world_config(args.scale))
    add(f"synthetic:{args.scale}", f"synthetic:{args.scale}", world, 0, 48.0)
    for seed in range(args.seeds):
        if not args.no_catalog:
            cat = generate_catalog(catalog_config("catalog", seed=seed))
            add("synthetic:catalog", f"synthetic:catalog (seed {seed})", cat, seed, None)
        if not args.no_ebnerd:
            with tempfile.TemporaryDirectory() as tmp:
                folder = write_synthetic_ebnerd(
                    Path(tmp) / "ebnerd", users=args.ebnerd_users, articles=3000,
                    impressions_per_user=10, seed=seed,
                )  # fmt: skip
                eb = load_ebnerd(folder)
            # The synthetic EBNeRD slates show articles of the last 72 h: the retrieval corpus.
            name = f"EBNeRD synthetic ({args.ebnerd_users} users, seed {seed})"
            add("EBNeRD synthetic", name, eb, seed, 72.0)
    if not args.no_write:
        write_section("models", section(results, args))


if __name__ == "__main__":
    main()
