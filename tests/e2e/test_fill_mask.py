"""Trainer -> export -> transformers' fill-mask pipeline: a model trained on real sentences fills them in.

The corpus is small enough (a few Python reference-manual paragraphs) for the tiny model to learn it in a
few hundred steps, so "sensible" can be asserted: the masked word comes back in the top 5.
"""
import json
from pathlib import Path

import pydoc_data.topics
import pytest
import torch
import transformers

from data_prep.prepare import PrepareConfig, prepare
from data_prep.tokenizer import save_tokenizer, train_tokenizer
from modernbert_train.train.recipe import load_recipe
from modernbert_train.train.trainer import train
from modernbert_train.run.export import export_to_hf

pytestmark = pytest.mark.slow
REPO_RECIPE = "yamls/tiny/phase1.yaml"
# With the authors' head init (issue 12 item 12) 300 steps left the loss at 2.3 and " loop" out of the top 5.
STEPS = 450
TOPICS = ("break", "continue", "pass", "return", "while", "del")
# (sentence as it appears in the corpus, the word to mask)
PROBES = [
    ('It terminates the nearest enclosing loop, skipping the optional "else"\nclause if the loop has one.', " loop"),
    ("\"pass\" is a null operation — when it is executed, nothing happens.", " executed"),
]


def test_trained_export_fills_masks_from_its_training_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    docs = [pydoc_data.topics.topics[name] for name in TOPICS]
    for sentence, _ in PROBES:
        assert any(sentence in doc for doc in docs), sentence
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tokenizer_dir = tmp_path / "tok"
    save_tokenizer(train_tokenizer(docs * 4, vocab_size=400, show_progress=False), tokenizer_dir)
    prepare(PrepareConfig(inputs=[str(tmp_path / "corpus.jsonl")], out=str(tmp_path / "shards"),
                          tokenizer=str(tokenizer_dir), max_seq_len=128, progress=False))
    (tmp_path / "mix.yaml").write_text(f"name: reference\nsources:\n  - name: ref\n    local: {tmp_path / 'shards'}\n")

    recipe = load_recipe(Path(__file__).resolve().parents[2] / REPO_RECIPE, [
        f"data.manifest={tmp_path / 'mix.yaml'}", f"data.tokenizer={tokenizer_dir}", f"save_folder={tmp_path / 'run'}",
        f"max_duration={STEPS}ba", f"checkpoint.interval={STEPS}ba", "logging.progress_bar=false",
        "model.config.attention_output_dropout=0.0", "batch_warmup.start_batch_size=null",
        # Memorising six paragraphs in 450 steps wants the full step size: unclipped, as this test was tuned
        # (the tiny recipe clips at 1.0 for held-out quality on a real corpus, issue 27).
        "optimizer.grad_clip_norm=null"])
    result = train(recipe)
    assert result.final_loss < 2.0, result.final_loss  # from ln(400) = 6.0 at the start

    # Export reloads the folder with transformers and compares logits on a padded batch of real text.
    exported = export_to_hf(tmp_path / "run", tmp_path / "hf")
    assert exported.step == STEPS and exported.max_abs_logit_diff <= 1e-5
    fill = transformers.pipeline("fill-mask", model=str(tmp_path / "hf"), device="cpu")
    mask = fill.tokenizer.mask_token
    for sentence, word in PROBES:
        ids = fill.tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, f"{word!r} is not one token of this vocabulary"
        # In the context it was trained in: the document's start (its first chunk) up to the sentence. Alone, the
        # sentence came back in the top 5 on some data orders and not on others (seed 17 after the packer change
        # of issue 27 gave ' in', 'ent', ' nam', ...; seed 18 and the old order gave ' loop').
        doc = next(d for d in docs if sentence in d)
        prefix = doc[:doc.index(sentence)]
        masked = prefix + sentence.replace(word, mask, 1)  # the token carries its leading space, so does the mask
        top = [p["token_str"] for p in fill(masked, top_k=5)]
        assert word in top, (masked, top)
    assert torch.isfinite(torch.tensor([p["score"] for p in fill(masked, top_k=5)])).all()
