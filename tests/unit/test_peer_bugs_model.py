"""Model and checkpoint failure modes other inference servers shipped (vLLM, SGLang, TGI, Aphrodite, mlx-lm),
checked against this engine's config reader and loader. The reference is transformers on the same directory, in
float64 on CPU: a checkpoint it loads is served with its greedy tokens."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from engine_service import LLM, SamplingParams
from engine_service.engine import LLMEngine
from tests.integration.tiny import exact_engine, hf_greedy, make_family, make_qwen3, random_prompts
from tokenizer_service.validation import read_eos_token_ids, read_generation_defaults

ARGS = dict(device="cpu", num_kvcache_blocks=8, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def _rewrite(path, change) -> None:
    """Save model.safetensors again with change(tensors) applied."""
    tensors = load_file(path / "model.safetensors")
    save_file(change(tensors), path / "model.safetensors", metadata={"format": "pt"})


def _transformers(path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def _assert_serves_transformers_tokens(path, reference) -> None:
    prompts = random_prompts(5, [3, 21])
    with exact_engine(path) as llm:
        outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["token_ids"] == hf_greedy(reference, prompt, GREEDY.max_tokens)


def test_a_tied_checkpoint_that_kept_only_the_head_serves_it_as_the_embedding(tmp_path):
    """Some exports of a tied model keep lm_head.weight and drop embed_tokens.weight; transformers fills the tied
    pair from the head, the engine refused the directory as missing embed_tokens.weight."""
    make_qwen3(tmp_path, tie=True)

    def head_only(tensors):
        tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
        return tensors

    _rewrite(tmp_path, head_only)
    reference = _transformers(tmp_path)
    assert torch.equal(reference.model.embed_tokens.weight, reference.lm_head.weight)
    _assert_serves_transformers_tokens(tmp_path, reference)


def test_a_tied_head_only_checkpoint_of_another_shape_is_refused_naming_it(tmp_path):
    make_qwen3(tmp_path, tie=True)
    _rewrite(tmp_path, lambda t: {**{k: v for k, v in t.items() if "embed_tokens" not in k},
                                  "lm_head.weight": t["model.embed_tokens.weight"][:-1].clone()})
    with pytest.raises(ValueError, match=r"lm_head\.weight \(511, 64\), serving as the tied embedding .* does not "
                                         r"fit \(512, 64\)"):
        LLM(tmp_path, **ARGS)


def test_rotary_cos_sin_caches_in_a_checkpoint_are_skipped_as_transformers_skips_them(tmp_path):
    """ColossalAI-trained Llama checkpoints carry rotary_emb.cos_cached and sin_cached per layer: transformers and
    vLLM skip them, the engine refused them as unexpected weights."""
    make_family(tmp_path, "llama")
    _rewrite(tmp_path, lambda t: {**t, **{f"model.layers.{i}.self_attn.rotary_emb.{name}": torch.ones(1, 1, 64, 16)
                                          for i in range(2) for name in ("cos_cached", "sin_cached")}})
    _assert_serves_transformers_tokens(tmp_path, _transformers(tmp_path))


def test_weights_without_the_model_prefix_load_as_transformers_loads_them(tmp_path):
    """A checkpoint saved from the base model (layers.0..., embed_tokens..., no "model.") with its head beside it."""
    make_family(tmp_path, "qwen2", heads=6, kv_heads=2, head_dim=8, hidden=48)
    _rewrite(tmp_path, lambda t: {k.removeprefix("model."): v for k, v in t.items()})
    reference = _transformers(tmp_path)
    assert reference.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0  # transformers did load the prefix-less
    _assert_serves_transformers_tokens(tmp_path, reference)


def test_a_bfloat16_checkpoint_served_in_float64_equals_transformers_on_the_same_file(tmp_path):
    make_family(tmp_path, "llama", tie=True, attention_bias=True)
    _rewrite(tmp_path, lambda t: {k: v.to(torch.bfloat16) for k, v in t.items()})
    _assert_serves_transformers_tokens(tmp_path, _transformers(tmp_path))


@pytest.mark.parametrize("generation_config, defaults", [
    ({"do_sample": False, "temperature": 0.7, "top_k": 0}, {"temperature": 0.0, "top_k": -1}),
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20.0}, {"temperature": 0.6, "top_p": 0.95,
                                                                            "top_k": 20}),
    ({"top_k": None, "top_p": None, "repetition_penalty": 1.05}, {"repetition_penalty": 1.05}),
])
def test_generation_config_defaults_read_as_the_text_service_reads_them(tmp_path, generation_config, defaults):
    """do_sample false is greedy, top_k 0 is transformers' "off" (the engine's -1), an integral float top_k is the
    integer, null is unset; the engine and the text service read the file alike, or a request's defaults depend on
    which service filled them."""
    make_qwen3(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps(generation_config))
    with LLMEngine(tmp_path, **ARGS) as engine:
        assert engine.generation_defaults == defaults
    assert read_generation_defaults(str(tmp_path)) == defaults


def test_eos_ids_are_the_union_of_config_json_and_generation_config(tmp_path):
    """config.json's eos_token_id as an int and generation_config.json's as a list (Llama 3 Instruct's
    <|eot_id|> is only in the list, a pad_token_id equal to an EOS id beside them): each stops a request, and the
    text service counts the same ids (it checks the engine's against its own on first contact)."""
    make_qwen3(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "eos_token_id": 13, "pad_token_id": 13}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 11], "pad_token_id": 9}))
    with LLMEngine(tmp_path, **ARGS) as engine:
        assert engine.eos_token_ids == [9, 11, 13]
    assert read_eos_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=None), 512) == {9, 11, 13}
