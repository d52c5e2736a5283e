"""Loader configuration and batch-size warmup (tokens -> sequences per optimizer step)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from modernbert_train.data.manifest import Manifest
from modernbert_train.data.packing import RESPLIT_MODES
from modernbert_train.common.errors import UserError, did_you_mean


@dataclass
class MLMLoaderConfig:
    """Everything the training (or eval) loader needs. Sizes in sequences are max_seq_len-token rows.

    manifest: path of the mixture manifest YAML, or a loaded `Manifest`.
    tokenizer: tokenizer.json (or a folder holding one) the shards were prepared with.
    max_seq_len: longest document piece; shard chunks longer than this are re-split (nothing dropped).
    micro_batch_size: rows per micro-batch; each micro-batch is one flat stream of
        micro_batch_size * max_seq_len tokens holding whole pieces (padding only at the tail).
    global_batch_size: rows per optimizer step across all ranks; each rank takes the nearest whole number of
        rows to its share, the last micro-batch holding the remainder (see `BatchSizeWarmup`).
    batch_size_warmup_start / batch_size_warmup_tokens: rows per step start at the first and grow linearly to
        global_batch_size over this many real (non-pad) tokens seen across all ranks; None/0 disables warmup.
    mlm_probability, mask_token_fraction, random_token_fraction: masking rate and the 80/10/10 split.
    seed: shuffle seed and masking seed.
    raw_batch_size: samples per streaming fetch (the unit of streaming's partition and resume).
    packing_lookahead_tokens: tokens kept buffered beyond one full step, for best-fit choices and to spread the
        pieces of one long chunk over many steps (default: MIN_LOOKAHEAD_ROWS rows, at least 4 micro-batches).
    packing_max_wait: a piece waiting longer than this many micro-batches is packed next (default: about two
        turnovers of the buffer), which bounds how far the emitted mixture lags the read one.
    prefetch_steps: steps a background thread prepares ahead while the device runs the current one (0: each
        step is prepared when asked for, on the caller's thread).
    mixture_log_every: log each source's realized share of the real tokens every this many steps (0: never).
    return_provenance: add `sample_ids`, `piece_indices`, `source_ids` (numpy) to each micro-batch.
    world_invariant: every rank reads the whole global sample stream (streaming's `replication`), packs the
        whole optimizer step and keeps its own slice of micro-batches, so each step trains on the same data
        for any number of ranks (1-process and N-process runs agree, and a run may resume on another
        number of ranks). Costs world_size x the reading and packing work; batch-size warmup must round the
        same way for the world sizes compared (rows per step in multiples of world_size x micro_batch_size).
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
    # coverage: a source's epochs read every sample once per pass (data/coverage.py); balanced: streaming's
    # fresh random choice each epoch (samples repeat and others are never read when an epoch is smaller).
    sampling: str = "coverage"
    # How a stored chunk longer than max_seq_len becomes pieces (packing.split_sample): contiguous windows of
    # it, or pieces each wrapped again in [CLS] ... [SEP] (one piece more a chunk; the loader's only way before).
    resplit: str = "contiguous"
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
    download_retry: int = 6  # streaming's attempts per shard (dataset.DOWNLOAD_RETRY): the retry budget
    check_tokenizer_hash: bool = True
    return_provenance: bool = False
    world_invariant: bool = False
    mixture_log_every: int = 1000
    prefetch_steps: int = 1

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
        if isinstance(self.mixture_log_every, bool) or not isinstance(self.mixture_log_every, int) \
                or self.mixture_log_every < 0:
            raise UserError(f"{where}: mixture_log_every must be an integer >= 0 (got {self.mixture_log_every!r})")
        if isinstance(self.prefetch_steps, bool) or not isinstance(self.prefetch_steps, int) or self.prefetch_steps < 0:
            raise UserError(f"{where}: prefetch_steps must be an integer >= 0 (got {self.prefetch_steps!r})")
        if self.num_workers < 0:
            raise UserError(f"{where}: num_workers must be >= 0 (got {self.num_workers})")
        if self.global_batch_size < world_size:
            raise UserError(f"{where}: global_batch_size {self.global_batch_size} is smaller than the number of "
                            f"ranks ({world_size}); every rank needs at least one row per step")
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
        if self.sampling not in ("coverage", "balanced"):
            raise UserError(f"{where}: sampling {self.sampling!r} is not one of coverage, balanced"
                            f"{did_you_mean(str(self.sampling), ['coverage', 'balanced'])}")
        if self.resplit not in RESPLIT_MODES:
            raise UserError(f"{where}: resplit {self.resplit!r} is not one of {', '.join(RESPLIT_MODES)}"
                            f"{did_you_mean(str(self.resplit), list(RESPLIT_MODES))}")
        if self.shuffle_algo not in ("py1e", "py1br", "py1b", "py1s", "py2s", "naive"):
            raise UserError(f"{where}: shuffle_algo {self.shuffle_algo!r} is not one of streaming's "
                            f"py1e, py1br, py1b, py1s, py2s, naive{did_you_mean(self.shuffle_algo, ['py1e', 'py1br', 'py1b', 'py1s', 'py2s', 'naive'])}")


@dataclass(frozen=True)
class BatchSizeWarmup:
    """Rows per optimizer step as a function of real tokens seen (ModernBERT's batch-size warmup).

    The recipe's rows grow linearly from `start` to `full` over `warmup_tokens`. Each rank takes the nearest
    whole number of rows to its share (at least one), cut into micro-batches of `micro_batch_size` rows and
    one smaller last micro-batch for the remainder. So every rank runs the same micro-batches, at every
    world size (768 rows on 8 ranks of 64-row micro-batches: 96 rows per rank, 64 + 32; 4608 rows on 16
    ranks: 288 per rank, 4 x 64 + 32). The first and the full step are within half a row per rank of the
    recipe; in between, rows per rank move from the first in steps of `granularity` (a quarter micro-batch or
    less), so that the last micro-batch takes only a few shapes (each new shape is a recompile of the compiled
    model parts), and stay within (granularity + 1) / 2 rows per rank of the recipe.
    """

    full: int
    start: int | None
    warmup_tokens: float
    world_size: int
    micro_batch_size: int

    @classmethod
    def from_config(cls, config: MLMLoaderConfig, world_size: int) -> "BatchSizeWarmup":
        return cls(full=config.global_batch_size, start=config.batch_size_warmup_start,
                   warmup_tokens=float(config.batch_size_warmup_tokens or 0), world_size=world_size,
                   micro_batch_size=config.micro_batch_size)

    def recipe_rows(self, tokens_seen: float) -> float:
        """Rows per step the recipe asks for (before splitting over ranks)."""
        if self.start is None or not self.warmup_tokens or tokens_seen >= self.warmup_tokens:
            return float(self.full)
        return self.start + (self.full - self.start) * (tokens_seen / self.warmup_tokens)

    @property
    def granularity(self) -> int:
        """Rows per rank move in these steps during the warmup: the largest divisor of micro_batch_size that
        is at most a quarter of it."""
        return max(d for d in range(1, max(1, self.micro_batch_size // 4) + 1) if self.micro_batch_size % d == 0)

    def rows_per_rank(self, tokens_seen: float) -> int:
        def nearest(rows: float) -> int:
            return max(1, math.floor(rows / self.world_size + 0.5))

        full = nearest(self.full)
        if self.start is None or self.recipe_rows(tokens_seen) == self.full:
            return full
        # Steps of `granularity` rows counted from the start's rows: starts and ends where the recipe says.
        first, step = nearest(self.start), self.granularity
        share = self.recipe_rows(tokens_seen) / self.world_size
        return min(full, first + max(0, math.floor((share - first) / step + 0.5)) * step)

    def sequences(self, tokens_seen: float) -> int:
        """Rows per step over all ranks."""
        return self.rows_per_rank(tokens_seen) * self.world_size

    def micro_batch_rows(self, tokens_seen: float) -> list[int]:
        """Rows of each micro-batch of one rank's step: full ones, then the remainder."""
        full, rest = divmod(self.rows_per_rank(tokens_seen), self.micro_batch_size)
        return [self.micro_batch_size] * full + ([rest] if rest else [])

    def micro_batches_per_rank(self, tokens_seen: float) -> int:
        return -(-self.rows_per_rank(tokens_seen) // self.micro_batch_size)

    @property
    def max_micro_batches_per_rank(self) -> int:
        return self.micro_batches_per_rank(float("inf"))

    def schedule(self, points: int = 11) -> list[dict[str, Any]]:
        """The effective schedule at evenly spaced points of the warmup (one point when there is none)."""
        if self.start is None or not self.warmup_tokens:
            positions = [0.0]
        else:
            positions = [self.warmup_tokens * i / (points - 1) for i in range(points)]
        rows = []
        for tokens in positions:
            per_rank = self.micro_batch_rows(tokens)
            rows.append({"tokens": int(tokens), "recipe_rows": round(self.recipe_rows(tokens), 1),
                         "rows": self.sequences(tokens), "rows_per_rank": sum(per_rank),
                         "micro_batches_per_rank": len(per_rank),
                         "last_micro_batch_rows": per_rank[-1]})
        return rows

    def describe(self, points: int = 11) -> list[str]:
        """Human-readable lines of `schedule()` (printed at start, kept in the run's config.yaml)."""
        lines = [f"effective batch-size schedule on {self.world_size} rank(s), micro-batches of "
                 f"{self.micro_batch_size} rows (a smaller last one takes the remainder; rows per rank in steps "
                 f"of {self.granularity} during the warmup):"]
        for row in self.schedule(points):
            lines.append(f"  from {row['tokens']:>18,} tokens: {row['rows']:>6} rows/step (recipe "
                         f"{row['recipe_rows']:g}) = {self.world_size} x {row['rows_per_rank']} rows, "
                         f"{row['micro_batches_per_rank']} micro-batch(es) per rank, last of "
                         f"{row['last_micro_batch_rows']} rows")
        return lines


# Default lookahead floor in max_seq_len rows. A long chunk re-splits into pieces that reach the buffer together;
# the packer draws from the whole buffer, so the buffer's size is how far apart they land. At 64 rows, 60% of
# a tiny run's pieces shared their document with a piece of the 8 steps before (24% when every piece is stored on
# its own); at 512 rows 32% (bench/RESULTS.md, issue 27). States saved before this record their own (older_states).
MIN_LOOKAHEAD_ROWS = 512


def default_lookahead_tokens(config: MLMLoaderConfig, min_rows: int = MIN_LOOKAHEAD_ROWS) -> int:
    """At least `min_rows` pieces to choose from, so that a small step's rows come from many samples."""
    return max(4 * config.tokens_per_micro_batch, min_rows * config.max_seq_len)
