"""Recipe loading: defaults <- YAML <- overrides, and one-line errors that name the key and where it was set."""
from __future__ import annotations

from pathlib import Path

import pytest

from modernbert_train.cli.main import main
from modernbert_train.common.errors import UserError
from modernbert_train.train.recipe import load_recipe, parse_duration

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "yamls").glob("phase*.yaml")) + sorted((REPO / "yamls" / "large").glob("*.yaml")) \
    + sorted((REPO / "yamls" / "tiny").glob("*.yaml"))

MINIMAL = """\
run_name: t
max_duration: 100ba
data:
  manifest: m.yaml
  tokenizer: tok
optimizer:
  lr: 1.0e-3
"""


@pytest.fixture
def recipe_file(tmp_path):
    def write(text: str = MINIMAL) -> Path:
        path = tmp_path / "recipe.yaml"
        path.write_text(text)
        return path
    return write


def test_shipped_recipes_load_with_paper_values():
    assert len(SHIPPED) == 9
    recipes = {p.relative_to(REPO).as_posix(): load_recipe(p) for p in SHIPPED}
    p1, p2, p3 = (recipes[f"yamls/phase{i}.yaml"] for i in (1, 2, 3))
    assert (p1.data.max_seq_len, p1.data.mlm_probability, p1.optimizer.lr) == (1024, 0.3, 8e-4)
    assert (p1.batch_warmup.start_batch_size, p1.data.global_batch_size, p1.batch_warmup.tokens) == (768, 4608, 50e9)
    assert parse_duration(p1.scheduler.warmup, "w") == (3e9, "tok")
    assert p1.model.config["global_rope_theta"] == 10_000.0 and p2.model.config["global_rope_theta"] == 160_000.0
    assert (p2.data.max_seq_len, parse_duration(p2.max_duration, "d")) == (8192, (250e9, "tok"))
    assert p2.model.init_from == "runs/modernbert-base-phase1" and p3.model.init_from == "runs/modernbert-base-phase2"
    assert p3.scheduler.decay_shape == "1-sqrt" and p3.data.manifest != p2.data.manifest
    large = recipes["yamls/large/phase1.yaml"]
    assert (large.model.preset, large.optimizer.lr, large.batch_warmup.start_batch_size) == ("large", 5e-4, 448)
    # Each shipped recipe's global batch splits evenly into micro-batches on 8 GPUs.
    for name, recipe in recipes.items():
        if "tiny" not in name:
            assert recipe.data.global_batch_size % (8 * recipe.data.micro_batch_size) == 0, name
    tiny = [r for n, r in recipes.items() if "tiny" in n]
    assert [r.model.preset for r in tiny] == ["tiny"] * 3


def test_overrides_and_interpolation(recipe_file):
    recipe = load_recipe(recipe_file(), ["optimizer.lr=3e-4", "model.config.global_rope_theta=160000",
                                         "run_name=other", "optimizer.betas=[0.9,0.95]"])
    assert recipe.optimizer.lr == 3e-4 and recipe.optimizer.betas == [0.9, 0.95]
    assert recipe.model.config == {"global_rope_theta": 160000}
    assert recipe.save_folder == "runs/other"  # ${run_name} resolves after overrides
    assert recipe.where("optimizer.lr") == "override 'optimizer.lr=3e-4': "


@pytest.mark.parametrize("text_change, overrides, expected", [
    (("  lr: 1.0e-3", "  lr: 1.0e-3\n  lrr: 3"), [], "recipe.yaml:8: unknown key 'optimizer.lrr' in optimizer (did you mean: lr?)"),
    (("data:", "dataa:"), [], "recipe.yaml:3: unknown key 'dataa' in the recipe (did you mean: data?)"),
    (None, ["optimizer.weight_decy=0"], "override 'optimizer.weight_decy=0': unknown key 'optimizer.weight_decy' in optimizer (did you mean: weight_decay?)"),
    (("  lr: 1.0e-3", "  lr: fast"), [], "recipe.yaml:7: bad value for 'optimizer.lr': Value 'fast' of type 'str' could not be converted to Float"),
    (None, ["data.micro_batch_size=2.5"], "override 'data.micro_batch_size=2.5': bad value for 'data.micro_batch_size'"),
    (("100ba", "100 epochs"), [], "recipe.yaml:2: max_duration='100 epochs' is not a duration"),
    (None, ["scheduler.warmup=10tok"], "override 'scheduler.warmup=10tok': scheduler.warmup='10tok' must use the unit of max_duration (ba)"),
    (None, ["scheduler.warmup=60ba", "scheduler.decay=50ba"], "scheduler.decay: warmup (60ba) + decay (50ba) exceed max_duration (100ba, set at "),
    (None, ["scheduler.decay_shape=cosin"], "scheduler.decay_shape: 'cosin' is not one of 1-sqrt, linear, cosine (did you mean: cosine?)"),
    (None, ["model.config.hiden_size=64"], "model.config.hiden_size: unknown model config key 'hiden_size' (did you mean: hidden_size?)"),
    (None, ["model.preset=bsae"], "model.preset: 'bsae' is not one of"),
    (None, ["optimizer.no_decay=[norms,embedding]"], "'embedding' is not one of norms, biases, embeddings (did you mean: embeddings?)"),
    (("  tokenizer: tok\n", ""), [], "required key 'data.tokenizer' is not set"),
    (None, ["batch_warmup.start_batch_size=1000"], "batch_warmup.start_batch_size: must be in 1..data.global_batch_size (64)"),
    (None, ["optimizer"], "override 'optimizer' must look like key=value"),
])
def test_bad_recipe_is_one_clear_error(recipe_file, text_change, overrides, expected):
    text = MINIMAL if text_change is None else MINIMAL.replace(*text_change)
    with pytest.raises(UserError) as err:
        load_recipe(recipe_file(text), overrides)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_cli_prints_one_line_and_exits_2(recipe_file, capsys):
    path = recipe_file()
    assert main(["train", str(path), "optimizer.lrr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: override 'optimizer.lrr=1': unknown key")
    assert main(["train", "--print-config", str(path), "optimizer.lr=2e-4"]) == 0
    assert "lr: 0.0002" in capsys.readouterr().out


def test_duration_parsing():
    assert parse_duration("1_719_000_000_000tok", "k") == (1.719e12, "tok")
    assert parse_duration("3e9tok", "k") == (3e9, "tok") and parse_duration("20ba", "k") == (20, "ba")
    with pytest.raises(UserError, match="whole numbers"):
        parse_duration("2.5ba", "k")
    with pytest.raises(UserError, match="not a duration"):
        parse_duration("1ep", "k")  # the loader never ends an epoch
