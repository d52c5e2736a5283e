"""Config presets, backend selection, init, and the transformers weight mapping."""
import json

import pytest
import torch
import transformers

from modernbert_train.common.errors import UserError
from modernbert_train.model import ModernBertConfig, ModernBertForMaskedLM
from modernbert_train.model.attention import resolve_backend
from modernbert_train.model.hf import config_from_hf_dict, config_to_hf_dict


def test_base_and_large_presets_have_the_published_sizes():
    # Built on the meta device: sizes without allocating 600M floats.
    with torch.device("meta"):
        base = ModernBertForMaskedLM(ModernBertConfig.preset("base"))
        large = ModernBertForMaskedLM(ModernBertConfig.preset("large"))
    # Published as 149M and 395M; these are transformers' own counts for the same configs.
    assert base.num_parameters() == 149_655_232
    assert large.num_parameters() == 395_881_664
    with torch.device("meta"):
        hf_base = transformers.ModernBertForMaskedLM(
            transformers.ModernBertConfig(**{k: v for k, v in config_to_hf_dict(base.config).items() if k != "architectures"}))
    assert hf_base.num_parameters() == base.num_parameters()
    assert [i for i in range(22) if base.config.is_global_layer(i)] == [0, 3, 6, 9, 12, 15, 18, 21]
    assert base.model.layers[1].attn.window_half == 64 and base.model.layers[0].attn.window_half is None
    assert isinstance(base.model.layers[0].attn_norm, torch.nn.Identity)


def test_unknown_preset_or_key_is_a_clear_error():
    with pytest.raises(UserError, match="did you mean: base"):
        ModernBertConfig.preset("bsae")
    with pytest.raises(UserError, match="did you mean: hidden_size"):
        ModernBertConfig.preset("tiny", hiden_size=64)
    with pytest.raises(UserError, match="attn_backend"):
        ModernBertConfig.preset("tiny", attn_backend="flash")
    with pytest.raises(UserError, match="pad_token_id=50283 is outside the vocabulary"):
        ModernBertConfig.preset("tiny", vocab_size=1024)
    with pytest.raises(UserError, match="positive"):
        ModernBertConfig.preset("tiny", global_rope_theta=-1)


def test_forced_unavailable_backend_is_an_error_not_a_fallback():
    with pytest.raises(UserError, match="flash_attn.*cannot run here"):
        resolve_backend("flash_attn", torch.device("cpu"), prob_dropout=False)
    model = ModernBertForMaskedLM(ModernBertConfig.preset("micro", attn_backend="flex"))
    with pytest.raises(UserError, match="flex"):
        model(torch.tensor([1, 5, 2]), torch.tensor([0, 3], dtype=torch.int32), 3)
    assert resolve_backend("auto", torch.device("cpu"), prob_dropout=True) == "sdpa"


def test_init_is_truncated_normal_with_scaled_output_projections():
    torch.manual_seed(0)
    config = ModernBertConfig.preset("tiny")
    model = ModernBertForMaskedLM(config)
    wqkv = model.model.layers[1].attn.Wqkv.weight
    wo = model.model.layers[1].attn.Wo.weight
    std_out = 0.02 / (2 * config.num_hidden_layers) ** 0.5
    assert wqkv.abs().max() <= 2 * 0.02 + 1e-7 and abs(wqkv.std().item() - 0.02) < 0.004
    assert wo.abs().max() <= 2 * std_out + 1e-7
    assert model.decoder.weight is model.model.embeddings.tok_embeddings.weight
    assert torch.count_nonzero(model.decoder.bias) == 0


def test_config_round_trips_through_hf_dict_and_5x_form():
    config = ModernBertConfig.preset("tiny", global_rope_theta=10_000.0, vocab_size=50432)
    as_dict = config_to_hf_dict(config)
    assert config_from_hf_dict(as_dict) == config.replace(attn_backend="auto")
    only_5x = {k: v for k, v in as_dict.items()
               if k not in ("global_rope_theta", "local_rope_theta", "global_attn_every_n_layers", "local_attention")}
    assert config_from_hf_dict(only_5x) == config
    # transformers' own config object (4.x or 5.x form, whichever is installed) reads back to the same config.
    hf = transformers.ModernBertConfig(**{k: v for k, v in as_dict.items() if k != "architectures"})
    assert config_from_hf_dict(hf.to_dict()) == config.replace(attn_backend="auto")


def test_save_hf_loads_in_transformers_and_from_hf_round_trips_bit_identically(tmp_path):
    torch.manual_seed(0)
    model = ModernBertForMaskedLM(ModernBertConfig.preset("micro")).eval()
    model.save_hf(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "modernbert" and saved["mask_token_id"] == 4
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(5, 256, (2, 20))
    with torch.no_grad():
        assert (model(ids).logits - theirs(input_ids=ids).logits).abs().max() <= 1e-5
    for source in (tmp_path, theirs):
        again = ModernBertForMaskedLM.from_hf(source)
        for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), name
        assert again.decoder.weight is again.model.embeddings.tok_embeddings.weight


def test_from_hf_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        ModernBertForMaskedLM.from_hf(tmp_path)


def test_head_dense_init_uses_the_authors_input_std():
    torch.manual_seed(0)
    config = ModernBertConfig.preset("base", num_hidden_layers=2, vocab_size=256, pad_token_id=3, cls_token_id=1,
                                     sep_token_id=2, mask_token_id=4, bos_token_id=1, eos_token_id=2)
    dense = ModernBertForMaskedLM(config).head.dense.weight  # 768 x 768: the sample std is within 1% of the truth
    # A normal truncated at +-2 sigma has std 0.8796 sigma; transformers' output std would be 0.01 here.
    assert abs(dense.std().item() - 0.02 * 0.8796) < 0.0003
    assert dense.abs().max() <= 2 * 0.02 + 1e-7


def test_head_dense_init_can_take_transformers_output_std():
    torch.manual_seed(0)
    config = ModernBertConfig.preset("base", num_hidden_layers=2, vocab_size=256, pad_token_id=3, cls_token_id=1,
                                     sep_token_id=2, mask_token_id=4, bos_token_id=1, eos_token_id=2,
                                     head_init="output")
    dense = ModernBertForMaskedLM(config).head.dense.weight
    std_out = 0.02 / (2 * 2) ** 0.5
    assert abs(dense.std().item() - std_out * 0.8796) < 0.0002
    with pytest.raises(UserError, match="head_init"):
        ModernBertConfig.preset("micro", head_init="outputs")
