"""The local tasks built from this machine's standard library: deterministic, split without overlap, and the
two tasks meant to need more than word identity really do (shuffled lines keep the bag of words; code-search
queries without the signature's names). Retrieval chooses its grid point on its dev split."""
import ast
import json
import re
from collections import Counter

import pytest

from modernbert_train.eval.local_tasks import (TRANSFER_TRAIN, _shuffled, _without_shared_words, _without_signature,
                                               build_local_tasks)
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
                 "stdlib-code-search-noname/qrels/dev.tsv", "stdlib-topic/test.jsonl",
                 "stdlib-code-continuation/corpus.jsonl", "stdlib-code-continuation/qrels/test.tsv"):
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


def _beir(folder):
    """(corpus id -> text, query id -> text, split -> [(query id, doc id)]) of a BEIR folder's three splits."""
    texts = [{r["_id"]: r["text"] for r in _jsonl(folder / f"{name}.jsonl")} for name in ("corpus", "queries")]
    qrels = {s: [line.split("\t")[:2] for line in (folder / "qrels" / f"{s}.tsv").read_text().splitlines()[1:]]
             for s in ("train", "dev", "test")}
    return texts[0], texts[1], qrels


def test_noname_queries_lose_the_signature_names_only(built):
    root, _ = built
    corpus, queries, qrels = _beir(root / "stdlib-code-search-noname")
    original = {r["_id"]: r["text"] for r in _jsonl(root / "stdlib-code-search" / "queries.jsonl")}
    assert min(len(pairs) for pairs in qrels.values()) >= 80
    assert not {q for q, _ in qrels["dev"]} & {q for s in ("train", "test") for q, _ in qrels[s]}
    shortened = 0
    for query_id, doc_id in qrels["test"]:
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


def _identifier_words(code):
    """Every word of a code text, identifiers split at underscores and case changes, lower-cased."""
    words = set()
    for token in re.findall(r"[A-Za-z0-9]+", code):
        words.add(token.lower())
        words.update(w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", token))
    return words


def test_nooverlap_queries_share_no_word_with_their_code(built):
    root, info = built
    corpus, queries, qrels = _beir(root / "stdlib-code-search-nooverlap")
    assert min(len(pairs) for pairs in qrels.values()) >= 80
    assert corpus == {r["_id"]: r["text"] for r in _jsonl(root / "stdlib-code-search" / "corpus.jsonl")}
    for split, pairs in qrels.items():
        for query_id, doc_id in pairs:
            words = {w.lower() for w in re.findall(r"[A-Za-z0-9]+", queries[query_id]) if len(w) >= 2}
            assert len(queries[query_id].split()) >= 3
            assert not words & _identifier_words(corpus[doc_id]), (split, queries[query_id])
    code = "def load(path):\n    return open(path).readlines()  # config"
    assert _without_shared_words("Read the lines of the config files at a path.", code) == "the of the files at a"


def test_transfer_training_pairs_come_from_the_pretraining_side_only(built):
    root, info = built
    folder = root / TRANSFER_TRAIN
    corpus = {r["text"] for r in _jsonl(folder / "corpus.jsonl")}
    held_out = {r["text"] for r in _jsonl(root / "stdlib-code-search" / "corpus.jsonl")}
    assert info["counts"]["transfer_train"] > 2000 and info["counts"]["transfer_train-nooverlap"] > 2000
    assert not corpus & held_out
    # training splits only: nothing here is scored
    assert sorted(p.name for p in (folder / "qrels").iterdir()) == ["train-nooverlap.tsv", "train.tsv"]


def test_code_continuation_cuts_each_function_once_between_40_and_70_percent(built):
    root, info = built
    tails, heads, qrels = _beir(root / "stdlib-code-continuation")
    assert [len(qrels[s]) for s in ("train", "dev", "test")] == [760, 100, 200]
    pairs = [pair for split in qrels.values() for pair in split]
    assert len({q for q, _ in pairs}) == len({d for _, d in pairs}) == len(tails) == len(pairs)  # one cut each
    for query_id, doc_id in pairs:
        head, tail = heads[query_id].splitlines(), tails[doc_id].splitlines()
        assert any(line.startswith(("def ", "async def ")) for line in head)  # decorators come first
        assert not any(line.startswith(("def ", "async def ")) for line in tail)
        lines = len(head) + len(tail)
        assert round(0.4 * lines) <= len(head) <= round(0.7 * lines)
        ast.parse("\n".join(head + tail))  # the two halves are one function again


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


def test_retrieval_dev_split_scores_what_an_eval_on_that_split_scores(tmp_path, toy_tasks, hf_folder):
    """dev_split shares the corpus search with eval_split: its scores equal scoring that split on its own."""
    import shutil

    from modernbert_train.eval.models import load_eval_model
    from modernbert_train.eval.retrieval import run_retrieval

    beir = tmp_path / "beir"
    shutil.copytree(toy_tasks / "beir", beir)
    (beir / "qrels" / "dev.tsv").write_text((beir / "qrels" / "train.tsv").read_text())
    model = load_eval_model(str(hf_folder))

    def task(**data):
        return TaskSpec(name="s", type="retrieval", zero_shot=True, max_length=64,
                        metrics=["ndcg@10", "recall@100"], main_metric="ndcg@10", data=DataSpec(beir=str(beir), **data))

    kwargs = dict(lr=0.0, weight_decay=0.0, epochs=0, seed=0, device="cpu", where="t")
    test, dev, _ = run_retrieval(task(dev_split="dev"), model, **kwargs)
    alone_dev, none, _ = run_retrieval(task(eval_split="dev"), model, **kwargs)
    alone_test, _, _ = run_retrieval(task(), model, **kwargs)
    assert none is None and dev == pytest.approx(alone_dev) and test == pytest.approx(alone_test)
    assert dev != test  # different queries: not the same split scored twice


def test_demo_suite_keeps_the_tasks_that_show_pretraining():
    from pathlib import Path

    from modernbert_train.eval.suite import load_suite

    suite = load_suite(Path(__file__).resolve().parents[2] / "yamls" / "eval" / "local.yaml")
    tasks = {t.name: t for t in suite.tasks}
    few = tasks["stdlib-topic-60"]  # low-resource: each model's LR is chosen on dev from a grid, 3 seeds
    assert few.limit == 60 and len(few.sweep.lr) >= 2 and len(few.sweep.seeds) >= 3
    assert "recall@100" in tasks["stdlib-code-search"].metrics


def _task_texts(root):
    """(file, text) of every text a local task shows a model: queries, documents, examples, held-out prose
    (the transfer training pairs aside: they come from the pretraining side on purpose)."""
    return [(str(path.relative_to(root)), row["text"]) for path in sorted(root.rglob("*.jsonl"))
            if TRANSFER_TRAIN not in path.parts for row in _jsonl(path) if "text" in row]


def test_default_sizes_are_full(built):
    _, info = built
    counts = info["counts"]
    assert [counts[f"topic_{s}"] for s in ("train", "dev", "test")] == [432, 108, 180]  # 120 per topic, 60/15/25
    assert (counts["corpus"], counts["retrieval_train"], counts["retrieval_test"]) == (1200, 800, 200)
    assert [counts[f"shuffle_{s}"] for s in ("train", "dev", "test")] == [480, 120, 200]
    assert counts["heldout"] == 200 and counts["noname_dev"] >= 80
    assert [counts[f"continuation_{s}"] for s in ("train", "dev", "test")] == [760, 100, 200]


def test_no_task_text_is_in_the_pretraining_corpus(built, tmp_path):
    """The local corpus (uncapped: every file it may take) holds no text of any task, whole or as a run of
    lines; every task is built from reserved files only, and small sizes come out as requested."""
    from data_prep.local_corpus import build_local_corpus, reserved_for_eval, stdlib_python_files
    from modernbert_train.eval.local_tasks import PretrainingText

    root, _ = built
    corpus = tmp_path / "corpus"
    info = build_local_corpus(corpus)
    code = sorted((corpus / "code").rglob("*.py"))
    assert not [p for p in code if reserved_for_eval(p.relative_to(corpus / "code"))]
    docstrings = _jsonl(corpus / "prose" / "docstrings.jsonl")
    assert docstrings and not [d for d in docstrings if reserved_for_eval(d["id"])]
    reserved_bytes = sum(p.stat().st_size for p in stdlib_python_files(reserved=True))
    assert 0.25 < reserved_bytes / (reserved_bytes + info["code"]["bytes"]) < 0.5

    texts = [p.read_text(encoding="utf-8") for p in code] + [d["text"] for d in docstrings]
    texts += [d["text"] for d in _jsonl(corpus / "prose" / "pydoc_topics.jsonl")]
    pretraining = PretrainingText(texts)
    small = tmp_path / "small"
    sizes = dict(per_topic=20, retrieval_train=60, retrieval_test=20, corpus_size=100, heldout=30, retrieval_dev=10,
                 shuffle_split=(30, 10, 20))
    counts = build_local_tasks(small, **sizes)["counts"]
    assert [counts[f"topic_{s}"] for s in ("train", "dev", "test")] == [72, 18, 30]
    assert [counts[k] for k in ("corpus", "retrieval_train", "retrieval_test", "heldout")] == [100, 60, 20, 30]
    assert [counts[f"shuffle_{s}"] for s in ("train", "dev", "test")] == [30, 10, 20]
    for folder in (root, small):
        shown = _task_texts(folder)
        assert len(shown) > 500
        # one-word queries ("Constructor.") are phrases any docstring may hold, not a text of the task
        leaked = [(name, text[:80]) for name, text in shown if len(text.split()) >= 2 and pretraining.has_run(text)]
        assert not leaked, leaked[:5]
    assert PretrainingText(["x = 1\n    '''Return the answer.\n    More.'''\n"]).has_run("Return the answer.\nMore.")

    # Tasks built under another rule (before files were reserved) are rebuilt, not reused.
    info_file, heldout = small / "tasks_info.json", (small / "heldout.jsonl").read_text()
    stale = json.loads(info_file.read_text())
    del stale["settings"]["reserved_files"]
    info_file.write_text(json.dumps(stale))
    (small / "heldout.jsonl").write_text(json.dumps({"text": "a docstring the corpus holds"}) + "\n")
    build_local_tasks(small, **sizes)
    assert (small / "heldout.jsonl").read_text() == heldout
