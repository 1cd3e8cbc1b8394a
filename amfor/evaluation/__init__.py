"""Evaluation: distances, Market-1501 protocol metrics (CMC/mAP/mINP), re-ranking and result pictures.

`amfor.evaluation.protocol` runs the protocol on a model and a dataset's splits (extraction on every rank, metrics on
rank 0); it needs the data stack, so it is imported by name, not here."""

from .distances import global_distance, pairwise_distance, part_distance
from .features import evaluate_features, extract_features, flip_average
from .rank import evaluate_rank, evaluate_rank_classic
from .reranking import k_reciprocal_rerank, re_ranking, re_ranking_distmat
from .visualize import plot_cmc, ranked_lists

__all__ = ["evaluate_features", "evaluate_rank", "evaluate_rank_classic", "extract_features", "flip_average",
           "global_distance", "k_reciprocal_rerank", "pairwise_distance", "part_distance", "plot_cmc", "ranked_lists",
           "re_ranking", "re_ranking_distmat"]
