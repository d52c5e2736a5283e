"""The training hub: recipe -> run folder -> composer Trainer -> fit, as a loop over attempts.

`train(recipe)` is what `modernbert-train train` and `composer -n N -m modernbert_train.train` call. One attempt
builds a Trainer (train/builders.py makes each piece) and fits it; a spike-guard rollback ends the attempt, which
releases its trainer, loaders, shard caches and CUDA memory before the next attempt starts from the checkpoint
the guard chose. What one optimizer step does is composer's loop plus, in order, the algorithms
(builders.build_algorithms) and the callbacks (builders.CALLBACK_ORDER).
"""
from __future__ import annotations

import gc
import os
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from modernbert_train.checkpoint.files import CHECKPOINT_NAME, LATEST_NAME, has_checkpoints, resume_checkpoint
from modernbert_train.checkpoint.trust import check_resume_is_safe
from modernbert_train.common.errors import UserError, disk_full_in
from modernbert_train.common.ranks import all_ranks_agree
from modernbert_train.run.folder import (check_resume_keeps_architecture, lock_run_dir, release_run_dir,
                                         write_config, write_run_artifacts)
from modernbert_train.train import builders
from modernbert_train.train.metrics_file import METRICS_FILE, MetricsFile
from modernbert_train.train.recipe import Recipe

log = logging.getLogger("modernbert_train")


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    final_loss: float | None
    attempts: int = 1


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


def prepare_run_folder(recipe: Recipe, dist_info) -> tuple[Path, str | None]:
    """(run folder, checkpoint to resume from or None). Rank 0 repairs an interrupted save and picks the checkpoint
    for every rank; every rank refuses a folder that holds another run's checkpoints."""
    run_dir = Path(recipe.save_folder)
    # Not composer's autoresume, which fails on several nodes sharing save_folder (checkpoint.files).
    resume_from = resume_checkpoint(run_dir) if recipe.checkpoint.autoresume else None
    # The agreement is the barrier: a failure on one rank ends every rank, named (common/ranks.py).
    with all_ranks_agree("preparing the run folder"):
        if resume_from is not None:
            # Composer's loading fully unpickles the checkpoint: it must pass the safe readers first, unless the
            # user trusts this run's checkpoints.
            check_resume_is_safe(run_dir, checkpoint=resume_from, trust=recipe.model.trust_checkpoint,
                                 where=f"save_folder {run_dir}: ")
        if not recipe.checkpoint.autoresume and has_checkpoints(run_dir):
            raise UserError(f"{recipe.where('save_folder')}save_folder {run_dir} already holds checkpoints; set "
                            f"checkpoint.autoresume=true to continue that run, or choose another run_name/save_folder")
    return run_dir, resume_from


def record_run(recipe: Recipe, run_dir: Path, model, loader) -> None:
    """Rank 0: the resolved recipe, model config and tokenizer in the run folder, plus the batch schedule that
    this world size really runs (rounded per rank), for the console and the record."""
    from modernbert_train.data.tokenizer import resolve_tokenizer_file

    write_config(run_dir, recipe.to_yaml())
    write_run_artifacts(run_dir, model.config, resolve_tokenizer_file(recipe.data.tokenizer))
    batch_schedule = loader.warmup.describe()
    print("\n".join(batch_schedule), flush=True)
    log.info("\n".join(batch_schedule))
    with open(run_dir / "config.yaml", "a", encoding="utf-8") as config_file:
        config_file.write("".join(f"# {line}\n" for line in batch_schedule))


def build_trainer(recipe: Recipe):
    """Everything but `fit()`: returns (trainer, run_dir). Tests call it to inspect the set-up."""
    from composer import Trainer

    from modernbert_train.checkpoint.init import apply_optimizer_settings, carry_optimizer_state, optimizer_settings
    from modernbert_train.data.dataset import initialize_distributed
    from modernbert_train.train.composer_model import ModernBertMLM, make_data_spec

    device, precision = builders.resolve_device_and_precision(recipe)
    # Before any StreamingDataset exists: streaming otherwise builds (and destroys) its own process group.
    dist_info = initialize_distributed()
    run_dir, resume_from = prepare_run_folder(recipe, dist_info)
    _start_liveness(run_dir, dist_info)
    with all_ranks_agree("reading the data manifest and locking the run folder"):
        manifest = builders.load_manifest_at(recipe.data.manifest, recipe, "data.manifest")
        facts = builders.read_data_facts(manifest, recipe)
        if facts.max_chunk_len > recipe.data.max_seq_len:
            log.info("shards hold chunks up to %d tokens; the loader re-splits them to %d",
                     facts.max_chunk_len, recipe.data.max_seq_len)
        if dist_info.rank == 0:
            lock_run_dir(run_dir)  # one writer per run folder (rank 0 speaks for the job); names the holder if taken
            _add_file_log(run_dir)

    torch.manual_seed(recipe.seed)  # model init is reproducible from the recipe's seed
    model = builders.build_model(recipe, facts)  # a checkpoint to start from is read on rank 0 and broadcast
    with all_ranks_agree("building the model and optimizer"):
        if has_checkpoints(run_dir) or (run_dir / LATEST_NAME.format(rank=0)).exists():
            check_resume_keeps_architecture(run_dir, model.config.to_dict(),
                                            lambda key: recipe.where(f"model.config.{key}"))
        parallelism = builders.build_parallelism(recipe, model)
        if recipe.compile:
            model.compile_dense()
        composer_model = ModernBertMLM(model)
        optimizer = builders.build_optimizer(recipe, model, device)
        recipe_settings = optimizer_settings(optimizer)

    train_loader = builders.build_loader(recipe, manifest, dist_info, infinite=True)
    train_loader.mask_rate_schedule = builders.mask_rate_schedule(recipe)
    with all_ranks_agree("starting the data loader and recording the run"):
        if dist_info.rank == 0:
            record_run(recipe, run_dir, model, train_loader)
    metrics = MetricsFile(run_dir / METRICS_FILE)
    callbacks = builders.build_callbacks(recipe, run_dir, train_loader, model.config, metrics)
    evaluators = builders.build_evaluators(recipe, facts, dist_info, list(composer_model.eval_metrics))
    loggers, console = builders.build_loggers(recipe, run_dir)

    trainer = Trainer(
        model=composer_model,
        train_dataloader=make_data_spec(train_loader),
        spin_dataloaders=False,  # ExactResumeState restores the loader; replaying batches would skip data
        max_duration=builders.composer_duration(recipe.max_duration, "max_duration"),
        optimizers=optimizer,
        schedulers=[],
        algorithms=builders.build_algorithms(recipe, run_dir, train_loader, metrics, callbacks),
        eval_dataloader=evaluators or None,
        eval_interval=builders.composer_duration(recipe.eval.interval, "eval.interval") if evaluators else 1,
        eval_subset_num_batches=recipe.eval.max_batches if evaluators else -1,
        callbacks=callbacks,
        loggers=loggers,
        run_name=recipe.run_name,
        progress_bar=console == "bar",
        log_to_console=False,
        save_folder=str(run_dir),
        save_filename=CHECKPOINT_NAME,
        save_latest_filename=LATEST_NAME,
        save_interval=builders.composer_duration(recipe.checkpoint.interval, "checkpoint.interval"),
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


def _loaders_of(trainer) -> list:
    loaders = [trainer.state.train_dataloader]
    for evaluator in trainer.state.evaluators or []:
        loaders.append(evaluator.dataloader.dataloader)
    return [loader for loader in loaders if loader is not None]


def _clear_model_caches() -> None:
    """torch.distributed.checkpoint's state-dict helpers memoise on the model (functools.lru_cache on
    `_get_fqns(model, name)`), which keeps every model composer ever saved alive; the cache is rebuilt on use."""
    from torch.distributed.checkpoint import state_dict as dcp_state_dict

    for name in dir(dcp_state_dict):
        cache_clear = getattr(getattr(dcp_state_dict, name), "cache_clear", None)
        if callable(cache_clear):
            cache_clear()


_liveness = None  # this rank's file for the others (common/liveness.py); one trainer at a time


def _start_liveness(run_dir: Path, dist_info) -> None:
    global _liveness
    from modernbert_train.common.liveness import RankLiveness

    if _liveness is None and dist_info.world_size > 1:
        _liveness = RankLiveness(run_dir, dist_info.rank, dist_info.world_size)


def _stop_liveness() -> None:
    global _liveness
    if _liveness is not None:
        _liveness.stop()
        _liveness = None


def _one_line_failure(err: BaseException, recipe: Recipe, run_dir: Path) -> UserError | None:
    """The one line for a failure every rank of a job can meet: a full disk, a lost peer (naming it)."""
    from modernbert_train.common.liveness import failed_ranks, is_collective_failure

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    full = disk_full_in(err)
    if full is not None:
        return UserError(f"rank {rank}: no space left on the device of save_folder {run_dir} (writing "
                         f"{full.filename or recipe.save_folder}): completed checkpoints are intact and a "
                         f"half-written one is set aside at the next start; free space (or move save_folder), then "
                         f"re-run the same command to resume")
    if world > 1 and is_collective_failure(err):
        told = failed_ranks(run_dir, _liveness.record) if _liveness is not None else []
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        who = "; ".join(told) if told else "no rank of this host exited or stopped (the launchers name the others)"
        return UserError(f"rank {rank} of {world}: a collective with the other ranks failed ({first}): {who}; "
                         f"completed checkpoints are kept: relaunch the same command to resume")
    return None


def release_trainer(trainer, run_dir: Path) -> list[str]:
    """End an attempt: close the trainer, stop its loaders' threads and remove their shard caches, release the
    run folder's lock, and free what the trainer held (weights, gradients, optimizer state, CUDA memory).
    Returns the cache folders removed."""
    import atexit

    from composer.core.engine import Engine

    removed: list[str] = []
    try:
        trainer.close()
        # composer registers Engine._close(state, logger) with atexit for every trainer and never unregisters it
        # after close(): that registration would keep the closed trainer's state (model, optimizer) alive until
        # the process exits. Only one trainer lives at a time here, and it is closed now.
        atexit.unregister(Engine._close)
        _clear_model_caches()
    finally:
        for loader in _loaders_of(trainer):
            release = getattr(loader, "release", None) or getattr(loader, "close", None)
            if release is not None:
                removed += release() or []
        release_run_dir(run_dir)
        _stop_liveness()
    return removed


def _fit_once(recipe: Recipe):
    """One attempt: (result, rollback or None). The trainer is released before this returns, whatever happened."""
    from modernbert_train.train.spike_guard import SpikeRollback

    trainer, run_dir = build_trainer(recipe)
    rollback, failed = None, False
    try:
        elapsed = trainer.state.get_elapsed_duration()
        if elapsed is not None and elapsed >= 1.0:
            # Relaunching a finished run (e.g. a phase script run twice) is not an error: nothing to do.
            log.warning("%s already reached max_duration %s; nothing to train", run_dir, recipe.max_duration)
        else:
            trainer.fit()
    except SpikeRollback as spikes:
        # Its traceback holds the frames of fit(), and so the trainer: keep only the exception's data.
        rollback = spikes.with_traceback(None)
    except BaseException as err:
        failed = True
        line = _one_line_failure(err, recipe, run_dir)
        if line is None:
            raise
        raise line from err
    finally:
        try:
            release_trainer(trainer, run_dir)
        except Exception as err:  # noqa: BLE001 - after a failure, stopping must not replace its line
            if not failed:
                raise
            log.warning("while stopping after the failure: %s: %s", type(err).__name__,
                        (str(err).strip().splitlines() or [""])[0][:200])
    loss = (trainer.state.total_loss_dict or {}).get("loss/train/total")
    result = TrainResult(run_dir=run_dir, steps=int(trainer.state.timestamp.batch),
                         tokens=int(trainer.state.timestamp.token), final_loss=float(loss) if loss is not None else None)
    return result, rollback


def train(recipe: Recipe) -> TrainResult:
    """Fit the recipe; after each spike-guard rollback (at most spike_guard.max_rollbacks, which roll_back
    enforces), start a new attempt from the checkpoint the guard chose."""
    import composer.core.engine  # noqa: F401 - installs composer's SIGTERM handler, which the next line replaces

    from modernbert_train.common.termination import exit_promptly_on_sigterm
    from modernbert_train.data.dataset import remove_own_shard_caches
    from modernbert_train.train.spike_guard import roll_back

    exit_promptly_on_sigterm(cleanup=remove_own_shard_caches)
    attempts = 0
    while True:
        attempts += 1
        result, rollback = _fit_once(recipe)
        # Nothing of the attempt may outlive it: the next one builds its own model, optimizer and loaders.
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if rollback is None:
            return TrainResult(result.run_dir, result.steps, result.tokens, result.final_loss, attempts)
        roll_back(result.run_dir, rollback, recipe.spike_guard)


__all__ = ["train", "build_trainer", "release_trainer", "TrainResult"]
