"""Loader configuration and batch-size warmup (tokens -> sequences per optimizer step)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from modernbert_train.data.manifest import Manifest
from modernbert_train.errors import UserError, did_you_mean


@dataclass
class MLMLoaderConfig:
    """Everything the training (or eval) loader needs. Sizes in sequences are max_seq_len-token rows.

    manifest: path of the mixture manifest YAML, or a loaded `Manifest`.
    tokenizer: tokenizer.json (or a folder holding one) the shards were prepared with.
    max_seq_len: longest document piece; shard chunks longer than this are re-split (nothing dropped).
    micro_batch_size: rows per micro-batch; each micro-batch is one flat stream of
        micro_batch_size * max_seq_len tokens holding whole pieces (padding only at the tail).
    global_batch_size: rows per optimizer step across all ranks (must divide by world_size * micro_batch_size).
    batch_size_warmup_start / batch_size_warmup_tokens: rows per step start at the first and grow linearly to
        global_batch_size over this many real (non-pad) tokens seen across all ranks; None/0 disables warmup.
    mlm_probability, mask_token_fraction, random_token_fraction: masking rate and the 80/10/10 split.
    seed: shuffle seed and masking seed.
    raw_batch_size: samples per streaming fetch (the unit of streaming's partition and resume).
    packing_lookahead_tokens: tokens kept buffered beyond one full step, for best-fit choices.
    packing_max_wait: a piece waiting longer than this many micro-batches is packed next (default: about two
        turnovers of the buffer), which bounds how far the emitted mixture lags the read one.
    return_provenance: add `sample_ids`, `piece_indices`, `source_ids` (numpy) to each micro-batch.
    world_invariant: every rank reads the whole global sample stream (streaming's `replication`), packs the
        whole optimizer step and keeps its own slice of micro-batches, so each step trains on the same data
        for any number of ranks (1-process and N-process runs agree, and a run may resume on another
        number of ranks). Costs world_size x the reading and packing work; batch-size warmup must round the
        same way for the world sizes compared (warmup steps in multiples of world_size x micro_batch_size).
    """

    manifest: str | Manifest
    tokenizer: str
    max_seq_len: int = 1024
    micro_batch_size: int = 8
    global_batch_size: int = 8
    batch_size_warmup_start: int | None = None
    batch_size_warmup_tokens: float = 0
    mlm_probability: float = 0.3
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1
    seed: int = 17
    shuffle: bool = True
    shuffle_algo: str = "py1e"
    num_canonical_nodes: int | None = None
    shuffle_block_size: int | None = None
    num_workers: int = 0
    prefetch_factor: int | None = None
    raw_batch_size: int = 64
    packing_lookahead_tokens: int | None = None
    packing_max_wait: int | None = None
    predownload: int | None = None
    cache_limit: int | str | None = None
    download_timeout: float = 60.0
    check_tokenizer_hash: bool = True
    return_provenance: bool = False
    world_invariant: bool = False

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "data") -> "MLMLoaderConfig":
        """Build from a mapping (e.g. a recipe section), naming misspelt keys."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                raise UserError(f"{where}: unknown key {key!r}{did_you_mean(str(key), names)}")
        for required in ("manifest", "tokenizer"):
            if values.get(required) in (None, ""):
                raise UserError(f"{where}: {required!r} is required")
        return cls(**values)

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch_size * self.max_seq_len

    def validate(self, world_size: int, where: str = "data") -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{where}: {name} must be a positive integer (got {value!r})")

        for name in ("max_seq_len", "micro_batch_size", "global_batch_size", "raw_batch_size"):
            positive(name)
        if self.max_seq_len < 3:
            raise UserError(f"{where}: max_seq_len must be at least 3 ([CLS] token [SEP]), got {self.max_seq_len}")
        if self.num_workers < 0:
            raise UserError(f"{where}: num_workers must be >= 0 (got {self.num_workers})")
        unit = world_size * self.micro_batch_size
        if self.global_batch_size % unit:
            raise UserError(f"{where}: global_batch_size {self.global_batch_size} must be a multiple of "
                            f"world_size x micro_batch_size = {world_size} x {self.micro_batch_size} = {unit}")
        if self.batch_size_warmup_start is not None:
            if not 0 < self.batch_size_warmup_start <= self.global_batch_size:
                raise UserError(f"{where}: batch_size_warmup_start must be in (0, global_batch_size="
                                f"{self.global_batch_size}] (got {self.batch_size_warmup_start})")
            if not self.batch_size_warmup_tokens or self.batch_size_warmup_tokens <= 0:
                raise UserError(f"{where}: batch_size_warmup_start is set, so batch_size_warmup_tokens must be > 0")
        if self.packing_lookahead_tokens is not None and self.packing_lookahead_tokens < 0:
            raise UserError(f"{where}: packing_lookahead_tokens must be >= 0")
        if self.packing_max_wait is not None and self.packing_max_wait < 1:
            raise UserError(f"{where}: packing_max_wait must be >= 1 or null")
        if self.shuffle_algo not in ("py1e", "py1br", "py1b", "py1s", "py2s", "naive"):
            raise UserError(f"{where}: shuffle_algo {self.shuffle_algo!r} is not one of streaming's "
                            f"py1e, py1br, py1b, py1s, py2s, naive{did_you_mean(self.shuffle_algo, ['py1e', 'py1br', 'py1b', 'py1s', 'py2s', 'naive'])}")


@dataclass(frozen=True)
class BatchSizeWarmup:
    """Rows per optimizer step as a function of real tokens seen (ModernBERT's batch-size warmup).

    Grows linearly from `start` to `full` rows over `warmup_tokens`, rounded down to whole micro-batches on
    every rank (at least one), so all ranks always run the same number of micro-batches.
    """

    full: int
    start: int | None
    warmup_tokens: float
    unit: int  # world_size * micro_batch_size

    def sequences(self, tokens_seen: int) -> int:
        if self.start is None or not self.warmup_tokens or tokens_seen >= self.warmup_tokens:
            return self.full
        wanted = self.start + (self.full - self.start) * (tokens_seen / self.warmup_tokens)
        return int(min(self.full, max(self.unit, (int(wanted) // self.unit) * self.unit)))

    def micro_batches_per_rank(self, tokens_seen: int) -> int:
        return self.sequences(tokens_seen) // self.unit

    @property
    def max_micro_batches_per_rank(self) -> int:
        return self.full // self.unit
