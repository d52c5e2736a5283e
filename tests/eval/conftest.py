"""A micro model exported as a Hugging Face folder with its tokenizer, and small tasks in every format."""
import json
import shutil

import pytest
import torch

from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM


@pytest.fixture(scope="session")
def eval_tokenizer(tmp_path_factory):
    import pydoc_data.topics

    from data_prep.tokenizer import save_tokenizer, train_tokenizer

    texts = list(pydoc_data.topics.topics.values())[:60]
    tok = train_tokenizer(texts, vocab_size=600, show_progress=False)
    return save_tokenizer(tok, tmp_path_factory.mktemp("eval_tok"))


def micro_config(tokenizer_file) -> ModernBertConfig:
    from data_prep.tokenizer import load_tokenizer, special_token_ids

    ids = special_token_ids(load_tokenizer(tokenizer_file))
    return ModernBertConfig.preset("micro", vocab_size=640, pad_token_id=ids.pad_id, cls_token_id=ids.cls_id,
                                   sep_token_id=ids.sep_id, mask_token_id=ids.mask_id, bos_token_id=ids.cls_id,
                                   eos_token_id=ids.sep_id, attn_backend="sdpa")


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory, eval_tokenizer):
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(micro_config(eval_tokenizer))
    with torch.no_grad():  # away from init, so norms and biases matter
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("hf") / "micro"
    model.save_hf(folder)
    shutil.copyfile(eval_tokenizer, folder / "tokenizer.json")
    return folder


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def toy_tasks(tmp_path_factory):
    """A separable classification task, a pair task, a BEIR folder and held-out text."""
    import random

    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)
    words = {"loop": ["for", "while", "break", "continue", "iterate"],
             "class": ["object", "method", "attribute", "instance", "inherit"]}

    def rows(n):
        out = []
        for _ in range(n):
            label = rng.choice(sorted(words))
            out.append({"sentence": " ".join(rng.choice(words[label]) for _ in range(8)), "topic": label,
                        "other": "the statement", "score": float(label == "loop")})
        return out

    for split, n in (("train", 96), ("dev", 32), ("test", 32)):
        write_jsonl(root / "cls" / f"{split}.jsonl", rows(n))
    beir = root / "beir"
    topics = list(__import__("pydoc_data.topics").topics.topics.items())[:40]
    write_jsonl(beir / "corpus.jsonl", [{"_id": f"d{i}", "title": name, "text": text[:300]}
                                         for i, (name, text) in enumerate(topics)])
    write_jsonl(beir / "queries.jsonl", [{"_id": f"q{i}", "text": name.replace("-", " ")} for i, (name, _) in enumerate(topics)])
    (beir / "qrels").mkdir()
    for split, span in (("train", range(0, 24)), ("test", range(24, 40))):
        (beir / "qrels" / f"{split}.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in span))
    write_jsonl(beir / "hard_negatives.jsonl", [{"query_id": f"q{i}", "negative_ids": [f"d{(i + 1) % 40}"]}
                                               for i in range(24)])
    write_jsonl(root / "heldout.jsonl", [{"text": text[:400]} for _, text in topics[:12]])
    return root


from tests.train.conftest import data_overrides, tiny_data  # noqa: E402,F401 - shared fixtures (real shards)
