"""Batch-size warmup at every world size (issue 12, item 8): the shipped recipes run unedited on 1..64 ranks,
each step within half a row per rank of the recipe's rows, and the effective schedule is printed and kept."""
from __future__ import annotations

from pathlib import Path

import pytest

from modernbert_train.data import BatchSizeWarmup
from modernbert_train.train.recipe import load_recipe
from modernbert_train.train.trainer import build_trainer
from modernbert_train.train.builders import loader_config

REPO = Path(__file__).resolve().parents[2]
RECIPES = [f"yamls/phase{i}.yaml" for i in (1, 2, 3)] + [f"yamls/large/phase{i}.yaml" for i in (1, 2, 3)]
WORLD_SIZES = [2 ** k for k in range(7)]  # 1 .. 64


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_shipped_recipes_dry_run_at_every_world_size(world_size):
    for path in RECIPES:
        recipe = load_recipe(REPO / path)
        config = loader_config(recipe, recipe.data.manifest)  # no process group: nothing is read
        config.validate(world_size)
        warmup = BatchSizeWarmup.from_config(config, world_size)
        mbs = config.micro_batch_size
        end = config.batch_size_warmup_tokens or 0
        positions = [end * i / 500 for i in range(501)] + [end + 1, 1e15]
        previous, last_sizes = 0, set()
        for tokens in positions:
            wanted = warmup.recipe_rows(tokens)
            rows = warmup.micro_batch_rows(tokens)
            # Whole micro-batches first, one smaller last one at most; the same layout on every rank.
            assert rows and all(r == mbs for r in rows[:-1]) and 1 <= rows[-1] <= mbs, (path, tokens, rows)
            assert warmup.sequences(tokens) == world_size * sum(rows)
            # Within half a step of rows per rank of the recipe: well within one micro-batch per rank.
            slack = ((warmup.granularity + 1) if tokens < end else 1) * world_size / 2
            assert abs(warmup.sequences(tokens) - wanted) <= slack, (path, world_size, tokens)
            assert warmup.granularity <= max(1, mbs // 4)
            last_sizes.add(rows[-1])
            assert warmup.sequences(tokens) >= previous  # never shrinks
            previous = warmup.sequences(tokens)
        # Few micro-batch shapes, so few recompiles of the compiled model parts.
        assert len(last_sizes) <= mbs // warmup.granularity + 2, (path, world_size, sorted(last_sizes))
        full = config.global_batch_size
        assert abs(warmup.sequences(1e15) - full) <= world_size / 2
        if config.batch_size_warmup_start is not None and config.batch_size_warmup_start % world_size == 0:
            assert warmup.sequences(0) == config.batch_size_warmup_start  # starts where the recipe says


def test_phase1_on_8_and_16_ranks_starts_and_ends_where_the_recipe_says():
    recipe = load_recipe(REPO / "yamls/phase1.yaml")
    config = loader_config(recipe, recipe.data.manifest)
    on_8 = BatchSizeWarmup.from_config(config, 8)
    assert on_8.sequences(0) == 768 and on_8.micro_batch_rows(0) == [64, 32]  # was 512 rows
    on_16 = BatchSizeWarmup.from_config(config, 16)  # was refused: 4608 % (16 x 64)
    assert on_16.sequences(1e12) == 4608 and on_16.micro_batch_rows(1e12) == [64] * 4 + [32]
    lines = on_16.describe()
    assert len(lines) == 12 and "16 rank(s)" in lines[0] and "4608 rows/step" in lines[-1]


def test_trainer_prints_the_schedule_and_keeps_it_in_config_yaml(data_overrides, tmp_path, capsys):
    recipe = load_recipe(REPO / "yamls/tiny/phase1.yaml", data_overrides() + [
        f"save_folder={tmp_path / 'run'}", "data.micro_batch_size=3", "batch_warmup.start_batch_size=4"])
    trainer, run_dir = build_trainer(recipe)
    trainer.close()
    printed = capsys.readouterr().out
    assert "effective batch-size schedule on 1 rank(s)" in printed
    assert "4 rows/step (recipe 4) = 1 x 4 rows, 2 micro-batch(es) per rank, last of 1 rows" in printed
    config_text = (run_dir / "config.yaml").read_text()
    assert "# effective batch-size schedule on 1 rank(s)" in config_text
    assert "8 rows/step (recipe 8) = 1 x 8 rows, 3 micro-batch(es) per rank, last of 2 rows" in config_text
    assert load_recipe(run_dir / "config.yaml").data.micro_batch_size == 3  # still a loadable recipe
