"""Packing of whole documents into fixed token budgets, and re-splitting of long samples.

A *piece* is what the model sees as one document, at most `max_seq_len` ids. Shards hold [CLS] ... [SEP]
chunks of up to 8192 ids; when training at a shorter length a chunk is re-split into consecutive pieces (no
token lost; see `split_sample`). The packer keeps a lookahead buffer of pieces and fills each budget
(micro_batch_size x max_seq_len tokens): pieces drawn at random from the whole buffer while they fit, then the
remaining room filled by the largest piece that still fits, so padding only ever appears as one tail segment.
Draws come from the packer's counters alone (so a resume redraws them). The pieces of one long sample arrive
together; taking the oldest put them in one budget, and a step's rows came from a few documents instead of many
(bench/quality_bench.py: a worse encoder at equal tokens); the buffer's size is how far apart they land now.
A piece that has waited longer than `max_wait` budgets goes first, so nothing starves. The buffer is described
by small references (sample id, piece index, ...) for checkpoints; the tokens are re-read on restore.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

import numpy as np

from modernbert_train.data.masking import _splitmix64_int


@dataclass
class Piece:
    tokens: np.ndarray  # at most max_seq_len ids: a whole chunk [CLS] ... [SEP], or a window of one
    sample_id: int      # global streaming sample index
    piece_index: int    # which piece of that sample
    epoch: int          # epoch the sample was read in (feeds the mask key)
    key: int            # masking key, see masking.document_key
    seq: int = -1       # arrival number in the packer (set by the packer)
    arrival: int = -1   # budget count when it arrived (set by the packer)

    @property
    def length(self) -> int:
        return int(self.tokens.shape[0])

    def reference(self) -> tuple[int, int, int, int, int]:
        return (self.sample_id, self.piece_index, self.epoch, self.seq, self.arrival)


RESPLIT_MODES = ("contiguous", "framed")


def split_sample(tokens: np.ndarray, max_seq_len: int, cls_id: int, sep_id: int,
                 mode: str = "contiguous") -> list[np.ndarray]:
    """Re-split one [CLS] ... [SEP] chunk into pieces of at most `max_seq_len` ids; no token is lost.

    contiguous: the chunk's ids, its [CLS] and [SEP] included, are cut into consecutive windows, so a chunk of
    k x max_seq_len ids becomes k full pieces; the first piece starts with the [CLS], the last ends with the [SEP].
    framed: every piece is wrapped again in [CLS] ... [SEP]. Two ids of each piece go to the frame, so a full
    chunk becomes one piece more, and two of them short: 512 ids at 128 give 126, 126, 126, 66, 66 ids of text.
    At equal tokens that cost 0.08-0.10 held-out cross-entropy (bench/RESULTS.md, issue 27); it is kept for
    runs that started with it.
    In both, a short remainder (under half a piece) is balanced with the piece before it, so that no piece is a
    stub of a few tokens. A chunk that already fits comes back unchanged; a missing [CLS] / [SEP] is added.
    """
    if max_seq_len < 3:
        raise ValueError(f"max_seq_len must be at least 3 ([CLS] token [SEP]), got {max_seq_len}")
    if mode not in RESPLIT_MODES:
        raise ValueError(f"re-split mode {mode!r} is not one of {', '.join(RESPLIT_MODES)}")
    n = tokens.shape[0]
    has_cls = n > 0 and tokens[0] == cls_id
    has_sep = n > 1 and tokens[-1] == sep_id
    if has_cls and has_sep and n <= max_seq_len:
        return [tokens]
    if mode == "contiguous":
        if not (has_cls and has_sep):
            tokens = np.concatenate([[cls_id]] * (not has_cls) + [tokens] + [[sep_id]] * (not has_sep)).astype(
                tokens.dtype)
        return [tokens[start:end] for start, end in _windows(tokens.shape[0], max_seq_len)]
    body = tokens[1 if has_cls else 0: n - 1 if has_sep else n]
    pieces = []
    for start, end in _windows(body.shape[0], max_seq_len - 2):
        piece = np.empty(end - start + 2, dtype=tokens.dtype)
        piece[0], piece[1:-1], piece[-1] = cls_id, body[start:end], sep_id
        pieces.append(piece)
    return pieces


def _windows(total: int, step: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) of at most `step` covering `total`; a last one under step // 2 shares with the one
    before it."""
    bounds = list(range(0, total, step)) + [total] if total else [0, 0]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < step // 2:
        bounds[-2] = (bounds[-3] + total + 1) // 2
    return list(zip(bounds[:-1], bounds[1:]))


def pieces_count(num_tokens: int, max_seq_len: int, mode: str = "contiguous") -> int:
    """How many pieces `split_sample` makes of a [CLS] ... [SEP] chunk of `num_tokens` ids."""
    if num_tokens <= max_seq_len:
        return 1
    if mode == "contiguous":
        return -(-num_tokens // max_seq_len)
    return -(-(num_tokens - 2) // (max_seq_len - 2))


PACKING_POLICIES = ("draw_then_fit", "best_fit")


class BestFitPacker:
    """Lookahead buffer of pieces; `pack()` returns the pieces of one budget.

    draw_then_fit (the default): pieces drawn uniformly from the whole buffer while they fit, then the rest of the
    budget filled largest-that-fits. Every piece waits alike whatever its length, so the emitted mixture follows
    the read one however large the buffer. best_fit: largest-that-fits from the start (before 2026-12-03; kept
    for runs that started with it): short pieces wait for `max_wait`, and with a 512-row buffer a source of
    short documents came out 3-7 points below its share for the first ~100 steps (bench/RESULTS.md, issue 27).
    """

    def __init__(self, budget: int, max_wait: int | None = None, policy: str = "draw_then_fit"):
        if budget < 1:
            raise ValueError("budget must be positive")
        if policy not in PACKING_POLICIES:
            raise ValueError(f"packing policy {policy!r} is not one of {', '.join(PACKING_POLICIES)}")
        self.budget = int(budget)
        self.max_wait = max_wait
        self.policy = policy
        self._keys: list[tuple[int, int]] = []  # (length, -seq): the last one of a length is the oldest
        self._pieces: dict[int, Piece] = {}
        self._arrivals: deque[int] = deque()    # seqs in arrival order (lazily pruned)
        self.buffered_tokens = 0
        self.next_seq = 0
        self.budgets_packed = 0

    def __len__(self) -> int:
        return len(self._pieces)

    def add(self, piece: Piece, *, keep_identity: bool = False) -> None:
        if piece.length > self.budget:
            raise ValueError(f"piece of {piece.length} tokens exceeds the budget {self.budget}")
        if not keep_identity:
            piece.seq = self.next_seq
            piece.arrival = self.budgets_packed
            self.next_seq += 1
        bisect.insort(self._keys, (piece.length, -piece.seq))
        self._pieces[piece.seq] = piece
        self._arrivals.append(piece.seq)
        self.buffered_tokens += piece.length

    def _take(self, index: int) -> Piece:
        length, neg_seq = self._keys.pop(index)
        piece = self._pieces.pop(-neg_seq)
        self.buffered_tokens -= length
        return piece

    def _oldest(self) -> Piece | None:
        while self._arrivals and self._arrivals[0] not in self._pieces:
            self._arrivals.popleft()
        return self._pieces[self._arrivals[0]] if self._arrivals else None

    def pack(self, budget: int | None = None) -> list[Piece]:
        """Pieces for one budget (the packer's, or a smaller one that still holds any piece; empty only when
        the buffer is empty)."""
        chosen: list[Piece] = []
        room = self.budget if budget is None else min(int(budget), self.budget)
        if self.max_wait is not None:
            # Overdue pieces go first, oldest first, so that small pieces (the gap fillers) are not held back
            # and the emitted mixture tracks the read mixture within a bounded delay.
            oldest = self._oldest()
            while (oldest is not None and self.budgets_packed - oldest.arrival > self.max_wait
                   and oldest.length <= room):
                chosen.append(self._take(bisect.bisect_left(self._keys, (oldest.length, -oldest.seq))))
                room -= oldest.length
                oldest = self._oldest()
        if self.policy == "draw_then_fit":
            while self._keys:
                index = _splitmix64_int((self.budgets_packed << 20) + (1 << 19) + len(chosen)) % len(self._keys)
                if self._keys[index][0] > room:
                    break
                piece = self._take(index)
                chosen.append(piece)
                room -= piece.length
        while self._keys and room > 0:
            index = bisect.bisect_right(self._keys, (room, 1)) - 1
            if index < 0:
                break
            first = bisect.bisect_left(self._keys, (self._keys[index][0], -self.next_seq))  # same length from here
            if index > first:
                draw = _splitmix64_int((self.budgets_packed << 20) + len(chosen))
                index = first + draw % (index - first + 1)
            piece = self._take(index)
            chosen.append(piece)
            room -= piece.length
        self.budgets_packed += 1
        return chosen

    def references(self) -> list[tuple[int, int, int, int, int]]:
        """The buffer, in arrival order, as (sample_id, piece_index, epoch, seq, arrival) tuples."""
        return [self._pieces[seq].reference() for seq in sorted(self._pieces)]

    def counters(self) -> dict[str, int]:
        return {"next_seq": self.next_seq, "budgets_packed": self.budgets_packed}

    def restore(self, pieces: list[Piece], counters: dict[str, int]) -> None:
        """Replace the buffer with `pieces` (seq/arrival already set) and the counters."""
        self._keys.clear()
        self._pieces.clear()
        self._arrivals.clear()
        self.buffered_tokens = 0
        for piece in sorted(pieces, key=lambda p: p.seq):
            self.add(piece, keep_identity=True)
        self.next_seq = int(counters["next_seq"])
        self.budgets_packed = int(counters["budgets_packed"])


def assemble(pieces: list[Piece], budget: int, pad_id: int,
             max_seq_len: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate pieces into a (budget,) int64 stream padded at the tail.

    Returns (input_ids, cu_seqlens int32 incl. the padding segments, lengths of the real pieces). The padding
    tail is cut into segments of at most `max_seq_len` tokens: as one segment it would be as long as the
    budget, and attention costs grow with the square of the longest segment (an all-padding eval micro-batch
    would cost budget^2, and a 65k x 65k mask with sdpa).
    """
    lengths = np.fromiter((p.length for p in pieces), dtype=np.int64, count=len(pieces))
    used = int(lengths.sum())
    if used > budget:
        raise ValueError(f"pieces hold {used} tokens, more than the budget {budget}")
    input_ids = np.full(budget, pad_id, dtype=np.int64)
    if pieces:
        input_ids[:used] = np.concatenate([p.tokens for p in pieces])
    boundaries = np.concatenate([[0], np.cumsum(lengths)])
    if used < budget:
        step = budget - used if max_seq_len is None else max_seq_len
        boundaries = np.concatenate([boundaries, np.arange(used + step, budget, step), [budget]])
    return input_ids, boundaries.astype(np.int32), lengths
