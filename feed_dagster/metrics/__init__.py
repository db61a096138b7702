"""Ranking metrics (EBNeRD definitions), the challenge submission format, and baselines."""

from feed_dagster.metrics.baselines import BASELINES, evaluate_baselines, label_impressions
from feed_dagster.metrics.ranking import evaluate_scores, group_auc, per_action_auc
from feed_dagster.metrics.submission import read_submission, write_submission

__all__ = [
    "BASELINES",
    "evaluate_baselines",
    "evaluate_scores",
    "group_auc",
    "label_impressions",
    "per_action_auc",
    "read_submission",
    "write_submission",
]
