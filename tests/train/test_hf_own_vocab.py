"""ModernBERT folders with their own (small) vocabulary load (issue 12, item 7).

transformers' ModernBertConfig has no mask_token_id, so our default 50284 used to fail validation for any
vocabulary smaller than 50285; the folder's tokenizer.json says where [CLS], [SEP], [PAD], [MASK] are."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from data_prep.tokenizer import load_tokenizer, save_tokenizer, special_token_ids, train_tokenizer
from modernbert_train.model import ModernBertForMaskedLM
from modernbert_train.train.recipe import load_recipe
from modernbert_train.train.builders import DataFacts, build_model

REPO = Path(__file__).resolve().parents[2]
VOCAB = 448


@pytest.fixture(scope="module")
def own_vocab_folder(tmp_path_factory) -> Path:
    """A transformers-written ModernBERT folder with a 448-token tokenizer: config.json has the tokenizer's
    pad/cls/sep ids (transformers needs pad inside the vocabulary) and, as transformers writes it, no mask id."""
    import pydoc_data.topics

    folder = tmp_path_factory.mktemp("own_vocab")
    texts = list(pydoc_data.topics.topics.values())[:40]
    save_tokenizer(train_tokenizer(texts, vocab_size=VOCAB, show_progress=False), folder)
    assert load_tokenizer(folder).get_vocab_size() == VOCAB
    config = transformers.ModernBertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                           num_attention_heads=2, intermediate_size=48, max_position_embeddings=256,
                                           local_attention=16, pad_token_id=3, cls_token_id=1, sep_token_id=2,
                                           bos_token_id=1, eos_token_id=2)
    assert "mask_token_id" not in config.to_dict()
    torch.manual_seed(0)
    transformers.ModernBertForMaskedLM(config).save_pretrained(folder)
    return folder


def test_from_hf_takes_special_ids_from_the_folders_tokenizer(own_vocab_folder):
    ids = special_token_ids(load_tokenizer(own_vocab_folder))
    model = ModernBertForMaskedLM.from_hf(own_vocab_folder)
    config = model.config
    assert config.vocab_size == VOCAB
    assert (config.cls_token_id, config.sep_token_id, config.pad_token_id, config.mask_token_id) == \
        (ids.cls_id, ids.sep_id, ids.pad_id, ids.mask_id) == (1, 2, 3, 4)
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(own_vocab_folder).eval()
    tok = transformers.AutoTokenizer.from_pretrained(own_vocab_folder)
    batch = tok(["The for statement iterates.", "while True: pass"], padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.eval()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        reference = theirs(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], reference[real], rtol=1e-4, atol=1e-4)


def test_folder_without_tokenizer_or_mask_id_loads_without_one(own_vocab_folder, tmp_path):
    """The model itself needs no mask id: only masking does, and it asks the data's tokenizer."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((own_vocab_folder / name).read_bytes())
    model = ModernBertForMaskedLM.from_hf(bare)
    assert model.config.mask_token_id is None and model.config.vocab_size == VOCAB


def test_init_from_hf_folder_with_its_own_vocabulary(own_vocab_folder):
    ids = special_token_ids(load_tokenizer(own_vocab_folder))
    recipe = load_recipe(REPO / "yamls/tiny/phase1.yaml", [f"model.init_from=hf:{own_vocab_folder}",
                                                          f"data.tokenizer={own_vocab_folder}"])
    facts = DataFacts(vocab_size=VOCAB, cls_id=ids.cls_id, sep_id=ids.sep_id, pad_id=ids.pad_id, mask_id=ids.mask_id,
                      tokenizer_sha256=None, max_chunk_len=128)
    model = build_model(recipe, facts)
    assert model.config.vocab_size == VOCAB and model.config.mask_token_id == ids.mask_id
    published = transformers.AutoModelForMaskedLM.from_pretrained(own_vocab_folder).state_dict()
    own = model.state_dict()
    assert all(torch.equal(own[k], published[k]) for k in published)
