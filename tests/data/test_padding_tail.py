"""The padding tail of a packed micro-batch is cut into segments of at most max_seq_len (issue 12, item 5):
one budget-long padding "document" made max_seqlen 65,536 at phase 1, an O(budget^2) attention."""
from __future__ import annotations

import resource

import numpy as np
import torch

from modernbert_train.data import build_eval_loader
from modernbert_train.data.packing import Piece, assemble
from modernbert_train.train.composer_model import document_lengths

from .conftest import write_manifest
from .test_loader import PAD_ID, _config


def _piece(length: int, sample_id: int) -> Piece:
    return Piece(tokens=np.full(length, 7, dtype=np.uint16), sample_id=sample_id, piece_index=0, epoch=0,
                 key=sample_id)


def test_padding_tail_segments_never_exceed_max_seq_len():
    for lengths, budget, max_seq_len in (([], 4096, 1024), ([1024, 1024, 1024, 1024], 4096, 1024),
                                         ([1000, 24, 3], 4096, 1024), ([100], 1000, 300), ([3, 5], 16, 8)):
        pieces = [_piece(n, i) for i, n in enumerate(lengths)]
        ids, cu, real = assemble(pieces, budget, PAD_ID, max_seq_len)
        segments = np.diff(cu)
        assert cu[0] == 0 and cu[-1] == budget and (segments > 0).all() and segments.max() <= max_seq_len
        # Real documents first, unchanged; then only padding, in as few segments as possible.
        assert real.tolist() == lengths and segments[:len(lengths)].tolist() == lengths
        assert len(segments) == len(lengths) + -(-(budget - sum(lengths)) // max_seq_len)
        assert (ids[sum(lengths):] == PAD_ID).all()


def test_all_padding_eval_micro_batch_at_phase1_budget_runs_in_bounded_memory(corpus_copy):
    from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

    manifest = write_manifest(corpus_copy["tmp"] / "eval.yaml", corpus_copy["shards"])
    loader = build_eval_loader(_config(corpus_copy, manifest, max_seq_len=1024, micro_batch_size=64,
                                       global_batch_size=64))
    # What a rank whose share of the eval set ran out yields: the packer's empty pack.
    batch = loader._micro_batch(loader.packer.pack())
    budget = 64 * 1024
    assert batch["input_ids"].shape == (budget,) and batch["num_tokens"] == batch["num_masked"] == 0
    assert batch["max_seqlen"] == 1024 and batch["cu_seqlens"].tolist() == list(range(0, budget + 1, 1024))
    # FLOP counting and document counts see only real documents.
    assert batch["num_docs"] == 0 and document_lengths(batch) == []
    assert document_lengths({k: v for k, v in batch.items() if k != "document_lengths"}) == []

    config = ModernBertConfig.preset("micro", vocab_size=3008, attn_backend="sdpa", max_position_embeddings=1024)
    model = ModernBertForMaskedLM(config).eval()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    with torch.no_grad():
        hidden = model.model(batch["input_ids"], batch["cu_seqlens"], batch["max_seqlen"])
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert hidden.shape == (budget, 32) and torch.isfinite(hidden).all()
    # One 65k-token padding segment would need a 65536 x 65536 mask (4 GiB) on the sdpa path alone.
    assert grown_mib < 1024, f"peak memory grew by {grown_mib:.0f} MiB"
