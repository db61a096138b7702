"""The learned parts: training data, two-tower retrieval, transformer ranker, model store,
evaluation and promotion (core; no dagster).

Typical use (an asset body):

    data = prepare_training_data(world, content_vectors)
    tt = train_two_tower(data)
    rk = train_ranker(data)
    table = evaluate_models(world, data, load_ranker(rk.state_dict, rk.config),
                            load_two_tower(tt.state_dict, tt.config))
    version = ModelStore(root).save("ranker", rk.state_dict, rk.config, rk.summary())
    passed, reasons = promotion_decision(table, incumbent_auc)
"""

from feed_dagster.models.catalog import FeatureConfig, ItemCatalog
from feed_dagster.models.evaluate import evaluate_models, evaluation_chart, training_curves
from feed_dagster.models.promotion import promotion_decision
from feed_dagster.models.ranker import PhoenixRanker, RankerConfig, load_ranker, score_frame
from feed_dagster.models.serve import (
    ServingContext,
    item_vectors_of,
    score_candidates,
    user_vectors_at,
)
from feed_dagster.models.store import ModelStore
from feed_dagster.models.train import (
    TrainConfig,
    TrainingData,
    TrainResult,
    prepare_training_data,
    train_ranker,
    train_two_tower,
    two_tower_recall,
)
from feed_dagster.models.two_tower import (
    TwoTower,
    TwoTowerConfig,
    item_vectors,
    load_two_tower,
    user_vectors,
)

__all__ = [
    "FeatureConfig",
    "ItemCatalog",
    "ModelStore",
    "PhoenixRanker",
    "RankerConfig",
    "ServingContext",
    "TrainConfig",
    "TrainResult",
    "TrainingData",
    "TwoTower",
    "TwoTowerConfig",
    "evaluate_models",
    "evaluation_chart",
    "item_vectors",
    "item_vectors_of",
    "load_ranker",
    "load_two_tower",
    "prepare_training_data",
    "promotion_decision",
    "score_candidates",
    "score_frame",
    "train_ranker",
    "train_two_tower",
    "training_curves",
    "two_tower_recall",
    "user_vectors",
    "user_vectors_at",
]
