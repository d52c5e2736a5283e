"""Masked-LM evaluation at a fixed rate (15%, as the paper evaluates whatever the training rate) on held-out
text. Masks come from the training masker keyed by (mask_seed, document index): every model sharing a
tokenizer is scored on exactly the same masked positions and replacements.
"""
from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer

from modernbert_train.data.masking import Masker, MaskingConfig, document_key
from modernbert_train.eval.data import load_split, select_columns
from modernbert_train.eval.encoder import PackedBatch, TextEncoder
from modernbert_train.eval.models import EvalModel
from modernbert_train.eval.suite import TaskSpec


def fixed_masks(sequences: list[list[int]], tokenizer_file, probability: float, seed: int):
    """(masked ids, labels) per sequence, a pure function of the token ids, the tokenizer and the seed."""
    tok = Tokenizer.from_file(str(tokenizer_file))
    special = {i for i, token in tok.get_added_tokens_decoder().items() if token.special}
    special |= {tok.token_to_id(s) for s in ("[CLS]", "[SEP]", "[PAD]", "[MASK]", "[UNK]") if tok.token_to_id(s) is not None}
    mask_id = tok.token_to_id("[MASK]")
    masker = Masker(MaskingConfig(mlm_probability=probability), mask_id=mask_id,
                    vocab_size=tok.get_vocab_size(with_added_tokens=True), special_ids=special)
    out = []
    for index, ids in enumerate(sequences):
        masked, labels = masker.mask(np.asarray(ids), np.asarray([document_key(seed, 0, index, 0)], dtype=np.uint64),
                                     np.asarray([len(ids)]))
        out.append((masked.tolist(), labels.tolist()))
    return out


@torch.no_grad()
def evaluate_mlm(task: TaskSpec, model: EvalModel, device, where: str, batch_size: int = 16) -> dict[str, float]:
    rows = load_split(task.data.dataset, task.data.config, task.data.train, f"{where}.data.train")
    texts = select_columns(rows, {"text": task.data.columns.get("text", "text")}, f"{where}.data.train")["text"]
    encoder = TextEncoder(model.tokenizer_file, task.max_length or min(512, model.config.max_position_embeddings))
    masked = fixed_masks(encoder.encode(texts), model.tokenizer_file, task.mlm_probability, task.mask_seed)
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
