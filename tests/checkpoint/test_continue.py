"""Continued pretraining (yamls/continue/): the same model from a transformers folder, a run and a checkpoint;
the starting model's vocabulary checked against the shards before any step; two held-out sets side by side."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from modernbert_train.common.errors import UserError
from modernbert_train.train.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]
TWIN = REPO / "yamls/continue/tiny/from_final.yaml"


def twin(data_overrides, tiny_data, *extra):
    return load_recipe(TWIN, data_overrides() + [
        f"eval.manifests={{domain: {tiny_data['decay']}, general: {tiny_data['eval']}}}", *extra])


def first_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def exported(trained_tiny_run, tmp_path_factory) -> Path:
    from modernbert_train.run.export import export_to_hf

    out = tmp_path_factory.mktemp("continue") / "hf"
    export_to_hf(trained_tiny_run, out, trust_checkpoint=True)  # our own fixture's checkpoint
    return out


def test_hf_folder_run_and_checkpoint_start_the_same_model(trained_tiny_run, exported, data_overrides, tiny_data,
                                                            tmp_path):
    """The same weights three ways: first-step loss and held-out losses agree to float rounding."""
    from modernbert_train.train.trainer import train

    losses = {}
    # The run was trained at global theta 10k (tiny phase 1): an HF folder carries it, a run directory's weights
    # take the recipe's (the preset's 160k unless set), so the recipe pins it for all three.
    for name, source in (("hf", f"hf:{exported}"), ("run", str(trained_tiny_run)),
                         ("checkpoint", str(trained_tiny_run / "ep0-ba16-rank0.pt"))):
        recipe = twin(data_overrides, tiny_data, f"model.init_from={source}", f"save_folder={tmp_path / name}",
                      "model.trust_checkpoint=true", "model.config.global_rope_theta=10000.0",
                      "max_duration=2ba", "eval.interval=2ba", "eval.max_batches=2", "checkpoint.interval=2ba")
        train(recipe)
        records = first_records(tmp_path / name)
        losses[name] = (records[0]["train/loss"], records[-1]["eval_domain/loss"], records[-1]["eval_general/loss"])
    assert losses["hf"] == pytest.approx(losses["run"], rel=1e-5, abs=1e-5)
    assert losses["checkpoint"] == pytest.approx(losses["run"], rel=1e-5, abs=1e-5)
    # Two held-out sets, two different numbers (domain = the code-heavy mix, general = held-out prose).
    assert abs(losses["run"][1] - losses["run"][2]) > 1e-3


def test_a_model_from_another_tokenizer_is_one_line_naming_both(exported, data_overrides, tiny_data, tmp_path):
    from data_prep.tokenizer import load_tokenizer, save_tokenizer
    from modernbert_train.train.trainer import build_trainer
    from tokenizers import AddedToken

    other = tmp_path / "other_model"
    other.mkdir()
    for name in ("config.json", "model.safetensors"):
        (other / name).write_bytes((exported / name).read_bytes())
    tok = load_tokenizer(exported)
    tok.add_tokens([AddedToken(f" domainword{i}", normalized=False) for i in range(80)])  # 700 -> 780 ids
    save_tokenizer(tok, other)
    config = json.loads((exported / "config.json").read_text())
    config["vocab_size"] = 832
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        build_trainer(twin(data_overrides, tiny_data, f"model.init_from=hf:{other}", f"save_folder={tmp_path}/run"))
    message = str(err.value)
    assert "\n" not in message and "vocabulary mismatch" in message
    assert str(other / "tokenizer.json") in message and "780 ids" in message
    assert str(tiny_data["mix"]) in message and "700 ids" in message
    # No tokenizer in the folder: the embedding rows are checked against the shards' ids padded to 64.
    (other / "tokenizer.json").unlink()
    with pytest.raises(UserError, match=r"has 832 embedding rows but the shards of .* would need 704"):
        build_trainer(twin(data_overrides, tiny_data, f"model.init_from=hf:{other}", f"save_folder={tmp_path}/run2"))


def test_continue_recipes_print_their_resolved_choices(capsys):
    from modernbert_train.cli.main import main

    printed = {}
    for name in ("from_final", "from_predecay", "domain_adapt"):
        assert main(["train", str(REPO / f"yamls/continue/{name}.yaml"), "--print-config"]) == 0
        printed[name] = capsys.readouterr().out
        assert "init_from: hf:" in printed[name]
        assert "general: yamls/data/continue_heldout_general.yaml" in printed[name]
    assert "lr: 0.0001" in printed["from_final"] and "decay: 0.2dur" in printed["from_final"]
    assert "kind: stepped" in printed["from_predecay"] and "lr: 0.0003" in printed["from_predecay"]
    assert "mlm_probability: 0.15" in printed["domain_adapt"]


def test_eval_manifests_names_are_checked(data_overrides, tiny_data):
    with pytest.raises(UserError, match=r"eval.manifests.bad name"):
        load_recipe(TWIN, data_overrides() + [f"eval.manifests={{'bad name': {tiny_data['eval']}}}"])


@pytest.mark.parametrize("name", ["from_final", "from_predecay", "domain_adapt"])
def test_tiny_twins_build_on_the_test_data(name, trained_tiny_run, exported, data_overrides, tiny_data, tmp_path):
    """Each CPU twin sets up (recipe, vocabulary check, starting weights, two evaluators) from its kind of source."""
    from modernbert_train.train.trainer import build_trainer, release_trainer

    source = str(trained_tiny_run) if name == "from_predecay" else f"hf:{exported}"
    recipe = load_recipe(REPO / f"yamls/continue/tiny/{name}.yaml", data_overrides() + [
        f"eval.manifests={{domain: {tiny_data['decay']}, general: {tiny_data['eval']}}}",
        f"model.init_from={source}", f"save_folder={tmp_path / name}", "model.trust_checkpoint=true"])
    trainer, run_dir = build_trainer(recipe)
    try:
        assert [e.label for e in trainer.state.evaluators] == ["eval_domain", "eval_general"]
        assert bool(trainer.state.optimizers[0].state) == (name == "from_predecay")  # Adam moments carried
    finally:
        release_trainer(trainer, run_dir)
