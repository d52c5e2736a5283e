"""The training and eval loaders: streaming samples -> re-split pieces -> best-fit packs -> masked micro-batches.

Per optimizer step every rank: tops its packer buffer up to one full step plus a lookahead; joins one small
CPU all-reduce (are we out of this epoch's samples? how many real tokens did the last step hold?); when any
rank ran out, all ranks start the next epoch together (streaming's epoch start is a collective, and the
tail samples of the other ranks are skipped, like drop_last); packs as many micro-batches as the batch-size
warmup allows; masks them. The state is (epoch, samples consumed, buffer references, tokens seen) per rank,
gathered to every rank by `state_dict()` so the rank-0 checkpoint holds all of them.

Resume: streaming restarts at the largest whole raw batch every rank had consumed (its resume unit is a
global batch), each rank then skips the samples of its stripe already read, and the buffer is re-read by sample
id. On another number of ranks the same holds with the ranks' positions re-partitioned (see elastic.py).
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Iterator

import numpy as np
import torch

from modernbert_train.data import elastic, older_states
from modernbert_train.data.config import BatchSizeWarmup, MLMLoaderConfig, default_lookahead_tokens
from modernbert_train.data.dataset import (DistInfo, build_raw_dataloader, build_streaming_dataset,
                                           cpu_process_group, initialize_distributed,
                                           prepare_streaming_environment, stream_of_sample)
from modernbert_train.data.manifest import Manifest, load_manifest, sampling_manifest
from modernbert_train.data.masking import IGNORE_INDEX, Masker, MaskingConfig, document_key
from modernbert_train.data.packing import BestFitPacker, Piece, assemble, split_sample
from modernbert_train.data.prefetch import StepPrefetcher
from modernbert_train.common.errors import UserError

log = logging.getLogger("modernbert_train")

STATE_FORMAT = "modernbert_train.data.loader/1"
# Settings that fix the sample sequence: a resume with any of them changed cannot continue exactly.
RESUME_KEYS = ("seed", "max_seq_len", "micro_batch_size", "raw_batch_size", "shuffle", "shuffle_algo")


def _special_ids(tok, roles) -> set[int]:
    ids = {i for i in (roles.cls_id, roles.sep_id, roles.pad_id, roles.mask_id, roles.unk_id) if i is not None}
    ids.update(i for i, added in tok.get_added_tokens_decoder().items() if added.special)
    return ids


class _LoaderBase:
    """Shared set-up: distributed, shm hygiene, tokenizer checks, dataset, raw DataLoader, packer, masker."""

    def __init__(self, config: MLMLoaderConfig, *, rank: int | None, world_size: int | None, shuffle: bool,
                 lookahead_steps: int, sampling_method: str = "balanced", world_invariant: bool = False):
        from modernbert_train.data.tokenizer import load_tokenizer, special_token_ids, tokenizer_sha256

        self.config = config
        self.manifest: Manifest = (config.manifest if isinstance(config.manifest, Manifest)
                                   else load_manifest(config.manifest))
        self.dist: DistInfo = initialize_distributed()
        for name, given, actual in (("rank", rank, self.dist.rank), ("world_size", world_size, self.dist.world_size)):
            if given is not None and given != actual:
                raise UserError(f"{name}={given} was passed but torch.distributed / the launcher environment "
                                f"says {actual}")
        config.validate(self.dist.world_size)
        self._group = cpu_process_group()
        self._step_group = self._group  # the per-step all-reduce (MLMLoader gives it its own with prefetch)
        prepare_streaming_environment(self.dist, self._group)

        tokenizer = load_tokenizer(config.tokenizer)
        self.special_token_ids = special_token_ids(tokenizer, config.tokenizer)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._check_shards_match_tokenizer(tokenizer_sha256(config.tokenizer))
        self.masker = Masker(MaskingConfig(config.mlm_probability, config.mask_token_fraction,
                                           config.random_token_fraction),
                             mask_id=self.special_token_ids.mask_id, vocab_size=self.vocab_size,
                             special_ids=_special_ids(tokenizer, self.special_token_ids))

        self.world_invariant = world_invariant
        # A world-invariant stream is the one a single process on one node would read.
        num_nodes = 1 if world_invariant else max(1, self.dist.world_size // max(1, self.dist.local_world_size))
        self.num_nodes = num_nodes
        self._num_canonical_nodes = config.num_canonical_nodes or (
            64 * num_nodes if config.shuffle_algo in ("py1s", "py2s") else num_nodes)
        if self._num_canonical_nodes % num_nodes and num_nodes % self._num_canonical_nodes:
            raise UserError(f"data num_canonical_nodes={self._num_canonical_nodes} and this run's {num_nodes} nodes: "
                            f"one must divide the other (streaming's partition); set it to a multiple of the node count")
        # Manifest proportions are token shares; streaming draws samples, so weigh by tokens per sample.
        self.resplit = config.resplit
        streaming_manifest, self.token_shares = sampling_manifest(self.manifest, config.max_seq_len, self.resplit)
        self.dataset = build_streaming_dataset(
            streaming_manifest, batch_size=config.raw_batch_size, shuffle=shuffle, seed=config.seed,
            shuffle_algo=config.shuffle_algo, num_canonical_nodes=self._num_canonical_nodes,
            shuffle_block_size=config.shuffle_block_size, predownload=config.predownload,
            cache_limit=config.cache_limit, download_timeout=config.download_timeout,
            download_retry=config.download_retry, sampling_method=sampling_method, replication=self.dist.world_size if world_invariant else None)
        # The eval loader's fixed pass keeps streaming's sampling; training epochs cover every sample per pass.
        self.dataset.coverage_sampling = shuffle and config.sampling == "coverage"
        self._raw_loader = build_raw_dataloader(self.dataset, batch_size=config.raw_batch_size,
                                                num_workers=config.num_workers,
                                                prefetch_factor=config.prefetch_factor)
        self.tokens_per_micro_batch = config.tokens_per_micro_batch
        self.packer = BestFitPacker(self.tokens_per_micro_batch)
        self._lookahead_steps = lookahead_steps
        lookahead = config.packing_lookahead_tokens
        self.set_lookahead(default_lookahead_tokens(config) if lookahead is None else lookahead)
        self._raw_iter: Iterator | None = None
        self._pending: deque = deque()
        self.epoch = 0
        self.raw_consumed = 0
        # Where this rank's reads lie in the epoch's global order (elastic.py): read i is at position
        # origin + i * stride + offset; positions in _skip_positions were read before a resume and are dropped.
        self._origin = 0
        self._reads = 0
        self._skip_positions: deque = deque()
        self.source_tokens = np.zeros(len(self.manifest.sources), dtype=np.int64)  # real tokens emitted

    @property
    def source_names(self) -> list[str]:
        return self.manifest.source_names()

    def realized_token_shares(self) -> dict[str, float]:
        """Share of each source in the real tokens this rank emitted so far (up to the last step taken)."""
        yielded = getattr(self, "_yielded_state", None)
        return self._shares(yielded["source_tokens"] if yielded is not None else self.source_tokens)

    def _shares(self, counts) -> dict[str, float]:
        counts = np.asarray(counts, dtype=np.int64)
        total = max(1, int(counts.sum()))
        return {name: int(n) / total for name, n in zip(self.source_names, counts)}

    def _log_token_shares(self, steps: int) -> None:
        wanted = self.token_shares or {}
        shares = ", ".join(f"{name} {share:.1%}" + (f" (manifest {wanted[name]:.1%})" if name in wanted else "")
                           for name, share in self._shares(self.source_tokens).items())
        log.info("data: realized token shares after %d steps, %d tokens on rank %d: %s", steps,
                 int(self.source_tokens.sum()), self.rank, shares)

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def _stride(self) -> int:
        return 1 if self.world_invariant else self.world_size

    def set_lookahead(self, tokens: int) -> None:
        """Buffer `tokens` beyond the next step's micro-batches; by default a piece waits at most about two
        buffer turnovers."""
        self._lookahead_tokens = int(tokens)
        self._target_tokens = self._lookahead_steps * self.tokens_per_micro_batch + self._lookahead_tokens
        turnover = -(-self._target_tokens // self.tokens_per_micro_batch)
        self.packer.max_wait = self.config.packing_max_wait or 2 * turnover

    @property
    def _offset(self) -> int:
        return 0 if self.world_invariant else elastic.rank_offset(self.rank, self.world_size, self.num_nodes)

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    def _check_shards_match_tokenizer(self, sha: str) -> None:
        roles = self.special_token_ids.as_dict()
        for source in self.manifest.sources:
            meta = source.prep_meta()
            if meta is None:
                continue
            where = f"source {source.name!r} ({source.local}/prep_meta.json)"
            if self.config.check_tokenizer_hash and meta.get("tokenizer_sha256") not in (None, sha):
                raise UserError(f"{where} was prepared with another tokenizer (sha256 {meta['tokenizer_sha256'][:12]}"
                                f"...) than {self.config.tokenizer} (sha256 {sha[:12]}...); re-prepare the shards or "
                                f"set check_tokenizer_hash: false if the vocabularies are truly identical")
            if meta.get("vocab_size") is not None and int(meta["vocab_size"]) > self.vocab_size:
                raise UserError(f"{where} has vocab_size {meta['vocab_size']} but {self.config.tokenizer} has "
                                f"{self.vocab_size}")
            saved = meta.get("special_token_ids") or {}
            for role, value in saved.items():
                if role in roles and value is not None and roles[role] is not None and int(value) != roles[role]:
                    raise UserError(f"{where} has {role}={value} but {self.config.tokenizer} has {roles[role]}")

    # --- raw samples -------------------------------------------------------------------------------
    def _read_raw(self) -> tuple[int, np.ndarray] | None:
        """Next raw sample of this rank in this epoch, or None when the epoch's partition is used up."""
        while True:
            while not self._pending:
                if self._raw_iter is None:
                    return None
                try:
                    sample_ids, arrays = next(self._raw_iter)
                except StopIteration:
                    return None
                self._pending.extend(zip(sample_ids.tolist(), arrays))
            self.raw_consumed += 1
            item = self._pending.popleft()
            position = self._origin + self._reads * self._stride + self._offset
            self._reads += 1
            if self._skip_positions and self._skip_positions[0] == position:
                self._skip_positions.popleft()  # read before the checkpoint (by this or another rank)
                continue
            return item

    def _start_raw(self) -> None:
        """Begin this rank's pass over the current streaming epoch, fetching its first raw batch now.

        Streaming's epoch start is a barrier across all ranks of the node, so every rank must enter it at
        the same step, even one whose buffer is full and would not read for a while.
        """
        self._pending.clear()
        self._raw_iter = iter(self._raw_loader)
        try:
            sample_ids, arrays = next(self._raw_iter)
        except StopIteration:
            return
        self._pending.extend(zip(sample_ids.tolist(), arrays))

    def _restart_raw(self) -> None:
        self.raw_consumed = 0
        self._origin = self._reads = 0
        self._skip_positions.clear()
        self._start_raw()

    def _pieces_of(self, sample_id: int, tokens: np.ndarray, epoch: int) -> list[Piece]:
        ids = self.special_token_ids
        return [Piece(tokens=piece, sample_id=sample_id, piece_index=i, epoch=epoch,
                      key=document_key(self.config.seed, epoch, sample_id, i))
                for i, piece in enumerate(split_sample(np.asarray(tokens), self.config.max_seq_len, ids.cls_id,
                                                       ids.sep_id, self.resplit))]

    def _top_up(self, target_tokens: int, mask_epoch: int) -> bool:
        """Read samples until the buffer holds `target_tokens`; True if the epoch ran out first."""
        while self.packer.buffered_tokens < target_tokens:
            item = self._read_raw()
            if item is None:
                return True
            for piece in self._pieces_of(item[0], item[1], mask_epoch):
                self.packer.add(piece)
        return False

    # --- collectives ---------------------------------------------------------------------------------
    def _all_reduce_sum(self, values: list[int]) -> list[int]:
        if self.dist.world_size == 1:
            return list(values)
        import torch.distributed as torch_dist

        tensor = torch.tensor(values, dtype=torch.int64)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM, group=self._step_group)
        return tensor.tolist()

    # --- micro-batches -------------------------------------------------------------------------------
    def _micro_batch(self, pieces: list[Piece], rows: int | None = None,
                     mlm_probability: float | None = None) -> dict[str, Any]:
        rows = self.config.micro_batch_size if rows is None else rows
        budget = rows * self.config.max_seq_len
        input_ids, cu_seqlens, lengths = assemble(pieces, budget, self.special_token_ids.pad_id,
                                                   self.config.max_seq_len)
        used = int(lengths.sum())
        sample_ids = np.fromiter((p.sample_id for p in pieces), dtype=np.int64, count=len(pieces))
        source_ids = stream_of_sample(self.dataset, sample_ids)
        per_source = np.bincount(source_ids, weights=lengths, minlength=len(self.source_tokens))
        self.source_tokens += per_source.astype(np.int64)
        labels = np.full(budget, IGNORE_INDEX, dtype=np.int64)
        if used:
            keys = np.fromiter((p.key for p in pieces), dtype=np.uint64, count=len(pieces))
            input_ids[:used], labels[:used] = self.masker.mask(input_ids[:used], keys, lengths, mlm_probability)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "cu_seqlens": torch.from_numpy(cu_seqlens),
            "max_seqlen": int(np.diff(cu_seqlens).max()),
            "labels": torch.from_numpy(labels),
            "num_tokens": used,
            "num_masked": int(np.count_nonzero(labels != IGNORE_INDEX)),
            "num_docs": len(pieces),
            "num_rows": rows,  # max_seq_len-token rows this micro-batch's budget stands for
            # Host-side copy for FLOP counting: reading cu_seqlens back from the GPU would sync every step.
            "document_lengths": lengths.tolist(),
        }
        if self.config.return_provenance:
            batch["sample_ids"] = sample_ids
            batch["piece_indices"] = np.fromiter((p.piece_index for p in pieces), dtype=np.int64, count=len(pieces))
            batch["epochs"] = np.fromiter((p.epoch for p in pieces), dtype=np.int64, count=len(pieces))
            batch["source_ids"] = source_ids
        return batch

    def release(self) -> list[str]:
        """close(), then give back what the loader holds on the host: its raw iterator and the shard cache
        folders of its dataset (see dataset.release_shard_caches), its threads and its shared memory (see
        shm_prefix.release_streaming_dataset). The loader cannot be used afterwards."""
        from modernbert_train.data.dataset import release_shard_caches
        from modernbert_train.data.shm_prefix import release_streaming_dataset

        getattr(self, "close", lambda: None)()
        self._raw_iter = None
        self._raw_loader = None
        release_streaming_dataset(self.dataset)  # first: its threads may still be filling the caches
        return release_shard_caches(self.dataset)


class MLMLoader(_LoaderBase):
    """Infinite training loader; iterate for `{"micro_batches": [...], "num_tokens": int, ...}` per step.

    Attributes the trainer uses: `special_token_ids`, `vocab_size`, `tokens_per_micro_batch`, `warmup`,
    `tokens_seen` (real tokens of all ranks in the steps before the one just yielded: the warmup position),
    `state_dict()`, `load_state_dict()`. Each step item also carries `num_tokens` (this rank's real tokens),
    `num_sequences` (this rank's rows; each micro-batch has `num_rows`, the last may have fewer than
    micro_batch_size), `tokens_seen_before` and `epoch`.
    Iterating again continues where it stopped (it never restarts from scratch).

    With `prefetch_steps` > 0 a background thread prepares that many steps ahead (see prefetch.py); the
    per-step all-reduce then runs on a gloo group of its own, so that `state_dict()`'s all-gather on the
    main thread never interleaves with it.
    """

    def __init__(self, config: MLMLoaderConfig, *, rank: int | None = None, world_size: int | None = None):
        probe_world = initialize_distributed().world_size
        config.validate(probe_world)
        self.warmup = BatchSizeWarmup.from_config(config, probe_world)
        # World-invariant: this rank packs the whole step (every rank's micro-batches) and keeps its own.
        self._packing_ranks = probe_world if config.world_invariant else 1
        super().__init__(config, rank=rank, world_size=world_size, shuffle=config.shuffle,
                         lookahead_steps=self.warmup.max_micro_batches_per_rank * self._packing_ranks,
                         world_invariant=config.world_invariant)
        self._tokens_seen = 0        # real tokens of all ranks in all steps whose counts were reduced
        self._pending_tokens = 0     # this rank's real tokens of the last step, reduced at the next step
        self.steps = 0
        # (first, last) loader steps, 1-based since the phase began, that __next__ drops (set by the spike guard).
        self.skip_windows: list[tuple[int, int]] = []
        self._prefetcher: StepPrefetcher | None = None
        self._yielded_state: dict[str, Any] | None = None  # producer state right after the last yielded step
        # A MaskRateSchedule (set by the trainer) gives each step's mask rate from the tokens seen.
        self.mask_rate_schedule = None
        if config.prefetch_steps and self.world_size > 1:
            from modernbert_train.common.ranks import new_gloo_group

            self._step_group = new_gloo_group()

    @property
    def tokens_seen(self) -> int:
        """Real tokens of all ranks in the steps before the one last yielded (the warmup position)."""
        if self._yielded_state is not None:
            return int(self._yielded_state["tokens_seen"])
        return self._tokens_seen

    def __iter__(self) -> "MLMLoader":
        return self

    def __next__(self) -> dict[str, Any]:
        while True:
            step = self._take_step()
            # The spike guard's windows: loader steps whose data a rollback discarded are never trained on.
            if not any(first <= step["loader_step"] <= last for first, last in self.skip_windows):
                return step

    def _take_step(self) -> dict[str, Any]:
        if not self.config.prefetch_steps:
            return self._next_step()
        if self._prefetcher is None:
            if self._yielded_state is not None:
                raise RuntimeError("the loader was closed with prepared steps dropped; load_state_dict() a state "
                                   "to continue")
            self._prefetcher = StepPrefetcher(self._produce, self.config.prefetch_steps)
        step, self._yielded_state = self._prefetcher.get()
        return step

    def _produce(self) -> tuple[dict[str, Any], dict[str, Any]]:
        step = self._next_step()
        return step, self._local_state()

    def close(self) -> None:
        """Stop the prefetch thread; steps prepared but not taken are dropped, `state_dict()` still gives the
        position after the last step taken (load it to iterate again)."""
        if self._prefetcher is not None:
            self._prefetcher.close()
            self._prefetcher = None

    def _next_step(self) -> dict[str, Any]:
        if self._raw_iter is None:
            self._start_raw()
        exhausted = self._top_up(self._target_tokens, self.epoch)
        reduced = self._all_reduce_sum([int(exhausted), self._pending_tokens, 0])
        self._tokens_seen += reduced[1]
        self._pending_tokens = 0
        while reduced[0]:
            # Some rank used up its share of this epoch: everyone starts the next one now, together.
            self.epoch += 1
            self._restart_raw()
            exhausted = self._top_up(self._target_tokens, self.epoch)
            reduced = self._all_reduce_sum([int(exhausted), 0, int(self.raw_consumed == 0 and not self._pending)])
            if reduced[2]:
                raise UserError(f"manifest {self.manifest.path}: an epoch gives no samples to some rank "
                                f"(world size {self.world_size}); the data is too small for this many ranks")
        rows = self.warmup.micro_batch_rows(self._tokens_seen)
        # The producer's own token count: with prefetching, this step is packed ahead of the trainer.
        rate = self.mask_rate_schedule(self._tokens_seen) if self.mask_rate_schedule is not None else None
        micro_batches = []
        for packing_rank in range(self._packing_ranks):
            for micro_batch_rows in rows:
                pieces = self.packer.pack(micro_batch_rows * self.config.max_seq_len)
                if packing_rank == self.rank % self._packing_ranks:
                    micro_batches.append(self._micro_batch(pieces, micro_batch_rows, rate))
        num_tokens = sum(mb["num_tokens"] for mb in micro_batches)
        self._pending_tokens = num_tokens
        self.steps += 1
        if self.config.mixture_log_every and self.steps % self.config.mixture_log_every == 0:
            self._log_token_shares(self.steps)
        return {
            "micro_batches": micro_batches,
            "num_tokens": num_tokens,
            "num_sequences": sum(rows),
            "tokens_seen_before": self._tokens_seen,
            "epoch": self.epoch,
            "loader_step": self.steps,  # this step's position in the stream, dropped steps included
        }

    # --- state ---------------------------------------------------------------------------------------
    def _local_state(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "epoch": self.epoch,
            "raw_consumed": self.raw_consumed,
            "origin": self._origin,
            "stride": self._stride,
            "offset": self._offset,
            "reads": self._reads,
            "skip": np.asarray(self._skip_positions, dtype=np.int64),
            "tokens_seen": self._tokens_seen,
            "pending_tokens": self._pending_tokens,
            "steps": self.steps,
            "buffer": np.asarray(self.packer.references(), dtype=np.int64).reshape(-1, 5),
            "packer": self.packer.counters(),
            "source_tokens": self.source_tokens.tolist(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Picklable state of every rank (a collective when distributed: call it on all ranks together)."""
        local = self._yielded_state if self._yielded_state is not None else self._local_state()
        if self.world_size > 1:
            import torch.distributed as torch_dist

            gathered: list[Any] = [None] * self.world_size
            torch_dist.all_gather_object(gathered, local, group=self._group)
        else:
            gathered = [local]
        return {
            "format": STATE_FORMAT,
            "world_size": self.world_size,
            "num_nodes": self.num_nodes,
            "world_invariant": self.world_invariant,
            "num_canonical_nodes": self._num_canonical_nodes,
            "sampling": "coverage" if self.dataset.coverage_sampling else "balanced",
            "resplit": self.resplit,
            "lookahead_tokens": self._lookahead_tokens,
            "packing": self.packer.policy,
            "config": {key: getattr(self.config, key) for key in RESUME_KEYS},
            "sources": self.source_names,
            # A tuple is one opaque item to torch.distributed.checkpoint (FSDP sharded checkpoints): a list of
            # dicts would be saved entry by entry and loaded only as far as this world's own list reaches.
            "ranks": tuple(gathered),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` was saved: exactly on the same number of ranks; on another number, with the
        same global sample order, no sample read twice or skipped, and the packer buffers handed over."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise UserError(f"data loader state is not a {STATE_FORMAT} state (got keys "
                            f"{sorted(state) if isinstance(state, dict) else type(state).__name__})")
        saved_invariant = bool(state.get("world_invariant", False))
        if saved_invariant != self.world_invariant:
            raise UserError(f"data config world_invariant was {saved_invariant} in the checkpoint and is "
                            f"{self.world_invariant} now; exact data resume needs it unchanged")
        for key in RESUME_KEYS:
            if state["config"][key] != getattr(self.config, key):
                raise UserError(f"data config {key} was {state['config'][key]!r} in the checkpoint and is "
                                f"{getattr(self.config, key)!r} now; exact data resume needs it unchanged")
        older_states.adopt_modes(self, state)
        if state["sources"] != self.source_names:
            raise UserError(f"the checkpoint's manifest sources {state['sources']} differ from this run's "
                            f"{self.source_names}")
        saved_world = int(state["world_size"])
        ranks = [self._with_layout(r, state) for r in state["ranks"]]
        num_canonical_nodes = int(state["num_canonical_nodes"])
        if not self.world_invariant:
            elastic.check_node_count(num_canonical_nodes, self.num_nodes)
        self.close()
        self._yielded_state = None
        if self.world_invariant:
            # Every saved rank read and packed the same stream; only the last step's token counts differ.
            # They are reduced at the next step, so whichever rank carries their sum gives the same total.
            readers, owners = ranks[:1], ranks[:1]
        else:
            readers = ranks
            owners = [ranks[g] for g in elastic.inherited_ranks(saved_world, self.world_size, self.rank)]
        if saved_world == self.world_size and not self.world_invariant:
            pending_tokens = int(ranks[self.rank]["pending_tokens"])
        else:
            pending_tokens = sum(int(r["pending_tokens"]) for r in ranks) if self.rank == 0 else 0
        first = ranks[0]
        frontier, extras = elastic.consumed(readers)
        start, _, skip = elastic.restart_plan(frontier, extras, rank=0 if self.world_invariant else self.rank,
                                              world_size=self._stride, num_nodes=1 if self.world_invariant
                                              else self.num_nodes, align=self._stride * self.config.raw_batch_size)
        self._num_canonical_nodes = num_canonical_nodes
        self.dataset.load_state_dict({
            "epoch": int(first["epoch"]),
            "sample_in_epoch": start,
            "num_canonical_nodes": num_canonical_nodes,
            "shuffle_seed": self.config.seed,
            "initial_physical_nodes": self.num_nodes,
        })
        # A loader that already iterated holds a newer epoch counter in shared memory; rewind it so streaming
        # takes the resume state above instead of calling it stale.
        self.dataset.next_epoch = int(first["epoch"])
        self._pending.clear()
        self._raw_iter = None
        self.epoch = int(first["epoch"])
        self._origin, self._reads = start, 0
        self._skip_positions = deque(int(q) for q in skip)
        self.raw_consumed = start // self._stride
        self._tokens_seen = int(first["tokens_seen"])
        self._pending_tokens = pending_tokens
        self.steps = int(first["steps"])
        counts = [r.get("source_tokens", [0] * len(self.source_names)) for r in owners]
        self.source_tokens = np.sum(np.asarray(counts, dtype=np.int64).reshape(-1, len(self.source_names)), axis=0)
        buffer, counters = elastic.merge_buffers(owners)
        if not owners:  # a rank added by the resize: an empty buffer, packing in step with the others
            counters = {"next_seq": 0, "budgets_packed": int(first["packer"]["budgets_packed"])}
        self.packer.restore(self._reread_buffer(buffer), counters)

    def _with_layout(self, rank_state: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
        """A saved rank's state with its read positions; states written before elastic resume existed give
        them only for the world they were written on."""
        if "origin" in rank_state:
            return rank_state
        if int(state["world_size"]) != self.world_size and not self.world_invariant:
            raise UserError(f"the checkpoint's data state was written by {state['world_size']} ranks by a version "
                            f"without elastic resume; resume it once on {state['world_size']} ranks, then change")
        return {**rank_state, "origin": 0, "stride": self._stride, "reads": int(rank_state["raw_consumed"]),
                "skip": np.zeros(0, np.int64),
                "offset": 0 if self.world_invariant else elastic.rank_offset(int(rank_state["rank"]),
                                                                             self.world_size, self.num_nodes)}

    def _reread_buffer(self, references: np.ndarray) -> list[Piece]:
        pieces: list[Piece] = []
        cache: dict[tuple[int, int], list[Piece]] = {}
        for sample_id, piece_index, epoch, seq, arrival in references.tolist():
            if (sample_id, epoch) not in cache:
                cache[(sample_id, epoch)] = self._pieces_of(sample_id, self.dataset[sample_id]["input_ids"], epoch)
            split = cache[(sample_id, epoch)]
            if piece_index >= len(split):
                raise UserError(f"checkpoint refers to piece {piece_index} of sample {sample_id}, which has only "
                                f"{len(split)} pieces now: the shards changed since the checkpoint was written")
            source = split[piece_index]
            pieces.append(Piece(tokens=source.tokens, sample_id=sample_id, piece_index=piece_index, epoch=epoch,
                                key=source.key, seq=seq, arrival=arrival))
        return pieces


class EvalMLMLoader(_LoaderBase):
    """One finite pass over the eval manifest, unshuffled, fixed masking (epoch 0 keys), no warmup.

    Yields contract-4 micro-batches. With several ranks all ranks yield the same number; a rank whose share
    ran out yields padding-only micro-batches (num_tokens == num_masked == 0) that must weigh nothing.
    """

    def __init__(self, config: MLMLoaderConfig, *, rank: int | None = None, world_size: int | None = None):
        # "fixed" sampling: a source weighted below 1x gives the same samples on every pass.
        super().__init__(config, rank=rank, world_size=world_size, shuffle=False, lookahead_steps=1,
                         sampling_method="fixed")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.packer.restore([], {"next_seq": 0, "budgets_packed": 0})
        self._restart_raw()
        exhausted = False
        while True:
            if not exhausted:
                exhausted = self._top_up(self._target_tokens, 0)
            if self._all_reduce_sum([len(self.packer)])[0] == 0:
                return
            yield self._micro_batch(self.packer.pack())


def build_mlm_loader(config: MLMLoaderConfig, *, rank: int | None = None, world_size: int | None = None,
                     infinite: bool = True) -> MLMLoader | EvalMLMLoader:
    """The training loader (infinite=True) or a one-pass eval loader (infinite=False).

    Starts torch.distributed first when WORLD_SIZE > 1 and cleans stale streaming shared memory.
    """
    if infinite:
        return MLMLoader(config, rank=rank, world_size=world_size)
    return EvalMLMLoader(config, rank=rank, world_size=world_size)


def build_eval_loader(config: MLMLoaderConfig, *, rank: int | None = None,
                      world_size: int | None = None) -> EvalMLMLoader:
    return EvalMLMLoader(config, rank=rank, world_size=world_size)
