"""From MDS shards to packed, masked micro-batches with exact resume (contracts 3 and 4).

Public API::

    from modernbert_train.data import MLMLoaderConfig, build_mlm_loader, build_eval_loader, load_manifest

    cfg = MLMLoaderConfig(manifest="yamls/data/demo.yaml", tokenizer="demo_out/tokenizer.json",
                          max_seq_len=1024, micro_batch_size=8, global_batch_size=64,
                          batch_size_warmup_start=16, batch_size_warmup_tokens=5e6)
    loader = build_mlm_loader(cfg)            # infinite; starts torch.distributed when WORLD_SIZE > 1
    for step in loader:                       # one item per optimizer step on this rank
        for mb in step["micro_batches"]:      # input_ids (T,), cu_seqlens, max_seqlen, labels, num_tokens, ...
            ...
    state = loader.state_dict()               # collective over ranks; small and picklable
    loader.load_state_dict(state)             # before iterating, in the resumed run

    loader.special_token_ids, loader.vocab_size, loader.tokens_per_micro_batch, loader.tokens_seen,
    loader.warmup.sequences(tokens), loader.warmup.micro_batches_per_rank(tokens)

    for mb in build_eval_loader(cfg):         # one pass, unshuffled, fixed masks, equal counts on all ranks
        ...

Importing this package is cheap: names load on first use, and streaming/composer only when a loader is built.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Manifest": "manifest", "SourceSpec": "manifest", "load_manifest": "manifest", "parse_manifest": "manifest",
    "MLMLoaderConfig": "config", "BatchSizeWarmup": "config",
    "MLMLoader": "loader", "EvalMLMLoader": "loader", "build_mlm_loader": "loader", "build_eval_loader": "loader",
    "STATE_FORMAT": "loader",
    "Masker": "masking", "MaskingConfig": "masking", "document_key": "masking", "IGNORE_INDEX": "masking",
    "BestFitPacker": "packing", "Piece": "packing", "split_sample": "packing", "assemble": "packing",
    "initialize_distributed": "dataset", "clean_stale_streaming_shm": "dataset",
    "build_streaming_dataset": "dataset",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
