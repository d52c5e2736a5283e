"""The training recipe's schema: every key, its type and default, and what it means, in one place.

`recipe.load_recipe` merges defaults <- recipe YAML <- `key=value` overrides over these dataclasses and
validates the result; nothing deeper digs in dicts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml
from omegaconf import MISSING

@dataclass
class MaskScheduleConfig:
    # constant: data.mlm_probability throughout; stepped: the rate jumps to rates[i] once tokens[i] real
    # tokens of this phase were seen; linear: it moves linearly from data.mlm_probability at token 0 through
    # (tokens[i], rates[i]); after the last point it stays.
    kind: str = "constant"
    tokens: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)


@dataclass
class DataConfig:
    # Mixture manifest (yamls/data/*.yaml) of the training data; relative paths resolve against the CWD.
    manifest: str = MISSING
    # The tokenizer.json (or a folder holding one) the shards were prepared with (checked by sha256).
    tokenizer: str = MISSING
    # Longest document piece in tokens; longer shard chunks are re-split, nothing is dropped.
    max_seq_len: int = 1024
    # Rows of max_seq_len tokens in one micro-batch on one device (the packed tensor has
    # micro_batch_size * max_seq_len token slots, a static shape).
    micro_batch_size: int = 8
    # Rows per optimizer step summed over all ranks, after batch-size warmup. Each rank takes its nearest whole
    # share, cut into full micro-batches plus a smaller last one (the schedule is printed at start).
    global_batch_size: int = 64
    mlm_probability: float = 0.3
    # Of the masked positions: fraction replaced by [MASK], fraction by a random token; the rest keep theirs.
    mask_token_fraction: float = 0.8
    random_token_fraction: float = 0.1
    # A mask rate that changes within the phase (mmBERT, Ettin lower it between phases).
    mask_schedule: MaskScheduleConfig = field(default_factory=MaskScheduleConfig)
    shuffle: bool = True
    # Seeds the data order and the masking; null uses the recipe's seed.
    seed: Optional[int] = None
    num_workers: int = 0
    # Further MLMLoaderConfig keys (raw_batch_size, packing_lookahead_tokens, packing_max_wait,
    # shuffle_algo, predownload, cache_limit, ...), passed through and checked by the loader.
    loader_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class BatchWarmupConfig:
    # Global rows per step at the start; null disables batch-size warmup.
    start_batch_size: Optional[int] = None
    # Real tokens over which the batch grows linearly to data.global_batch_size (e.g. 50e9).
    tokens: float = 0.0


@dataclass
class ModelConfig:
    # A ModernBertConfig preset: base, large, tiny, micro.
    preset: str = "base"
    # ModernBertConfig fields overriding the preset (rope thetas, dropout, attn_backend, ...).
    # vocab_size and the special token ids default to the data's tokenizer.
    config: dict[str, Any] = field(default_factory=dict)
    # Starting weights: null (random init), a previous phase's run directory or checkpoint file
    # (weights only unless init_optimizer; the schedule starts fresh), 'hf:PATH' (a transformers folder),
    # or 'tile:PATH' (centre-tile a smaller model's run directory, checkpoint or HF folder into this one).
    init_from: Optional[str] = None
    # Fully unpickle init_from's checkpoint, and the one a resume starts from, when they hold more than weights
    # and plain data (it can run code). Our own checkpoints never need it: only for foreign files you trust.
    trust_checkpoint: bool = False
    # Also take the optimizer state (Adam moments) of init_from's checkpoint; lr, weight decay, betas and
    # the schedule stay this recipe's (the authors' reset_time with restart_override).
    init_optimizer: bool = False


@dataclass
class OptimizerConfig:
    name: str = "stable_adamw"
    lr: float = 8e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 1e-5
    # True: the decay is scaled by lr / peak lr (composer's "decoupled" convention, as the
    # ModernBERT authors trained); False: by lr (torch AdamW convention).
    decouple_lr: bool = True
    # Parameter kinds that get no weight decay: any of norms, biases, embeddings (the paper: norms, biases).
    no_decay: list[str] = field(default_factory=lambda: ["norms", "biases"])
    # Clip the global gradient norm to this value; null disables clipping.
    grad_clip_norm: Optional[float] = None


@dataclass
class LrStep:
    at: str = MISSING
    lr: float = MISSING


@dataclass
class SchedulerConfig:
    # Linear warmup from 0 to the peak lr, in the unit of max_duration (or 'dur', a fraction of it).
    warmup: str = "0tok"
    # Length of the final decay; 0 keeps the lr constant after warmup (warmup-stable-decay).
    decay: str = "0tok"
    decay_shape: str = "1-sqrt"
    # lr at the very end, as a fraction of the peak.
    min_lr_ratio: float = 0.0
    # A stepped peak: from each `at` (max_duration's unit, or dur) on, the peak lr is `lr` (warmup,
    # plateau and decay follow it), e.g. ModernBERT-large's drop 5e-4 -> 5e-5 after 900B tokens.
    lr_steps: list[LrStep] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    # Save every N tokens or batches ('500ba', '2e9tok'); the end of training always saves.
    interval: str = "1000ba"
    # Checkpoints kept on disk (the newest ones); -1 keeps all.
    keep_last: int = 3
    # Continue from the newest checkpoint in save_folder when one exists (same run_name).
    autoresume: bool = True
    # On resume, replace the checkpoint's optimizer settings (peak lr, weight decay, betas, eps) by this
    # recipe's (the authors' restart_override); false keeps the checkpoint's. The lr schedule is always
    # this recipe's.
    restart_override: bool = False


@dataclass
class EvalConfig:
    # Held-out mixture manifest; null disables evaluation.
    manifest: Optional[str] = None
    # More held-out sets, each scored and logged on its own ({domain: a.yaml, general: b.yaml} -> metrics
    # eval_domain/loss, eval_general/loss): forgetting shows while a continued run adapts to its domain.
    manifests: dict[str, str] = field(default_factory=dict)
    interval: str = "1000ba"
    # Micro-batches per evaluation (data.micro_batch_size rows each); -1 runs the whole held-out set.
    max_batches: int = 20
    # Masking rate of the held-out evaluation, whatever the training rate (the paper evaluates at 15%), and the
    # seed of its masks: every phase and every run with the same eval manifest is scored on the same tokens.
    mlm_probability: float = 0.15
    mask_seed: int = 0
    # Live downstream evaluation: a suite file (yamls/eval/) run on the current weights every suite_interval.
    suite: Optional[str] = None
    suite_interval: str = "1000ba"  # or "checkpoint": at every checkpoint.interval


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "modernbert"
    entity: Optional[str] = None
    # auto: online when WANDB_API_KEY is set, else offline (never needs the network).
    mode: str = "auto"
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    # auto: composer's progress bar on a terminal, else one plain line per console_interval (log files,
    # SLURM); true: always the bar; false: always lines. The CLIs' --progress flag overrides it.
    progress_bar: str = "auto"
    # How often a progress line is printed when there is no bar ('10ba', '5e6tok').
    console_interval: str = "10ba"
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class ParallelismConfig:
    # Passed to composer's parallelism_config={'fsdp': ...} (FSDP2 keys, e.g. {sharding_strategy:
    # FULL_SHARD, state_dict_type: full, activation_checkpointing: false}); null uses DDP.
    fsdp: Optional[dict[str, Any]] = None


@dataclass
class SpikeGuardConfig:
    # A step is a spike when its loss or its gradient norm exceeds the running mean by more than
    # z_threshold running standard deviations AND by more than min_rise x the mean (exponential moving
    # statistics of accepted steps, decay ema). A spike's update is skipped.
    enabled: bool = False
    z_threshold: float = 6.0
    min_rise: float = 0.2
    # The gradient norm's own minimum rise. Healthy norms jump far more than the loss: on the tiny recipes
    # they reached 48x their running mean early in phase 1 (issue 28, where 4.0 fired on healthy steps), so
    # only a norm beyond 101x the mean counts; the loss rule catches the damage a smaller one does.
    grad_min_rise: float = 100.0
    ema: float = 0.98
    # Accepted steps before any step can be called a spike (the statistics need to settle).
    warmup_steps: int = 20
    # This many spikes in a row: roll back to the newest checkpoint before the streak, skip the data the
    # streak read, and multiply the peak lr by lr_factor (1.0 keeps it).
    max_consecutive: int = 3
    lr_factor: float = 1.0
    # Rollbacks allowed in one run before it stops with an error.
    max_rollbacks: int = 3


@dataclass
class Recipe:
    run_name: str = MISSING
    seed: int = 17
    # Run directory: resolved config.yaml, metrics.jsonl, checkpoints.
    save_folder: str = "runs/${run_name}"
    # Total training time in tokens or batches (the loader never ends, so no epochs): '1.7e12tok'.
    max_duration: str = MISSING
    # auto: amp_bf16 on GPU, fp32 on CPU.
    precision: str = "auto"
    # auto: cuda when available, else cpu.
    device: str = "auto"
    # torch.compile the model.
    compile: bool = False
    # Peak dense FLOP/s of one device for MFU; null asks composer's table (GPU only).
    peak_flops_per_device: Optional[float] = None
    data: DataConfig = field(default_factory=DataConfig)
    batch_warmup: BatchWarmupConfig = field(default_factory=BatchWarmupConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    spike_guard: SpikeGuardConfig = field(default_factory=SpikeGuardConfig)

    # Where each key came from ('recipe.yaml:12', "override 'a.b=1'"), for error messages.
    _sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    # Values that came from the environment (${oc.env:VAR}), as written: to_yaml keeps them unresolved so that
    # secrets (API keys, tokens) never land in config.yaml or the wandb config. [(path, raw text), ...]
    _from_env: list = field(default_factory=list, repr=False, compare=False)

    def where(self, key: str) -> str:
        """'phase1.yaml:12: '-style prefix locating a key (or its section), '' when it kept its default."""
        parts = key.split(".")
        for n in range(len(parts), 0, -1):
            source = self._sources.get(".".join(parts[:n]))
            if source:
                return f"{source}: "
        return ""

    def to_yaml(self) -> str:
        """The recipe as written to config.yaml and wandb: resolved, except values taken from the environment."""
        data = dataclasses.asdict(self)
        data.pop("_sources")
        data.pop("_from_env")
        for path, raw in self._from_env:
            node = data
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = raw
        return yaml.safe_dump(data, sort_keys=False)
