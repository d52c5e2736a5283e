"""Taking a tokenizer (contract 1 in docs/CONTRACTS.md): load any `tokenizer.json`, find its special tokens,
save it as `transformers` reads it. The one way the project takes a tokenizer; training one is data_prep's job.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from modernbert_train.common.errors import UserError

TOKENIZER_FILE = "tokenizer.json"

# Our trained tokenizers put the specials first, in this order (contract 1: [UNK]=0 ... [MASK]=4).
SPECIAL_TOKENS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")

# Accepted spellings per role, first match wins: the BERT family, then the RoBERTa/GPT family.
_ROLE_SPELLINGS = {
    "cls_id": ("[CLS]", "<s>", "<cls>"),
    "sep_id": ("[SEP]", "</s>", "<sep>"),
    "pad_id": ("[PAD]", "<pad>"),
    "mask_id": ("[MASK]", "<mask>"),
    "unk_id": ("[UNK]", "<unk>"),
}

@dataclass(frozen=True)
class SpecialTokenIds:
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    unk_id: int | None

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_tokenizer_file(path: str | os.PathLike) -> Path:
    """`path` itself if it is a file, else `path/tokenizer.json`; UserError naming the path if neither exists."""
    path = Path(path)
    if path.is_dir():
        candidate = path / TOKENIZER_FILE
        if not candidate.is_file():
            raise UserError(f"tokenizer folder {path} has no {TOKENIZER_FILE}")
        return candidate
    if not path.is_file():
        raise UserError(f"tokenizer file {path} does not exist (give a tokenizer.json or a folder holding one)")
    return path


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a `tokenizers` tokenizer.json (or a folder with one, e.g. a Hugging Face model folder)."""
    file = resolve_tokenizer_file(path)
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception with the serde message
        raise UserError(f"{file} is not a valid tokenizer.json: {err}") from err


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """Hash of the tokenizer.json bytes: shards record it so a mismatched tokenizer is caught later."""
    return hashlib.sha256(resolve_tokenizer_file(path).read_bytes()).hexdigest()


def special_token_ids(tok: Tokenizer, source: str | os.PathLike | None = None) -> SpecialTokenIds:
    """Ids of [CLS] [SEP] [PAD] [MASK] [UNK] (or <s> </s> <pad> <mask> <unk>), found by token string.

    `source` only names the file in the error message. [UNK] may be absent (byte-level BPE never needs it).
    """
    found: dict[str, int | None] = {}
    for role, spellings in _ROLE_SPELLINGS.items():
        found[role] = next((tid for tid in map(tok.token_to_id, spellings) if tid is not None), None)
    missing = [_ROLE_SPELLINGS[role][0] for role, tid in found.items() if tid is None and role != "unk_id"]
    if missing:
        where = f"tokenizer {source}" if source is not None else "the tokenizer"
        raise UserError(
            f"{where} lacks the special token(s) {', '.join(missing)} "
            f"(accepted spellings: {'; '.join('/'.join(s) for s in _ROLE_SPELLINGS.values())})")
    return SpecialTokenIds(**found)


def vocab_size(tok: Tokenizer) -> int:
    """Number of ids the tokenizer can emit, added tokens included."""
    return tok.get_vocab_size(with_added_tokens=True)


def mask_absorbs_preceding_space(tok: Tokenizer) -> bool:
    """Whether the mask token is an added token with lstrip=true."""
    mask = tok.get_added_tokens_decoder().get(special_token_ids(tok).mask_id)
    return mask is not None and mask.lstrip


def make_mask_absorb_preceding_space(tok: Tokenizer) -> bool:
    """Give the mask token lstrip=true (in place); True if it did not have it.

    Masking happens on ids, so in training the mask replaces a whole token, leading space included; a user's
    "the [MASK] is" must therefore tokenize as `the`, `[MASK]`, `is`, not with a stray space token (`Ġ`) the
    model never saw before a mask. ModernBERT's tokenizer sets the same flag."""
    if mask_absorbs_preceding_space(tok):
        return False
    content = tok.id_to_token(special_token_ids(tok).mask_id)
    tok.add_special_tokens([AddedToken(content, lstrip=True, rstrip=False, normalized=False, special=True)])
    return True


def save_tokenizer(tok: Tokenizer, out_dir: str | os.PathLike, model_max_length: int = 8192) -> Path:
    """Write tokenizer.json plus the files `transformers.AutoTokenizer` needs; return the tokenizer.json path."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    specials = special_token_ids(tok)
    id_to_token = tok.id_to_token
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        cls_token=id_to_token(specials.cls_id),
        sep_token=id_to_token(specials.sep_id),
        pad_token=id_to_token(specials.pad_id),
        mask_token=id_to_token(specials.mask_id),
        unk_token=id_to_token(specials.unk_id) if specials.unk_id is not None else None,
        model_max_length=model_max_length,
        # Cleaning would glue " ." back to "." on decode and break the lossless round trip.
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    hf_tok.save_pretrained(str(out_dir))
    # save_pretrained writes tokenizer.json itself; re-save ours so the bytes are the tokenizers-native form.
    tok.save(str(out_dir / TOKENIZER_FILE))
    return out_dir / TOKENIZER_FILE


def verify_saved_tokenizer(folder: str | os.PathLike, samples: list[str]) -> None:
    """Check that `transformers.AutoTokenizer` loads `folder` offline and gives the same ids as `tokenizers`."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok = load_tokenizer(folder)
    for text in samples:
        ours = tok.encode(text).ids
        theirs = hf_tok(text)["input_ids"]
        if ours != theirs:
            raise RuntimeError(f"transformers and tokenizers disagree on {text[:60]!r}: {theirs[:12]} vs {ours[:12]}")
