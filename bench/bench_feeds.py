"""Feed precompute with the learned models: throughput, ranker FLOP/s and offline quality.

    .venv/bin/python bench/bench_feeds.py                # demo world, 3 repeats
    .venv/bin/python bench/bench_feeds.py --no-quality --repeats 1

Self-contained: generates the world in-process, encodes content vectors with the lexical
encoder, trains the two-tower model and the ranker with their default configs (cached under
data/bench/feeds_models/<world key>/ so a rerun on the same world skips training), writes
the item-tower vectors to a LanceDB table in a temporary directory, then measures

1. throughput of `build_feeds` for every user at `world.now` with TwoTowerRetriever +
   RankerScorer, and with the table fallbacks for comparison;
2. the ranker's achieved FLOP/s against a float32 matmul peak measured in the same run;
3. recall@35 of held-out positive engagements for feeds built at `world.heldout_start` from
   data before it, against a chronological-following and a popularity feed.

Writes the "feeds" section of docs/BENCHMARKS.md (unless --no-write).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import machine, markdown_table, write_section  # noqa: E402

import feed_dagster.models.serve as serve  # noqa: E402
from feed_dagster.data.schema import World  # noqa: E402
from feed_dagster.embeddings import LexicalEncoder  # noqa: E402
from feed_dagster.feeds.build import build_feeds  # noqa: E402
from feed_dagster.feeds.evaluation import (  # noqa: E402
    CHRONOLOGICAL,
    DEFAULT_SAMPLE,
    POPULARITY,
    evaluate_feeds,
)
from feed_dagster.feeds.model_backends import (  # noqa: E402
    RankerScorer,
    TwoTowerRetriever,
    serving_features,
)
from feed_dagster.memory import peak_rss_mib, reset_peak_rss, rss_mib  # noqa: E402
from feed_dagster.models.engagement_log import N_ACTIONS  # noqa: E402
from feed_dagster.models.layers import CatalogTensors  # noqa: E402
from feed_dagster.models.ranker import (  # noqa: E402
    PhoenixRanker,
    context_runs,
    load_ranker,
    predict,
    ranker_batch,
)
from feed_dagster.models.ranker_data import N_PEER_FEATURES, PROFILE_FEATURES  # noqa: E402
from feed_dagster.models.serve import ServingContext, item_vectors_of  # noqa: E402
from feed_dagster.models.store import ModelStore  # noqa: E402
from feed_dagster.models.train import (  # noqa: E402
    prepare_training_data,
    ranker_validation,
    train_ranker,
    train_two_tower,
)
from feed_dagster.models.two_tower import TwoTower, load_two_tower  # noqa: E402
from feed_dagster.pipeline import (  # noqa: E402
    PipelineConfig,
    PipelineStats,
    PopularityRetriever,
    TopicAffinityScorer,
)
from feed_dagster.pipeline.tables import candidate_window  # noqa: E402
from feed_dagster.vectors import (  # noqa: E402
    ensure_index,
    open_vectors,
    retrieval_frame,
    write_vectors,
)
from feed_dagster.world import generate_world, world_config  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "data" / "bench" / "feeds_models"
RANKER, TWO_TOWER = "ranker", "two_tower"
VECTOR_TABLE = "article_vectors"
SERVED = 35
# Stage labels of run_pipeline's stats.seconds, grouped for the report (first match wins).
STAGE_GROUPS: list[tuple[str, Callable[[str], bool]]] = [
    ("hydration (query + candidates)", lambda s: s.startswith(("query_hydrator.", "hydrator."))),
    ("source: in-network", lambda s: s == "source.in_network"),
    ("source: out-of-network (retriever)", lambda s: s == "source.out_of_network"),
    ("filters", lambda s: s.startswith("filter.")),
    ("scorer model", lambda s: s == "scorer.model"),
    ("score rules (weights, diversity, OON)", lambda s: s.startswith("scorer.")),
    ("selection + serve", lambda s: s.startswith(("selector.", "post_selection."))),
]


def group_of(stage: str) -> str:
    for name, match in STAGE_GROUPS:
        if match(stage):
            return name
    return stage


# -- memory --------------------------------------------------------------------------------


# -- the ranker's forward, timed ----------------------------------------------------------


@dataclass
class ForwardLog:
    """What score_candidates spent in feature building and in the forward, per call."""

    feature_seconds: float = 0.0
    forward_seconds: float = 0.0
    groups: int = 0  # candidate groups (rows of the [G, C] tensors)
    contexts: int = 0  # distinct contexts (user + history) encoded, once each
    item_rows: int = 0  # distinct catalog rows among the candidates, per predict call
    slots: int = 0  # G * C, padding included
    real: int = 0  # real candidates
    shapes: set[tuple[int, int]] = field(default_factory=set)  # (C, history length)
    sample: Any = None  # the first RankerData, for the FLOP counter

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


LOG = ForwardLog()
# While set, the instrumented serving path scores with `legacy_predict` (the baseline).
USE_LEGACY_PREDICT = [False]


def instrument_serving() -> None:
    """Time the two halves of serve.score_candidates (features, forward) by wrapping the
    module-level functions it calls; results are unchanged."""
    build, predict = serve.build_serving_data, serve.predict

    def timed_build(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        out = build(*a, **kw)
        LOG.feature_seconds += time.perf_counter() - t
        return out

    def timed_predict(model: PhoenixRanker, data: Any, *a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        if USE_LEGACY_PREDICT[0]:
            out = legacy_predict(model, data, a[0] if a else kw["catalog"])
        else:
            out = predict(model, data, *a, **kw)
        LOG.forward_seconds += time.perf_counter() - t
        g, c = data.cand_item.shape
        LOG.groups += g
        LOG.contexts += len(context_runs(data)[0])
        LOG.item_rows += len(np.unique(data.cand_item))
        LOG.slots += g * c
        LOG.real += int(data.cand_mask.sum())
        LOG.shapes.add((c, data.history.item.shape[1]))
        if LOG.sample is None:
            LOG.sample = data
        return out

    serve.build_serving_data = timed_build
    serve.predict = timed_predict


def ranker_flops(
    model: PhoenixRanker, contexts: int, slots: int, h: int, item_rows: int | None = None
) -> dict[str, float]:
    """Matmul FLOPs (2 per multiply-add) of scoring `slots` candidate slots (padding
    included) against `contexts` contexts of a history of `h` tokens, as the ranker executes
    it: each context once (`predict`), or once per group when `contexts` = groups (the
    training forward, which `predict` ran per group before the context cache).

    Context = user token + h history tokens, L = h + 1. Per context: item encoder content
    Linear (content_dim -> d) and the history encoder's action (N_ACTIONS -> d) and dwell
    (1 -> d) Linears on the h history tokens; per block qkv 3d^2 on every context token, and
    in every block but the last the context's own update (attention over L keys, out d^2,
    FFN 2 ffn_mult d^2). Per candidate slot: content, profile, peer and affinity Linears;
    per block qkv 3d^2, scores against the L context keys + itself and the weighted sum of
    values 2 * 2d(L+1), out d^2, FFN 2 ffn_mult d^2; head d -> n_actions + 1. Embedding
    lookups, LayerNorm, softmax, GELU and the elementwise adds are not counted.

    `item_rows`: distinct catalog rows among the candidates, when the content Linear runs
    once per row (`predict`'s candidate tables) rather than once per slot (None).
    """
    cfg = model.cfg
    d, f, lyr = cfg.d_model, cfg.ffn_mult, cfg.n_layers
    L = h + 1
    mm = 2.0  # FLOPs per multiply-add
    cand_in = cfg.content_dim
    if model.profile is not None:
        cand_in += len(cfg.profile_inputs)
    if model.peer is not None:
        cand_in += N_PEER_FEATURES
    if model.affinity is not None:
        cand_in += 2
    ctx_encoder = mm * h * (cfg.content_dim + N_ACTIONS + 1) * d
    per_row = 0.0
    if item_rows is not None:
        cand_in -= cfg.content_dim
        per_row = mm * cfg.content_dim * d
    cand_encoder = mm * cand_in * d
    cand_layer = mm * (3 * d * d + d * d + f * d * d * 2) + mm * 2 * d * (L + 1)
    ctx_qkv = mm * 3 * d * d * L
    ctx_update = mm * (d * d + 2 * f * d * d) * L + mm * 2 * d * L * L
    per_context = ctx_encoder + lyr * ctx_qkv + (lyr - 1) * ctx_update
    per_slot = cand_encoder + lyr * cand_layer + mm * d * (len(cfg.actions) + 1)
    out = {
        "contexts (encoder + blocks)": contexts * per_context,
        "candidates (encoder + blocks + head)": slots * per_slot,
        "catalog rows (content Linear)": (item_rows or 0) * per_row,
    }
    out["total"] = sum(out.values())
    return out


def legacy_predict(model: PhoenixRanker, data: Any, cat: Any) -> tuple[np.ndarray, np.ndarray]:
    """`predict` as it ran before the context cache: the training forward on about 8,192
    candidate slots at a time, every group encoding its own context."""
    batch = max(1, 8192 // data.cand_item.shape[1])
    probs, dwell = [], []
    with torch.inference_mode():
        for s in range(0, len(data), batch):
            logits, d = model(ranker_batch(data, np.arange(s, min(len(data), s + batch))), cat)
            probs.append(torch.sigmoid(logits).numpy())
            dwell.append(torch.expm1(d.clamp(min=0)).numpy())
    return np.concatenate(probs), np.concatenate(dwell)


BF16 = "context once per user, bfloat16 autocast"


def forward_comparison(
    model: PhoenixRanker, data: Any, ctx: ServingContext, repeats: int
) -> dict[str, list[float]]:
    """Seconds of `predict`, of `predict` under a bfloat16 autocast (this CPU's matmul
    units run bfloat16 several times faster than float32) and of `legacy_predict` on the
    same groups, interleaved so all see the same load on a shared machine."""
    out: dict[str, list[float]] = {"context once per user": [], BF16: [], "context per group": []}
    for _ in range(repeats):
        t = time.perf_counter()
        predict(model, data, ctx.tensors)
        out["context once per user"].append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            predict(model, data, ctx.tensors)
        out[BF16].append(time.perf_counter() - t)
        t = time.perf_counter()
        legacy_predict(model, data, ctx.tensors)
        out["context per group"].append(time.perf_counter() - t)
    return out


def precision_auc(model: PhoenixRanker, world: World, vectors: np.ndarray) -> dict[str, float]:
    """Held-out click AUC of the ranker in float32 and under a bfloat16 autocast, on the
    held-out slates of `prepare_training_data` (labels the model never trained on)."""
    data = prepare_training_data(world, vectors)
    cat = CatalogTensors(data.catalog)
    fp32 = ranker_validation(model, data.ranker_heldout, cat)["valid_auc"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = ranker_validation(model, data.ranker_heldout, cat)["valid_auc"]
    return {"float32": fp32, "bfloat16": bf16, "slates": float(len(data.ranker_heldout))}


def counted_flops(model: PhoenixRanker, data: Any, ctx: ServingContext, groups: int) -> float:
    """FLOPs torch's FlopCounterMode sees in `predict` on the first `groups` groups."""
    from torch.utils.flop_counter import FlopCounterMode

    sample = data.take(np.arange(min(groups, len(data))))
    with FlopCounterMode(display=False) as counter:
        predict(model, sample, ctx.tensors, batch_size=len(sample))
    return float(counter.get_total_flops())


def matmul_peak(
    threads: int, n: int = 2048, repeats: int = 7, dtype: torch.dtype = torch.float32
) -> tuple[float, list[float]]:
    """Median FLOP/s of an n x n @ n x n matmul in `dtype` with `threads` intra-op threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, generator=gen).to(dtype)
        b = torch.randn(n, n, generator=gen).to(dtype)
        out = torch.empty(n, n, dtype=dtype)
        torch.mm(a, b, out=out)  # warm-up
        samples = []
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b, out=out)
            samples.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    flops = 2.0 * n**3
    return flops / statistics.median(samples), [flops / s for s in samples]


# -- models ---------------------------------------------------------------------------------


def world_key(scale: str, encoder: LexicalEncoder) -> str:
    """Cache key: the whole world config (seed included), the content encoder and the
    models' input layout (a model with other inputs cannot be reloaded)."""
    cfg = asdict(world_config(scale))
    inputs = {"profile": PROFILE_FEATURES, "actions": N_ACTIONS}
    text = json.dumps(
        {"world": cfg, "encoder": encoder.version, "inputs": inputs}, sort_keys=True, default=str
    )
    return f"{scale}-s{cfg['seed']}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def trained_models(
    world: World, vectors: np.ndarray, store: ModelStore, retrain: bool
) -> tuple[TwoTower, PhoenixRanker, dict[str, Any]]:
    """The cached models of this world, or train both (default configs) and cache them."""
    tower_v, ranker_v = store.promoted(TWO_TOWER), store.promoted(RANKER)
    info: dict[str, Any] = {"cached": True}
    if retrain or tower_v is None or ranker_v is None:
        t = time.perf_counter()
        data = prepare_training_data(world, vectors)
        info["prepare_seconds"] = time.perf_counter() - t
        print(f"training data: {len(data.ranker_train):,} train slates", flush=True)
        tt = train_two_tower(data)
        print(f"two-tower trained in {tt.seconds:.0f} s", flush=True)
        rk = train_ranker(data)
        print(f"ranker trained in {rk.seconds:.0f} s", flush=True)
        tower_v = store.save(TWO_TOWER, tt.state_dict, tt.config, tt.summary())
        ranker_v = store.save(RANKER, rk.state_dict, rk.config, rk.summary())
        store.promote(TWO_TOWER, tower_v)
        store.promote(RANKER, ranker_v)
        info["cached"] = False
    info["two_tower"] = {"version": tower_v, **store.metrics(TWO_TOWER, tower_v)}
    info["ranker"] = {"version": ranker_v, **store.metrics(RANKER, ranker_v)}
    tower = load_two_tower(*store.load(TWO_TOWER, tower_v))
    ranker = load_ranker(*store.load(RANKER, ranker_v))
    return tower, ranker, info


# -- measurements ---------------------------------------------------------------------------


@dataclass
class Throughput:
    label: str
    users: int
    totals: list[float]
    groups: dict[str, list[float]]  # group -> seconds per repeat
    rows_into_scoring: int
    feed_rows: int
    peak_rss: float
    rss_before: float
    retriever: str
    scorer: str
    forward: list[ForwardLog]
    feeds: pl.DataFrame

    @property
    def total(self) -> float:
        return statistics.median(self.totals)


def measured_config(world: World) -> PipelineConfig:
    """The pipeline the throughput figures measure: the default, except that a user whose
    in-network posts fall short of the selection has every out-of-network candidate
    scored, as when these figures began (about 750 candidates a user on demo; the default
    short budget, FilterConfig.out_of_network_scored_short, scores fewer)."""
    cfg = PipelineConfig().with_max_age(candidate_window(world))
    return replace(cfg, filters=replace(cfg.filters, out_of_network_scored_short=None))


@dataclass
class Variant:
    label: str
    retriever: Any
    scorer: Any
    config: PipelineConfig | None = None  # None: measured_config
    legacy_predict: bool = False


def measure(
    variants: list[Variant],
    tables: World,
    users: np.ndarray,
    now: datetime,
    repeats: int,
    batch_size: int,
) -> list[Throughput]:
    """Every variant `repeats` times, interleaved (repeat r of each, then r + 1), so on a
    shared machine all variants see the same spells of load."""
    totals: dict[str, list[float]] = {v.label: [] for v in variants}
    groups: dict[str, dict[str, list[float]]] = {v.label: {} for v in variants}
    forward: dict[str, list[ForwardLog]] = {v.label: [] for v in variants}
    peak: dict[str, float] = {v.label: 0.0 for v in variants}
    before: dict[str, float] = {}
    last: dict[str, tuple[pl.DataFrame, PipelineStats]] = {}
    for r in range(repeats):
        for v in variants:
            before.setdefault(v.label, rss_mib())
            reset_peak_rss()
            LOG.reset()
            USE_LEGACY_PREDICT[0] = v.legacy_predict
            t = time.perf_counter()
            try:
                last[v.label] = build_feeds(
                    tables,
                    users,
                    now,
                    v.retriever,
                    v.scorer,
                    config=v.config or measured_config(tables),
                    batch_size=batch_size,
                )
            finally:
                USE_LEGACY_PREDICT[0] = False
            totals[v.label].append(time.perf_counter() - t)
            peak[v.label] = max(peak[v.label], peak_rss_mib())
            per: dict[str, float] = {}
            for stage, sec in last[v.label][1].seconds.items():
                per[group_of(stage)] = per.get(group_of(stage), 0.0) + sec
            for g, sec in per.items():
                groups[v.label].setdefault(g, []).append(sec)
            forward[v.label].append(
                ForwardLog(**{k: getattr(LOG, k) for k in LOG.__dataclass_fields__})
            )
            print(f"  {v.label} repeat {r + 1}/{repeats}: {totals[v.label][-1]:.2f} s", flush=True)
    out = []
    for v in variants:
        feeds, stats = last[v.label]
        # Rows entering the model stage = rows out of the last filter.
        filters = [s for s in stats.rows if s.startswith("filter.")]
        out.append(
            Throughput(
                label=v.label,
                users=len(users),
                totals=totals[v.label],
                groups=groups[v.label],
                rows_into_scoring=stats.rows[filters[-1]],
                feed_rows=feeds.height,
                peak_rss=peak[v.label],
                rss_before=before[v.label],
                retriever=stats.retriever,
                scorer=stats.scorer,
                forward=forward[v.label],
                feeds=feeds,
            )
        )
    return out


@dataclass
class Setup:
    """What every throughput run scores with: the world, content vectors, both models and
    the serving context, with the seconds each took to make."""

    world: World
    vectors: np.ndarray
    tower: TwoTower
    ranker: PhoenixRanker
    ctx: ServingContext
    info: dict[str, Any]
    key: str
    gen_s: float
    enc_s: float
    train_s: float
    ctx_s: float


def load_setup(scale: str, retrain: bool = False) -> Setup:
    t0 = time.perf_counter()
    world = generate_world(world_config(scale))
    gen_s = time.perf_counter() - t0
    encoder = LexicalEncoder()
    t0 = time.perf_counter()
    vectors = encoder.encode(world.articles)
    enc_s = time.perf_counter() - t0
    key = world_key(scale, encoder)
    t0 = time.perf_counter()
    tower, ranker, info = trained_models(world, vectors, ModelStore(CACHE / key), retrain)
    train_s = time.perf_counter() - t0
    if tower.cfg.features != ranker.cfg.features:
        raise SystemExit("the two models were trained with different feature configs")
    t0 = time.perf_counter()
    ctx = ServingContext.build(
        world.articles,
        vectors,
        world.engagements,
        world.follows,
        world.topic_follows,
        serving_features(ranker.cfg.features),
        impressions=world.impressions,
    )
    ctx_s = time.perf_counter() - t0
    return Setup(world, vectors, tower, ranker, ctx, info, key, gen_s, enc_s, train_s, ctx_s)


# -- processes side by side, as feed shards run ------------------------------------------------


def _wait_for(paths: list[Path], procs: list[subprocess.Popen] | None = None) -> None:
    while not all(p.exists() for p in paths):
        if procs and any(p.poll() not in (None, 0) for p in procs):
            raise SystemExit("a side-by-side worker failed (its output is above)")
        time.sleep(0.02)


def side_by_side(
    args: argparse.Namespace, lance_dir: str, processes: int, compiled: bool
) -> list[float]:
    """Wall seconds of each repeat of `processes` worker processes scoring the users split
    between them, started together (one torch thread each, as feed shards run on this
    machine), each repeat from the first start to the last end."""
    with tempfile.TemporaryDirectory(prefix="bench-feeds-sync-") as sync_dir:
        sync = Path(sync_dir)
        cmd = [sys.executable, __file__, "--scale", args.scale, "--repeats", str(args.repeats)]
        cmd += ["--batch-size", str(args.batch_size), "--threads", "1", "--lance", lance_dir]
        cmd += ["--sync", sync_dir, "--of", str(processes)] + (["--compile"] if compiled else [])
        procs = [subprocess.Popen([*cmd, "--worker", str(k)]) for k in range(processes)]
        walls = []
        try:
            for r in range(args.repeats):
                _wait_for([sync / f"ready-{r}-{k}" for k in range(processes)], procs)
                (sync / f"go-{r}").touch()
                done = [sync / f"done-{r}-{k}" for k in range(processes)]
                _wait_for(done, procs)
                spans = [json.loads(p.read_text()) for p in done]
                walls.append(max(s["end"] for s in spans) - min(s["start"] for s in spans))
                print(f"  {processes} processes, repeat {r + 1}: {walls[-1]:.2f} s", flush=True)
        finally:
            for p in procs:
                p.wait(timeout=600)
    return walls


def side_by_side_worker(args: argparse.Namespace) -> None:
    """One of `side_by_side`'s processes: every `--of`-th user from `--worker`, scored at
    `world.now` once per repeat when the coordinator says go."""
    su = load_setup(args.scale)
    table = open_vectors(args.lance, VECTOR_TABLE)
    retriever = TwoTowerRetriever(su.tower, su.ctx, table)
    scorer = RankerScorer(su.ranker, su.ctx)
    if args.compile:
        scorer.compile()
    users = su.world.users["user_id"].to_numpy()[args.worker :: args.of]
    # Untimed warm-up: the classic peers' fit, and the compile.
    config = measured_config(su.world)
    build_feeds(
        su.world, users[:64], su.world.now, retriever, scorer, config, batch_size=args.batch_size
    )
    sync = Path(args.sync)
    for r in range(args.repeats):
        (sync / f"ready-{r}-{args.worker}").touch()
        _wait_for([sync / f"go-{r}"])
        start = time.time()
        build_feeds(
            su.world, users, su.world.now, retriever, scorer, config, batch_size=args.batch_size
        )
        span = {"start": start, "end": time.time(), "users": len(users)}
        done = sync / f"done-{r}-{args.worker}"
        done.with_suffix(".tmp").write_text(json.dumps(span))
        done.with_suffix(".tmp").rename(done)


def fmt_recall(row: dict[str, Any]) -> list[str]:
    return [
        f"{row['recall_macro']:.3f}",
        f"{row['recall_micro']:.3f}",
        f"{row['hits']:,} / {row['positives']:,}",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scale", default="demo")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=512, help="users per pipeline run")
    ap.add_argument("--retrain", action="store_true", help="ignore the cached models")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument(
        "--quality-users",
        type=int,
        default=DEFAULT_SAMPLE,
        help="seeded sample of users with a held-out positive for the quality section",
    )
    ap.add_argument(
        "--wide-out-of-network",
        type=int,
        default=1_400,
        help="out-of-network candidates per user of the second learned run (~1,000 scored)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for the whole run; 1, as feed steps run "
        "(FEED_TORCH_THREADS): on a busy 2-core box two threads made the ranker 3-10x slower",
    )
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument(
        "--processes",
        type=int,
        default=2,
        help="processes of the side-by-side runs (one per core, as feed shards run)",
    )
    # A side-by-side worker process (see side_by_side), not for direct use.
    for flag in ("--worker", "--of"):
        ap.add_argument(flag, type=int, help=argparse.SUPPRESS)
    for flag in ("--lance", "--sync"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    ap.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    instrument_serving()

    if args.worker is not None:
        side_by_side_worker(args)
        return
    su = load_setup(args.scale, args.retrain)
    world, vectors, ctx, info = su.world, su.vectors, su.ctx, su.info
    tower, ranker = su.tower, su.ranker
    gen_s, enc_s, train_s, ctx_s, key = su.gen_s, su.enc_s, su.train_s, su.ctx_s, su.key
    users = world.users["user_id"].to_numpy()

    with tempfile.TemporaryDirectory(prefix="bench-feeds-lancedb-") as lance_dir:
        t0 = time.perf_counter()
        write_vectors(
            lance_dir, VECTOR_TABLE, retrieval_frame(item_vectors_of(tower, ctx), world.articles)
        )
        table = open_vectors(lance_dir, VECTOR_TABLE)
        index = ensure_index(table)
        table = open_vectors(lance_dir, VECTOR_TABLE)
        vec_s = time.perf_counter() - t0
        print(f"vector table: {index.kind}, {index.n_rows:,} rows, {vec_s:.1f} s", flush=True)

        # 1. Throughput at world.now.
        threads = torch.get_num_threads()
        # The same users with more out-of-network candidates: about 1,000 per user into
        # the ranker (the default config gives ~750 on the demo world).
        wide_config = measured_config(world)
        wide_config = replace(
            wide_config,
            sources=replace(wide_config.sources, out_of_network_max=args.wide_out_of_network),
            filters=replace(wide_config.filters, out_of_network_scored=None),
        )
        retriever, scorer = TwoTowerRetriever(tower, ctx, table), RankerScorer(ranker, ctx)
        # Untimed warm-up: the first scoring at `now` fits the classic peers (cached after).
        build_feeds(world, users[:64], world.now, retriever, scorer, batch_size=args.batch_size)
        # The ranker's candidate blocks compiled, as FEED_DAGSTER_COMPILE_RANKER=1 scores
        # (models.compiled); compiled on its first batch, with the compile cache as found.
        compiled_scorer = RankerScorer(ranker, ctx)
        compiled_scorer.compile()
        t0 = time.perf_counter()
        build_feeds(
            world, users[:64], world.now, retriever, compiled_scorer, batch_size=args.batch_size
        )
        compile_s = time.perf_counter() - t0
        peak_before = matmul_peak(threads)[1]
        learned, compiled, baseline, wide, fallback = measure(
            [
                Variant("learned", retriever, scorer),
                Variant("learned, compiled", retriever, compiled_scorer),
                Variant("learned, context per group", retriever, scorer, legacy_predict=True),
                Variant("learned, wide", retriever, scorer, config=wide_config),
                Variant(
                    "fallback",
                    PopularityRetriever.from_tables(world),
                    TopicAffinityScorer.from_tables(world),
                ),
            ],
            world,
            users,
            world.now,
            args.repeats,
            args.batch_size,
        )

        # Processes side by side, one per core, as the shards of a feed run.
        pair = {
            label: side_by_side(args, lance_dir, args.processes, flag)
            for label, flag in (("learned", False), ("learned, compiled", True))
        }

        # 2. Ranker FLOP/s against the matmul peak, same thread count, same run.
        # Sampled before and after the throughput runs: the peak moves with the load too.
        peak_samples = peak_before + matmul_peak(threads)[1]
        peak = statistics.median(peak_samples)
        shapes = set().union(*(f.shapes for f in learned.forward))
        if len(shapes) != 1:
            raise SystemExit(f"expected one (candidates, history) shape, got {shapes}")
        (c, h) = shapes.pop()
        fwd = learned.forward[0]
        per_run = ranker_flops(ranker, fwd.contexts, fwd.slots, h, fwd.item_rows)
        flops = per_run["total"]
        fwd_s = statistics.median(f.forward_seconds for f in learned.forward)
        feat_s = statistics.median(f.feature_seconds for f in learned.forward)
        model_stage_s = statistics.median(learned.groups["scorer model"])
        sample_groups = min(1024, len(fwd.sample))
        counted = counted_flops(ranker, fwd.sample, ctx, sample_groups)
        head = fwd.sample.take(np.arange(sample_groups))
        head_rows = len(np.unique(head.cand_item))
        head_contexts = len(context_runs(head)[0])
        analytic_sample = ranker_flops(ranker, head_contexts, head.cand_item.size, h, head_rows)
        analytic_sample = analytic_sample["total"]
        # The forward with and without the context cache on one batch's groups, same run.
        compare = forward_comparison(ranker, fwd.sample, ctx, max(5, args.repeats))
        sample_slots = fwd.sample.cand_item.size
        compare_flops = {
            "context once per user": ranker_flops(
                ranker,
                len(context_runs(fwd.sample)[0]),
                sample_slots,
                h,
                len(np.unique(fwd.sample.cand_item)),
            )["total"],
            "context per group": ranker_flops(ranker, len(fwd.sample), sample_slots, h)["total"],
        }
        compare_flops[BF16] = compare_flops["context once per user"]
        bf16_peak = matmul_peak(threads, dtype=torch.bfloat16)[0]
        auc = precision_auc(ranker, world, vectors)

        # 3. Quality at world.heldout_start, from the data before it: the same core
        # function as the feed_quality asset, so the benchmark and the graph agree.
        quality_rows: list[list[str]] = []
        quality_note = ""
        if not args.no_quality:
            cut = world.heldout_start

            def learned_at_cut(known: dict[str, pl.DataFrame]) -> tuple[Any, Any]:
                # The serving context sees the posts and engagements before the cut only.
                keep = world.articles["published_at"].to_numpy() <= np.datetime64(cut, "us")
                q_ctx = ServingContext.build(
                    known["articles"],
                    vectors[keep],
                    known["engagements"],
                    known["follows"],
                    known["topic_follows"],
                    serving_features(ranker.cfg.features),
                    impressions=known.get("impressions"),
                )
                return TwoTowerRetriever(tower, q_ctx, table), RankerScorer(ranker, q_ctx)

            def fallbacks_at_cut(known: dict[str, pl.DataFrame]) -> tuple[Any, Any]:
                return PopularityRetriever.from_tables(known), TopicAffinityScorer.from_tables(
                    known
                )

            result = evaluate_feeds(
                world,
                cut,
                {"learned": learned_at_cut, "fallback": fallbacks_at_cut},
                sample_size=args.quality_users,
                batch_size=args.batch_size,
                progress=lambda m: print(f"  quality {m}", flush=True),
            )
            labels = {
                "learned": "served feed, learned (two-tower + ranker)",
                "fallback": "served feed, table fallbacks",
                CHRONOLOGICAL: "chronological following (in-network source, newest first)",
                POPULARITY: "popularity (most positive engagements, 48 h)",
            }
            rows = {r["feed"]: r for r in result.iter_rows(named=True)}
            for feed, label in labels.items():
                r = rows[feed]
                quality_rows.append([label, *fmt_recall(r), f"{r['posts_per_user']:.1f}"])
            first = rows["learned"]
            n_all = world.engagements.filter(pl.col("engaged_at") >= cut)
            quality_note = (
                f"{first['eligible_users']:,} users have a held-out positive on a post "
                f"published before `heldout_start`; a seeded sample of {first['users']:,} of "
                f"them is evaluated ({first['positives']:,} pairs). Build time of each feed "
                "at the cut: "
                + ", ".join(f"{feed} {rows[feed]['seconds']:.1f} s" for feed in labels)
                + f". Held-out engagement rows: {n_all.height:,}."
            )

    load_end = os.getloadavg()[0]
    n = len(users)

    def stage_table(tp: Throughput) -> str:
        rows = []
        for g, samples in tp.groups.items():
            sec = statistics.median(samples)
            rows.append([g, f"{sec:,.2f}", f"{sec / tp.total:.0%}"])
        return markdown_table(["stage group", "s (median)", "share"], rows)

    def summary(tp: Throughput) -> list[list[str]]:
        return [
            [f"{tp.label}: retriever / scorer", f"`{tp.retriever}` / `{tp.scorer}`"],
            [
                f"{tp.label}: end to end (median of {len(tp.totals)})",
                f"{tp.total:.2f} s ({', '.join(f'{t:.2f}' for t in tp.totals)})",
            ],
            [f"{tp.label}: throughput", f"**{tp.users / tp.total:,.0f} users/s**"],
            [
                f"{tp.label}: candidates into scoring",
                f"{tp.rows_into_scoring:,} ({tp.rows_into_scoring / tp.users:,.0f} per user)",
            ],
            [f"{tp.label}: feed rows", f"{tp.feed_rows:,}"],
            [
                f"{tp.label}: ranker forward + feature building (median)",
                f"{statistics.median(f.forward_seconds for f in tp.forward):.2f} s + "
                f"{statistics.median(f.feature_seconds for f in tp.forward):.2f} s",
            ],
            [
                f"{tp.label}: peak RSS",
                f"{tp.peak_rss:,.0f} MiB ({tp.rss_before:,.0f} MiB before the runs)",
            ],
        ]

    trained = (
        "loaded from the cache"
        if info["cached"]
        else f"trained in {train_s:.0f} s (data {info['prepare_seconds']:.0f} s)"
    )
    rk, tt = info["ranker"], info["two_tower"]
    setup = [
        ["world", f"{args.scale}: {n:,} users, {world.articles.height:,} posts"],
        ["models", f"{trained}, `{CACHE.relative_to(ROOT) / key}`"],
        [
            "ranker",
            f"`{rk['version']}`: {rk.get('n_params', 0):,} params, d={ranker.cfg.d_model}, "
            f"{ranker.cfg.n_layers} layers, ffn x{ranker.cfg.ffn_mult}, "
            f"valid AUC {rk.get('valid_valid_auc', float('nan')):.3f}, "
            f"trained {rk.get('train_seconds', 0):.0f} s",
        ],
        [
            "two-tower",
            f"`{tt['version']}`: {tt.get('n_params', 0):,} params, valid recall@100 "
            f"{tt.get('valid_valid_recall@100', float('nan')):.3f}, "
            f"trained {tt.get('train_seconds', 0):.0f} s",
        ],
        [
            "vector table",
            f"LanceDB in a temp dir, {index.kind}, {index.n_rows:,} rows, {vec_s:.1f} s "
            "(write + index)",
        ],
        [
            "setup (not timed below)",
            f"world {gen_s:.1f} s, lexical vectors {enc_s:.1f} s, serving context {ctx_s:.1f} s",
        ],
        ["batch size", f"{args.batch_size} users per pipeline run"],
        ["torch threads (ranker, matmul)", f"{threads}"],
        [
            "machine",
            f"{machine()}, load average {load_start:.1f} at start, {load_end:.1f} at the end "
            "(shared box)",
        ],
    ]
    ratio = learned.total / fallback.total
    pair_rows = [
        [
            "1 process, learned (the table above)",
            f"{learned.total:.2f} s",
            ", ".join(f"{t:.2f}" for t in learned.totals),
            f"{n / learned.total:,.0f} users/s",
        ]
    ]
    for label, walls in pair.items():
        wall = statistics.median(walls)
        pair_rows.append(
            [
                f"{args.processes} processes, {label}",
                f"{wall:.2f} s",
                ", ".join(f"{t:.2f}" for t in walls),
                f"**{n / wall:,.0f} users/s**",
            ]
        )
    keys = ["user_id", "position", "article_id"]
    same_rows = learned.feeds.select(keys).join(baseline.feeds.select(keys), on=keys).height
    compiled_same = learned.feeds.select(keys).join(compiled.feeds.select(keys), on=keys).height

    flop_rows = [
        [
            "groups scored per run (x slots)",
            f"{fwd.groups:,} x {c} (history {h} tokens), {fwd.contexts:,} contexts encoded",
        ],
        [
            "real candidates / slots",
            f"{fwd.real:,} / {fwd.slots:,} ({fwd.real / max(fwd.slots, 1):.0%} of slots used)",
        ],
        [
            "FLOPs per run (analytic)",
            ", ".join(f"{k} {v / 1e9:.2f} G" for k, v in per_run.items()),
        ],
        [
            "FlopCounterMode check",
            f"{counted / 1e9:.2f} GFLOP counted vs {analytic_sample / 1e9:.2f} analytic on "
            f"{sample_groups:,} groups (ratio {counted / analytic_sample:.3f})",
        ],
        ["ranker FLOPs per run", f"{flops / 1e9:,.1f} GFLOP"],
        [
            "ranker time (median)",
            f"forward {fwd_s:.2f} s + feature building {feat_s:.2f} s, of a "
            f"{model_stage_s:.2f} s `scorer.model` stage",
        ],
        [
            "achieved",
            f"**{flops / fwd_s / 1e9:.1f} GFLOP/s** in the forward, "
            f"{flops / model_stage_s / 1e9:.1f} GFLOP/s over the whole model stage",
        ],
        [
            f"float32 matmul peak ({2048}^3, {threads} threads, median of 14 before and after)",
            f"{peak / 1e9:.1f} GFLOP/s (samples {min(peak_samples) / 1e9:.0f}-"
            f"{max(peak_samples) / 1e9:.0f})",
        ],
        [
            "fraction of peak",
            f"**{flops / fwd_s / peak:.1%}** (forward), {flops / model_stage_s / peak:.1%} "
            "(model stage)",
        ],
    ]
    cached, bf16, legacy = (statistics.median(compare[k]) for k in compare)
    compare_rows = [
        [
            name,
            f"{statistics.median(v):.3f} s ({', '.join(f'{t:.3f}' for t in v)})",
            f"{compare_flops[name] / 1e9:.2f} GFLOP",
            f"{compare_flops[name] / statistics.median(v) / 1e9:.1f} GFLOP/s "
            f"({compare_flops[name] / statistics.median(v) / peak:.1%} of peak)",
            f"{fwd.sample.cand_mask.sum() / statistics.median(v):,.0f}",
        ]
        for name, v in compare.items()
    ]

    parts = [
        "## Feed precompute (`bench/bench_feeds.py`)",
        "",
        f"Command: `{' '.join(['.venv/bin/python', 'bench/bench_feeds.py', *sys.argv[1:]])}`",
        "",
        "Self-contained: world generated in-process, lexical content vectors, both models "
        "trained with their default configs (weights cached by world config + seed), item "
        "vectors in a LanceDB table in a temporary directory.",
        "",
        markdown_table(["", ""], setup),
        "",
        f"### Throughput: every user at `world.now`, batches of {args.batch_size}",
        "",
        markdown_table(
            ["", ""],
            summary(learned)
            + summary(compiled)
            + summary(baseline)
            + summary(wide)
            + summary(fallback),
        ),
        "",
        '"learned, compiled": the same models with the ranker\'s candidate blocks compiled '
        "(`torch.compile`, `feed_dagster/models/compiled.py`, what FEED_DAGSTER_COMPILE_RANKER=1 "
        f"turns on): **{learned.total / compiled.total:.2f}x** the learned throughput; "
        f"{compiled_same:,} of {learned.feed_rows:,} feed rows identical. Compiling (with the "
        f"compile cache as this run found it) and scoring the first 64 users took "
        f"{compile_s:.1f} s, not timed above.",
        "",
        f"### {args.processes} processes side by side, as the shards of a feed run",
        "",
        f"The users split into {args.processes} parts, each scored by its own process with one "
        "torch thread (the shards of `feed-dagster run` go one per core), started together; "
        "wall time from the first start to the last end, median of "
        f"{args.repeats}. Each process loads the world, models and vector table and fits the "
        "classic peers before the start (not timed).",
        "",
        markdown_table(["run", "wall (median)", "runs", "throughput"], pair_rows),
        "",
        'Variants ran interleaved (repeat r of each, then r + 1). "learned, context per '
        'group": the same models with the ranker forward as it ran before the context cache '
        f"(`legacy_predict`): learned is **{baseline.total / learned.total:.2f}x** faster end "
        f"to end, same run; {same_rows:,} of {learned.feed_rows:,} feed rows (user, position, "
        "post) are identical between the two. "
        f"Learned / fallback end-to-end time: **{ratio:.1f}x**. "
        '"learned, wide": '
        f"the learned models with {args.wide_out_of_network:,} out-of-network candidates per "
        "user (default 1,000), for the figure at about 1,000 candidates per user.",
        "",
        "Learned models, per stage group (seconds summed over batches, median over repeats):",
        "",
        stage_table(learned),
        "",
        "Learned models, wide (about 1,000 candidates per user), per stage group:",
        "",
        stage_table(wide),
        "",
        "Table fallbacks, per stage group:",
        "",
        stage_table(fallback),
        "",
        "### Ranker FLOP/s vs float32 matmul peak",
        "",
        "FLOPs are counted analytically for the work the forward executes (`ranker_flops` "
        "in the script: matmuls only, 2 FLOPs per multiply-add). Each distinct context "
        "(user token + history) is encoded once per user: history encoders, qkv 3d^2 per "
        "context token in every block and the context's own update in all but the last. "
        "Per padded candidate slot: its input Linears (the content Linear once per distinct "
        "catalog row among the candidates), per block qkv 3d^2 + out d^2 + FFN "
        "2*ffn_mult*d^2 multiply-adds + attention over the L = history + 1 context keys and "
        "itself, and the head. Cross-checked with `torch.utils.flop_counter.FlopCounterMode` "
        "on `predict` over the first 1,024 groups.",
        "",
        markdown_table(["", ""], flop_rows),
        "",
        f"The forward alone on the first batch's {len(fwd.sample):,} groups "
        f"({fwd.sample.cand_mask.sum():,} candidates, {len(context_runs(fwd.sample)[0]):,} "
        "users), with the context once per user (`predict`) and once per group (the training "
        "forward, as serving ran it before), interleaved in the same run: "
        f"**{legacy / cached:.2f}x** faster with the cache.",
        "",
        markdown_table(
            ["forward", "s (median)", "FLOPs", "achieved", "candidates/s"], compare_rows
        ),
        "",
        "Lower precision: the same forward under `torch.autocast('cpu', dtype=torch.bfloat16)` "
        f"takes **{bf16 / cached:.2f}x** the float32 time (a {2048}^3 bfloat16 matmul runs at "
        f"{bf16_peak / 1e9:.0f} GFLOP/s here, {bf16_peak / peak:.1f}x the float32 peak). "
        f"Held-out click AUC on {auc['slates']:,.0f} slates: float32 {auc['float32']:.4f}, "
        f"bfloat16 {auc['bfloat16']:.4f} (difference {auc['bfloat16'] - auc['float32']:+.4f}). "
        + (
            "Serving keeps float32: with d_model 64 the forward is bound by passes over "
            "memory, not by its matmuls, and the autocast adds a cast before each of them."
            if bf16 >= cached
            else "Serving keeps float32 for now."
        ),
    ]
    if quality_rows:
        parts += [
            "",
            "### Quality: recall@35 of held-out positive engagements",
            "",
            "Feeds built at `world.heldout_start` from data strictly before it (engagements, "
            "impressions and follows cut at the start; posts published up to it) by "
            "`feed_dagster.feeds.evaluation.evaluate_feeds`, the function behind the "
            "`feed_quality` asset; positives = (user, post) pairs with a positive action "
            "(click, favorite, reply, repost, quote, share) at or after the start on a post "
            "published before it. Recall per user = positives in the user's 35 served posts / "
            "positives, macro-averaged over the sampled users; micro = all hits / all "
            "positives. Every feed goes through the same candidate pipeline (filters: seen, "
            "own, blocked/muted, too old, ...; top 50, conversation dedupe, 35 served). "
            "Chronological following = the in-network source alone ranked newest first; "
            "popularity = in-network plus the most-engaged recent posts, ranked by positive "
            "engagements before the start; both without author diversity or the "
            "out-of-network factor, which would reorder them.",
            "",
            markdown_table(
                ["feed", "recall@35 (macro)", "micro", "hits / positives", "posts per user"],
                quality_rows,
            ),
            "",
            quality_note,
        ]
    body = "\n".join(parts)
    print(body)
    if not args.no_write:
        write_section("feeds", body)


if __name__ == "__main__":
    main()
