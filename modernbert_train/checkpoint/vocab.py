"""The model side of a vocabulary extension (data/vocab_extension.py makes the tokenizer side).

Each new token's embedding row (tied with the decoder's weight) and decoder bias start as the mean of the
rows of the pieces the old tokenizer split its text into: the model's first guess for the new id is what it
knew about that string. `unused` mode overwrites placeholder rows in place; `append` mode grows the
embedding to the tokenizer's size rounded up to a multiple of 64 (rows past the tokenizer are padding:
zero weight, the lowest bias, so they are never predicted). No other weight changes, so with the new tokens
absent from the input every old token's logit is exactly what it was.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from tokenizers import Tokenizer

from modernbert_train.common.errors import UserError

log = logging.getLogger("modernbert_train")
EMBEDDING = "model.embeddings.tok_embeddings.weight"
DECODER_WEIGHT = "decoder.weight"
DECODER_BIAS = "decoder.bias"


def piece_ids(old_tok: Tokenizer, token: str) -> list[int]:
    ids = old_tok.encode(token, add_special_tokens=False).ids
    if not ids:
        raise UserError(f"the tokenizer turns {token!r} into no ids; it cannot be initialised from its pieces")
    return ids


@torch.no_grad()
def extend_model_vocab(model, old_tok: Tokenizer, new_vocab_size: int, assigned: list[tuple[int, str]]):
    """A model whose rows for `assigned` [(id, token)] are the mean of their old pieces' rows; grown (a new
    model object) when `new_vocab_size` exceeds the embedding. Returns (model, {token: piece ids})."""
    from modernbert_train.model import ModernBertForMaskedLM, pad_vocab_size

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    old_rows = state[EMBEDDING].shape[0]
    rows = max(old_rows, pad_vocab_size(new_vocab_size))
    pieces = {token: piece_ids(old_tok, token) for _, token in assigned}
    bad = [(i, t) for i, t in assigned if i >= new_vocab_size]
    if bad:
        raise UserError(f"token {bad[0][1]!r} got id {bad[0][0]} past the tokenizer's {new_vocab_size} ids")
    embedding = state[EMBEDDING]
    bias = state.get(DECODER_BIAS)
    if rows > old_rows:
        grown = embedding.new_zeros(rows, embedding.shape[1])
        grown[:old_rows] = embedding
        embedding = grown
        if bias is not None:
            grown_bias = bias.new_full((rows,), float(bias.min()))
            grown_bias[:old_rows] = bias
            bias = grown_bias
    old_embedding = state[EMBEDDING]
    for token_id, token in assigned:
        ids = torch.tensor(pieces[token])
        embedding[token_id] = old_embedding[ids].mean(0)
        if bias is not None:
            bias[token_id] = state[DECODER_BIAS][ids].mean()
    state[EMBEDDING] = embedding
    if bias is not None:
        state[DECODER_BIAS] = bias
    if model.config.tie_word_embeddings:
        state.pop(DECODER_WEIGHT, None)
    elif DECODER_WEIGHT in state:
        raise UserError("vocabulary extension needs tied embeddings (tie_word_embeddings=true), as ModernBERT has")
    if rows > old_rows:
        model = ModernBertForMaskedLM(dataclasses.replace(model.config, vocab_size=rows))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != DECODER_WEIGHT]:
        raise RuntimeError(f"extension lost weights: missing {missing}, unexpected {unexpected}")
    log.info("vocabulary: %d tokens initialised from their pieces; embedding %d -> %d rows",
             len(assigned), old_rows, rows)
    return model, pieces


def old_token_logits(model, token_ids: list[int], old_rows: int) -> torch.Tensor:
    """Logits of one padded sequence over the first `old_rows` ids (what an extension must not change)."""
    model.eval()
    ids = torch.tensor([token_ids])
    return model(ids, attention_mask=torch.ones_like(ids)).logits[0, :, :old_rows]


def extend_hf_folder(source, tokens: list[str], mode: str, out_dir, sample_text: str = "") -> dict:
    """Read a Hugging Face ModernBERT folder (weights + tokenizer.json), add `tokens` the `mode` way, write the
    new folder (config.json, model.safetensors, tokenizer files, extension.json) and return its record.

    Before writing, the old tokens' logits on `sample_text` are compared with the source model's: they must be
    bit-identical (the new rows are the only change)."""
    import json
    from pathlib import Path

    from modernbert_train.data.tokenizer import load_tokenizer, save_tokenizer, special_token_ids, vocab_size
    from modernbert_train.data.vocab_extension import extend_tokenizer
    from modernbert_train.model import ModernBertForMaskedLM

    source, out_dir = Path(source), Path(out_dir)
    if not (source / "config.json").is_file() or not (source / "tokenizer.json").is_file():
        raise UserError(f"--model {source}: expected a Hugging Face model folder with config.json and tokenizer.json "
                        f"(export a run first: modernbert-train export RUN --out FOLDER)")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"--out {out_dir} exists and is not empty; choose a new folder")
    old_tok = load_tokenizer(source)
    model = ModernBertForMaskedLM.from_hf(source)
    old_rows = model.config.vocab_size
    new_tok, assigned = extend_tokenizer(old_tok, tokens, mode)
    new_model, pieces = extend_model_vocab(model, old_tok, vocab_size(new_tok), assigned)
    sample = old_tok.encode(sample_text or "The quick brown fox jumps over the lazy dog.").ids[:256]
    new_ids = {i for i, _ in assigned}
    sample = [i for i in sample if i not in new_ids]  # unused mode: a slot's old text no longer exists
    before, after = old_token_logits(model, sample, old_rows), old_token_logits(new_model, sample, old_rows)
    keep = [i for i in range(old_rows) if i not in new_ids]
    diff = float((before[:, keep] - after[:, keep]).abs().max())
    if diff != 0.0:
        raise RuntimeError(f"the extension changed old tokens' logits (max difference {diff:g})")
    out_dir.mkdir(parents=True, exist_ok=True)
    new_model.save_hf(out_dir)
    special_token_ids(new_tok, out_dir / "tokenizer.json")
    save_tokenizer(new_tok, out_dir, model_max_length=new_model.config.max_position_embeddings)
    record = {"source": str(source), "mode": mode, "old_vocab_rows": old_rows,
              "new_vocab_rows": new_model.config.vocab_size, "tokenizer_ids": vocab_size(new_tok),
              "old_logits_max_abs_diff": diff,
              "tokens": [{"id": i, "token": t, "init_from_pieces": pieces[t]} for i, t in assigned]}
    (out_dir / "extension.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


# -- the starting model's vocabulary against the shards' (before any step runs) ----------------------------------
def source_files(init_from: str):
    """(tokenizer.json, number of embedding rows) of a model.init_from source, each None where it has none: a
    Hugging Face folder (config.json), a run directory (model_config.json), or a checkpoint inside one."""
    import json
    from pathlib import Path

    path = Path(init_from.split(":", 1)[1] if init_from.startswith(("hf:", "tile:")) else init_from)
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        return None, None
    for candidate in (folder, folder.parent):  # a sharded checkpoint folder sits one level down
        rows = None
        for name in ("config.json", "model_config.json"):
            if (candidate / name).is_file():
                try:
                    rows = json.loads((candidate / name).read_text()).get("vocab_size")
                except (json.JSONDecodeError, AttributeError):
                    rows = None
                break
        tokenizer = candidate / "tokenizer.json"
        if rows is not None or tokenizer.is_file():
            return (tokenizer if tokenizer.is_file() else None), rows
    return None, None


def check_source_vocabulary(init_from: str | None, facts, data_tokenizer: str | None, manifest: str,
                            where: str = "") -> None:
    """One line naming both sides when the starting model and the shards disagree on the vocabulary: its
    tokenizer.json against the shards' (ids, special ids, content), and its embedding rows against the
    shards' id count padded to a multiple of 64 (ModernBERT: 50,368 ids, 50,368 rows)."""
    from modernbert_train.data.tokenizer import (load_tokenizer, resolve_tokenizer_file, special_token_ids,
                                                 tokenizer_sha256, vocab_size)
    from modernbert_train.model import pad_vocab_size

    if not init_from:
        return
    tokenizer_file, rows = source_files(init_from)
    shards = (f"the shards of {manifest} (prepared with a tokenizer of {facts.vocab_size:,} ids"
              + (f", data.tokenizer {data_tokenizer}" if data_tokenizer else "") + ")")
    fix = "prepare the shards with the model's own tokenizer.json (or extend it: modernbert-data extend-vocab)"
    if tokenizer_file is not None and tokenizer_sha256(tokenizer_file) != facts.tokenizer_sha256:
        tok = load_tokenizer(tokenizer_file)
        ids = special_token_ids(tok, tokenizer_file)
        specials = {"cls_id": ids.cls_id, "sep_id": ids.sep_id, "pad_id": ids.pad_id, "mask_id": ids.mask_id}
        data_specials = {k: getattr(facts, k) for k in specials}
        same = vocab_size(tok) == facts.vocab_size and specials == data_specials
        if same and data_tokenizer is not None:
            same = tok.get_vocab(with_added_tokens=True) == load_tokenizer(
                resolve_tokenizer_file(data_tokenizer)).get_vocab(with_added_tokens=True)
        if not same:
            detail = (f"{vocab_size(tok):,} ids" if vocab_size(tok) != facts.vocab_size else
                      f"special ids {specials} vs {data_specials}" if specials != data_specials else
                      "the same size, other tokens")
            raise UserError(f"{where}model.init_from: vocabulary mismatch: the model's tokenizer {tokenizer_file} "
                            f"({detail}) is not the one of {shards}; {fix}")
    if rows is not None:
        rows = int(rows)
        if rows < facts.vocab_size or rows >= pad_vocab_size(facts.vocab_size) + 64:
            raise UserError(f"{where}model.init_from: vocabulary mismatch: the model {init_from} has {rows:,} "
                            f"embedding rows but {shards} would need {pad_vocab_size(facts.vocab_size):,}; {fix}")
        if rows % 64:
            log.warning("model.init_from: %s has %d embedding rows, not a multiple of 64 (slower matmuls)",
                        init_from, rows)
