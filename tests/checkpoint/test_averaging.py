"""Checkpoint averaging (`modernbert-train average`, `export --average`) on real tiny checkpoints: copies of one
checkpoint average to itself, two average to their elementwise mean, FSDP sharded folders are read like files,
and the averaged export passes export validation (transformers reproduces our logits)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modernbert_train.checkpoint.averaging import average_checkpoints
from modernbert_train.cli.main import main
from modernbert_train.common.errors import UserError


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state"]["model"]


def save_sharded(checkpoint: Path, folder: Path) -> Path:
    """The same composer state as an FSDP-style sharded folder (.metadata + .distcp), written by one process."""
    import torch.distributed.checkpoint as dcp

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    dcp.save({"state": {"model": state["state"]["model"], "timestamp": state["state"]["timestamp"]}},
             checkpoint_id=str(folder), no_dist=True)
    return folder


def test_averaging_copies_of_one_checkpoint_is_the_identity(trained_tiny_run, tmp_path):
    source = trained_tiny_run / "ep0-ba12-rank0.pt"
    out = average_checkpoints([source, source, source], tmp_path / "avg.pt")
    original, averaged = weights(source), weights(out)
    assert averaged.keys() == original.keys()
    assert all(torch.equal(averaged[k], original[k]) for k in original)
    # export needs the run's model_config.json and tokenizer.json: copied beside the averaged file.
    assert (tmp_path / "model_config.json").read_text() == (trained_tiny_run / "model_config.json").read_text()


def test_averaging_two_checkpoints_is_the_elementwise_mean_also_from_a_sharded_folder(trained_tiny_run, tmp_path):
    a, b = trained_tiny_run / "ep0-ba8-rank0.pt", trained_tiny_run / "ep0-ba16-rank0.pt"
    wa, wb = weights(a), weights(b)
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    averaged = weights(average_checkpoints([a, b], tmp_path / "avg.pt"))
    for key in wa:
        assert torch.allclose(averaged[key], (wa[key].double() + wb[key].double()).div(2).float(), atol=0, rtol=0)
    sharded = save_sharded(b, tmp_path / "ep0-ba16")
    # A sharded folder is read safely; trust=True takes the full-unpickling path (the same result).
    from_sharded = weights(average_checkpoints([a, sharded], tmp_path / "avg-sharded.pt", trust=True))
    assert all(torch.equal(from_sharded[k], averaged[k]) for k in averaged)
    step = torch.load(tmp_path / "avg.pt", weights_only=False)["state"]["timestamp"]
    assert step == torch.load(b, weights_only=False)["state"]["timestamp"]  # the last source's step


def test_average_and_export_commands_write_a_validated_hf_folder(trained_tiny_run, tmp_path, capsys):
    a, b = trained_tiny_run / "ep0-ba12-rank0.pt", trained_tiny_run / "ep0-ba16-rank0.pt"
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "avg" / "averaged.pt")]) == 0
    assert main(["export", str(tmp_path / "avg" / "averaged.pt"), "--out", str(tmp_path / "hf-file")]) == 0
    assert main(["export", str(a), str(b), "--average", "--out", str(tmp_path / "hf")]) == 0
    out = capsys.readouterr().out
    assert "averaged 2 checkpoints" in out and out.count("transformers reproduces our logits") == 2
    from safetensors.torch import load_file
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    averaged = weights(tmp_path / "avg" / "averaged.pt")
    assert torch.equal(exported["model.embeddings.tok_embeddings.weight"],
                       averaged["model.model.embeddings.tok_embeddings.weight"])
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["hidden_size"] == 128
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_bad_averaging_input_is_one_line(trained_tiny_run, tmp_path, capsys):
    a = trained_tiny_run / "ep0-ba12-rank0.pt"
    assert main(["export", str(a), str(a), "--out", str(tmp_path / "hf")]) == 2
    assert "pass --average" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    state = torch.load(a, weights_only=False)
    state["state"]["model"] = {k: v[:1] for k, v in state["state"]["model"].items()}
    torch.save(state, other)
    with pytest.raises(UserError, match=r"other.pt: .* is \(1"):
        average_checkpoints([a, other], tmp_path / "avg.pt")
    with pytest.raises(UserError, match="exists"):
        average_checkpoints([a], other)
