"""Vocabulary extension: propose-tokens finds strings worth an id; extend-vocab adds them to unused slots or
appends them, initialises their rows from their pieces, leaves every old token's logits as they were, and
writes a folder whose tokenizer and model transformers loads and agrees with (fill-mask prints the new token)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modernbert_train.common.errors import UserError

N_NEW = 12


@pytest.fixture(scope="module")
def proposals(tiny_data, tmp_path_factory) -> Path:
    from data_prep.cli import main

    out = tmp_path_factory.mktemp("propose") / "candidates.jsonl"
    assert main(["propose-tokens", str(tiny_data["root"] / "corpus" / "code"), "--format", "code",
                 "--tokenizer", str(tiny_data["tokenizer"]), "--top", "40", "--max-mb", "0.2", "--out", str(out),
                 "--progress", "none"]) == 0
    return out


def source_folder(tiny_data, out: Path, unused_slots: int) -> Path:
    """A tiny random ModernBERT with the test tokenizer (+ [unusedN] placeholders, as ModernBERT's has)."""
    from data_prep.tokenizer import load_tokenizer, save_tokenizer
    from modernbert_train.data.tokenizer import special_token_ids, vocab_size
    from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM, pad_vocab_size

    tok = load_tokenizer(tiny_data["tokenizer"])
    if unused_slots:
        tok.add_special_tokens([f"[unused{i}]" for i in range(unused_slots)])
    ids = special_token_ids(tok)
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(ModernBertConfig.preset(
        "micro", vocab_size=pad_vocab_size(vocab_size(tok)), pad_token_id=ids.pad_id, cls_token_id=ids.cls_id,
        sep_token_id=ids.sep_id, mask_token_id=ids.mask_id, bos_token_id=ids.cls_id, eos_token_id=ids.sep_id))
    with torch.no_grad():
        model.decoder.bias.normal_()  # a trained model's biases are not zero: the init must carry them too
    model.save_hf(out)
    save_tokenizer(tok, out)
    return out


def test_proposals_are_frequent_many_piece_strings_with_their_gain(proposals, tiny_data):
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_data["tokenizer"])
    rows = [json.loads(line) for line in proposals.read_text().splitlines()]
    assert len(rows) == 40
    assert [r["gain_tokens"] for r in rows] == sorted((r["gain_tokens"] for r in rows), reverse=True)
    for row in rows:
        assert row["pieces"] == len(tok.encode(row["token"], add_special_tokens=False).ids) >= 2
        assert row["gain_tokens"] == row["count"] * (row["pieces"] - 1) and row["count"] >= 5


@pytest.mark.parametrize("mode", ["unused", "append"])
def test_extension_keeps_old_logits_and_exports_a_folder_transformers_agrees_with(mode, proposals, tiny_data,
                                                                                  tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

    from data_prep.cli import main
    from modernbert_train.checkpoint.vocab import old_token_logits
    from modernbert_train.data.tokenizer import load_tokenizer
    from modernbert_train.model import ModernBertForMaskedLM

    source = source_folder(tiny_data, tmp_path / "source", unused_slots=40 if mode == "unused" else 0)
    out = tmp_path / "extended"
    assert main(["extend-vocab", "--model", str(source), "--tokens", str(proposals), "--top", str(N_NEW),
                 "--mode", mode, "--out", str(out)]) == 0
    record = json.loads((out / "extension.json").read_text())
    old, new = ModernBertForMaskedLM.from_hf(source), ModernBertForMaskedLM.from_hf(out)
    old_tok, new_tok = load_tokenizer(source), load_tokenizer(out)
    rows = old.config.vocab_size
    if mode == "unused":  # 700 ids + 40 slots -> 768 rows, unchanged; the tokens take the first 12 slots
        assert new.config.vocab_size == rows == 768 and [t["id"] for t in record["tokens"]] == list(range(700, 712))
    else:  # 700 ids -> 704 rows, grown to 712 ids -> 768 rows (a multiple of 64)
        assert (rows, new.config.vocab_size) == (704, 768) and [t["id"] for t in record["tokens"]] == list(
            range(700, 712))
    embedding = new.model.embeddings.tok_embeddings.weight
    assert new.decoder.weight is embedding  # tied head grew with it
    for entry in record["tokens"]:
        pieces = old_tok.encode(entry["token"], add_special_tokens=False).ids
        assert entry["init_from_pieces"] == pieces and len(pieces) >= 2
        assert torch.allclose(embedding[entry["id"]], old.model.embeddings.tok_embeddings.weight[pieces].mean(0))
        assert torch.allclose(new.decoder.bias[entry["id"]], old.decoder.bias[pieces].mean())
        assert new_tok.encode(entry["token"], add_special_tokens=False).ids == [entry["id"]]
    # Step 0: text made only of old tokens gives every old token exactly the logit it had.
    text = (tiny_data["root"] / "corpus" / "code").rglob("*.py").__next__().read_text()[:2000]
    ids = [i for i in old_tok.encode(text).ids[:200] if i < 700]
    kept = [i for i in range(rows) if i not in {t["id"] for t in record["tokens"]}]
    assert torch.equal(old_token_logits(old, ids, rows)[:, kept], old_token_logits(new, ids, rows)[:, kept])

    # The exported folder: transformers loads model and tokenizer, tokenizes the new strings to the new ids,
    # and computes our logits.
    hf_model = AutoModelForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    probe = "x = 1" + "".join(t["token"] for t in record["tokens"][:4])
    assert hf_tok(probe)["input_ids"] == new_tok.encode(probe).ids
    assert set(hf_tok(probe)["input_ids"]) >= {t["id"] for t in record["tokens"][:4]}
    batch = torch.tensor([new_tok.encode(probe).ids])
    with torch.no_grad():
        theirs = hf_model(input_ids=batch).logits[0]
    ours = old_token_logits(new, batch[0].tolist(), new.config.vocab_size)
    assert torch.allclose(theirs, ours, atol=1e-4)

    # fill-mask names a new token by its text: make one the model's favourite and ask the pipeline.
    favourite = record["tokens"][0]
    with torch.no_grad():
        hf_model.decoder.bias[favourite["id"]] = 100.0
    fill = pipeline("fill-mask", model=hf_model, tokenizer=hf_tok, device="cpu")
    top = fill(f"import os{hf_tok.mask_token}")[0]
    assert top["token"] == favourite["id"] and top["token_str"].strip() == favourite["token"].strip()


def test_unused_mode_refuses_more_tokens_than_slots(proposals, tiny_data, tmp_path):
    from modernbert_train.checkpoint.vocab import extend_hf_folder

    source = source_folder(tiny_data, tmp_path / "source", unused_slots=3)
    with pytest.raises(UserError, match=r"12 new tokens but the tokenizer has only 3 unused slots"):
        extend_hf_folder(source, [json.loads(line)["token"] for line in proposals.read_text().splitlines()][:N_NEW],
                         "unused", tmp_path / "out")
