"""The named builders `build_trainer` assembles: data checks, model, loader, optimizer, callbacks, algorithms,
evaluators and loggers. Each takes the recipe (and what an earlier builder made) and returns one piece.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from modernbert_train.common.errors import UserError
from modernbert_train.train.recipe import Recipe, parse_duration

log = logging.getLogger("modernbert_train")


@dataclass(frozen=True)
class DataFacts:
    """What the shards say about their tokenizer (prep_meta.json, contract 2)."""
    vocab_size: int
    cls_id: int
    sep_id: int
    pad_id: int
    mask_id: int
    tokenizer_sha256: str | None
    max_chunk_len: int


# -- data checks ----------------------------------------------------------------------------------------------
def read_data_facts(manifest, recipe: Recipe) -> DataFacts:
    """Check that every source was prepared with one tokenizer, and that it is the recipe's tokenizer."""
    metas = []
    for source in manifest.sources:
        meta = source.prep_meta()
        if meta is not None:
            metas.append((source, meta))
    where = recipe.where("data.manifest")
    if not metas:
        raise UserError(f"{where}data.manifest: no source of {manifest.path} has a prep_meta.json beside its "
                        f"shards, so the tokenizer cannot be checked; prepare the data with `modernbert-data prepare`")
    first_source, first = metas[0]
    for source, meta in metas[1:]:
        for key in ("tokenizer_sha256", "vocab_size", "special_token_ids"):
            if meta.get(key) != first.get(key):
                raise UserError(f"{where}data.manifest: sources {first_source.name!r} and {source.name!r} were "
                                f"prepared with different tokenizers ({key}: {first.get(key)!r} vs {meta.get(key)!r})")
    specials = first.get("special_token_ids") or {}
    missing = [k for k in ("cls_id", "sep_id", "pad_id", "mask_id") if specials.get(k) is None]
    if missing or "vocab_size" not in first:
        raise UserError(f"{first_source.local}/prep_meta.json lacks vocab_size or special_token_ids "
                        f"{', '.join(missing)} (contract 2)")
    if recipe.data.tokenizer is not None:
        from modernbert_train.data.tokenizer import resolve_tokenizer_file

        path = resolve_tokenizer_file(recipe.data.tokenizer)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if first.get("tokenizer_sha256") and digest != first["tokenizer_sha256"]:
            raise UserError(f"{recipe.where('data.tokenizer')}data.tokenizer: {path} is not the tokenizer the shards "
                            f"of source {first_source.name!r} were prepared with (sha256 {digest[:12]}... vs "
                            f"{str(first['tokenizer_sha256'])[:12]}...)")
    max_chunk = max(int(meta.get("max_seq_len", 0)) for _, meta in metas)
    from modernbert_train.data.shards import check_token_ranges

    # Sources without prep_meta.json are scanned: another tokenizer's ids would fail mid-training.
    check_token_ranges(manifest, int(first["vocab_size"]), f"{where}data.manifest: ")
    return DataFacts(vocab_size=int(first["vocab_size"]), cls_id=int(specials["cls_id"]),
                     sep_id=int(specials["sep_id"]), pad_id=int(specials["pad_id"]),
                     mask_id=int(specials["mask_id"]), tokenizer_sha256=first.get("tokenizer_sha256"),
                     max_chunk_len=max_chunk)


# -- model ----------------------------------------------------------------------------------------------------
_TOKEN_ID_FIELDS = {"cls_token_id": "cls_id", "sep_token_id": "sep_id", "pad_token_id": "pad_id",
                    "mask_token_id": "mask_id", "bos_token_id": "cls_id", "eos_token_id": "sep_id"}


def model_config_values(recipe: Recipe, facts: DataFacts) -> dict[str, Any]:
    """Recipe overrides plus what the data dictates (vocabulary, special ids), checked for conflicts."""
    from modernbert_train.model import pad_vocab_size

    values = dict(recipe.model.config)
    for field_name, fact in _TOKEN_ID_FIELDS.items():
        wanted = getattr(facts, fact)
        if field_name in values and int(values[field_name]) != wanted:
            raise UserError(f"{recipe.where('model.config.' + field_name)}model.config.{field_name}="
                            f"{values[field_name]} but the data's tokenizer has {wanted}")
        values[field_name] = wanted
    if "vocab_size" in values:
        if int(values["vocab_size"]) < facts.vocab_size:
            raise UserError(f"{recipe.where('model.config.vocab_size')}model.config.vocab_size="
                            f"{values['vocab_size']} is smaller than the data's tokenizer ({facts.vocab_size} ids)")
    else:
        values["vocab_size"] = pad_vocab_size(facts.vocab_size)
    values.setdefault("max_position_embeddings", recipe.data.max_seq_len)
    return values


def build_model(recipe: Recipe, facts: DataFacts):
    """ModernBertForMaskedLM from the recipe, with its starting weights (random, previous phase, HF or tiled)."""
    from modernbert_train.checkpoint.init import initial_model
    from modernbert_train.checkpoint.vocab import check_source_vocabulary

    check_source_vocabulary(recipe.model.init_from, facts, recipe.data.tokenizer, recipe.data.manifest,
                            recipe.where("model.init_from"))
    return initial_model(model_config_values(recipe, facts), preset=recipe.model.preset,
                         init_from=recipe.model.init_from, save_folder=recipe.save_folder,
                         data_vocab_size=facts.vocab_size, trust=recipe.model.trust_checkpoint,
                         where=recipe.where("model.init_from"), explicit_vocab="vocab_size" in recipe.model.config)


# -- runtime --------------------------------------------------------------------------------------------------
def resolve_device_and_precision(recipe: Recipe) -> tuple[str, str]:
    device = recipe.device
    if device == "auto":
        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device == "gpu" and not torch.cuda.is_available():
        raise UserError(f"{recipe.where('device')}device: 'gpu' requested but CUDA is not available")
    precision = recipe.precision
    if precision == "auto":
        # composer's GPU default is amp_fp16; the paper trained in bf16.
        precision = "amp_bf16" if device == "gpu" else "fp32"
    if device == "cpu" and precision != "fp32":
        raise UserError(f"{recipe.where('precision')}precision: {precision} needs a GPU; use fp32 (or auto) on CPU")
    return device, precision


def composer_duration(text: str, key: str) -> str:
    value, unit = parse_duration(text, key)
    return f"{int(value)}{unit}"


def wandb_logger(recipe: Recipe, run_dir: Path):
    from composer.loggers import WandBLogger

    cfg = recipe.logging.wandb
    mode = cfg.mode
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    # A fixed id derived from the run name makes a resumed run continue the same wandb run.
    run_id = hashlib.sha1(f"{recipe.run_name}:{run_dir.resolve()}".encode()).hexdigest()[:16]
    return WandBLogger(project=cfg.project, entity=cfg.entity, name=recipe.run_name, tags=list(cfg.tags) or None,
                       init_kwargs={"mode": mode, "dir": str(run_dir), "id": run_id, "resume": "allow",
                                    "config": yaml.safe_load(recipe.to_yaml())})


def loader_config(recipe: Recipe, manifest):
    """The data section of the recipe as the loader's MLMLoaderConfig (validated by the loader)."""
    from modernbert_train.data import MLMLoaderConfig

    data, warm = recipe.data, recipe.batch_warmup
    values = dict(manifest=manifest, tokenizer=data.tokenizer, max_seq_len=data.max_seq_len,
                  micro_batch_size=data.micro_batch_size, global_batch_size=data.global_batch_size,
                  batch_size_warmup_start=warm.start_batch_size,
                  batch_size_warmup_tokens=warm.tokens if warm.start_batch_size is not None else 0,
                  mlm_probability=data.mlm_probability, mask_token_fraction=data.mask_token_fraction,
                  random_token_fraction=data.random_token_fraction,
                  seed=recipe.seed if data.seed is None else data.seed, shuffle=data.shuffle,
                  num_workers=data.num_workers)
    clash = sorted(set(values) & set(data.loader_options))
    if clash:
        raise UserError(f"{recipe.where('data.loader_options')}data.loader_options: {clash[0]!r} has its own key "
                        f"in the data section; set it there")
    return MLMLoaderConfig.from_dict({**values, **data.loader_options}, where="data.loader_options")


def mask_rate_schedule(recipe: Recipe):
    """data.mask_schedule as the loader's MaskRateSchedule (None when the rate is constant)."""
    from modernbert_train.data.masking import MaskRateSchedule

    cfg = recipe.data.mask_schedule
    if cfg.kind == "constant":
        return None
    return MaskRateSchedule(recipe.data.mlm_probability, cfg.kind, tuple(cfg.tokens), tuple(cfg.rates))


def build_loader(recipe: Recipe, manifest, dist_info, *, infinite: bool):
    from modernbert_train.data import build_mlm_loader

    cfg = loader_config(recipe, manifest)
    if not infinite:
        # Evaluation sees every held-out document once, in a fixed order, without batch warmup, with masks at
        # the evaluation's own rate and seed: the same masked tokens for every phase and run.
        cfg = dataclasses.replace(cfg, shuffle=False, batch_size_warmup_start=None, batch_size_warmup_tokens=0,
                                  mlm_probability=recipe.eval.mlm_probability, seed=recipe.eval.mask_seed)
    try:
        cfg.validate(dist_info.world_size, where="data")
    except UserError as err:
        raise UserError(f"{recipe.where('data')}{err}") from None
    return build_mlm_loader(cfg, rank=dist_info.rank, world_size=dist_info.world_size, infinite=infinite)


def load_manifest_at(path: str, recipe: Recipe, key: str):
    """The manifest a recipe key names; its errors name that key."""
    from modernbert_train.data.manifest import load_manifest

    try:
        return load_manifest(path)
    except UserError as err:
        raise UserError(f"{recipe.where(key)}{key}: {err}") from None


def build_optimizer(recipe: Recipe, model, device: str):
    from modernbert_train.train.optim import build_optimizer as optimizer_for

    optimizer, groups = optimizer_for(model, recipe.optimizer, device)
    log.info("optimizer %s: %s", recipe.optimizer.name, groups.describe())
    return optimizer


def build_callbacks(recipe: Recipe, run_dir: Path, loader, model_config, metrics) -> list:
    """The run's callbacks in the order composer must call them (CALLBACK_ORDER states it; this function sorts
    by it, so the order does not depend on how the list was built).

    Live evaluation first: its scores belong to the step that just ended, before the metrics line is written.
    The LR schedule before anything that reads the LR. ExactResumeState before MetricsJsonl: the loader state is
    restored before the metrics file is cut back to the checkpoint's step. PruneCheckpoints after those. (The
    spike guard changes the state: it is an algorithm, see build_algorithms.)"""
    from modernbert_train.train.callbacks import ExactResumeState, MetricsJsonl, PruneCheckpoints
    from modernbert_train.train.schedule import LRSchedule, WarmupStableDecay, peak_steps_from_recipe

    schedule, unit = WarmupStableDecay.from_recipe(recipe)
    lr_schedule = LRSchedule(schedule, unit, recipe.optimizer.lr, peak_steps_from_recipe(recipe))
    callbacks = [lr_schedule, ExactResumeState(loader, recipe.seed),
                 MetricsJsonl(metrics, recipe.run_name, recipe.data.micro_batch_size, lambda: lr_schedule.current_lr,
                              recipe.peak_flops_per_device),
                 PruneCheckpoints(run_dir, recipe.checkpoint.keep_last)]
    if recipe.eval.suite is not None:
        from modernbert_train.data.tokenizer import resolve_tokenizer_file
        from modernbert_train.eval.live import LiveEvaluation

        # "checkpoint": evaluate the weights each checkpoint holds (the authors ran MNLI on their checkpoints).
        interval = (recipe.checkpoint.interval if recipe.eval.suite_interval.strip() == "checkpoint"
                    else recipe.eval.suite_interval)
        callbacks.append(LiveEvaluation(recipe.eval.suite, interval, metrics, recipe.run_name, model_config,
                                        resolve_tokenizer_file(recipe.data.tokenizer), where="eval.suite"))
    return sorted(callbacks, key=_callback_rank)


# The order composer calls callbacks in (see build_callbacks): class names, so that this module imports none.
CALLBACK_ORDER = ("LiveEvaluation", "LRSchedule", "ExactResumeState", "MetricsJsonl", "PruneCheckpoints")


def _callback_rank(callback) -> int:
    return CALLBACK_ORDER.index(type(callback).__name__)


def lr_schedule_of(callbacks: list):
    return next(c for c in callbacks if type(c).__name__ == "LRSchedule")


def build_algorithms(recipe: Recipe, run_dir: Path, loader, metrics, callbacks: list) -> list:
    """Algorithms change the training state. Composer runs them in list order on "before" events and in REVERSE
    on "after" events (composer/core/passes.py set_filo_order). ALGORITHM_ORDER is the list order; on
    AFTER_TRAIN_BATCH, where both act, the spike guard therefore runs first and judges the gradient norm before
    GradientClipping scales it (a clipped norm never shows a gradient spike)."""
    algorithms = []
    if recipe.optimizer.grad_clip_norm is not None:
        from composer.algorithms import GradientClipping

        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=recipe.optimizer.grad_clip_norm))
    if recipe.spike_guard.enabled:
        from modernbert_train.train.spike_guard import SpikeGuard

        algorithms.append(SpikeGuard(recipe.spike_guard, run_dir, metrics, loader, lr_schedule_of(callbacks)))
    return sorted(algorithms, key=lambda algorithm: ALGORITHM_ORDER.index(type(algorithm).__name__))


# List order of the algorithms (see build_algorithms): on AFTER_TRAIN_BATCH they run last to first.
ALGORITHM_ORDER = ("GradientClipping", "SpikeGuard")


def build_evaluators(recipe: Recipe, facts: DataFacts, dist_info, metric_names: list[str]) -> list:
    from composer.core import Evaluator

    from modernbert_train.train.composer_model import make_data_spec

    # eval.manifest logs eval/loss; each eval.manifests entry NAME logs eval_NAME/loss (MetricsJsonl).
    sets = ([("eval", "eval.manifest", recipe.eval.manifest)] if recipe.eval.manifest is not None else []) + [
        (f"eval_{name}", f"eval.manifests.{name}", path) for name, path in recipe.eval.manifests.items()]
    evaluators = []
    for label, key, path in sets:
        eval_manifest = load_manifest_at(path, recipe, key)
        eval_facts = read_data_facts(eval_manifest, recipe)
        if eval_facts.tokenizer_sha256 != facts.tokenizer_sha256 or eval_facts.vocab_size != facts.vocab_size:
            raise UserError(f"{recipe.where(key)}{key}: its shards use another tokenizer than the training data")
        eval_loader = build_loader(recipe, eval_manifest, dist_info, infinite=False)
        evaluators.append(Evaluator(label=label, dataloader=make_data_spec(eval_loader), metric_names=metric_names,
                                    device_eval_microbatch_size=1))
    return evaluators


def build_loggers(recipe: Recipe, run_dir: Path) -> tuple[list, str]:
    """(loggers, console mode). A bar only on a terminal; a log file (SLURM) gets one line per
    logging.console_interval (rank 0 only)."""
    from modernbert_train.train.console import ConsoleLines, console_mode

    loggers = [wandb_logger(recipe, run_dir)] if recipe.logging.wandb.enabled else []
    console = console_mode(recipe)
    if console == "lines":
        loggers.append(ConsoleLines(recipe.run_name, recipe.logging.console_interval))
    return loggers, console


def build_parallelism(recipe: Recipe, model) -> dict | None:
    """Composer's parallelism config, with wrap policies attached and shards checked (after torch.distributed
    is up: HYBRID_SHARD builds its device mesh here)."""
    from modernbert_train.train.parallel import (attach_wrap_policies, check_even_shards, composer_parallelism_config,
                                                 install_gloo_workarounds, shard_group_size)

    parallelism = composer_parallelism_config(recipe.parallelism.fsdp, recipe.where("parallelism.fsdp"))
    if parallelism:
        from modernbert_train.model.modeling import ModernBertEncoderLayer

        attach_wrap_policies(model, ModernBertEncoderLayer)
        check_even_shards(model, shard_group_size(parallelism), recipe.optimizer.name, recipe.where("parallelism.fsdp"))
        # Only gloo groups are affected; a single process gets its (gloo) group from composer later.
        install_gloo_workarounds()
    return parallelism
