"""Recipe -> composer Trainer -> fit. Also the phase hand-off (initial weights from a run or HF folder).

`train(recipe)` is what `modernbert-train train` and `composer -n N -m modernbert_train.train` call.
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

from modernbert_train.checkpoints import (LATEST_NAME, has_checkpoints, latest_checkpoint,
                                          load_model_weights_from_checkpoint)
from modernbert_train.errors import UserError
from modernbert_train.run_dir import (check_resume_keeps_architecture, lock_run_dir, release_run_dir,
                                      write_config, write_run_artifacts)
from modernbert_train.train.recipe import Recipe, parse_duration

log = logging.getLogger("modernbert_train")

CHECKPOINT_NAME = "ep{epoch}-ba{batch}-rank{rank}.pt"


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


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    final_loss: float | None


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
        from data_prep.tokenizer import resolve_tokenizer_file

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
    """ModernBertForMaskedLM from the recipe, with its starting weights (random, previous phase or HF)."""
    from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

    values = model_config_values(recipe, facts)
    init_from = recipe.model.init_from
    where = recipe.where("model.init_from")
    if init_from and init_from.startswith("hf:"):
        hf_path = init_from[3:]
        if not Path(hf_path).exists():
            raise UserError(f"{where}model.init_from: Hugging Face folder {hf_path} does not exist")
        # The architecture comes from the folder's config.json; the recipe may still set rope thetas,
        # dropout, backend and context length. An explicit vocab_size must equal the folder's.
        if "vocab_size" not in recipe.model.config:
            values.pop("vocab_size")
        model = ModernBertForMaskedLM.from_hf(hf_path, **values)
        if model.config.vocab_size < facts.vocab_size:
            raise UserError(f"{where}model.init_from: {hf_path} has vocab_size {model.config.vocab_size} but the "
                            f"data's tokenizer has {facts.vocab_size} ids")
        log.info("initial weights: Hugging Face folder %s", hf_path)
        return model
    config = ModernBertConfig.preset(recipe.model.preset, **values)
    model = ModernBertForMaskedLM(config)
    if init_from and init_from.startswith("tile:"):
        _tile_from(model, init_from[len("tile:"):], where, trust=recipe.model.trust_checkpoint)
        return model
    if init_from:
        source = Path(init_from)
        if source.resolve() == Path(recipe.save_folder).resolve():
            raise UserError(f"{where}model.init_from points at this run's own save_folder; use the previous phase's "
                            f"run directory (resuming this run is checkpoint.autoresume's job)")
        checkpoint = latest_checkpoint(source) if source.exists() else None
        if checkpoint is None:
            raise UserError(f"{where}model.init_from: {init_from} does not exist (give the previous phase's run "
                            f"directory, a checkpoint file, or hf:PATH)")
        step = load_model_weights_from_checkpoint(model, checkpoint, where, trust=recipe.model.trust_checkpoint)
        log.info("initial weights: %s (step %d of the previous phase)", checkpoint, step)
    return model


def _tile_from(model, source: str, where: str, trust: bool = False) -> None:
    """Centre-tile a smaller model (run directory, checkpoint, sharded folder or HF folder) into `model`."""
    from modernbert_train.checkpoints import find_checkpoint, load_composer_state
    from modernbert_train.model import ModernBertForMaskedLM
    from modernbert_train.model.tiling import tile_into

    path = Path(source)
    if not path.exists():
        raise UserError(f"{where}model.init_from: tile source {source} does not exist (give a run directory, a "
                        f"checkpoint, or a Hugging Face folder of the smaller model)")
    if (path / "config.json").is_file():
        weights = ModernBertForMaskedLM.from_hf(path).state_dict()
    else:
        checkpoint, _ = find_checkpoint(path)
        state = load_composer_state(checkpoint, trust=trust)
        weights = {k[len("model."):]: v for k, v in state["state"]["model"].items() if k.startswith("model.")}
    if weights["model.embeddings.tok_embeddings.weight"].shape[0] != model.config.vocab_size:
        raise UserError(f"{where}model.init_from: {source} has another vocabulary size "
                        f"({weights['model.embeddings.tok_embeddings.weight'].shape[0]}) than this model "
                        f"({model.config.vocab_size}); tiling needs the same tokenizer")
    tile_into(model, weights)
    log.info("initial weights: centre-tiled from %s", source)


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


_file_log: logging.Handler | None = None


def _add_file_log(run_dir: Path) -> None:
    """<run dir>/train.log gets this library's log lines (one handler per process, replaced per run)."""
    global _file_log
    logger = logging.getLogger("modernbert_train")
    if _file_log is not None:
        logger.removeHandler(_file_log)
        _file_log.close()
    _file_log = logging.FileHandler(run_dir / "train.log")
    _file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(_file_log)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


def build_trainer(recipe: Recipe):
    """Everything but `fit()`: returns (trainer, run_dir). Tests call it to inspect the set-up."""
    from composer import Trainer
    from composer.algorithms import GradientClipping
    from composer.core import Evaluator

    from modernbert_train.data.dataset import initialize_distributed
    from modernbert_train.data.manifest import load_manifest
    from modernbert_train.train.callbacks import ExactResumeState, MetricsJsonl, PruneCheckpoints
    from modernbert_train.train.continuation import (apply_optimizer_settings, carry_optimizer_state,
                                                     optimizer_settings)
    from modernbert_train.train.spike_guard import SpikeGuard
    from modernbert_train.train.composer_model import ModernBertMLM, make_data_spec
    from modernbert_train.train.console import ConsoleLines, console_mode
    from modernbert_train.train.optim import build_optimizer
    from modernbert_train.train.resume_point import resume_checkpoint
    from modernbert_train.train.parallel import (attach_wrap_policies, check_even_shards,
                                                 composer_parallelism_config, install_gloo_workarounds,
                                                 shard_group_size)
    from modernbert_train.train.schedule import LRSchedule, WarmupStableDecay, peak_steps_from_recipe

    device, precision = resolve_device_and_precision(recipe)
    # Before any StreamingDataset exists (see REFERENCE: streaming otherwise builds its own group).
    dist_info = initialize_distributed()
    # After torch.distributed is up: HYBRID_SHARD builds its device mesh here.
    parallelism = composer_parallelism_config(recipe.parallelism.fsdp, recipe.where("parallelism.fsdp"))
    run_dir = Path(recipe.save_folder)
    # Not composer's autoresume: it breaks on several nodes sharing save_folder (see train/resume_point.py).
    resume_from = resume_checkpoint(run_dir, dist_info.rank) if recipe.checkpoint.autoresume else None
    if not recipe.checkpoint.autoresume and has_checkpoints(run_dir):
        raise UserError(f"{recipe.where('save_folder')}save_folder {run_dir} already holds checkpoints; set "
                        f"checkpoint.autoresume=true to continue that run, or choose another run_name/save_folder")

    manifest = _load_manifest(load_manifest, recipe.data.manifest, recipe, "data.manifest")
    facts = read_data_facts(manifest, recipe)
    if facts.max_chunk_len > recipe.data.max_seq_len:
        log.info("shards hold chunks up to %d tokens; the loader re-splits them to %d",
                 facts.max_chunk_len, recipe.data.max_seq_len)
    if dist_info.rank == 0:
        lock_run_dir(run_dir)  # one writer per run folder (rank 0 speaks for the job); names the holder if taken
        _add_file_log(run_dir)
    torch.manual_seed(recipe.seed)  # model init is reproducible from the recipe's seed
    model = build_model(recipe, facts)
    if has_checkpoints(run_dir) or (run_dir / LATEST_NAME.format(rank=0)).exists():
        check_resume_keeps_architecture(run_dir, model.config.to_dict(),
                                        lambda key: recipe.where(f"model.config.{key}"))
    if dist_info.rank == 0:
        from data_prep.tokenizer import resolve_tokenizer_file

        write_config(run_dir, recipe.to_yaml())
        write_run_artifacts(run_dir, model.config, resolve_tokenizer_file(recipe.data.tokenizer))
    if recipe.compile:
        model.compile_dense()
    composer_model = ModernBertMLM(model)
    optimizer, groups = build_optimizer(model, recipe.optimizer, device)
    recipe_settings = optimizer_settings(optimizer)
    log.info("optimizer %s: %s", recipe.optimizer.name, groups.describe())

    train_loader = build_loader(recipe, manifest, dist_info, infinite=True)
    if dist_info.rank == 0:
        # The rows per step this world size really runs (rounded per rank), for the console and the record.
        batch_schedule = train_loader.warmup.describe()
        print("\n".join(batch_schedule), flush=True)
        log.info("\n".join(batch_schedule))
        with open(run_dir / "config.yaml", "a", encoding="utf-8") as config_file:
            config_file.write("".join(f"# {line}\n" for line in batch_schedule))
    train_loader.mask_rate_schedule = mask_rate_schedule(recipe)
    schedule, unit = WarmupStableDecay.from_recipe(recipe)
    lr_schedule = LRSchedule(schedule, unit, recipe.optimizer.lr, peak_steps_from_recipe(recipe))
    callbacks = [lr_schedule, ExactResumeState(train_loader, recipe.seed),
                 MetricsJsonl(run_dir / "metrics.jsonl", recipe.run_name, recipe.data.micro_batch_size,
                              lambda: lr_schedule.current_lr, recipe.peak_flops_per_device),
                 PruneCheckpoints(run_dir, recipe.checkpoint.keep_last, LATEST_NAME.format(rank=0))]
    if recipe.spike_guard.enabled:  # after MetricsJsonl: its rollback line follows the resume clean-up
        callbacks.append(SpikeGuard(recipe.spike_guard, run_dir, run_dir / "metrics.jsonl", train_loader, lr_schedule))
    if recipe.eval.suite is not None:
        from data_prep.tokenizer import resolve_tokenizer_file
        from modernbert_train.eval.live import LiveEvaluation

        # "checkpoint": evaluate the weights each checkpoint holds (the authors ran MNLI on their checkpoints).
        interval = (recipe.checkpoint.interval if recipe.eval.suite_interval.strip() == "checkpoint"
                    else recipe.eval.suite_interval)
        callbacks.insert(0, LiveEvaluation(recipe.eval.suite, interval, run_dir / "metrics.jsonl",
                                           recipe.run_name, model.config, resolve_tokenizer_file(recipe.data.tokenizer),
                                           where="eval.suite"))

    evaluators = []
    if recipe.eval.manifest is not None:
        eval_manifest = _load_manifest(load_manifest, recipe.eval.manifest, recipe, "eval.manifest")
        eval_facts = read_data_facts(eval_manifest, recipe)
        if eval_facts.tokenizer_sha256 != facts.tokenizer_sha256 or eval_facts.vocab_size != facts.vocab_size:
            raise UserError(f"{recipe.where('eval.manifest')}eval.manifest: its shards use another tokenizer than "
                            f"the training data")
        eval_loader = build_loader(recipe, eval_manifest, dist_info, infinite=False)
        evaluators.append(Evaluator(label="eval", dataloader=make_data_spec(eval_loader),
                                    metric_names=list(composer_model.eval_metrics), device_eval_microbatch_size=1))

    loggers = [wandb_logger(recipe, run_dir)] if recipe.logging.wandb.enabled else []
    # A bar only on a terminal; a log file (SLURM) gets one line per logging.console_interval (rank 0 only).
    console = console_mode(recipe)
    if console == "lines":
        loggers.append(ConsoleLines(recipe.run_name, recipe.logging.console_interval))
    algorithms = []
    if recipe.optimizer.grad_clip_norm is not None:
        algorithms.append(GradientClipping(clipping_type="norm", clipping_threshold=recipe.optimizer.grad_clip_norm))
    if parallelism:
        from modernbert_train.model.modeling import ModernBertEncoderLayer
        attach_wrap_policies(model, ModernBertEncoderLayer)
        check_even_shards(model, shard_group_size(parallelism), recipe.optimizer.name, recipe.where("parallelism.fsdp"))
        # Only gloo groups are affected; a single process gets its (gloo) group from composer later.
        install_gloo_workarounds()

    trainer = Trainer(
        model=composer_model,
        train_dataloader=make_data_spec(train_loader),
        spin_dataloaders=False,  # ExactResumeState restores the loader; replaying batches would skip data
        max_duration=composer_duration(recipe.max_duration, "max_duration"),
        optimizers=optimizer,
        schedulers=[],
        algorithms=algorithms,
        eval_dataloader=evaluators or None,
        eval_interval=composer_duration(recipe.eval.interval, "eval.interval") if evaluators else 1,
        eval_subset_num_batches=recipe.eval.max_batches if evaluators else -1,
        callbacks=callbacks,
        loggers=loggers,
        run_name=recipe.run_name,
        progress_bar=console == "bar",
        log_to_console=False,
        save_folder=str(run_dir),
        save_filename=CHECKPOINT_NAME,
        save_latest_filename=LATEST_NAME,
        save_interval=composer_duration(recipe.checkpoint.interval, "checkpoint.interval"),
        save_num_checkpoints_to_keep=recipe.checkpoint.keep_last,
        save_overwrite=False,
        load_path=resume_from,
        parallelism_config=parallelism,
        device=device,
        precision=precision,
        device_train_microbatch_size=1,  # ignored: the loader already cut the step into micro-batches
        accumulate_train_batch_on_tokens=True,  # loss weights = masked tokens (see composer_model.py)
        seed=recipe.seed,
    )
    if int(trainer.state.timestamp.batch) == 0 and recipe.model.init_optimizer:
        carry_optimizer_state(trainer, recipe.model.init_from, recipe_settings, recipe.where("model.init_optimizer"),
                              trust=recipe.model.trust_checkpoint)
    elif int(trainer.state.timestamp.batch) > 0 and recipe.checkpoint.restart_override:
        apply_optimizer_settings(trainer.state.optimizers[0], recipe_settings)
    return trainer, run_dir


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


def _load_manifest(load_manifest, path: str, recipe: Recipe, key: str):
    try:
        return load_manifest(path)
    except UserError as err:
        raise UserError(f"{recipe.where(key)}{key}: {err}") from None


def train(recipe: Recipe) -> TrainResult:
    from modernbert_train.train.spike_guard import SpikeRollback, roll_back

    trainer, run_dir = build_trainer(recipe)
    rollback = None
    try:
        elapsed = trainer.state.get_elapsed_duration()
        if elapsed is not None and elapsed >= 1.0:
            # Relaunching a finished run (e.g. a phase script run twice) is not an error: nothing to do.
            log.warning("%s already reached max_duration %s; nothing to train", run_dir, recipe.max_duration)
        else:
            trainer.fit()
    except SpikeRollback as spikes:
        rollback = spikes
    finally:
        trainer.close()
        close_loader = getattr(trainer.state.train_dataloader, "close", None)
        if close_loader is not None:
            close_loader()  # stops the loader's prefetch thread
        release_run_dir(run_dir)
    if rollback is not None:
        # The spike guard asked for a rollback: restart from the good checkpoint it chose (bounded by
        # spike_guard.max_rollbacks).
        roll_back(run_dir, rollback.spike_steps, recipe.spike_guard)
        return train(recipe)
    loss = (trainer.state.total_loss_dict or {}).get("loss/train/total")
    return TrainResult(run_dir=run_dir, steps=int(trainer.state.timestamp.batch),
                       tokens=int(trainer.state.timestamp.token), final_loss=float(loss) if loss is not None else None)


__all__ = ["train", "build_trainer", "build_model", "read_data_facts", "DataFacts", "TrainResult",
           "model_config_values",
           "resolve_device_and_precision"]
