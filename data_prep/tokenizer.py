"""Tokenizers: load any `tokenizer.json`, find its special tokens, train a lossless code-friendly BPE.

Loading, special ids and saving live in `modernbert_train.data.tokenizer` (contract 1); they are re-exported here.
A trained tokenizer is byte-level BPE whose pre-tokenizer keeps whitespace runs and indentation as their own
pieces and never adds a prefix space, so `decode(encode(text)) == text` for every string (except a literal
mask token, which takes the space before it, as ModernBERT's own tokenizer does).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from modernbert_train.common.errors import UserError
from modernbert_train.data.tokenizer import (SPECIAL_TOKENS, TOKENIZER_FILE, SpecialTokenIds, load_tokenizer,  # noqa: F401
                                            make_mask_absorb_preceding_space, mask_absorbs_preceding_space,
                                            resolve_tokenizer_file, save_tokenizer, special_token_ids,
                                            tokenizer_sha256, verify_saved_tokenizer, vocab_size)

# A GPT-4-like split, lossless and code-friendly: words take at most one leading non-letter, numbers split
# in groups of three, punctuation runs stop at the line end, and whitespace runs (indentation, blank lines)
# are pieces of their own, so line structure never hides inside a word piece.
CODE_FRIENDLY_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def build_untrained_tokenizer() -> Tokenizer:
    """The byte-level BPE pipeline (before training): lossless, code-friendly, [CLS] ... [SEP] wrapping."""
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CODE_FRIENDLY_SPLIT), behavior="isolated"),
        # The split above already chose the pieces; the byte-level step only maps bytes to symbols.
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _wrap_with_cls_sep(tok: Tokenizer) -> None:
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    show_progress: bool = True, length: int | None = None,
                    total_chars: int | None = None) -> Tokenizer:
    """Train a byte-level BPE with ModernBERT's specials at ids 0-4 on an iterator of documents.

    Progress: the tokenizers library's bars on a terminal; in a log file, lines of characters read (out of
    `total_chars`, for the ETA, when known) and one line when the merges are done.
    """
    from modernbert_train.common.progress import Progress, resolve_mode

    mode = resolve_mode(None if show_progress else "none")
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise UserError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least "
                        f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
    tok = build_untrained_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=mode == "bar",
    )
    if mode != "lines":
        tok.train_from_iterator(texts, trainer=trainer, length=length)
    else:
        reading = Progress("train-tokenizer", total_chars, "chars", mode="lines")
        tok.train_from_iterator(_counted(texts, reading), trainer=trainer, length=length)
        reading.note(f"merges done, vocabulary {tok.get_vocab_size():,}")
    _wrap_with_cls_sep(tok)
    make_mask_absorb_preceding_space(tok)
    return tok


def _counted(texts: Iterable[str], progress) -> Iterator[str]:
    for text in texts:
        progress.update(len(text), docs=1)
        yield text
    progress.close()
    progress.note("computing merges (no lines until done)")


def iter_training_texts(files: Iterable[str], fmt: str = "auto", text_field: str = "text",
                        max_chars: int | None = None, skipped: dict | None = None) -> Iterator[str]:
    """Documents for tokenizer training, read like `prepare` reads them; bad records are counted in `skipped`."""
    from data_prep.sources import Document, WorkUnit, file_kind, read_unit

    used = 0
    for path in files:
        unit = WorkUnit(index=0, kind=file_kind(path, fmt), files=[path])
        for item in read_unit(unit, text_field):
            if not isinstance(item, Document):
                if skipped is not None:
                    skipped[item.reason] = skipped.get(item.reason, 0) + 1
                continue
            yield item.text
            used += len(item.text)
            if max_chars is not None and used >= max_chars:
                return
