"""Training recipe: the schema (recipe_schema.py), merged as defaults <- recipe YAML <- `key=value` overrides.

Loading validates at the edge so nothing deeper has to dig in dicts:
an unknown or misspelt key, a wrong type or a bad value is a `UserError` naming the key, where it came
from (`recipe.yaml:12` or `override 'optimizer.lr=...'`) and the closest valid keys.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from modernbert_train.common.errors import UserError, did_you_mean
from modernbert_train.train.recipe_schema import (BatchWarmupConfig, CheckpointConfig, DataConfig, EvalConfig,
                                                  LoggingConfig, LrStep, MaskScheduleConfig, ModelConfig,
                                                  OptimizerConfig, ParallelismConfig, Recipe, SchedulerConfig,
                                                  SpikeGuardConfig, WandbConfig)

DECAY_SHAPES = ("1-sqrt", "linear", "cosine")
NO_DECAY_KINDS = ("norms", "biases", "embeddings")
PRECISIONS = ("auto", "fp32", "amp_bf16", "amp_fp16")
DEVICES = ("auto", "cpu", "gpu")
WANDB_MODES = ("auto", "online", "offline", "disabled")
PROGRESS_BAR_CHOICES = ("auto", "true", "false")
OPTIMIZERS = ("stable_adamw", "adamw")
MASK_SCHEDULES = ("constant", "stepped", "linear")
TRAIN_UNITS = ("tok", "ba")

_DURATION = re.compile(r"^\s*([0-9][0-9_]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*(tok|ba|dur)\s*$")


def parse_duration(text: str, key: str, allowed_units=TRAIN_UNITS) -> tuple[float, str]:
    """'3e9tok' -> (3e9, 'tok'). Units: tok (real tokens), ba (optimizer steps), dur (fraction of max_duration)."""
    match = _DURATION.match(str(text))
    if not match or match.group(2) not in allowed_units:
        units = ", ".join(allowed_units)
        raise UserError(f"{key}={text!r} is not a duration: write a number and one of {units} (e.g. '3e9tok', '500ba')")
    value = float(match.group(1).replace("_", ""))
    if match.group(2) != "dur" and value != int(value):
        raise UserError(f"{key}={text!r}: {match.group(2)} counts must be whole numbers")
    return value, match.group(2)


def schema_keys(schema: type) -> dict[str, Any]:
    """Field name -> nested dataclass type (or None for a leaf) of a recipe section."""
    keys = {}
    for f in dataclasses.fields(schema):
        if f.name.startswith("_"):
            continue
        keys[f.name] = f.type if dataclasses.is_dataclass(f.type) else None
    return keys


def _resolve_types(schema: type) -> None:
    """`from __future__ import annotations` leaves field types as strings; resolve them once."""
    import typing
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        f.type = hints[f.name]
        if dataclasses.is_dataclass(f.type):
            _resolve_types(f.type)


_resolve_types(Recipe)


def _yaml_key_lines(text: str, file_name: str) -> dict[str, int]:
    """Dotted key -> 1-based line in the YAML text (nested mappings only)."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{file_name}:{mark.line + 1}" if mark else file_name
        raise UserError(f"{where}: not valid YAML: {getattr(err, 'problem', err)}") from None
    lines: dict[str, int] = {}

    def walk(node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{prefix}{key_node.value}"
                lines[dotted] = key_node.start_mark.line + 1
                walk(value_node, dotted + ".")

    if root is not None:
        walk(root, "")
    return lines


def _check_keys(data: Any, schema: type, prefix: str, where) -> None:
    """Unknown keys -> UserError with the closest valid names; free-form dict fields are left alone."""
    if not isinstance(data, dict):
        return
    valid = schema_keys(schema)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in valid:
            section = prefix.rstrip(".") or "the recipe"
            raise UserError(f"{where(dotted)}unknown key {dotted!r} in {section}{did_you_mean(str(key), valid)}; "
                            f"valid keys: {', '.join(valid)}")
        nested = valid[key]
        if nested is not None:
            if value is not None and not isinstance(value, dict):
                raise UserError(f"{where(dotted)}{dotted!r} must be a mapping of {', '.join(schema_keys(nested))}")
            _check_keys(value, nested, dotted + ".", where)


def _parse_overrides(overrides: list[str]) -> tuple[dict, dict[str, str]]:
    nested: dict = {}
    sources: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r} must look like key=value (e.g. optimizer.lr=3e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
            raise UserError(f"override {item!r}: {key!r} is not a dotted key")
        value = yaml.safe_load(raw) if raw.strip() else None
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} conflicts with an earlier override of {part!r}")
        node[parts[-1]] = value
        sources[key] = f"override '{item}'"
    return nested, sources


def _omegaconf_error(err: OmegaConfBaseException, where) -> UserError:
    key = getattr(err, "full_key", "") or ""
    message = str(err).splitlines()[0]
    return UserError(f"{where(key)}bad value for {key!r}: {message}")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """defaults <- YAML file <- dotted overrides, validated. Raises UserError naming file:line and key."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe file {str(path)!r} does not exist")
    text = path.read_text()
    lines = _yaml_key_lines(text, str(path))
    file_data = yaml.safe_load(text) or {}
    if not isinstance(file_data, dict):
        raise UserError(f"{path}: a recipe must be a YAML mapping of keys, got {type(file_data).__name__}")
    override_data, override_sources = _parse_overrides(list(overrides))

    def where_in_file(key: str) -> str:
        return f"{path}:{lines[key]}: " if key in lines else f"{path}: "

    def where_in_overrides(key: str) -> str:
        for candidate in (key, *[key.rsplit(".", n)[0] for n in range(1, key.count(".") + 1)]):
            if candidate in override_sources:
                return override_sources[candidate] + ": "
        return "overrides: "

    _check_keys(file_data, Recipe, "", where_in_file)
    _check_keys(override_data, Recipe, "", where_in_overrides)

    sources = {key: f"{path}:{line}" for key, line in lines.items()}
    sources.update(override_sources)

    def where_any(key: str) -> str:
        return f"{sources[key]}: " if key in sources else ""

    schema = OmegaConf.structured(Recipe)
    try:
        merged = OmegaConf.merge(schema, OmegaConf.create(file_data))
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, where_in_file) from None
    try:
        merged = OmegaConf.merge(merged, OmegaConf.create(override_data))
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, where_in_overrides) from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise UserError(f"{path}: required key {missing[0]!r} is not set (add it to the recipe or pass "
                        f"{missing[0]}=...)")
    try:
        recipe: Recipe = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as err:
        raise _omegaconf_error(err, where_any) from None
    recipe._sources = sources
    recipe._from_env = _environment_values(merged)
    validate(recipe)
    return recipe


_ENV_INTERPOLATION = re.compile(r"\$\{\s*(?:oc\.)?env\s*:\s*([^,}\s]+)")


def _environment_values(merged: DictConfig) -> list[tuple[tuple, str]]:
    """(path, raw text) of every value that holds an env interpolation or resolves to an env variable's value
    (e.g. through ${run_name} when run_name came from the environment)."""
    raw = OmegaConf.to_container(merged, resolve=False)
    resolved = OmegaConf.to_container(merged, resolve=True)
    found: list[tuple[tuple, str]] = []

    def leaves(node, path=()):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
        if items is None:
            yield path, node
            return
        for key, value in items:
            yield from leaves(value, (*path, key))

    names = {m.group(1) for _, value in leaves(raw) if isinstance(value, str)
             for m in _ENV_INTERPOLATION.finditer(value)}
    values = [os.environ[n] for n in names if os.environ.get(n)]
    for path, value in leaves(raw):
        if not (isinstance(value, str) and "${" in value):
            continue
        final = resolved
        for part in path:
            final = final[part]
        if _ENV_INTERPOLATION.search(value) or any(v in str(final) for v in values):
            found.append((path, value))
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def validate(recipe: Recipe) -> None:
    """Value checks that types alone cannot express. Each names the key and where it was set."""
    def fail(key: str, message: str) -> None:
        raise UserError(f"{recipe.where(key)}{key}: {message}")

    def duration(key: str, text: str, **kwargs) -> tuple[float, str]:
        try:
            return parse_duration(text, key, **kwargs)
        except UserError as err:
            raise UserError(f"{recipe.where(key)}{err}") from None

    def in_unit(key: str, text: str) -> float:
        try:
            return resolve_in_unit(text, key, total, unit)
        except UserError as err:
            raise UserError(f"{recipe.where(key)}{err}") from None

    def choice(key: str, value: str, choices) -> None:
        if value not in choices:
            fail(key, f"{value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}")

    if not re.fullmatch(r"[\w.\-]+", recipe.run_name):
        fail("run_name", f"{recipe.run_name!r} may only hold letters, digits, '.', '_' and '-' (it names files)")
    total, unit = duration("max_duration", recipe.max_duration)
    if total <= 0:
        fail("max_duration", "must be positive")
    choice("precision", recipe.precision, PRECISIONS)
    choice("device", recipe.device, DEVICES)

    data = recipe.data
    for key in ("max_seq_len", "micro_batch_size", "global_batch_size"):
        if getattr(data, key) <= 0:
            fail(f"data.{key}", f"must be positive, got {getattr(data, key)}")
    if data.max_seq_len < 8:
        fail("data.max_seq_len", f"{data.max_seq_len} is too short for [CLS] ... [SEP] chunks")
    if not 0.0 < data.mlm_probability < 1.0:
        fail("data.mlm_probability", f"must be in (0, 1), got {data.mlm_probability}")
    if not 0.0 < recipe.eval.mlm_probability < 1.0:
        fail("eval.mlm_probability", f"must be in (0, 1), got {recipe.eval.mlm_probability}")
    fractions = (data.mask_token_fraction, data.random_token_fraction)
    if min(fractions) < 0 or sum(fractions) > 1:
        fail("data.mask_token_fraction", "mask_token_fraction and random_token_fraction must be >= 0 and sum to "
                                         "at most 1")
    if data.num_workers < 0:
        fail("data.num_workers", "must be >= 0")
    mask_schedule = data.mask_schedule
    choice("data.mask_schedule.kind", mask_schedule.kind, MASK_SCHEDULES)
    if mask_schedule.kind != "constant":
        if not mask_schedule.tokens or len(mask_schedule.tokens) != len(mask_schedule.rates):
            fail("data.mask_schedule.tokens", "needs one or more token counts and as many rates")
        if any(b <= a for a, b in zip(mask_schedule.tokens, mask_schedule.tokens[1:])) or mask_schedule.tokens[0] <= 0:
            fail("data.mask_schedule.tokens", f"must be positive and increasing, got {list(mask_schedule.tokens)}")
        if not all(0.0 < r < 1.0 for r in mask_schedule.rates):
            fail("data.mask_schedule.rates", f"must be in (0, 1), got {list(mask_schedule.rates)}")

    warm = recipe.batch_warmup
    if warm.start_batch_size is not None:
        if not 0 < warm.start_batch_size <= data.global_batch_size:
            fail("batch_warmup.start_batch_size",
                 f"must be in 1..data.global_batch_size ({data.global_batch_size}), got {warm.start_batch_size}")
        if not warm.tokens > 0:
            fail("batch_warmup.tokens", "must be > 0 when batch_warmup.start_batch_size is set")

    choice("model.preset", recipe.model.preset, _model_presets())
    valid_model_keys = _model_config_fields()
    for key in recipe.model.config:
        if key not in valid_model_keys:
            fail(f"model.config.{key}", f"unknown model config key {key!r}{did_you_mean(str(key), valid_model_keys)}")

    opt = recipe.optimizer
    choice("optimizer.name", opt.name, OPTIMIZERS)
    if not opt.lr > 0:
        fail("optimizer.lr", f"must be positive, got {opt.lr}")
    if len(opt.betas) != 2 or not all(0.0 <= b < 1.0 for b in opt.betas):
        fail("optimizer.betas", f"must be two numbers in [0, 1), got {list(opt.betas)}")
    if opt.eps < 0 or opt.weight_decay < 0:
        fail("optimizer.weight_decay", "eps and weight_decay must be >= 0")
    for kind in opt.no_decay:
        choice("optimizer.no_decay", kind, NO_DECAY_KINDS)
    if opt.grad_clip_norm is not None and not opt.grad_clip_norm > 0:
        fail("optimizer.grad_clip_norm", f"must be positive or null, got {opt.grad_clip_norm}")

    sched = recipe.scheduler
    choice("scheduler.decay_shape", sched.decay_shape, DECAY_SHAPES)
    if not 0.0 <= sched.min_lr_ratio <= 1.0:
        fail("scheduler.min_lr_ratio", f"must be in [0, 1], got {sched.min_lr_ratio}")
    warmup = in_unit("scheduler.warmup", sched.warmup)
    decay = in_unit("scheduler.decay", sched.decay)
    if warmup + decay > total:
        set_at = recipe.where("max_duration").rstrip(": ")
        fail("scheduler.decay", f"warmup ({sched.warmup}) + decay ({sched.decay}) exceed max_duration "
                                f"({recipe.max_duration}{', set at ' + set_at if set_at else ''})")

    previous_at = -1.0
    for i, lr_step in enumerate(sched.lr_steps):
        at = in_unit(f"scheduler.lr_steps.{i}.at", lr_step.at)
        if not previous_at < at < total:
            fail(f"scheduler.lr_steps.{i}.at", f"{lr_step.at!r} must lie inside max_duration and after the step before")
        if not lr_step.lr > 0:
            fail(f"scheduler.lr_steps.{i}.lr", f"must be positive, got {lr_step.lr}")
        previous_at = at

    ckpt = recipe.checkpoint
    duration("checkpoint.interval", ckpt.interval)
    if ckpt.keep_last == 0 or ckpt.keep_last < -1:
        fail("checkpoint.keep_last", f"must be positive or -1 (keep all), got {ckpt.keep_last}")
    if recipe.eval.manifest is not None or recipe.eval.manifests:
        duration("eval.interval", recipe.eval.interval)
    for name in recipe.eval.manifests:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", str(name)):
            fail(f"eval.manifests.{name}", "a held-out set's name must be letters, digits, _ or - (it names metrics)")
    choice("logging.wandb.mode", recipe.logging.wandb.mode, WANDB_MODES)
    recipe.logging.progress_bar = str(recipe.logging.progress_bar).lower()
    choice("logging.progress_bar", recipe.logging.progress_bar, PROGRESS_BAR_CHOICES)
    duration("logging.console_interval", recipe.logging.console_interval)
    if recipe.model.init_from is not None and not str(recipe.model.init_from).strip():
        fail("model.init_from", "is empty; use null for random initialisation")
    if recipe.model.init_optimizer and (recipe.model.init_from is None
                                        or str(recipe.model.init_from).startswith(("hf:", "tile:"))):
        fail("model.init_optimizer", "needs model.init_from to name a previous run directory or checkpoint "
                                     "(an HF folder or a tiled model has no optimizer state to carry); set "
                                     "model.init_optimizer=false to start with fresh moments")
    guard = recipe.spike_guard
    if guard.z_threshold <= 0 or guard.min_rise < 0 or guard.grad_min_rise < 0 or not 0.0 < guard.ema < 1.0:
        fail("spike_guard.z_threshold", "z_threshold must be > 0, min_rise and grad_min_rise >= 0 and ema in (0, 1)")
    if guard.warmup_steps < 1 or guard.max_consecutive < 1 or guard.max_rollbacks < 0:
        fail("spike_guard.max_consecutive", "warmup_steps and max_consecutive must be >= 1, max_rollbacks >= 0")
    if not 0.0 < guard.lr_factor <= 1.0:
        fail("spike_guard.lr_factor", f"must be in (0, 1], got {guard.lr_factor}")
    if guard.enabled and not recipe.checkpoint.autoresume:
        fail("spike_guard.enabled", "a rollback restarts from a checkpoint of this run: it needs "
                                    "checkpoint.autoresume=true")
    for key in ("model.config", "parallelism.fsdp", "data.loader_options"):
        section, name = key.split(".")
        setattr(getattr(recipe, section), name, _plain(getattr(getattr(recipe, section), name)))


def resolve_in_unit(text: str, key: str, total: float, unit: str) -> float:
    """A schedule length in max_duration's unit; 'dur' is a fraction of max_duration."""
    value, value_unit = parse_duration(text, key, allowed_units=(*TRAIN_UNITS, "dur"))
    if value_unit == "dur":
        if not 0.0 <= value <= 1.0:
            raise UserError(f"{key}={text!r}: a 'dur' fraction must be within 0..1")
        return math.floor(value * total)
    if value_unit != unit and value > 0:
        raise UserError(f"{key}={text!r} must use the unit of max_duration ({unit}) or 'dur'")
    return value


def _model_presets() -> tuple[str, ...]:
    from modernbert_train.model.config import PRESETS
    return tuple(PRESETS)


def _model_config_fields() -> tuple[str, ...]:
    from modernbert_train.model.config import ModernBertConfig
    return tuple(f.name for f in dataclasses.fields(ModernBertConfig))


__all__ = ["Recipe", "DataConfig", "MaskScheduleConfig", "LrStep", "SpikeGuardConfig", "BatchWarmupConfig",
           "ModelConfig", "OptimizerConfig", "SchedulerConfig", "CheckpointConfig", "EvalConfig", "LoggingConfig",
           "WandbConfig", "ParallelismConfig", "load_recipe", "validate", "parse_duration", "resolve_in_unit"]
