"""Training, evaluation and promotion of the two-tower retrieval model and the ranker."""

from typing import Any

import dagster as dg
import polars as pl
from pydantic import Field

from feed_dagster.assets.retry import IO_RETRY, fail_fast
from feed_dagster.assets.upstream import upstream_metadata
from feed_dagster.data.schema import TABLE_SCHEMAS
from feed_dagster.data.world_tables import world_from_tables
from feed_dagster.embeddings.stored import content_vectors
from feed_dagster.memory import StepMemory
from feed_dagster.models.budget import (
    HELDOUT_POST_ENGAGEMENTS,
    TrainingBudget,
    read_training_tables,
)
from feed_dagster.models.evaluate import (
    evaluation_chart,
    evaluation_frame,
    evaluation_rows,
    training_curves,
    two_tower_row,
)
from feed_dagster.models.promotion import promotion_decision
from feed_dagster.models.ranker import load_ranker
from feed_dagster.models.train import TrainingData, TrainResult, prepare_and_train
from feed_dagster.models.two_tower import load_two_tower
from feed_dagster.paths import RANKER, TWO_TOWER
from feed_dagster.plots import markdown_table, png_bytes_markdown
from feed_dagster.resources.storage import StorageResource
from feed_dagster.resources.stores import ModelStoreResource
from feed_dagster.resources.warehouse import WAREHOUSE_POOL

MODEL_TABLES = [
    "world_info",
    "users",
    "articles",
    "engagements",
    "impressions",
    "impression_truth",
    "follows",
    "topic_follows",
]


class TrainingBudgetConfig(dg.Config):
    """How much of the world the models train and are evaluated on (models.budget): worlds
    within the budget are used whole; bigger ones are sampled, and the sample is stated in
    the ranker_weights metadata."""

    train_slates: int = Field(default=TrainingBudget.train_slates, ge=1)
    valid_slates: int = Field(default=TrainingBudget.valid_slates, ge=1)
    heldout_users: int = Field(
        default=TrainingBudget.heldout_users,
        ge=1,
        description="held-out metrics on every impression of this many random users",
    )
    retrieval_positives: int = Field(default=TrainingBudget.retrieval_positives, ge=1)
    overlap_max_engagements: int = Field(
        default=TrainingBudget.overlap_max_engagements,
        ge=0,
        description="worlds with more engagements build the ranker's groups before the "
        "two-tower starts training, so the two peaks of memory do not add up",
    )
    whole_max_engagements: int = Field(
        default=TrainingBudget.whole_max_engagements,
        ge=0,
        description="worlds with more engagements train on the sampled slates' users' own "
        "rows; what every user's rows decide is counted in the warehouse",
    )
    seed: int = TrainingBudget.seed


def epoch_line(model: str, row: dict[str, float], epochs: int, best_epoch: int) -> str:
    """One epoch of a training history, e.g. "ranker epoch 2/3: train_loss 0.4120,
    valid_auc 0.7011 (12.3s), best"."""
    epoch = int(row["epoch"])
    values = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "seconds"))
    seconds = f" ({row['seconds']:.1f}s)" if "seconds" in row else ""
    best = ", best" if epoch == best_epoch else ""
    return f"{model} epoch {epoch}/{epochs}: {values}{seconds}{best}"


# The models read no post's words (their content vectors come from article_embeddings):
# the texts, most of the table's bytes (about 2 GiB at 10M posts), stay in the warehouse.
TRAINING_COLUMNS = {
    "articles": [c for c in TABLE_SCHEMAS["articles"] if c not in ("title", "text", "topic_name")]
}
INPUTS = {dg.AssetKey(t) for t in [*MODEL_TABLES, "article_embeddings"]}


@dg.multi_asset(
    outs={
        "retrieval_model": dg.AssetOut(
            group_name="models",
            kinds={"pytorch", "safetensors"},
            dagster_type=dg.Nothing,
            description="Two-tower retrieval model (user tower over history and hashed user "
            "id, item tower over content + hashed post/author ids + topic), in-batch softmax "
            "with logQ correction.",
        ),
        "ranker_weights": dg.AssetOut(
            group_name="models",
            kinds={"pytorch", "safetensors"},
            dagster_type=dg.Nothing,
            description="Transformer ranker with candidate isolation, one head per action; "
            "hashed post/author/user ids, classic-peer scores as inputs.",
        ),
        # Returned as a table: the warehouse I/O manager stores it in DuckDB.
        "ranker_evaluation": dg.AssetOut(
            group_name="evaluation",
            kinds={"duckdb", "polars"},
            description="Held-out AUC/MRR/nDCG of the new ranker against the two-tower score, "
            "the promoted ranker, baselines, the classic peers (all-time popularity, item-kNN, "
            "ALS, EASE) and (synthetic data) the oracle. Warehouse table `ranker_evaluation`.",
        ),
    },
    deps=sorted(INPUTS, key=str),
    internal_asset_deps={
        "retrieval_model": INPUTS,
        "ranker_weights": INPUTS,
        "ranker_evaluation": {dg.AssetKey("retrieval_model"), dg.AssetKey("ranker_weights")},
    },
    pool=WAREHOUSE_POOL,
    can_subset=False,
)
def trained_models(
    context: dg.AssetExecutionContext,
    config: TrainingBudgetConfig,
    models: ModelStoreResource,
    storage: StorageResource,
):
    """Train both models on one temporal split, store them, and evaluate on held-out data."""
    memory = StepMemory().start()
    store = models.store()
    storage.check_artifacts()  # the embeddings' bucket, before minutes of reading
    budget = TrainingBudget(**config.model_dump())
    tables, sample = read_training_tables(
        storage.warehouse_path(), MODEL_TABLES, budget, columns=TRAINING_COLUMNS
    )
    context.log.info(f"training sample (budget {budget.to_dict()}): {sample.summary()}")
    # Past the budget's whole_max_engagements: everyone's engagements on the held-out
    # posts, for the baselines (the world holds the sampled users' own).
    on_heldout_posts = tables.pop(HELDOUT_POST_ENGAGEMENTS, None)
    world = world_from_tables(tables, tables["world_info"])
    incumbent = store.promoted(RANKER)
    ranker_side: dict[str, Any] = {}

    def evaluate_rankers(data: TrainingData, rk: TrainResult) -> None:
        # Every row of the evaluation but the two-tower's, while the two-tower still trains.
        ranker = load_ranker(rk.state_dict, rk.config)
        version = store.save(RANKER, rk.state_dict, rk.config, rk.summary())
        extra = {}
        if incumbent and incumbent != version:
            try:
                extra["promoted"] = load_ranker(*store.load(RANKER, incumbent))
            except (RuntimeError, KeyError, ValueError) as exc:  # incompatible architecture
                context.log.warning(f"cannot evaluate the promoted ranker {incumbent}: {exc}")
        rows = evaluation_rows(
            world, data, ranker, extra_rankers=extra, heldout_post_engagements=on_heldout_posts
        )
        ranker_side.update(version=version, rows=rows)

    data, tt, rk = prepare_and_train(
        world,
        content_vectors(world.articles, storage.embeddings_path()),
        budget=budget,
        valid_start=sample.valid_start,
        warehouse=storage.warehouse_path(),
        peer_fits=storage.serving_peers_dir(),
        while_two_tower=evaluate_rankers,
        users_only=sample.users_only,
    )
    context.log.info(
        f"training data: {data.logged_groups:,} logged slates + "
        f"{len(data.ranker_train) - data.logged_groups:,} groups sampled from engagements; "
        f"{len(data.retrieval_train):,} retrieval positives"
    )
    context.log.info(f"two-tower trained in {tt.seconds:.0f}s, ranker in {rk.seconds:.0f}s")
    # The trainers return their per-epoch history rather than logging as they go; one line
    # per epoch puts loss and validation metric in the run's log (UI and `feed-dagster run`).
    for name, result in ((TWO_TOWER, tt), (RANKER, rk)):
        for row in result.history:
            context.log.info(epoch_line(name, row, len(result.history), result.best_epoch))
    tt_version = store.save(TWO_TOWER, tt.state_dict, tt.config, tt.summary())
    rk_version = ranker_side["version"]
    # The retrieval model has no gate of its own: article_vectors promotes it together with
    # the vector table built from it, so the user and item towers always match.
    two_tower = load_two_tower(tt.state_dict, tt.config)
    rows = ranker_side["rows"]
    table = evaluation_frame(rows, two_tower_row(data, two_tower))
    storage.evaluation_dir().mkdir(parents=True, exist_ok=True)
    eval_path = storage.evaluation_dir() / f"ranker-{rk_version}.parquet"
    table.write_parquet(eval_path)
    curves = png_bytes_markdown(
        training_curves({"two_tower": tt.history, "ranker": rk.history}), "training curves"
    )
    memory.stop()
    sampling = dg.MetadataValue.json({"budget": budget.to_dict(), **sample.summary()})
    metric_cols = [
        c for c in ("method", "auc", "mrr", "ndcg@5", "ndcg@10", "ne_click") if c in table.columns
    ]
    yield dg.Output(
        None,
        output_name="retrieval_model",
        metadata={
            "version": tt_version,
            # What article_vectors builds its item vectors with (and then promotes).
            "two_tower_version": tt_version,
            "path": f"{store.root}/{TWO_TOWER}/{tt_version}",
            **tt.summary(),
            **(
                {"peak_rss_mib": tt.process_peak_rss_mib}
                if tt.process_peak_rss_mib is not None
                else {}
            ),
            "curves": dg.MetadataValue.md(curves),
        },
    )
    yield dg.Output(
        None,
        output_name="ranker_weights",
        metadata={
            "version": rk_version,
            "path": f"{store.root}/{RANKER}/{rk_version}",
            "heads": ", ".join(data.actions),
            "logged_slates": data.logged_groups,
            "sampled_groups": len(data.ranker_train) - data.logged_groups,
            "training_mix": dg.MetadataValue.json(data.mix.to_dict()),
            "training_sample": sampling,
            **memory.metadata(),
            **rk.summary(),
            "curves": dg.MetadataValue.md(curves),
        },
    )
    yield dg.Output(
        evaluation_table(table, rk_version, tt_version),
        output_name="ranker_evaluation",
        metadata={
            "dagster/row_count": table.height,
            # The candidate the gate judges and promoted_ranker promotes, the evaluation it
            # is judged on, and the incumbent it was compared with ("" when none was).
            "candidate_version": rk_version,
            "ranker_version": rk_version,
            "two_tower_version": tt_version,
            "incumbent_version": (
                incumbent if any(r["method"] == "promoted" for r in rows.rankers) else ""
            ),
            "path": str(eval_path),
            "table": dg.MetadataValue.md(markdown_table(table.select(metric_cols))),
            "chart": dg.MetadataValue.md(png_bytes_markdown(evaluation_chart(table), "evaluation")),
            **{f"auc_{m}": float(a) for m, a in zip(table["method"], table["auc"], strict=True)},
        },
    )


def evaluation_table(table: pl.DataFrame, ranker: str, two_tower: str) -> pl.DataFrame:
    """The evaluation as stored in the warehouse: one row per method, with the versions of
    the models this training run produced (the candidate ranker the gate judges)."""
    head = ["method", "auc", "mrr", "ndcg@5", "ndcg@10", "n_impressions", "ne_click"]
    return table.select(
        *[c for c in head if c in table.columns],
        pl.lit(ranker).alias("model_version"),
        pl.lit(two_tower).alias("two_tower_version"),
        *[c for c in table.columns if c.startswith("auc_")],
    )


def _candidate(instance: dg.DagsterInstance) -> dict:
    """The ranker the latest training evaluated: its version, the evaluation's Parquet
    file and the incumbent it was compared with, from ranker_evaluation's metadata."""
    return upstream_metadata(
        instance,
        "ranker_evaluation",
        ["ranker_version", "path", "incumbent_version"],
        produced_by="trained_models",
    )


@dg.asset_check(
    asset="ranker_evaluation",
    blocking=True,
    description="The new ranker must beat popularity, the two-tower score, every baseline and "
    "every classic peer (all-time popularity, item-kNN, ALS, EASE) by 0.01 AUC, and lose at "
    "most 0.005 AUC to the promoted ranker; otherwise it is never promoted.",
)
def ranker_promotion_gate(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    cand = _candidate(context.instance)
    table = pl.read_parquet(cand["path"])
    incumbent_auc = None
    if cand["incumbent_version"]:
        incumbent_auc = float(table.filter(pl.col("method") == "promoted")["auc"][0])
    passed, reasons = promotion_decision(table, incumbent_auc=incumbent_auc)
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(reasons),
        metadata={
            "candidate_version": cand["ranker_version"],
            "incumbent_auc": incumbent_auc or 0.0,
        },
    )


@dg.asset(group_name="models", deps=["ranker_evaluation"], kinds={"pytorch"}, retry_policy=IO_RETRY)
def promoted_ranker(
    context: dg.AssetExecutionContext, models: ModelStoreResource
) -> dg.MaterializeResult:
    """Points the model store's PROMOTED ranker at the candidate that passed the gate; feeds
    score with the promoted ranker only."""
    candidate = _candidate(context.instance)["ranker_version"]
    store = models.store()
    previous = store.promoted(RANKER)
    with fail_fast():  # a damaged candidate is refused and the incumbent stays promoted
        store.promote(RANKER, candidate)
    return dg.MaterializeResult(
        metadata={
            "version": candidate,
            "previous": previous or "none",
            "changed": previous != candidate,
        }
    )
