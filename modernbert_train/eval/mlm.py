"""Masked-LM evaluation at a fixed rate on held-out data: 15% unless the suite's `mlm_probability` says
otherwise, whatever rate the model was trained at (the paper evaluates at 15% for every model).

The data is a text file or split (`data.train`, column `text`) or a mixture manifest of prepared shards
(`data.manifest`, yamls/data style), of which the first `limit` samples are read, shared evenly among its
sources. Masks come from the training masker keyed by (mask_seed, a hash of the sequence's token ids): a pure
function of each sequence and the seed, so every model sharing a tokenizer is scored on exactly the same
masked positions and replacements, whatever the order or the subset of the data.
"""
from __future__ import annotations

import hashlib
import itertools

import numpy as np
import torch
from tokenizers import Tokenizer

from modernbert_train.data.masking import Masker, MaskingConfig, document_key
from modernbert_train.common.errors import UserError
from modernbert_train.eval.data import load_split, select_columns
from modernbert_train.eval.encoder import PackedBatch, TextEncoder
from modernbert_train.eval.models import EvalModel
from modernbert_train.eval.suite import TaskSpec

MANIFEST_SAMPLES = 1000  # samples read from a manifest when the task sets no `limit`


def sequence_key(ids) -> int:
    """64 bits of the sequence's token ids: the same sequence gets the same key wherever it is read."""
    return int.from_bytes(hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).digest()[:8], "little")


def fixed_masks(sequences: list[list[int]], tokenizer_file, probability: float, seed: int):
    """(masked ids, labels) per sequence, each a pure function of its token ids, the tokenizer and the seed."""
    tok = Tokenizer.from_file(str(tokenizer_file))
    special = {i for i, token in tok.get_added_tokens_decoder().items() if token.special}
    special |= {tok.token_to_id(s) for s in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]") if tok.token_to_id(s) is not None}
    mask_id = tok.token_to_id("[MASK]")
    masker = Masker(MaskingConfig(mlm_probability=probability), mask_id=mask_id,
                    vocab_size=tok.get_vocab_size(with_added_tokens=True), special_ids=special)
    out = []
    for ids in sequences:
        key = document_key(seed, 0, sequence_key(ids), 0)
        masked, labels = masker.mask(np.asarray(ids), np.asarray([key], dtype=np.uint64), np.asarray([len(ids)]))
        out.append((masked.tolist(), labels.tolist()))
    return out


def manifest_sequences(manifest_file: str, tokenizer_file, limit: int, max_length: int, where: str) -> list[list[int]]:
    """Token ids of the first `limit` samples of a manifest's sources (an even share each, in shard order),
    cut to `max_length` keeping the closing [SEP]; the shards must come from the model's tokenizer."""
    from modernbert_train.data.tokenizer import tokenizer_sha256
    from modernbert_train.data.manifest import load_manifest
    from modernbert_train.data.shards import iter_samples

    manifest = load_manifest(manifest_file)
    sha = tokenizer_sha256(tokenizer_file)
    for source in manifest.sources:
        prepared_with = (source.prep_meta() or {}).get("tokenizer_sha256")
        if prepared_with not in (None, sha):
            raise UserError(f"{where}.data.manifest: source {source.name!r} of {manifest_file} was prepared with "
                            f"another tokenizer (sha256 {prepared_with[:12]}...) than the model's {tokenizer_file} "
                            f"(sha256 {sha[:12]}...)")
    count = len(manifest.sources)
    sequences = []
    for i, source in enumerate(manifest.sources):
        share = limit // count + (i < limit % count)
        for sample in itertools.islice(iter_samples(source.local), share):
            ids = sample["input_ids"].astype(np.int64).tolist()
            sequences.append(ids if len(ids) <= max_length else ids[:max_length - 1] + ids[-1:])
    if not sequences:
        raise UserError(f"{where}.data.manifest: {manifest_file} has no samples")
    return sequences


def eval_sequences(task: TaskSpec, tokenizer_file, max_length: int, where: str) -> list[list[int]]:
    """The token ids the task scores, from its manifest or its text file / split."""
    if task.data.manifest:
        return manifest_sequences(task.data.manifest, tokenizer_file, task.limit or MANIFEST_SAMPLES, max_length, where)
    rows = load_split(task.data.dataset, task.data.config, task.data.train, f"{where}.data.train")
    texts = select_columns(rows, {"text": task.data.columns.get("text", "text")}, f"{where}.data.train")["text"]
    return TextEncoder(tokenizer_file, max_length).encode(texts[:task.limit])


@torch.no_grad()
def evaluate_mlm(task: TaskSpec, model: EvalModel, device, where: str, batch_size: int = 16) -> dict[str, float]:
    max_length = task.max_length or min(512, model.config.max_position_embeddings)
    sequences = eval_sequences(task, model.tokenizer_file, max_length, where)
    masked = fixed_masks(sequences, model.tokenizer_file, task.mlm_probability, task.mask_seed)
    mlm = model.build(task.mask_seed).to(device).eval()
    loss_sum, correct, count = 0.0, 0, 0
    for start in range(0, len(masked), batch_size):
        chunk = masked[start:start + batch_size]
        batch = PackedBatch.of([ids for ids, _ in chunk], device)
        labels = torch.tensor([t for _, lab in chunk for t in lab], device=device)
        if not (labels != -100).any():
            continue
        out = mlm(batch.input_ids, batch.cu_seqlens, batch.max_seqlen, labels=labels)
        n = int(out.num_masked)
        loss_sum += float(out.loss) * n
        correct += int((out.logits.argmax(-1) == out.masked_labels).sum())
        count += n
    results = {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1)}
    return {m: results[m] for m in task.metrics}
