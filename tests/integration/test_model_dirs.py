"""Model directories that do not hold what config.json says, or hold what the engine does not serve: each is
refused at start-up by a ValueError that names the file or weight and says what would be right (a tensor larger
than config.json implies used to be sliced silently into garbage)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine_service import LLM, SamplingParams
from engine_service.model.layers import ColumnParallelLinear, TPInfo
from tests.integration.tiny import exact_engine, hf_greedy, make_qwen3, random_prompts

ARGS = dict(device="cpu", num_kvcache_blocks=8, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64)


@pytest.fixture()
def tiny(tmp_path):
    """A tiny Qwen3 (hidden 64, 4 heads of 16, 2 KV heads, intermediate 128, vocab 512, tied) and its tensors."""
    make_qwen3(tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors"), json.loads((tmp_path / "config.json").read_text())


@pytest.mark.parametrize("change, weight", [
    ({"intermediate_size": 64}, r"mlp\.(gate|up|down)_proj\.weight"),
    ({"num_attention_heads": 2}, r"self_attn\.[qo]_proj\.weight"),
    ({"num_key_value_heads": 1}, r"self_attn\.[kv]_proj\.weight"),
    ({"vocab_size": 500}, r"embed_tokens\.weight"),
], ids=["intermediate", "heads", "kv-heads", "vocab"])
def test_weights_larger_than_config_json_says_are_refused(tiny, change, weight):
    path, _, cfg = tiny
    (path / "config.json").write_text(json.dumps(dict(cfg, **change)))
    with pytest.raises(ValueError, match=weight + r" .* does not fit .*: the whole tensor should be"):
        LLM(path, **ARGS)


def test_one_oversized_or_broadcastable_tensor_is_refused(tiny):
    path, tensors, _ = tiny
    name = "model.layers.0.self_attn.k_proj.weight"
    bigger = torch.cat([tensors[name], tensors[name][:16]])
    save_file(dict(tensors, **{name: bigger}), path / "model.safetensors")
    with pytest.raises(ValueError, match=r"k_proj\.weight \(48, 64\) does not fit .* \(32, 64\)"):
        LLM(path, **ARGS)
    norm = "model.layers.1.input_layernorm.weight"  # a [1] norm would broadcast over [64]
    save_file(dict(tensors, **{norm: tensors[norm][:1].clone()}), path / "model.safetensors")
    with pytest.raises(ValueError, match=r"input_layernorm\.weight \(1,\) does not fit"):
        LLM(path, **ARGS)


def test_an_oversized_kv_tensor_is_refused_on_every_rank():
    """At tensor_parallel_size 4 over 2 KV heads, ranks share a head; a rank other than 0 checks the whole too."""
    for rank in range(4):
        layer = ColumnParallelLinear(64, [("q", 16), ("k", 16), ("v", 16)], False, TPInfo(rank=rank, size=4),
                                     replicas={"k": 2, "v": 2})
        layer.weight.weight_loader(layer.weight, torch.zeros(32, 64), "k")  # 2 heads of 16: fits
        with pytest.raises(RuntimeError, match=r"the whole tensor should be \(32, 64\)"):
            layer.weight.weight_loader(layer.weight, torch.zeros(48, 64), "k")


def test_a_tied_config_with_a_different_lm_head_is_said(tiny, caplog):
    path, tensors, _ = tiny
    save_file(dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"].clone()}),
              path / "model.safetensors")
    with caplog.at_level(logging.WARNING), LLM(path, **ARGS):
        pass
    assert "tie_word_embeddings" not in caplog.text  # the same head: nothing to say
    save_file(dict(tensors, **{"lm_head.weight": tensors["model.embed_tokens.weight"] + 1}),
              path / "model.safetensors")
    with caplog.at_level(logging.WARNING), LLM(path, **ARGS):
        pass
    assert "lm_head.weight differs from embed_tokens.weight" in caplog.text
    assert "set tie_word_embeddings to false" in caplog.text


def test_files_the_engine_does_not_load_are_named(tiny):
    path, tensors, cfg = tiny
    (path / "config.json").write_text(json.dumps(dict(cfg, quantization_config={"quant_method": "fp8"})))
    with pytest.raises(ValueError, match=r"quantized checkpoints are not served \(.*'fp8'\).*unquantized"):
        LLM(path, **ARGS)
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "intermediate_size"}))
    with pytest.raises(ValueError, match=r"config\.json lacks \['intermediate_size'\]"):
        LLM(path, **ARGS)
    (path / "config.json").write_text(json.dumps(cfg))

    (path / "model.safetensors").rename(path / "kept.safetensors.off")
    torch.save(tensors, path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"PyTorch pickle weights \(pytorch_model\.bin\).*convert them to safetensors"):
        LLM(path, **ARGS)

    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors",
                        "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match=r"lists \['model-00001-of-00002.safetensors', 'model-00002.*absent.*complete"):
        LLM(path, **ARGS)


def test_tokenizer_config_alone_is_not_a_tokenizer(tmp_path):
    """A download of "*config.json" and the weights brings tokenizer_config.json without tokenizer.json: the
    engine still serves token ids (it used to fail start-up on transformers' sentencepiece message)."""
    model = make_qwen3(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "Qwen2Tokenizer"}))
    prompt = random_prompts(3, [9])[0]
    with exact_engine(tmp_path) as llm:
        assert llm.tokenizer is None
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=4))[0]
    assert out["token_ids"] == hf_greedy(model, prompt, 4)


def test_a_corrupt_tokenizer_file_is_named(tmp_path):
    from tokenizer_service.server import load_tokenizer

    make_qwen3(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "truncation": ')
    with pytest.raises(ValueError, match=r"tokenizer\.json cannot be read as JSON"):
        LLM(tmp_path, **ARGS)
    with pytest.raises(ValueError, match=r"tokenizer\.json cannot be read as JSON"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0"}')  # JSON, not a tokenizer
    with pytest.raises(ValueError, match=r"the tokenizer in .* \(tokenizer\.json\) cannot be loaded: .*remove them"):
        LLM(tmp_path, **ARGS)
    with pytest.raises(ValueError, match=r"the tokenizer in .* cannot be loaded"):
        load_tokenizer(str(tmp_path))


@pytest.mark.parametrize(("values", "message"), [
    ({"temperature": "0.7"}, "temperature must be a number, got '0.7'"),
    ({"top_k": 50.5}, "top_k must be an integer, got 50.5"),
    ({"top_p": 0}, "top_p"),
    ({"temperature": -1}, "temperature must be finite and >= 0"),
], ids=["string", "fractional-top-k", "top-p-0", "negative-temperature"])
def test_generation_config_defaults_out_of_range_or_type_stop_the_load(tiny, values, message):
    """generation_config.json's values are every request's defaults: one out of range or of the wrong type let the
    engine start, then refused every request that left the field unset, for a value it never sent."""
    path = tiny[0]
    (path / "generation_config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=f"generation_config.json: {message}"):
        LLM(path, **ARGS)


def test_an_integral_float_top_k_in_generation_config_is_the_integer(tiny):
    """top_k 50.0 (as some writers put it) made every request leaving top_k unset fail ('top_k must be an
    integer'); it is 50, and requests run with it."""
    path = tiny[0]
    (path / "generation_config.json").write_text(json.dumps({"top_k": 50.0, "temperature": 0.7}))
    llm = LLM(path, **ARGS)
    try:
        assert llm.generation_defaults["top_k"] == 50 and type(llm.generation_defaults["top_k"]) is int
        (out,) = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, seed=1))
        assert len(out["token_ids"]) == 3
    finally:
        llm.close()
