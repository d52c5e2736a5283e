"""Deterministic MLM masking: the mask of a document is a pure function of (seed, epoch, sample id, piece).

Every token draws from a counter-based hash (splitmix64) of its document key and its position in the
document, so masking is vectorised over a whole packed micro-batch, needs no RNG state, and gives the same
mask after a resume, on any rank, in any packing. Special tokens (all of the tokenizer's special added
tokens: [CLS] [SEP] [PAD] [MASK] [UNK] ...) are never selected; random replacements are drawn uniformly
from the real vocabulary (every id the tokenizer can emit except special tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modernbert_train.common.errors import UserError

IGNORE_INDEX = -100
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB
# A second stream of bits, independent of the first, for choosing replacement tokens.
_REPLACEMENT_SALT = 0xD1B54A32D192ED03
_FRACTION_BITS = 24
_FRACTION_SCALE = 1 << _FRACTION_BITS


def _splitmix64_int(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK64
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK64
    return x ^ (x >> 31)


def _splitmix64_array(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (in place, wrapping arithmetic)."""
    x += np.uint64(_GOLDEN)
    x ^= x >> np.uint64(30)
    x *= np.uint64(_MIX1)
    x ^= x >> np.uint64(27)
    x *= np.uint64(_MIX2)
    x ^= x >> np.uint64(31)
    return x


def document_key(seed: int, epoch: int, sample_id: int, piece_index: int) -> int:
    """64-bit key of one packed document (one piece of one streaming sample in one epoch)."""
    key = _splitmix64_int(seed & _MASK64)
    for part in (epoch, sample_id, piece_index):
        key = _splitmix64_int(key ^ (part & _MASK64))
    return key


@dataclass(frozen=True)
class MaskingConfig:
    mlm_probability: float = 0.3
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1

    def validate(self, where: str = "masking") -> None:
        if not 0.0 <= self.mlm_probability <= 1.0:
            raise UserError(f"{where}: mlm_probability must be in [0, 1] (got {self.mlm_probability})")
        for name in ("mask_token_fraction", "random_token_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{where}: {name} must be in [0, 1] (got {value})")
        if self.mask_token_fraction + self.random_token_fraction > 1.0 + 1e-9:
            raise UserError(f"{where}: mask_token_fraction + random_token_fraction must be <= 1 (got "
                            f"{self.mask_token_fraction} + {self.random_token_fraction}); the rest keeps the token")


class Masker:
    """Applies MLM masking to packed token streams.

    `special_ids`: ids never masked nor used as replacements. `vocab_size`: ids the tokenizer can emit.
    """

    def __init__(self, config: MaskingConfig, *, mask_id: int, vocab_size: int, special_ids):
        config.validate()
        self.config = config
        self.mask_id = int(mask_id)
        special = np.zeros(max(vocab_size, max(special_ids, default=0) + 1), dtype=bool)
        special[np.asarray(sorted(special_ids), dtype=np.int64)] = True
        self._is_special = special
        self.replacement_ids = np.flatnonzero(~special[:vocab_size]).astype(np.int64)
        if self.replacement_ids.size == 0:
            raise UserError("the tokenizer has no non-special tokens to draw random replacements from")
        scale = _FRACTION_SCALE
        self._select_below = np.uint64(round(config.mlm_probability * scale))
        self._mask_below = np.uint64(round(config.mask_token_fraction * scale))
        self._random_below = np.uint64(round((config.mask_token_fraction + config.random_token_fraction) * scale))

    def is_special(self, token_ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64)
        if ids.size and (ids.max() >= self._is_special.size or ids.min() < 0):
            bad = int(ids.max()) if ids.max() >= self._is_special.size else int(ids.min())
            raise UserError(f"token id {bad} is outside the tokenizer's vocabulary ({self._is_special.size} ids): "
                            f"shards and tokenizer do not match")
        return self._is_special[ids]

    def mask(self, token_ids: np.ndarray, doc_keys: np.ndarray, doc_lengths: np.ndarray,
             mlm_probability: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mask a stream of whole documents laid end to end.

        token_ids: (N,) ints; doc_keys: (D,) uint64 from `document_key`; doc_lengths: (D,) summing to N;
        mlm_probability: this step's rate from a MaskRateSchedule (None: the config's).
        Returns (masked input ids int64 (N,), labels int64 (N,) with IGNORE_INDEX where not masked).
        """
        select_below = self._select_below
        if mlm_probability is not None:
            select_below = np.uint64(round(mlm_probability * _FRACTION_SCALE))
        token_ids = np.asarray(token_ids, dtype=np.int64)
        lengths = np.asarray(doc_lengths, dtype=np.int64)
        total = int(lengths.sum())
        if total != token_ids.size:
            raise ValueError(f"document lengths sum to {total} but there are {token_ids.size} tokens")
        starts = np.cumsum(lengths) - lengths
        position = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)
        hashed = np.repeat(np.asarray(doc_keys, dtype=np.uint64), lengths)
        hashed += (position.astype(np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN)
        _splitmix64_array(hashed)

        select_draw = hashed >> np.uint64(64 - _FRACTION_BITS)
        selected = (select_draw < select_below) & ~self.is_special(token_ids)
        labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
        labels[selected] = token_ids[selected]
        masked = token_ids.copy()
        chosen = np.flatnonzero(selected)
        if chosen.size:
            chosen_hash = hashed[chosen]
            kind_draw = (chosen_hash >> np.uint64(16)) & np.uint64(_FRACTION_SCALE - 1)
            to_mask = kind_draw < self._mask_below
            to_random = ~to_mask & (kind_draw < self._random_below)
            masked[chosen[to_mask]] = self.mask_id
            if to_random.any():
                draw = chosen_hash[to_random] ^ np.uint64(_REPLACEMENT_SALT)
                _splitmix64_array(draw)
                picks = draw % np.uint64(self.replacement_ids.size)
                masked[chosen[to_random]] = self.replacement_ids[picks.astype(np.int64)]
        return masked, labels


@dataclass(frozen=True)
class MaskRateSchedule:
    """The mask rate as a function of real tokens seen in the phase (the loader's `tokens_seen`).

    constant: `start` throughout. stepped: the rate of the last point whose token count was reached.
    linear: piecewise linear from (0, start) through the points, then constant. A pure function of the
    token count, which the loader restores on resume, and each document's draws stay keyed by the document,
    so a resumed run masks exactly as an uninterrupted one.
    """
    start: float
    kind: str = "constant"
    tokens: tuple[float, ...] = ()
    rates: tuple[float, ...] = ()

    def __call__(self, tokens_seen: float) -> float:
        if self.kind == "constant" or not self.tokens:
            return self.start
        if self.kind == "stepped":
            rate = self.start
            for at, value in zip(self.tokens, self.rates):
                if tokens_seen >= at:
                    rate = value
            return rate
        if self.kind == "linear":
            return float(np.interp(tokens_seen, (0.0, *self.tokens), (self.start, *self.rates)))
        raise ValueError(f"unknown mask schedule kind {self.kind!r}")
