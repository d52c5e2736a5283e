"""Our metric code against scikit-learn / scipy and trec_eval (pytrec_eval) on random inputs."""
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from modernbert_train.eval.metrics import classification_metric, retrieval_metric


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    labels, predictions = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert classification_metric("accuracy", labels, predictions) == pytest.approx(np.mean(labels == predictions))
    assert classification_metric("f1", labels, predictions) == pytest.approx(skm.f1_score(labels, predictions))
    assert classification_metric("matthews", labels, predictions) == pytest.approx(
        skm.matthews_corrcoef(labels, predictions))
    three, three_pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert classification_metric("f1_macro", three, three_pred) == pytest.approx(
        skm.f1_score(three, three_pred, average="macro"))
    gold, guess = rng.normal(size=100), rng.normal(size=100)
    assert classification_metric("pearson", gold, guess) == pytest.approx(stats.pearsonr(gold, guess)[0])
    assert classification_metric("spearman", gold, guess) == pytest.approx(stats.spearmanr(gold, guess)[0])
    # Hand-checkable: perfect predictions.
    assert classification_metric("matthews", labels, labels) == pytest.approx(1.0)


def _random_run(rng, queries=30, docs=300):
    qrels, run = {}, {}
    for q in range(queries):
        judged = rng.choice(docs, size=rng.integers(1, 6), replace=False)
        qrels[f"q{q}"] = {f"d{d}": int(rng.integers(0, 3)) for d in judged}
        qrels[f"q{q}"][f"d{judged[0]}"] = int(rng.integers(1, 3))  # at least one relevant
        # Rounded scores create ties, which trec_eval breaks by document id.
        run[f"q{q}"] = {f"d{d}": float(np.round(rng.normal(), 1)) for d in range(docs)}
    return qrels, run


@pytest.mark.parametrize("seed", range(3))
def test_ranking_metrics_match_trec_eval(seed):
    pytrec_eval = pytest.importorskip("pytrec_eval")  # in the dev extra; installed in the project venvs
    rng = np.random.default_rng(seed)
    qrels, run = _random_run(rng)
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10", "recall.100"})
    per_query = evaluator.evaluate(run)
    assert retrieval_metric("ndcg@10", qrels, run) == pytest.approx(
        np.mean([v["ndcg_cut_10"] for v in per_query.values()]), abs=1e-9)
    assert retrieval_metric("recall@100", qrels, run) == pytest.approx(
        np.mean([v["recall_100"] for v in per_query.values()]), abs=1e-9)
    # MRR@10 = trec_eval's reciprocal rank on each query's top 10 documents.
    top10 = {q: dict(sorted(s.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:10]) for q, s in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)
    assert retrieval_metric("mrr@10", qrels, run) == pytest.approx(
        np.mean([v["recip_rank"] for v in rr.values()]), abs=1e-9)


def test_ranking_metrics_by_hand():
    qrels = {"q": {"a": 1, "c": 2}}
    run = {"q": {"a": 0.9, "b": 0.8, "c": 0.1}}
    ideal = 2 + 1 / np.log2(3)
    assert retrieval_metric("ndcg@10", qrels, run) == pytest.approx((1 + 2 / np.log2(4)) / ideal)
    assert retrieval_metric("mrr@10", qrels, run) == 1.0
    assert retrieval_metric("recall@2", qrels, run) == 0.5
