"""Retrieval search streams the corpus in chunks (running top-k) and ranks exactly as one top-k over the full
score matrix; the shipped BEIR suite runs on folders laid out as BEIR's zips are (no hard negatives there)."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from modernbert_train.cli.main import main
from modernbert_train.eval import retrieval
from modernbert_train.eval.data import BeirData
from modernbert_train.eval.encoder import MeanPoolingEmbedder, TextEncoder
from modernbert_train.eval.metrics import retrieval_metric
from modernbert_train.eval.suite import DataSpec, TaskSpec, load_suite
from modernbert_train.model import ModernBertForMaskedLM
from tests.eval.conftest import micro_config, write_jsonl

BEIR_SUITE = Path(__file__).resolve().parents[2] / "yamls" / "eval" / "beir.yaml"


def _topics(n):
    import pydoc_data.topics

    return list(pydoc_data.topics.topics.items())[:n]


@pytest.fixture(scope="module")
def corpus_and_model(eval_tokenizer):
    """53 documents of 100-164 tokens, 20 queries (2 relevant documents each), a random-init micro embedder."""
    topics = _topics(53)
    data = BeirData(corpus={f"d{i}": f"{name} {text[:300]}" for i, (name, text) in enumerate(topics)},
                    queries={f"q{i}": name.replace("-", " ") for i, (name, _) in enumerate(topics[:20])},
                    qrels={f"q{i}": {f"d{i}": 1, f"d{(7 * i + 3) % 53}": 2} for i in range(20)})
    torch.manual_seed(0)
    embedder = MeanPoolingEmbedder(ModernBertForMaskedLM(micro_config(eval_tokenizer)))
    return data, embedder, TextEncoder(eval_tokenizer, 512), TextEncoder(eval_tokenizer, 16)


def _one_shot_search(embedder, data, doc_encoder, query_encoder, batch_size, k):
    """The search before streaming: the whole corpus embedded at once, one top-k over queries x corpus."""
    doc_ids, query_ids = list(data.corpus), list(data.qrels)
    docs = retrieval.embed(embedder, doc_encoder.encode([data.corpus[d] for d in doc_ids]), batch_size, "cpu")
    queries = retrieval.embed(embedder, query_encoder.encode([data.queries[q] for q in query_ids]), batch_size, "cpu")
    top = retrieval.cosine_scores(queries, docs).topk(min(k, len(doc_ids)), dim=1)
    return {q: {doc_ids[d]: float(s) for s, d in zip(values.tolist(), indices.tolist())}
            for q, values, indices in zip(query_ids, top.values, top.indices)}


def _assert_same_search(run, expected, qrels, exact):
    assert list(run) == list(expected)
    for query in expected:  # the same documents in the same order, with the same scores
        assert list(run[query]) == list(expected[query])
        if exact:
            assert list(run[query].values()) == list(expected[query].values())
        else:
            assert list(run[query].values()) == pytest.approx(list(expected[query].values()), rel=0, abs=1e-6)
    for metric in ("ndcg@10", "mrr@10", "recall@5", "recall@100"):
        assert retrieval_metric(metric, qrels, run) == retrieval_metric(metric, qrels, expected)


@pytest.mark.parametrize("top_k, chunk_size", [(100, 7), (5, 7), (12, 5), (5, 1000)])
def test_chunked_search_equals_one_top_k_over_the_whole_corpus(monkeypatch, corpus_and_model, top_k, chunk_size):
    """One document per embedding batch: every embedding is the same in both searches, so chunking may change
    nothing, not a score's last bit."""
    data, embedder, doc_encoder, query_encoder = corpus_and_model
    monkeypatch.setattr(retrieval, "TOP_K", top_k)
    expected = _one_shot_search(embedder, data, doc_encoder, query_encoder, 1, top_k)
    run = retrieval.search(embedder, data, doc_encoder, query_encoder, data.qrels, 1, "cpu", chunk_size=chunk_size)
    assert all(len(scored) == min(top_k, 53) for scored in run.values())
    _assert_same_search(run, expected, data.qrels, exact=True)


def test_chunked_search_with_packed_batches_ranks_as_one_shot(monkeypatch, corpus_and_model):
    """Packed batches of 4: a chunk of 7 groups documents with other batch mates than the whole corpus does,
    which float32 kernels see as ~1e-8 noise in an embedding; rankings and metrics stay the same."""
    data, embedder, doc_encoder, query_encoder = corpus_and_model
    monkeypatch.setattr(retrieval, "TOP_K", 10)
    expected = _one_shot_search(embedder, data, doc_encoder, query_encoder, 4, 10)
    run = retrieval.search(embedder, data, doc_encoder, query_encoder, data.qrels, 4, "cpu", chunk_size=7)
    _assert_same_search(run, expected, data.qrels, exact=False)


def test_scores_do_not_depend_on_how_many_documents_are_scored_together(monkeypatch):
    torch.manual_seed(0)
    queries = F.normalize(torch.randn(30, 48), dim=-1)
    docs = F.normalize(torch.randn(61, 48), dim=-1)
    whole = retrieval.cosine_scores(queries, docs)
    assert torch.equal(torch.cat([retrieval.cosine_scores(queries, docs[s:s + 7]) for s in range(0, 61, 7)], 1),
                       whole)
    assert torch.allclose(whole, queries @ docs.T, rtol=0, atol=1e-6)
    monkeypatch.setattr(retrieval, "SCORE_BLOCK", 2 * 61)  # 2 queries scored at a time: the same top k
    values, indices = retrieval.chunk_top_k(queries, docs, 5)
    top = whole.topk(5, dim=1)
    assert torch.equal(values, top.values) and torch.equal(indices, top.indices)


def test_run_retrieval_tokenizes_the_corpus_one_chunk_at_a_time(monkeypatch, toy_tasks, hf_folder):
    """No token list of the whole corpus: each document is tokenized once, in a call of at most a chunk, and the
    metrics equal a search in one chunk."""
    from modernbert_train.eval.models import load_eval_model

    model = load_eval_model(str(hf_folder))
    task = TaskSpec(name="s", type="retrieval", zero_shot=True, max_length=64, query_max_length=16,
                    metrics=["ndcg@10", "mrr@10", "recall@100"], main_metric="ndcg@10",
                    data=DataSpec(beir=str(toy_tasks / "beir")))
    encoded_docs = []
    original = TextEncoder.encode

    def recording(self, texts, pairs=None):
        if self.max_length == 64:  # the document encoder (queries: 16)
            encoded_docs.append(list(texts))
        return original(self, texts, pairs)

    monkeypatch.setattr(TextEncoder, "encode", recording)
    kwargs = dict(lr=0.0, weight_decay=0.0, epochs=0, seed=0, device="cpu", where="t")
    monkeypatch.setattr(retrieval, "CORPUS_CHUNK", 6)
    chunked, _, _ = retrieval.run_retrieval(task, model, **kwargs)
    assert max(len(call) for call in encoded_docs) <= 6
    corpus = [json.loads(line) for line in (toy_tasks / "beir" / "corpus.jsonl").read_text().splitlines()]
    assert sum(len(call) for call in encoded_docs) == len(corpus) == 40  # every document once
    monkeypatch.setattr(retrieval, "CORPUS_CHUNK", 1000)
    whole, _, _ = retrieval.run_retrieval(task, model, **kwargs)
    assert chunked == whole and whole["recall@100"] == 1.0


def _beir_folder(root: Path, splits, n_docs=6):
    """A tiny folder laid out as BEIR's <name>.zip unpacks: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""
    topics = _topics(n_docs)
    write_jsonl(root / "corpus.jsonl", [{"_id": f"d{i}", "title": name, "text": text[:120]}
                                        for i, (name, text) in enumerate(topics)])
    write_jsonl(root / "queries.jsonl", [{"_id": f"q{i}", "text": name} for i, (name, _) in enumerate(topics)])
    (root / "qrels").mkdir()
    for split in splits:
        (root / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(n_docs)))


def test_shipped_beir_suite_runs_on_folders_as_the_zips_unpack(tmp_path, hf_folder):
    suite = load_suite(BEIR_SUITE)
    assert all(t.data.hard_negatives is None for t in suite.tasks)  # msmarco.zip has none
    data_root = tmp_path / "beir"
    for task in suite.tasks:
        splits = {s for s in (task.data.train_split, task.data.eval_split, task.data.dev_split) if s}
        _beir_folder(data_root / Path(task.data.beir).name, splits if task.zero_shot else {"train", "dev", "test"})
    out = tmp_path / "out"
    assert main(["eval", str(BEIR_SUITE), "--model", str(hf_folder), f"data_root={data_root}", "--out", str(out),
                 "--device", "cpu"]) == 0
    summary = {s["task"]: s for s in json.loads((out / "results.json").read_text())["summary"]}
    assert set(summary) == {t.name for t in suite.tasks}
    assert all(s["metric_means"]["recall@100"] == 1.0 for s in summary.values())  # 6 documents: all retrieved


def test_uncommented_hard_negatives_line_is_read_and_a_missing_file_stays_an_error(tmp_path, hf_folder, capsys):
    text = BEIR_SUITE.read_text()
    commented = '      # hard_negatives: "${data_root}/msmarco/hard_negatives.jsonl"\n'
    assert commented in text
    suite_file = tmp_path / "beir.yaml"
    suite_file.write_text(text.replace(commented, commented.replace("# ", "", 1)))
    msmarco = load_suite(suite_file, [f"data_root={tmp_path}"]).tasks[0]
    assert msmarco.data.hard_negatives == f"{tmp_path}/msmarco/hard_negatives.jsonl"
    _beir_folder(tmp_path / "msmarco", ["train", "dev"])
    assert main(["eval", str(suite_file), "--model", str(hf_folder), f"data_root={tmp_path}",
                 "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.count("\n") == 0 and str(suite_file) in line
    assert f"msmarco.data.hard_negatives: {tmp_path}/msmarco/hard_negatives.jsonl does not exist" in line
