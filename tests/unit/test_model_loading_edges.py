"""Edges of reading a checkpoint directory: config.json values of the wrong type or size, RoPE settings at their
bounds, and safetensors files that are stale, extra or duplicated. Each bad one is a ValueError that names the key
or file; each good one reads as transformers reads it."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_service import LLM, SamplingParams
from engine_service.model.config import ModelConfig
from tests.integration.tiny import exact_engine, hf_greedy, make_qwen3, random_prompts

ARGS = dict(device="cpu", num_kvcache_blocks=8, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64)
BASE = dict(model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)


@pytest.mark.parametrize("key, value", [
    ("vocab_size", None), ("num_attention_heads", 0), ("hidden_size", "64"), ("max_position_embeddings", None),
    ("num_key_value_heads", -2), ("num_hidden_layers", True), ("intermediate_size", 128.0), ("head_dim", 0),
    ("rms_norm_eps", None), ("rope_theta", None), ("rope_theta", 0),
])
def test_null_text_or_zero_sizes_are_refused_naming_the_key(key, value):
    """These passed and failed later as a TypeError or ZeroDivisionError deep in building the model or in the first
    request (rms_norm_eps null), or built a model of no heads."""
    with pytest.raises(ValueError, match=f"config.json's {key} should be a positive (integer|number), not"):
        ModelConfig.from_dict({**BASE, key: value})


@pytest.mark.parametrize("key", ["tie_word_embeddings", "attention_bias"])
def test_a_flag_that_is_not_a_json_boolean_is_refused_naming_the_key(key):
    """bool("false") is True: tie_word_embeddings "false" tied the head to the embedding (wrong logits, and a
    warning saying the config set it true), attention_bias "false" asked for biases the checkpoint has not.
    transformers refuses such a config too."""
    with pytest.raises(ValueError, match=f"config.json's {key} should be true or false \\(a JSON boolean\\), not 'false'"):
        ModelConfig.from_dict({**BASE, key: "false"})
    assert ModelConfig.from_dict({**BASE, key: None}) == ModelConfig.from_dict(BASE)  # null: the default


@pytest.mark.parametrize("key", ["attention_factor", "mscale", "beta_fast", "beta_slow"])
def test_a_yarn_setting_that_is_not_a_number_is_refused_naming_it(key):
    """A string or a list failed deep in the RoPE tables as a bare TypeError, or as "could not convert string to
    float: 'x'", naming neither the key nor the file."""
    rope = {"rope_type": "yarn", "factor": 4.0, "mscale_all_dim": 1.0, key: "x"}
    with pytest.raises(ValueError, match=f"config.json's RoPE scaling 'yarn' {key} should be a finite number, not 'x'"):
        ModelConfig.from_dict({**BASE, "rope_scaling": rope})


@pytest.mark.parametrize("rope, words", [
    # original_max_position_embeddings was read unchecked: int() of a list, math domain errors, "64" accepted.
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": [64]}, "positive integer .* \\[64\\]"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": -64}, "positive integer .* -64"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": "64"}, "positive integer .* '64'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64.9}, "positive integer .* 64.9"),
    # An integer past a float's range passed "< inf" and raised OverflowError where it became a float.
    ({"rope_type": "yarn", "factor": 2**1100}, "needs a factor of 1.0 or more"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": 2**1100}, "beta_fast should be a finite number"),
])
def test_rope_scaling_numbers_are_checked_before_they_are_used(rope, words):
    with pytest.raises(ValueError, match=words):
        ModelConfig.from_dict({**BASE, "rope_scaling": rope})


def test_a_rope_theta_past_a_floats_range_is_refused_naming_it():
    with pytest.raises(ValueError, match="config.json's rope_theta should be a positive number"):
        ModelConfig.from_dict({**BASE, "rope_theta": 2**2000})


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_rope_settings_that_are_not_an_object_are_refused(key):
    for value in ("yarn", ["yarn", 4.0]):  # dict() said "dictionary update sequence element #0 has length ..."
        with pytest.raises(ValueError, match=f"config.json's {key} should be a JSON object such as .*not"):
            ModelConfig.from_dict({**BASE, key: value})


def test_values_read_as_transformers_reads_them():
    cfg = ModelConfig.from_dict({**BASE, "rms_norm_eps": 1e-5, "torch_dtype": "float16", "attention_bias": True})
    assert cfg.rms_norm_eps == 1e-5
    assert cfg.torch_dtype == "float16"  # transformers 4's key: it picks float16 over bfloat16 on a GPU
    assert cfg.qkv_bias and cfg.o_proj_bias  # Qwen3's attention_bias is on o_proj too
    assert not cfg.tie_word_embeddings  # transformers' default for every family served
    with pytest.raises(ValueError, match=r"quantization_config\.quant_method='gptq'"):
        ModelConfig.from_dict({**BASE, "quantization_config": "gptq"})
    with pytest.raises(ValueError, match="sliding_window should be a positive integer or null, not True"):
        ModelConfig.from_dict({**BASE, "model_type": "mistral", "sliding_window": True})


def test_a_sliding_window_longer_than_the_positions_does_not_raise_the_limit():
    cfg = ModelConfig.from_dict({**BASE, "model_type": "mistral", "sliding_window": 4096})
    assert cfg.sliding_window == 4096 and cfg.max_model_len_limit == 1024


def test_rope_type_beats_the_old_type_key_as_in_transformers():
    cfg = ModelConfig.from_dict({**BASE, "rope_scaling": {"type": "linear", "rope_type": "yarn", "factor": 4.0}})
    assert cfg.rope_scaling.rope_type == "yarn"


def test_rope_scaling_factor_bounds():
    cfg = ModelConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "linear", "factor": 1.0}})
    assert cfg.rope_scaling.factor == 1.0 and cfg.max_model_len_limit == 1024
    with pytest.raises(ValueError, match="needs a factor of 1.0 or more; config.json has True"):
        ModelConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "linear", "factor": True}})
    with pytest.raises(ValueError, match="low_freq_factor and high_freq_factor"):  # the ramp would divide by 0
        ModelConfig.from_dict({**BASE, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0,
                                                        "high_freq_factor": 2.0}})


def test_limits_of_linear_and_llama3_scaling():
    # linear divides positions by factor: the limit is the config's length x factor, whatever original it names
    linear = {"rope_type": "linear", "factor": 2.0, "original_max_position_embeddings": 256}
    assert ModelConfig.from_dict({**BASE, "rope_scaling": linear}).max_model_len_limit == 2048
    # llama3 configs state their length in max_position_embeddings: 512 x 8 stretches nothing beyond 1024
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 512}
    assert ModelConfig.from_dict({**BASE, "model_type": "llama", "rope_scaling": llama3}).max_model_len_limit == 1024


def test_yarn_betas_from_config_json_give_transformers_frequencies():
    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine_service.model.layers import rope_frequencies

    # at a trained length of 4096 the betas move the ramp's ends (at 64 both ends clamp to 0, whatever the betas)
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 16.0,
            "beta_slow": 2.0, "rope_theta": 10000.0}
    hf_cfg = Qwen3Config(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=16384, rope_parameters=rope)
    want, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    ours = ModelConfig.from_dict(json.loads(hf_cfg.to_json_string()))
    got, factor = rope_frequencies(16, ours.rope_theta, ours.rope_scaling)
    assert torch.equal(got, want.float()) and factor == want_factor


def test_the_rope_scaling_argument_beats_config_json_key_by_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "rope_scaling": {"type": "yarn", "factor": 4.0}}))
    cfg = ModelConfig.from_dir(tmp_path, {"factor": 2.0})
    assert cfg.rope_scaling.rope_type == "yarn" and cfg.rope_scaling.factor == 2.0
    with pytest.raises(ValueError, match=r"is not a model directory: .*config\.json does not exist"):
        ModelConfig.from_dir(tmp_path / "absent")


@pytest.fixture()
def tiny(tmp_path):
    make_qwen3(tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors")


@pytest.mark.parametrize("weight_map", [{}, ["model.safetensors"], {"model.norm.weight": ["model.safetensors"]}],
                         ids=["empty", "list", "list-value"])
def test_an_index_without_a_usable_weight_map_is_named(tiny, weight_map):
    path = tiny[0]
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"index\.json has no usable weight_map: it should map each tensor name"):
        LLM(path, **ARGS)
    (path / "model.safetensors.index.json").write_text(json.dumps([weight_map]))
    with pytest.raises(ValueError, match=r"index\.json holds a JSON list, not an object"):
        LLM(path, **ARGS)


def test_an_unsharded_save_over_a_sharded_one_is_served(tmp_path, caplog):
    """save_pretrained deletes the old shards but leaves their index; transformers reads model.safetensors, and the
    engine refused the directory as an incomplete download."""
    make_qwen3(tmp_path, shard_size="100KB")
    model = make_qwen3(tmp_path, seed=1)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    prompt = random_prompts(5, [7])[0]
    with caplog.at_level(logging.WARNING), exact_engine(tmp_path) as llm:
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert out["token_ids"] == hf_greedy(model, prompt, 4)
    assert "serving model.safetensors instead" in caplog.text and "delete the stale index" in caplog.text


def test_a_sharded_save_over_an_unsharded_one_serves_the_shards_and_says_so(tmp_path, caplog):
    """save_pretrained leaves the old model.safetensors (it deletes only shard-named files); transformers would read
    it, the engine serves the shards its index lists, and says which it served."""
    make_qwen3(tmp_path, seed=1)
    model = make_qwen3(tmp_path, seed=2, shard_size="100KB")
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "model.safetensors.index.json").is_file()
    prompt = random_prompts(5, [7])[0]
    with caplog.at_level(logging.WARNING), exact_engine(tmp_path) as llm:
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert out["token_ids"] == hf_greedy(model, prompt, 4)
    assert "serving the shards (transformers would read model.safetensors)" in caplog.text


def test_other_safetensors_beside_model_safetensors_are_not_read(tiny):
    """As transformers reads a directory: Mistral's repositories carry consolidated.safetensors, in names of their
    own, which were refused as unexpected weights."""
    path, _ = tiny
    save_file({"layers.0.attention.wq.weight": torch.zeros(4)}, path / "consolidated.safetensors")
    with LLM(path, **ARGS):
        pass


def test_a_tensor_in_two_files_is_refused_naming_both(tiny):
    path, tensors = tiny
    (path / "model.safetensors").rename(path / "a.safetensors")
    save_file({"model.norm.weight": tensors["model.norm.weight"] + 1}, path / "b.safetensors")
    with pytest.raises(ValueError, match=r"model\.norm\.weight is in both a\.safetensors and b\.safetensors"):
        LLM(path, **ARGS)


def test_one_parameter_under_two_names_is_refused_naming_both(tiny):
    """The loader strips an optional "model." prefix: model.norm.weight and norm.weight both filled norm.weight,
    and whichever came last was served (all zeros here), in one file or two."""
    path, tensors = tiny
    save_file(dict(tensors, **{"norm.weight": torch.zeros_like(tensors["model.norm.weight"])}),
              path / "model.safetensors")
    with pytest.raises(ValueError, match=r"tensors model\.norm\.weight \(model\.safetensors\) and norm\.weight "
                                         r"\(model\.safetensors\) in .* are both the model's norm\.weight"):
        LLM(path, **ARGS)


@pytest.mark.parametrize("entry", ["", ".", "sub"])
def test_an_index_entry_naming_a_folder_is_no_shard(tiny, entry):
    """The absent-shard check asked whether the path exists: "", "." or a subfolder passed it, and opening it failed
    with a bare IsADirectoryError."""
    path, tensors = tiny
    (path / "sub").mkdir()
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    weight_map = {name: "model-00001-of-00001.safetensors" for name in tensors}
    weight_map["model.norm.weight"] = entry
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=f"index.json lists \\[{entry!r}\\], absent from"):
        LLM(path, **ARGS)


def test_an_untied_config_needs_the_head(tiny):
    path, _ = tiny
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=False)))
    with pytest.raises(ValueError, match=r"weights missing from .*\['lm_head\.weight'\]"):
        LLM(path, **ARGS)


def test_rotary_inv_freq_buffers_in_a_checkpoint_are_skipped(tiny):
    path, tensors = tiny
    save_file(dict(tensors, **{"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}),
              path / "model.safetensors")
    with LLM(path, **ARGS):
        pass


def test_a_tied_config_with_a_head_of_another_shape_is_said(tiny, caplog):
    path, tensors = tiny
    save_file(dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"][:-1].clone()}),
              path / "model.safetensors")
    with caplog.at_level(logging.WARNING), LLM(path, **ARGS):
        pass
    assert "lm_head.weight differs from embed_tokens.weight" in caplog.text
