"""MLM evaluation: 15% unless the suite says otherwise, masks that are a pure function of each sequence and
the seed (identical for every model compared), and held-out data from a manifest of prepared shards."""
import itertools
import shutil

import numpy as np
import pytest
import torch
import yaml

from modernbert_train.common.errors import UserError
from modernbert_train.eval.mlm import eval_sequences, evaluate_mlm, fixed_masks
from modernbert_train.eval.models import load_eval_model
from modernbert_train.eval.suite import load_suite


def _mlm_suite(tmp_path, data, **task):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({"name": "mlm", "tasks": [{"name": "mlm", "type": "mlm", "data": data, **task}]}))
    return path


def _recorded_inputs(model, task):
    """(input ids, labels) of every forward pass evaluate_mlm makes on `model`, and its scores."""
    seen = []
    build = model.build

    def recording_build(seed):
        mlm = build(seed)
        def record(_, args, kwargs):
            seen.append((args[0].tolist(), kwargs["labels"].tolist()))

        mlm.register_forward_pre_hook(record, with_kwargs=True)
        return mlm

    model.build = recording_build
    return seen, evaluate_mlm(task, model, "cpu", "t")


def test_rate_is_15_percent_unless_the_suite_says_otherwise(tmp_path, toy_tasks, eval_tokenizer):
    data = {"train": str(toy_tasks / "heldout.jsonl")}
    default = load_suite(_mlm_suite(tmp_path, data)).tasks[0]
    assert default.mlm_probability == 0.15
    changed = load_suite(_mlm_suite(tmp_path, data, mlm_probability=0.4)).tasks[0]
    for task, low, high in ((default, 0.12, 0.18), (changed, 0.36, 0.44)):
        sequences = eval_sequences(task, eval_tokenizer, 512, "t")
        masks = fixed_masks(sequences, eval_tokenizer, task.mlm_probability, seed=0)
        labels = np.array([t for _, lab in masks for t in lab])
        specials = 2 * len(sequences)  # [CLS] and [SEP] are never masked
        assert low < (labels != -100).sum() / (labels.size - specials) < high, task.mlm_probability
    with pytest.raises(UserError, match=r"tasks\[0\] \(mlm\)\.mlm_probability: must be in \(0, 1\)"):
        load_suite(_mlm_suite(tmp_path, data, mlm_probability=1.5))
    with pytest.raises(UserError, match=r"\.data: an mlm task needs held-out data: either data.train .* or data.man"):
        load_suite(_mlm_suite(tmp_path, dict(data, manifest="m.yaml")))


def test_two_models_are_scored_on_identical_masks(tmp_path, toy_tasks, hf_folder, eval_tokenizer):
    task = load_suite(_mlm_suite(tmp_path, {"train": str(toy_tasks / "heldout.jsonl")})).tasks[0]
    trained, trained_scores = _recorded_inputs(load_eval_model(str(hf_folder)), task)
    random, random_scores = _recorded_inputs(load_eval_model(f"random:{hf_folder}"), task)
    assert trained == random and len(trained) >= 1
    assert sum(label != -100 for _, labels in trained for label in labels) > 50
    assert trained_scores["loss"] != pytest.approx(random_scores["loss"])  # two different models, same masks
    # A pure function of each sequence and the seed: another order or subset of the data masks it alike.
    sequences = eval_sequences(task, eval_tokenizer, 512, "t")
    masks = fixed_masks(sequences, eval_tokenizer, 0.15, seed=task.mask_seed)
    assert fixed_masks(sequences[::-1], eval_tokenizer, 0.15, seed=task.mask_seed) == masks[::-1]
    assert fixed_masks(sequences[3:5], eval_tokenizer, 0.15, seed=task.mask_seed) == masks[3:5]
    assert fixed_masks(sequences, eval_tokenizer, 0.15, seed=task.mask_seed + 1) != masks


@pytest.fixture(scope="module")
def shards_model(tiny_data, tmp_path_factory):
    """A micro model exported with the tokenizer the prepared shards of `tiny_data` were made with."""
    from data_prep.tokenizer import load_tokenizer, special_token_ids
    from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM

    tokenizer_file = tiny_data["tokenizer"] / "tokenizer.json"
    ids = special_token_ids(load_tokenizer(tokenizer_file))
    config = ModernBertConfig.preset("micro", vocab_size=704, pad_token_id=ids.pad_id, cls_token_id=ids.cls_id,
                                     sep_token_id=ids.sep_id, mask_token_id=ids.mask_id, bos_token_id=ids.cls_id,
                                     eos_token_id=ids.sep_id, attn_backend="sdpa")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("shards_model") / "micro-shards"
    ModernBertForMaskedLM(config).save_hf(folder)
    shutil.copyfile(tokenizer_file, folder / "tokenizer.json")
    return folder


def test_mlm_reads_a_bounded_number_of_samples_from_a_manifest(tmp_path, tiny_data, shards_model, hf_folder):
    from modernbert_train.data.manifest import load_manifest
    from modernbert_train.data.shards import iter_samples

    manifest = load_manifest(tiny_data["mix"])  # code and prose shards, as data_prep prepared them
    suite = _mlm_suite(tmp_path, {"manifest": str(tiny_data["mix"])}, limit=7, max_length=64)
    task = load_suite(suite).tasks[0]
    model = load_eval_model(str(shards_model))
    sequences = eval_sequences(task, model.tokenizer_file, 64, "t")
    expected = []
    for source, share in zip(manifest.sources, (4, 3)):  # 7 samples shared evenly, the first source first
        for sample in itertools.islice(iter_samples(source.local), share):
            ids = sample["input_ids"].tolist()
            expected.append(ids if len(ids) <= 64 else ids[:63] + ids[-1:])
    assert sequences == expected and any(len(ids) == 64 for ids in sequences)
    seen, scores = _recorded_inputs(model, task)
    masks = fixed_masks(sequences, model.tokenizer_file, 0.15, task.mask_seed)
    assert [t for ids, _ in seen for t in ids] == [t for ids, _ in masks for t in ids]
    assert np.isfinite(scores["loss"]) and scores["loss"] > 0 and 0 <= scores["accuracy"] <= 1

    with pytest.raises(UserError, match=r"\.data\.manifest: source 'code' of .* was prepared with another tokenizer"):
        evaluate_mlm(task, load_eval_model(str(hf_folder)), "cpu", "t")
