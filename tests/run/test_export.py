"""Export of composer checkpoints to Hugging Face folders, checked by transformers 4.x and 5.x."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from modernbert_train.common.errors import UserError
from modernbert_train.run.export import export_to_hf, validate_folder
from modernbert_train.run.folder import write_run_artifacts
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

REPO = Path(__file__).resolve().parents[2]
HF5_PYTHON = REPO / ".venv-current" / "bin" / "python"
PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Masked language models read the whole sentence at once.",
]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    import pydoc_data.topics

    from data_prep.tokenizer import save_tokenizer, train_tokenizer

    texts = list(pydoc_data.topics.topics.values())[:60]
    tok = train_tokenizer(texts, vocab_size=600, show_progress=False)
    return save_tokenizer(tok, tmp_path_factory.mktemp("tok"))


def composer_checkpoint(model: ModernBertForMaskedLM, path: Path) -> Path:
    """What composer writes for our ComposerModel: state.model holds the wrapped model under 'model.'."""
    weights = {f"model.{key}": value for key, value in model.state_dict().items()}
    torch.save({"state": {"model": weights, "optimizers": {}}, "rng": []}, path)
    return path


def trained_like_model(tokenizer_file, seed=0, **overrides) -> ModernBertForMaskedLM:
    from data_prep.tokenizer import load_tokenizer, special_token_ids

    ids = special_token_ids(load_tokenizer(tokenizer_file))
    torch.manual_seed(seed)
    config = ModernBertConfig.preset("micro", vocab_size=640, pad_token_id=ids.pad_id, cls_token_id=ids.cls_id,
                                     sep_token_id=ids.sep_id, mask_token_id=ids.mask_id, bos_token_id=ids.cls_id,
                                     eos_token_id=ids.sep_id, **overrides)
    model = ModernBertForMaskedLM(config)
    with torch.no_grad():  # weights away from init, so norms and biases are exercised
        for name, p in model.named_parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture()
def run_dir(tmp_path, tokenizer_file):
    model = trained_like_model(tokenizer_file, global_rope_theta=10_000.0)
    run = tmp_path / "runs" / "phase1"
    write_run_artifacts(run, model.config, tokenizer_file)
    composer_checkpoint(model, run / "ep0-ba7-rank0.pt")
    return run, model


def padded(tokenizer_file):
    tok = transformers.AutoTokenizer.from_pretrained(str(Path(tokenizer_file).parent))
    return tok(PROSE, padding=True, return_tensors="pt")


def test_export_of_run_dir_loads_in_transformers_with_equal_logits(run_dir, tmp_path, tokenizer_file):
    run, model = run_dir
    result = export_to_hf(run, tmp_path / "hf")
    assert result.checkpoint.name == "ep0-ba7-rank0.pt" and result.max_abs_logit_diff <= 1e-5
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["global_rope_theta"] == 10_000.0  # phase 1's theta, not transformers' default 160k
    assert config["rope_parameters"]["full_attention"]["rope_theta"] == 10_000.0
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    batch = tok(PROSE, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 3 and (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        ours = model.eval()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hf = theirs(**batch).logits
    real = batch["attention_mask"].bool()
    assert (ours - hf)[real].abs().max().item() <= 1e-5


def test_hf_folder_import_then_export_is_bit_identical(tmp_path, tokenizer_file):
    hf_dir = tmp_path / "published"
    original = trained_like_model(tokenizer_file, seed=3)
    theirs = transformers.ModernBertForMaskedLM.from_pretrained(  # a folder as transformers itself writes it
        None, config=transformers.AutoConfig.for_model(**json.loads(_hf_config_json(original))),
        state_dict=original.state_dict())
    theirs.save_pretrained(hf_dir)
    imported = ModernBertForMaskedLM.from_hf(hf_dir)
    run = tmp_path / "run"
    write_run_artifacts(run, imported.config, tokenizer_file)
    composer_checkpoint(imported, run / "ep0-ba1-rank0.pt")
    export_to_hf(run, tmp_path / "out")
    before = load_file(hf_dir / "model.safetensors")
    after = load_file(tmp_path / "out" / "model.safetensors")
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def _hf_config_json(model):
    from modernbert_train.model.hf import config_to_hf_dict

    values = config_to_hf_dict(model.config)
    values.pop("architectures")
    return json.dumps(values)


def test_bfloat16_export_matches_its_rounded_weights(run_dir, tmp_path):
    run, _ = run_dir
    result = export_to_hf(run, tmp_path / "bf16", dtype="bfloat16")
    weights = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    assert result.max_abs_logit_diff <= 1e-4


def test_mismatching_folder_fails_validation_loudly(run_dir, tmp_path, tokenizer_file):
    run, model = run_dir
    export_to_hf(run, tmp_path / "hf")
    with torch.no_grad():
        # A random change (a constant shift would vanish in the following LayerNorms).
        model.model.layers[2].mlp.Wo.weight.add_(0.5 * torch.randn_like(model.model.layers[2].mlp.Wo.weight))
    with pytest.raises(UserError, match="validation failed"):
        validate_folder(model, tmp_path / "hf", [[1, 10, 11, 12, 2]], tolerance=1e-4)


def test_export_refuses_existing_output_and_missing_config(run_dir, tmp_path):
    run, _ = run_dir
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not empty"):
        export_to_hf(run, tmp_path / "taken")
    (run / "model_config.json").unlink()
    with pytest.raises(UserError, match="model_config.json"):
        export_to_hf(run, tmp_path / "other")
    with pytest.raises(UserError, match="does not exist"):
        export_to_hf(tmp_path / "nowhere", tmp_path / "other")


HF5_CHECK = r"""
import json, sys, torch, transformers
folder, texts = sys.argv[1], json.loads(sys.argv[2])
tok = transformers.AutoTokenizer.from_pretrained(folder)
model = transformers.AutoModelForMaskedLM.from_pretrained(folder).eval()
batch = tok(texts, padding=True, return_tensors="pt")
with torch.no_grad():
    logits = model(**batch).logits
torch.save({"version": transformers.__version__, "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"], "logits": logits}, sys.argv[3])
"""


def test_exported_folder_loads_in_transformers_5_with_the_same_logits(run_dir, tmp_path):
    # A CPU-runnable check: never skipped. `make test` (the README's test command) builds the environment.
    assert HF5_PYTHON.exists(), ".venv-current is missing: run `make test`, which builds the transformers 5.x environment"
    run, model = run_dir
    export_to_hf(run, tmp_path / "hf")
    out = tmp_path / "hf5.pt"
    subprocess.run([str(HF5_PYTHON), "-c", HF5_CHECK, str(tmp_path / "hf"), json.dumps(PROSE), str(out)],
                   check=True, env={**os.environ, "PYTHONPATH": ""}, timeout=300)
    result = torch.load(out)
    assert result["version"].startswith("5.")
    with torch.no_grad():
        ours = model.eval()(result["input_ids"], attention_mask=result["attention_mask"]).logits
    real = result["attention_mask"].bool()
    assert (ours - result["logits"])[real].abs().max().item() <= 1e-5


def test_sentence_transformers_export_gives_mean_pooled_encoder_embeddings(run_dir, tmp_path):
    import sentence_transformers  # a dev dependency (pyproject [dev])
    run, model = run_dir
    export_to_hf(run, tmp_path / "st", sentence_transformers=True)
    encoder = sentence_transformers.SentenceTransformer(str(tmp_path / "st"), device="cpu")
    embeddings = encoder.encode(PROSE, convert_to_tensor=True)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "st")
    batch = tok(PROSE, padding=True, return_tensors="pt")
    with torch.no_grad():
        flat = batch["input_ids"][batch["attention_mask"].bool()]
        lengths = batch["attention_mask"].sum(1)
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        hidden = model.eval().model(flat, cu, int(lengths.max()))
    expected = torch.stack([hidden[cu[i]:cu[i + 1]].mean(0) for i in range(len(PROSE))])
    assert embeddings.shape == (len(PROSE), model.config.hidden_size)
    assert (embeddings.cpu() - expected).abs().max().item() <= 1e-5


def test_export_gives_older_tokenizers_a_mask_that_absorbs_the_space(tmp_path, tokenizer_file, caplog):
    """Issue 12 item 6: a tokenizer trained before the fix (mask lstrip=false) is fixed in the exported folder,
    so fill-mask sees `Ġthe [MASK] Ġis`, not `Ġthe Ġ [MASK] Ġis`; export says so."""
    from tokenizers import AddedToken

    from data_prep.tokenizer import load_tokenizer

    old = load_tokenizer(tokenizer_file)
    old.add_special_tokens([AddedToken("[MASK]", lstrip=False, rstrip=False, normalized=False, special=True)])
    old_file = tmp_path / "old" / "tokenizer.json"
    old_file.parent.mkdir()
    old.save(str(old_file))
    assert old.encode("the state of the [MASK] is").tokens[-4:-2] == ["Ġ", "[MASK]"]  # the defect
    model = trained_like_model(tokenizer_file)
    run = tmp_path / "run"
    write_run_artifacts(run, model.config, old_file)
    composer_checkpoint(model, run / "ep0-ba3-rank0.pt")
    with caplog.at_level("WARNING", logger="modernbert_train"):
        export_to_hf(run, tmp_path / "hf")
    assert "absorbs it (lstrip=true)" in caplog.text

    fill = transformers.pipeline("fill-mask", model=str(tmp_path / "hf"), device="cpu")
    ids = fill.preprocess("the state of the [MASK] is")["input_ids"][0].tolist()
    tokens = fill.tokenizer.convert_ids_to_tokens(ids)
    assert tokens[tokens.index("[MASK]") - 1:] == ["Ġthe", "[MASK]", "Ġis", "[SEP]"], tokens
    predictions = fill("the state of the [MASK] is", top_k=3)
    assert len(predictions) == 3 and all(p["sequence"].startswith("the state of the") for p in predictions)
    assert (run / "tokenizer.json").read_bytes() == old_file.read_bytes()  # the run's own copy is untouched
