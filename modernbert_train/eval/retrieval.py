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

from modernbert_train.common.errors import UserError
from modernbert_train.eval.data import BeirData, load_beir
from modernbert_train.eval.encoder import MeanPoolingEmbedder, PackedBatch, TextEncoder
from modernbert_train.eval.metrics import retrieval_metric
from modernbert_train.eval.models import EvalModel
from modernbert_train.eval.suite import TaskSpec

TOP_K = 100  # documents kept per query; enough for recall@100
CORPUS_CHUNK = 50_000  # documents tokenized and embedded at a time by search (MS MARCO: 8.8M passages)
SCORE_BLOCK = 2 ** 26  # query x document scores computed at a time (512 MB in float64)


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


def search(embedder: MeanPoolingEmbedder, data: BeirData, doc_encoder: TextEncoder, query_encoder: TextEncoder,
           qrels, batch_size: int, device, chunk_size: int | None = None) -> dict[str, dict[str, float]]:
    """Exact cosine search of the queries of `qrels` over the whole corpus: query id -> {doc id: score} for
    its TOP_K best documents, the same as one top-k over the full queries x corpus score matrix.

    The corpus streams through in chunks of `chunk_size` (default CORPUS_CHUNK) documents, each tokenized,
    embedded, scored and dropped, while a running top-k per query is kept: memory is queries x k plus one
    chunk, whatever the corpus size (MS MARCO dev, 6,980 queries x 8.8M passages, would need ~247 GB of
    scores and ~27 GB of embeddings in one go)."""
    chunk_size = chunk_size or CORPUS_CHUNK
    query_ids = list(qrels)
    if not query_ids:
        return {}
    doc_ids = list(data.corpus)
    k = min(TOP_K, len(doc_ids))
    queries = embed(embedder, query_encoder.encode([data.queries[q] for q in query_ids]), batch_size, device)
    queries = queries.to(device, torch.float64)
    best_scores = torch.empty(len(query_ids), 0, device=device)
    best_docs = torch.empty(len(query_ids), 0, dtype=torch.long, device=device)
    for start in range(0, len(doc_ids), chunk_size):
        chunk = doc_ids[start:start + chunk_size]
        docs = embed(embedder, doc_encoder.encode([data.corpus[d] for d in chunk]), batch_size, device)
        values, indices = chunk_top_k(queries, docs.to(device), min(k, len(chunk)))
        # Earlier documents first in the concatenation, as in one top-k over the whole score matrix.
        scores = torch.cat([best_scores, values], dim=1)
        candidates = torch.cat([best_docs, indices + start], dim=1)
        best = scores.topk(min(k, scores.shape[1]), dim=1)
        best_scores, best_docs = best.values, candidates.gather(1, best.indices)
    return {q: {doc_ids[d]: float(s) for s, d in zip(values, indices)}
            for q, values, indices in zip(query_ids, best_scores.cpu().tolist(), best_docs.cpu().tolist())}


def cosine_scores(queries: torch.Tensor, docs: torch.Tensor) -> torch.Tensor:
    """queries x docs dot products of unit vectors, summed in float64 and rounded to float32: float32 matmuls
    sum in an order that depends on the matrix shapes, so a document's score would change (by an ulp, enough
    to swap near ties) with the size of the chunk it is scored in."""
    return (queries.double() @ docs.double().T).float()


def chunk_top_k(queries: torch.Tensor, docs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, doc indices) of each query's k best documents in `docs`, sorted; scored a block of queries at
    a time so that the score matrix stays near SCORE_BLOCK entries however many queries there are."""
    rows = max(1, SCORE_BLOCK // len(docs))
    docs = docs.double()
    tops = [cosine_scores(queries[start:start + rows], docs).topk(k, dim=1) for start in range(0, len(queries), rows)]
    return torch.cat([t.values for t in tops]), torch.cat([t.indices for t in tops])


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
    run = search(embedder, evaluation, doc_encoder, query_encoder, qrels, task.sweep.batch_size * 2, device)
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
