"""Retrieval in the DPR setting: a mean-pooling single-vector embedder, fine-tuned with an InfoNCE loss over
in-batch negatives (every other query's positive, plus hard negatives when given), scored by exact cosine
search over a BEIR corpus. `zero_shot` scores the pretrained encoder as is.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from modernbert_train.errors import UserError
from modernbert_train.eval.data import BeirData, load_beir
from modernbert_train.eval.encoder import MeanPoolingEmbedder, PackedBatch, TextEncoder
from modernbert_train.eval.metrics import retrieval_metric
from modernbert_train.eval.models import EvalModel
from modernbert_train.eval.suite import TaskSpec

TOP_K = 100  # documents kept per query; enough for recall@100


def load_hard_negatives(path: str | None, where: str) -> dict[str, list[str]]:
    if path is None:
        return {}
    if not Path(path).exists():
        raise UserError(f"{where}.data.hard_negatives: {path} does not exist")
    negatives = {}
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if line.strip():
            try:
                row = json.loads(line)
                negatives[str(row["query_id"])] = [str(d) for d in row["negative_ids"]]
            except (json.JSONDecodeError, KeyError) as err:
                raise UserError(f"{where}.data.hard_negatives: {path}:{number}: need query_id and negative_ids "
                                f"({err})") from None
    return negatives


@torch.no_grad()
def embed(embedder: MeanPoolingEmbedder, sequences: list[list[int]], batch_size: int, device) -> torch.Tensor:
    embedder.eval()
    # Similar lengths together: fewer tokens per packed batch wasted on nothing (packing has no padding,
    # but the attention grid of the SDPA fallback follows the longest document).
    order = np.argsort([len(s) for s in sequences], kind="stable")
    out = torch.empty(len(sequences), embedder.config.hidden_size)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        out[torch.as_tensor(index)] = embedder(PackedBatch.of([sequences[i] for i in index], device)).float().cpu()
    return out


def search(embedder, data: BeirData, doc_ids, doc_sequences, query_encoder: TextEncoder, qrels, batch_size,
           device) -> dict[str, dict[str, float]]:
    docs = embed(embedder, doc_sequences, batch_size, device)
    query_ids = list(qrels)
    queries = embed(embedder, query_encoder.encode([data.queries[q] for q in query_ids]), batch_size, device)
    scores = queries @ docs.T
    top = scores.topk(min(TOP_K, len(doc_ids)), dim=1)
    return {q: {doc_ids[d]: float(s) for s, d in zip(values.tolist(), indices.tolist())}
            for q, values, indices in zip(query_ids, top.values, top.indices)}


def run_retrieval(task: TaskSpec, model: EvalModel, *, lr: float, weight_decay: float, epochs: int, seed: int,
                  device, where: str, start_from=None
                  ) -> tuple[dict[str, float], dict[str, float] | None, MeanPoolingEmbedder]:
    """Fine-tune (unless zero-shot or epochs == 0) and score: (the task's metrics on eval_split, on
    dev_split when the task has one (else None), embedder). Both splits search the one corpus.

    `start_from`: an embedder fine-tuned by an earlier task (DPR on MS MARCO, then every BEIR set)."""
    max_length = task.max_length or model.config.max_position_embeddings
    doc_encoder = TextEncoder(model.tokenizer_file, max_length)
    query_encoder = TextEncoder(model.tokenizer_file, min(task.query_max_length, max_length))
    evaluation = load_beir(task.data.beir, task.data.eval_split, where)
    doc_ids = list(evaluation.corpus)
    doc_sequences = doc_encoder.encode([evaluation.corpus[d] for d in doc_ids])
    embedder = MeanPoolingEmbedder(model.build(seed))
    if start_from is not None:
        embedder.load_state_dict(start_from.state_dict())
    embedder.to(device)
    if not task.zero_shot and epochs > 0:
        train = load_beir(task.data.train_beir or task.data.beir, task.data.train_split, where)
        negatives = load_hard_negatives(task.data.hard_negatives, where)
        _contrastive_finetune(task, embedder, train, doc_encoder, query_encoder, negatives, lr=lr,
                              weight_decay=weight_decay, epochs=epochs, seed=seed, device=device)
    qrels = dict(evaluation.qrels)
    dev = None
    if task.data.dev_split is not None:
        dev = load_beir(task.data.beir, task.data.dev_split, where)
        qrels.update(dev.qrels)
    run = search(embedder, evaluation, doc_ids, doc_sequences, query_encoder, qrels, task.sweep.batch_size * 2,
                 device)
    scores = {m: retrieval_metric(m, evaluation.qrels, run) for m in task.metrics}
    dev_scores = None if dev is None else {m: retrieval_metric(m, dev.qrels, run) for m in task.metrics}
    return scores, dev_scores, embedder.cpu()


def _contrastive_finetune(task, embedder, train: BeirData, doc_encoder, query_encoder, negatives, *, lr,
                          weight_decay, epochs, seed, device) -> None:
    sweep = task.sweep
    pairs = [(q, d) for q, judged in train.qrels.items() for d, rel in judged.items() if rel > 0]
    if task.limit:
        pairs = pairs[: task.limit]
    optimizer = torch.optim.AdamW(embedder.parameters(), lr=lr, weight_decay=weight_decay,
                                  betas=tuple(sweep.betas), eps=sweep.eps)
    total = max(1, math.ceil(len(pairs) / sweep.batch_size) * epochs)
    warmup = int(sweep.warmup_ratio * total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / (warmup + 1) if step < warmup else max(0.0, (total - step) / (total - warmup)))
    rng = np.random.default_rng(seed)
    embedder.train()
    for _ in range(epochs):
        order = rng.permutation(len(pairs))
        for start in range(0, len(order), sweep.batch_size):
            batch = [pairs[i] for i in order[start:start + sweep.batch_size]]
            docs = [d for _, d in batch]
            for q, _ in batch:  # one hard negative per query, drawn from its list
                pool = [d for d in negatives.get(q, []) if d in train.corpus and d not in docs]
                if pool:
                    docs.append(pool[int(rng.integers(len(pool)))])
            q_vec = embedder(PackedBatch.of(query_encoder.encode([train.queries[q] for q, _ in batch]), device))
            d_vec = embedder(PackedBatch.of(doc_encoder.encode([train.corpus[d] for d in docs]), device))
            logits = (q_vec @ d_vec.T).float() / sweep.temperature
            # A document that is another query's positive too must not count as its negative.
            positives = torch.tensor([[train.qrels[q].get(d, 0) > 0 for d in docs] for q, _ in batch], device=device)
            target = torch.arange(len(batch), device=device)
            logits = logits.masked_fill(positives & ~F.one_hot(target, len(docs)).bool(), float("-inf"))
            loss = F.cross_entropy(logits, target)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
