"""Checkpoint -> Hugging Face folder that transformers loads, validated before it is handed over.

The folder is written next to its destination, reloaded with transformers, and compared with our model
on real token sequences; only a folder that matches is moved into place. A mismatch fails loudly and
leaves the rejected folder beside the destination for inspection.

Sources: a composer checkpoint file, an FSDP sharded checkpoint folder (.distcp files), or a run
directory (its newest checkpoint). The run directory also supplies the architecture (`model_config.json`)
and the tokenizer (`tokenizer.json`), both written there by the trainer.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from modernbert_train.checkpoint import find_checkpoint, load_model_weights_from_checkpoint
from modernbert_train.common.errors import UserError
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.run.folder import MODEL_CONFIG_FILE, TOKENIZER_FILE, read_model_config_values
from modernbert_train.common.safety import check_safe_to_replace, only_these_entries, remove_tree

log = logging.getLogger("modernbert_train")

# Everything an export writes (model.save_hf, save_tokenizer, the sentence-transformers files): `--overwrite`
# replaces only a folder made of these, with config.json and model.safetensors present.
EXPORT_ENTRIES = frozenset({"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                            "special_tokens_map.json", "added_tokens.json", "generation_config.json",
                            "modules.json", "sentence_bert_config.json", "1_Pooling"})
_previous_export = only_these_entries(EXPORT_ENTRIES.__contains__, ("config.json", "model.safetensors"),
                                      "an export")
VALIDATION_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Masked language models read the whole sentence at once.",
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportResult:
    out_dir: Path
    checkpoint: Path
    step: int
    max_abs_logit_diff: float


def write_sentence_transformers_files(out_dir: Path, config: ModernBertConfig) -> None:
    """Make the folder loadable as `SentenceTransformer(out_dir)`: the encoder with mean pooling."""
    (out_dir / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ], indent=2) + "\n")
    (out_dir / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": config.max_position_embeddings, "do_lower_case": False}, indent=2) + "\n")
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    (out_dir / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": config.hidden_size, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "include_prompt": True}, indent=2) + "\n")


def _read_model_config(run_dir: Path) -> ModernBertConfig:
    path = run_dir / MODEL_CONFIG_FILE
    if not path.exists():
        raise UserError(f"{run_dir} has no {MODEL_CONFIG_FILE}: export a checkpoint inside the run directory "
                        f"the trainer wrote, or pass --model-config")
    return ModernBertConfig(**read_model_config_values(run_dir))


def validate_folder(model: ModernBertForMaskedLM, folder: Path, token_rows: list[list[int]],
                    tolerance: float) -> float:
    """Max |logits(ours) - logits(transformers)| over real tokens of a padded batch; raises above tolerance."""
    from transformers import AutoModelForMaskedLM

    theirs = AutoModelForMaskedLM.from_pretrained(str(folder)).float().eval()
    ours = model.float().eval()
    width = max(len(row) for row in token_rows)
    ids = torch.full((len(token_rows), width), model.config.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(token_rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    with torch.no_grad():
        ours_logits = ours(ids, attention_mask=mask).logits
        hf_logits = theirs(input_ids=ids, attention_mask=mask).logits
    diff = (ours_logits - hf_logits)[mask.bool()].abs().max().item()
    if not diff <= tolerance:  # also catches NaN
        raise UserError(f"export validation failed: transformers' logits differ from ours by {diff:.3g} "
                        f"(tolerance {tolerance}); the folder is NOT usable")
    return diff


def validation_rows(tokenizer_file: Path | None, config: ModernBertConfig) -> list[list[int]]:
    if tokenizer_file is not None:
        from modernbert_train.data.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_file)
        rows = [tok.encode(text).ids for text in VALIDATION_TEXTS]
        if all(len(row) > 2 for row in rows):
            return rows
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(5, config.vocab_size, (n,), generator=generator).tolist() for n in (37, 12, 64)]


def export_to_hf(source: str | Path, out_dir: str | Path, *, dtype: str = "float32",
                 tokenizer: str | Path | None = None, model_config: str | Path | None = None,
                 overwrite: bool = False, tolerance: float = 1e-4,
                 sentence_transformers: bool = False, trust_checkpoint: bool = False) -> ExportResult:
    source, out_dir = Path(source), Path(out_dir)
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir} exists and is not empty (pass --overwrite to replace it)")
    checkpoint, run_dir = find_checkpoint(source)
    # Checked before the (slow) export, so a refused --out costs nothing; the rejected-folder slot too.
    check_safe_to_replace(out_dir, label="--out", recognise=_previous_export, keep=(source, checkpoint, run_dir))
    rejected = out_dir.absolute().with_name(out_dir.absolute().name + ".rejected")
    check_safe_to_replace(rejected, label="--out's .rejected folder", recognise=_previous_export,
                          keep=(source, checkpoint, run_dir))
    config = ModernBertConfig(**json.loads(Path(model_config).read_text())) if model_config else _read_model_config(run_dir)
    tokenizer_file = Path(tokenizer) if tokenizer else (run_dir / TOKENIZER_FILE)
    if not tokenizer_file.exists():
        if tokenizer:
            raise UserError(f"--tokenizer {tokenizer} does not exist")
        tokenizer_file = None
        log.warning("no tokenizer in %s: the folder will hold weights and config only", run_dir)

    model = ModernBertForMaskedLM(config.replace(attn_backend="auto"))
    step = load_model_weights_from_checkpoint(model, checkpoint, where=f"{run_dir / MODEL_CONFIG_FILE}: ",
                                              trust=trust_checkpoint)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_hf(staging, dtype=DTYPES[dtype])
        if tokenizer_file is not None:
            from modernbert_train.data.tokenizer import load_tokenizer, make_mask_absorb_preceding_space, save_tokenizer

            tok = load_tokenizer(tokenizer_file)
            if make_mask_absorb_preceding_space(tok):  # a tokenizer trained before train-tokenizer set it
                log.warning("%s: its mask token kept the space before it (fill-mask would see a stray space "
                            "token); the exported tokenizer's mask token absorbs it (lstrip=true)", tokenizer_file)
            save_tokenizer(tok, staging, model_max_length=config.max_position_embeddings)
        if sentence_transformers:
            write_sentence_transformers_files(staging, config)
        reference = model
        if dtype != "float32":  # compare against what the folder holds: our model with rounded weights
            reference = ModernBertForMaskedLM.from_hf(staging)
        diff = validate_folder(reference, staging, validation_rows(tokenizer_file, config), tolerance)
    except UserError as err:
        remove_tree(rejected, label="--out's .rejected folder", recognise=_previous_export,
                    keep=(source, checkpoint, run_dir))
        staging.rename(rejected)
        raise UserError(f"{err} (kept for inspection in {rejected})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    remove_tree(out_dir, label="--out", recognise=_previous_export, keep=(source, checkpoint, run_dir))
    staging.rename(out_dir)
    log.info("exported step %d of %s to %s (max |logit diff| vs transformers %.2e)", step, checkpoint, out_dir, diff)
    return ExportResult(out_dir, checkpoint, step, diff)
