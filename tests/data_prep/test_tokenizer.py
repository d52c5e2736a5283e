"""Tokenizer training, loading and special-token lookup (contract 1)."""
from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models

from .conftest import build_official_layout_tokenizer, read_jsonl_texts
from data_prep.local_corpus import stdlib_dir, stdlib_python_files
from data_prep.tokenizer import (SpecialTokenIds, load_tokenizer, special_token_ids, train_tokenizer,
                                 verify_saved_tokenizer, vocab_size)
from modernbert_train.common.errors import UserError


def test_trained_tokenizer_has_specials_first_and_wraps_cls_sep(trained_tokenizer_dir):
    tok = load_tokenizer(trained_tokenizer_dir)
    assert special_token_ids(tok) == SpecialTokenIds(cls_id=1, sep_id=2, pad_id=3, mask_id=4, unk_id=0)
    assert [tok.id_to_token(i) for i in range(5)] == ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    assert vocab_size(tok) == 3000
    ids = tok.encode("import os\n").ids
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) > 2


def test_round_trip_is_lossless_on_held_out_stdlib_files(trained_tokenizer_dir, local_corpus):
    """Files the tokenizer never saw (beyond the corpus cap), plus whitespace-heavy edge cases."""
    tok = load_tokenizer(trained_tokenizer_dir)
    trained_on = {p.relative_to(local_corpus / "code") for p in (local_corpus / "code").rglob("*.py")}
    held_out = [p for p in stdlib_python_files() if p.relative_to(stdlib_dir()) not in trained_on][::40][:25]
    assert len(held_out) >= 10
    texts = [p.read_text(encoding="utf-8") for p in held_out]
    texts += ["\tif x:\r\n\t\treturn  y   \n\n\n\n    # trailing   \n", " leading space", "   ", "日本語 😀 naïve",
              "a[MASK] b [CLS]"]  # a literal mask takes the space before it (lstrip, as ModernBERT's)
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_whitespace_runs_become_their_own_tokens(trained_tokenizer_dir):
    tok = load_tokenizer(trained_tokenizer_dir)
    # Python indentation is the most frequent whitespace run in the corpus: one token for a 4-space indent.
    pieces = tok.encode("def f():\n        return 1\n", add_special_tokens=False).tokens
    decoded = [tok.decode([tok.token_to_id(p)]) for p in pieces]
    assert any(set(piece) == {" "} and len(piece) >= 3 for piece in decoded), decoded
    # No piece mixes a line break with anything but whitespace: line structure survives in the pieces.
    assert all(piece.isspace() for piece in decoded if "\n" in piece), decoded
    assert "".join(decoded) == "def f():\n        return 1\n"


def test_transformers_loads_trained_tokenizer_offline_and_agrees(trained_tokenizer_dir, local_corpus):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    hf_tok = AutoTokenizer.from_pretrained(str(trained_tokenizer_dir), local_files_only=True)
    assert isinstance(hf_tok, PreTrainedTokenizerFast)
    assert (hf_tok.cls_token_id, hf_tok.sep_token_id, hf_tok.pad_token_id, hf_tok.mask_token_id) == (1, 2, 3, 4)
    tok = load_tokenizer(trained_tokenizer_dir)
    prose = read_jsonl_texts(local_corpus / "prose" / "pydoc_topics.jsonl")[:20]
    code = [p.read_text(encoding="utf-8") for p in sorted((local_corpus / "code").rglob("*.py"))[:10]]
    for text in prose + code:
        ids = tok.encode(text).ids
        assert hf_tok(text)["input_ids"] == ids
        assert hf_tok.decode(ids, skip_special_tokens=True) == text
    batch = hf_tok(prose[:4], padding=True, return_tensors="np")
    assert batch["input_ids"].shape[0] == 4 and (batch["input_ids"] == 3).any()  # padded with [PAD]=3
    verify_saved_tokenizer(trained_tokenizer_dir, prose[:3])  # the check train-tokenizer runs itself


def test_official_modernbert_layout_is_found_by_token_string(tmp_path):
    path = build_official_layout_tokenizer(tmp_path / "tokenizer.json")
    tok = load_tokenizer(tmp_path)  # a folder holding tokenizer.json works like the file
    assert special_token_ids(tok) == SpecialTokenIds(cls_id=50281, sep_id=50282, pad_id=50283, mask_id=50284,
                                                     unk_id=50280)
    assert vocab_size(load_tokenizer(path)) == 50368


def test_roberta_style_specials_and_optional_unk(tmp_path):
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<mask>": 3, "a": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    assert special_token_ids(tok) == SpecialTokenIds(cls_id=0, sep_id=2, pad_id=1, mask_id=3, unk_id=None)


def test_missing_special_token_names_the_file(tmp_path):
    tok = Tokenizer(models.WordLevel(vocab={"[CLS]": 0, "[SEP]": 1, "[PAD]": 2, "x": 3}, unk_token=None))
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    with pytest.raises(UserError, match=r"tokenizer .*tokenizer\.json lacks the special token\(s\) \[MASK\]"):
        special_token_ids(load_tokenizer(path), path)


def test_load_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="nope.json does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(UserError, match=f"{tmp_path} has no tokenizer.json"):
        load_tokenizer(tmp_path)
    broken = tmp_path / "tokenizer.json"
    broken.write_text(json.dumps({"model": "nonsense"}))
    with pytest.raises(UserError, match="tokenizer.json is not a valid tokenizer.json"):
        load_tokenizer(broken)


def test_vocab_too_small_is_refused():
    with pytest.raises(UserError, match="--vocab-size 100 is too small"):
        train_tokenizer(["abc"], vocab_size=100, show_progress=False)


def test_trained_mask_token_absorbs_the_space_before_it(trained_tokenizer_dir):
    """Issue 12 item 6: "the state of the [MASK] is" has no stray space token before the mask."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(trained_tokenizer_dir), local_files_only=True)
    tokens = hf_tok.convert_ids_to_tokens(hf_tok("the state of the [MASK] is")["input_ids"])
    assert tokens[tokens.index("[MASK]") - 1:] == ["Ġthe", "[MASK]", "Ġis", "[SEP]"], tokens
    assert json.loads((trained_tokenizer_dir / "tokenizer.json").read_text())["added_tokens"][4]["lstrip"] is True
