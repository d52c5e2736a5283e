"""Vocabulary extension for continued pretraining: propose domain tokens, and add them to a tokenizer.

Two ways to add a token (`extend_tokenizer`):
- `unused`: give it one of the tokenizer's placeholder slots (ModernBERT's tokenizer has 83 `[unused*]` added
  tokens, ids 50285-50367); the id count, and so the model's embedding shape, does not change.
- `append`: give it the next free id; the model grows its embeddings (checkpoint/vocab.py).

New tokens are added tokens (matched in the raw text before the BPE runs), the same mechanism as transformers'
`tokenizer.add_tokens`: no merge of the existing BPE changes, every old token keeps its id, and decoding stays
lossless. A candidate is a whole pre-token of the current tokenizer (` numpy`, `self`, `Exception`) that it
splits into several pieces; its gain is the tokens saved on the corpus, `count x (pieces - 1)`.
"""
from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Iterable

from tokenizers import AddedToken, Tokenizer

from modernbert_train.common.errors import UserError
from modernbert_train.data.tokenizer import vocab_size

# Placeholder slots: BERT's `[unused12]`, Gemma-style `<unused12>`.
UNUSED_SLOT = re.compile(r"^(\[unused\d+\]|<unused\d+>)$")
MODES = ("unused", "append")


@dataclass(frozen=True)
class Candidate:
    token: str          # the raw text the new token stands for (a leading space included)
    count: int          # occurrences as a whole pre-token in the corpus sample
    pieces: int         # ids the current tokenizer spends on it
    gain_tokens: int    # count x (pieces - 1): tokens saved if it becomes one id
    gain_share: float   # gain_tokens / all tokens of the sample

    def as_dict(self) -> dict:
        return asdict(self)


def propose_tokens(texts: Iterable[str], tok: Tokenizer, top: int = 100, min_count: int = 5,
                   min_pieces: int = 2, min_chars: int = 3) -> tuple[list[Candidate], int, int]:
    """(best candidates by gain, tokens of the sample, characters of the sample).

    Whitespace-only strings and strings with a line break are left out: an added token matches anywhere in
    the raw text, and indentation runs are where a code tokenizer's merges already do best."""
    if tok.pre_tokenizer is None:
        raise UserError("the tokenizer has no pre-tokenizer, so it has no word pieces to propose from")
    words: Counter[str] = Counter()
    total_tokens = total_chars = 0
    for text in texts:
        total_chars += len(text)
        total_tokens += len(tok.encode(text, add_special_tokens=False).ids)
        words.update(text[start:end] for _, (start, end) in tok.pre_tokenizer.pre_tokenize_str(text))
    known = set(tok.get_vocab(with_added_tokens=True))
    candidates = []
    for word, count in words.items():
        if count < min_count or len(word.strip()) < min_chars or "\n" in word or word in known:
            continue
        pieces = len(tok.encode(word, add_special_tokens=False).ids)
        if pieces >= min_pieces:
            gain = count * (pieces - 1)
            candidates.append(Candidate(word, count, pieces, gain, gain / max(1, total_tokens)))
    candidates.sort(key=lambda c: (-c.gain_tokens, c.token))
    return candidates[:top], total_tokens, total_chars


def unused_slots(tok: Tokenizer) -> list[int]:
    """Ids of the tokenizer's placeholder tokens (`[unused0]` ...), in id order."""
    return sorted(i for i, added in tok.get_added_tokens_decoder().items() if UNUSED_SLOT.match(added.content))


def extend_tokenizer(tok: Tokenizer, tokens: list[str], mode: str) -> tuple[Tokenizer, list[tuple[int, str]]]:
    """A new tokenizer with `tokens` added (see the module doc); returns it and [(id, token), ...]."""
    if mode not in MODES:
        raise UserError(f"--mode {mode!r}: choose one of {', '.join(MODES)}")
    if not tokens:
        raise UserError("no tokens to add (an empty --tokens file, or --top 0)")
    vocab = tok.get_vocab(with_added_tokens=True)
    clash = [t for t in tokens if t in vocab]
    if clash:
        raise UserError(f"token {clash[0]!r} is already in the vocabulary (id {vocab[clash[0]]})")
    if len(set(tokens)) != len(tokens) or not all(tokens):
        raise UserError("the new tokens must be distinct, non-empty strings")
    if mode == "append":
        new = Tokenizer.from_str(tok.to_str())
        start = vocab_size(new)
        new.add_tokens([AddedToken(t, single_word=False, normalized=False) for t in tokens])
        return new, [(start + i, t) for i, t in enumerate(tokens)]
    slots = unused_slots(tok)
    if len(tokens) > len(slots):
        raise UserError(f"{len(tokens)} new tokens but the tokenizer has only {len(slots)} unused slots "
                        f"([unused*]); add fewer or use --mode append")
    assigned = list(zip(slots, tokens))
    data = json.loads(tok.to_str())
    by_id = dict(assigned)
    for entry in data["added_tokens"]:
        if entry["id"] in by_id:
            # A plain (non-special) added token: transformers' decode and fill-mask print it like any word.
            entry.update(content=by_id[entry["id"]], single_word=False, lstrip=False, rstrip=False,
                         normalized=False, special=False)
    model_vocab = data.get("model", {}).get("vocab")
    if isinstance(model_vocab, dict):  # a slot also listed in the BPE vocabulary would shadow the new text
        for slot_id, _ in assigned:
            for key in [k for k, v in model_vocab.items() if v == slot_id]:
                del model_vocab[key]
    return Tokenizer.from_str(json.dumps(data)), assigned


def tokens_per_char(tok: Tokenizer, texts: Iterable[str]) -> float:
    """Ids per character (specials excluded): lower means the tokenizer compresses the text better."""
    tokens = chars = 0
    for text in texts:
        tokens += len(tok.encode(text, add_special_tokens=False).ids)
        chars += len(text)
    return tokens / max(1, chars)


def read_token_list(path) -> list[str]:
    """Tokens from a propose-tokens output (.jsonl, a `token` per line) or a .txt file of JSON strings
    (`" numpy"` with its quotes, so that leading spaces survive)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--tokens {path} does not exist")
    tokens = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not JSON ({err.msg}); write each token as a JSON string or a "
                            f"propose-tokens record") from None
        token = value.get("token") if isinstance(value, dict) else value
        if not isinstance(token, str):
            raise UserError(f"{path}:{number}: expected a JSON string or an object with a string 'token'")
        tokens.append(token)
    return tokens
