"""The local tasks built from this machine's standard library: deterministic, split without overlap, and the
two tasks meant to need more than word identity really do (shuffled lines keep the bag of words; code-search
queries without the signature's names). Retrieval chooses its grid point on its dev split."""
import ast
import json
from collections import Counter

import pytest

from modernbert_train.eval.local_tasks import _shuffled, _without_signature, build_local_tasks
from modernbert_train.eval.runner import _summarise
from modernbert_train.eval.suite import DataSpec, Sweep, TaskSpec


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("local")
    return root, build_local_tasks(root)


def test_build_is_deterministic_and_reused(built, tmp_path):
    root, info = built
    again = build_local_tasks(tmp_path)
    assert again["counts"] == info["counts"]
    for name in ("stdlib-shuffled-lines/train.jsonl", "stdlib-code-search-noname/queries.jsonl",
                 "stdlib-code-search-noname/qrels/dev.tsv", "stdlib-topic/test.jsonl"):
        assert (tmp_path / name).read_bytes() == (root / name).read_bytes(), name
    assert build_local_tasks(root) == info  # same settings: the files are reused


def test_shuffled_lines_classes_share_their_bag_of_words(built):
    root, info = built
    splits = {s: _jsonl(root / "stdlib-shuffled-lines" / f"{s}.jsonl") for s in ("train", "dev", "test")}
    assert [len(rows) for rows in splits.values()] == [480, 120, 200]
    texts = [r["text"] for rows in splits.values() for r in rows]
    assert len(set(texts)) == len(texts)  # one example per function body: no text in two splits
    for split, rows in splits.items():
        share = Counter(r["label"] for r in rows)["shuffled"] / len(rows)
        assert 0.35 < share < 0.65, (split, share)
    lines = ["a = 1", "b = a", "if b:", "    c = b", "return c"]
    shuffled = _shuffled(lines, "key")
    assert shuffled != lines and sorted(shuffled) == sorted(lines) and _shuffled(lines, "key") == shuffled


def test_noname_queries_lose_the_signature_names_only(built):
    root, _ = built
    folder = root / "stdlib-code-search-noname"
    corpus = {r["_id"]: r["text"] for r in _jsonl(folder / "corpus.jsonl")}
    queries = {r["_id"]: r["text"] for r in _jsonl(folder / "queries.jsonl")}
    original = {r["_id"]: r["text"] for r in _jsonl(root / "stdlib-code-search" / "queries.jsonl")}
    qrels = {s: [line.split("\t") for line in (folder / "qrels" / f"{s}.tsv").read_text().splitlines()[1:]]
             for s in ("train", "dev", "test")}
    assert min(len(pairs) for pairs in qrels.values()) >= 80
    assert not {q for q, _, _ in qrels["dev"]} & {q for s in ("train", "test") for q, _, _ in qrels[s]}
    shortened = 0
    for query_id, doc_id, _ in qrels["test"]:
        try:
            node = ast.parse(corpus[doc_id]).body[0]
        except SyntaxError:
            continue  # documents are cut at 4,000 characters
        words = {w.strip(".,:;()`'\"") for w in queries[query_id].split()}
        assert node.name not in words and not ({a.arg for a in node.args.args} - {"self", "cls"}) & words
        shortened += len(queries[query_id]) < len(original[query_id].split("\n\n")[0])
    assert shortened > len(qrels["test"]) // 4  # the names were there to remove in many queries
    assert _without_signature("Read the config file at path.", "def read_file(path):\n    pass") == \
        "the config at"


def test_retrieval_chooses_the_grid_point_on_dev(tmp_path):
    task = TaskSpec(name="search", type="retrieval", data=DataSpec(beir="x", dev_split="dev"),
                    metrics=["ndcg@10"], main_metric="ndcg@10", sweep=Sweep(lr=[1e-4, 1e-3]))
    records = [dict(lr=lr, weight_decay=0.0, epochs=1, seed=seed, eval={"ndcg@10": test}, dev={"ndcg@10": dev})
               for lr, dev, test in ((1e-4, 0.5, 0.1), (1e-3, 0.2, 0.9)) for seed in (0, 1)]

    class Model:
        name = "m"

    summary = _summarise(task, Model(), records)
    assert summary.chosen["lr"] == 1e-4 and summary.metric_means["ndcg@10"] == pytest.approx(0.1)
    assert summary.split == "test"
