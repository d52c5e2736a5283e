"""Task metrics: classification/regression through scikit-learn and scipy; ranking metrics over qrels.

Ranking metrics follow trec_eval's definitions (the ones BEIR reports through pytrec_eval): nDCG@k with
linear gains and log2 discounts, the ideal ranking built from all judged relevant documents; MRR@k the
reciprocal rank of the first relevant document in the top k; recall@k the share of relevant documents
retrieved in the top k. Documents with relevance <= 0 are not relevant. Ties in scores break by document id
(descending), as trec_eval does, so results do not depend on dictionary order.
"""
from __future__ import annotations

import math

import numpy as np

CLASSIFICATION_METRICS = ("accuracy", "f1", "f1_macro", "matthews", "pearson", "spearman")
RETRIEVAL_METRICS = ("ndcg@10", "mrr@10", "recall@100")


def rank_key(score: float | None) -> float:
    """A score as a sort key in which NaN (a diverged fine-tuning run, an undefined correlation) ranks below
    every number: max() and > never replace a NaN once it is held, so it could otherwise stay the best."""
    return -math.inf if score is None or math.isnan(score) else float(score)


def beats(score: float, best: float | None) -> bool:
    """Whether `score` replaces `best` (None: nothing held yet); a number always beats NaN, NaN never wins."""
    return best is None or rank_key(score) > rank_key(best)


def classification_metric(name: str, labels, predictions) -> float:
    """`predictions`: predicted classes for accuracy/F1/Matthews, real values for Pearson/Spearman."""
    from scipy import stats
    from sklearn import metrics

    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if name == "accuracy":
        return float(metrics.accuracy_score(labels, predictions))
    if name == "f1":  # binary F1 of the positive class (GLUE's MRPC / QQP)
        return float(metrics.f1_score(labels, predictions, average="binary", zero_division=0.0))
    if name == "f1_macro":
        return float(metrics.f1_score(labels, predictions, average="macro", zero_division=0.0))
    if name == "matthews":
        return float(metrics.matthews_corrcoef(labels, predictions))
    if name in ("pearson", "spearman"):
        if np.std(predictions) == 0 or np.std(labels) == 0:
            return 0.0  # a constant prediction carries no correlation (scipy would return nan)
        fn = stats.pearsonr if name == "pearson" else stats.spearmanr
        return float(fn(labels, predictions)[0])
    raise ValueError(f"unknown metric {name!r}")


def _ranked(scores: dict[str, float], k: int) -> list[str]:
    return sorted(scores, key=lambda doc: (scores[doc], doc), reverse=True)[:k]


def ndcg_at_k(qrels: dict[str, int], scores: dict[str, float], k: int) -> float:
    gains = [max(qrels.get(doc, 0), 0) for doc in _ranked(scores, k)]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    ideal = sorted((r for r in qrels.values() if r > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def mrr_at_k(qrels: dict[str, int], scores: dict[str, float], k: int) -> float:
    for rank, doc in enumerate(_ranked(scores, k), start=1):
        if qrels.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def recall_at_k(qrels: dict[str, int], scores: dict[str, float], k: int) -> float:
    relevant = {doc for doc, rel in qrels.items() if rel > 0}
    if not relevant:
        return 0.0
    return len(relevant.intersection(_ranked(scores, k))) / len(relevant)


_RANKING = {"ndcg": ndcg_at_k, "mrr": mrr_at_k, "recall": recall_at_k}


def retrieval_metric(name: str, qrels: dict[str, dict[str, int]], run: dict[str, dict[str, float]]) -> float:
    """Mean over the queries of `qrels` that have a relevant document (as BEIR averages) of e.g. 'ndcg@10'.

    `run`: query id -> {doc id: score} (any number of scored documents; a query missing from it scores 0).
    """
    kind, _, k = name.partition("@")
    if kind not in _RANKING or not k.isdigit():
        raise ValueError(f"unknown retrieval metric {name!r} (use ndcg@K, mrr@K or recall@K)")
    values = [_RANKING[kind](judged, run.get(query, {}), int(k))
              for query, judged in qrels.items() if any(r > 0 for r in judged.values())]
    return float(np.mean(values)) if values else 0.0
