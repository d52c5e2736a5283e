"""Set-up checks against the real data and checkpoints: one-line errors, HF initial weights, metrics.jsonl cut."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from modernbert_train.cli.main import main
from modernbert_train.train.metrics_file import MetricsFile
from modernbert_train.train.recipe import load_recipe
from modernbert_train.train.builders import build_model, read_data_facts

REPO = Path(__file__).resolve().parents[2]
TINY1 = str(REPO / "yamls/tiny/phase1.yaml")


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main(["train", TINY1, *args])
    return code, capsys.readouterr().err.strip()


def test_missing_data_folder(tiny_data, data_overrides, tmp_path, capsys):
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(f"name: broken\nsources:\n  - name: code\n    local: {tmp_path / 'nowhere'}\n")
    code, err = run_cli(capsys, *data_overrides(), f"data.manifest={manifest}", f"save_folder={tmp_path / 'run'}")
    assert code == 2 and "\n" not in err
    assert f"override 'data.manifest={manifest}'" in err
    assert f"source 'code': local folder {tmp_path / 'nowhere'} does not exist" in err


def test_tokenizer_that_did_not_make_the_shards(tiny_data, data_overrides, tmp_path, capsys):
    from data_prep.tokenizer import save_tokenizer, train_tokenizer

    other = save_tokenizer(train_tokenizer(["some other text " * 50, "more words here " * 50], vocab_size=300,
                                           show_progress=False), tmp_path / "other_tok")
    code, err = run_cli(capsys, *data_overrides(), f"data.tokenizer={other}", f"save_folder={tmp_path / 'run'}")
    assert code == 2 and "\n" not in err
    assert f"data.tokenizer: {other} is not the tokenizer the shards of source 'code' were prepared with" in err


def test_model_vocabulary_smaller_than_the_tokenizer(tiny_data, data_overrides, tmp_path, capsys):
    code, err = run_cli(capsys, *data_overrides(), "model.config.vocab_size=512", f"save_folder={tmp_path / 'run'}")
    assert code == 2 and "\n" not in err
    assert "model.config.vocab_size=512 is smaller than the data's tokenizer (700 ids)" in err


def test_special_token_id_conflict_and_missing_previous_phase(tiny_data, data_overrides, tmp_path, capsys):
    code, err = run_cli(capsys, *data_overrides(), "model.config.mask_token_id=9", f"save_folder={tmp_path / 'r'}")
    assert code == 2 and "model.config.mask_token_id=9 but the data's tokenizer has 4" in err
    code, err = run_cli(capsys, *data_overrides(), f"model.init_from={tmp_path / 'no_run'}",
                        f"save_folder={tmp_path / 'r'}")
    assert code == 2 and f"model.init_from: {tmp_path / 'no_run'} does not exist" in err


def test_init_from_hugging_face_folder_takes_rope_from_the_recipe(tiny_data, data_overrides, tmp_path):
    from modernbert_train.data import load_manifest
    from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

    torch.manual_seed(3)
    published = ModernBertForMaskedLM(ModernBertConfig.preset("tiny", vocab_size=704, pad_token_id=3, cls_token_id=1,
                                                              sep_token_id=2, mask_token_id=4, bos_token_id=1,
                                                              eos_token_id=2))
    published.save_hf(tmp_path / "hf")
    recipe = load_recipe(REPO / "yamls/tiny/phase2.yaml", data_overrides() + [f"model.init_from=hf:{tmp_path / 'hf'}",
                                                                    "model.init_optimizer=false"])
    model = build_model(recipe, read_data_facts(load_manifest(recipe.data.manifest), recipe))
    assert model.config.global_rope_theta == 160_000.0 and model.config.max_position_embeddings == 512
    own, theirs = model.state_dict(), published.state_dict()
    assert own.keys() == theirs.keys() and all(torch.equal(own[k], theirs[k]) for k in own)


def test_metrics_are_cut_back_to_the_checkpoint_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "tokens": 10 * s}) for s in range(1, 8)]
    lines.insert(6, json.dumps({"step": 6, "tokens": 60, "event": "rollback", "to_step": 2}))
    path.write_text("".join(line + "\n" for line in lines) + '{"step": 8, "tok')
    MetricsFile(path).truncate_after(4)
    # Step records past the checkpoint go; the event record stays (rollbacks are never forgotten).
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r.get("event")) for r in records] == [(1, None), (2, None), (3, None), (4, None),
                                                              (6, "rollback")]


def test_previous_phase_with_another_architecture(tiny_data, data_overrides, tmp_path, capsys):
    from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

    other = ModernBertForMaskedLM(ModernBertConfig.preset("micro", vocab_size=704))
    checkpoint = tmp_path / "ep0-ba5-rank0.pt"
    torch.save({"state": {"model": {f"model.{k}": v for k, v in other.state_dict().items()}}}, checkpoint)
    code, err = run_cli(capsys, *data_overrides(), f"model.init_from={checkpoint}", f"save_folder={tmp_path / 'r'}")
    assert code == 2 and "\n" not in err
    assert f"weights of {checkpoint} do not fit this recipe's model (model.embeddings.tok_embeddings.weight is " \
           f"(704, 32) there but (704, 128) here" in err
