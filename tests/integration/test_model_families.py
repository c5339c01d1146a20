"""The families beside Qwen3 (Llama, Mistral, Qwen2) give transformers' greedy tokens on the same weights, in
float64 on CPU, through prefill chunks, a cached prefix and decode; their config quirks are read as transformers
reads them."""

from __future__ import annotations

import pytest
import torch

from engine_service import LLM, SamplingParams
from engine_service.model.config import ModelConfig
from tests.integration.tiny import exact_engine, hf_greedy, make_family, random_prompts

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}

CASES = {
    # Llama 3.2-style: tied embeddings, GQA 2, no biases
    "llama": ("llama", dict(tie=True), {}),
    # every bias Llama's config can switch on, and Llama 3.1's RoPE scaling with its three wavelength regimes
    # inside the 16-dimensional head (kept, blended, slowed) over prompts past the 32 "trained" positions
    "llama-biases-llama3-rope": ("llama", dict(rope_scaling=LLAMA3_ROPE),
                                 dict(attention_bias=True, mlp_bias=True)),
    # Qwen2.5: biases on q/k/v only, GQA 3
    "qwen2": ("qwen2", dict(heads=6, kv_heads=2, head_dim=8, hidden=48), {}),
    # Mistral Nemo-style: no sliding window, a head_dim that is not hidden / heads
    "mistral": ("mistral", dict(head_dim=32), dict(sliding_window=None)),
}


@pytest.fixture(scope="module", params=list(CASES))
def family_model(request, tmp_path_factory):
    model_type, shape, extra = CASES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    return make_family(path, model_type, **shape, **extra), path


def test_greedy_tokens_equal_transformers(family_model):
    model, path = family_model
    prompts = random_prompts(1, [1, 7, 33, 90])
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with exact_engine(path, max_num_batched_tokens=48) as llm:  # the 90-token prompt prefills in two chunks
        outs = llm.generate(prompts, params)
        prompts.append(prompts[3][:64] + [5, 6, 7])  # a cached 64-token prefix (four 16-token blocks)
        outs += llm.generate(prompts[4:], params)
    assert outs[4]["num_cached_tokens"] == 64
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["token_ids"] == hf_greedy(model, prompt, 12)


def test_biases_are_loaded(family_model):
    """The reference's biases are random (tiny.make_family), so tokens equal to transformers' already mean the
    engine added them; here, that each family has exactly the biases its transformers class builds."""
    model, path = family_model
    with exact_engine(path) as llm:
        layer = llm.runner.model.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        ref = model.model.layers[0]
        assert (attn.qkv_proj.bias is not None) == (ref.self_attn.q_proj.bias is not None)
        assert (attn.o_proj.bias is not None) == (ref.self_attn.o_proj.bias is not None)
        assert (mlp.gate_up_proj.bias is not None) == (ref.mlp.gate_proj.bias is not None)
        assert (mlp.down_proj.bias is not None) == (ref.mlp.down_proj.bias is not None)
        assert (attn.q_norm is not None) == hasattr(ref.self_attn, "q_norm")
        if attn.qkv_proj.bias is not None:
            want = torch.cat([ref.self_attn.q_proj.bias, ref.self_attn.k_proj.bias, ref.self_attn.v_proj.bias])
            assert torch.equal(attn.qkv_proj.bias, want)


def test_llama3_rope_frequencies_equal_transformers():
    """The llama3 scaling's inverse frequencies, bit for bit, on a real head size and Llama 3.1's settings."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine_service.model.layers import rope_frequencies

    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    hf_cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters=rope)
    want, want_factor = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, torch.device("cpu"))
    cfg = ModelConfig.from_dict({**hf_cfg.to_dict(), "model_type": "llama"})
    assert cfg.rope_scaling.rope_type == "llama3"
    assert cfg.max_model_len_limit == 131072  # the config's own length: llama3 stretches nothing past it
    got, factor = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.equal(got, want) and factor == want_factor == 1.0
    plain, _ = rope_frequencies(cfg.head_dim, cfg.rope_theta, None)
    assert (got == plain).any() and (got == plain / 8).any() and ((got != plain) & (got != plain / 8)).any()


@pytest.mark.parametrize("low,high", [(None, 4.0), (4.0, 1.0), (0, 4.0), (True, 4.0)])
def test_llama3_rope_with_bad_factors_is_refused(low, high):
    cfg = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 1, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": low,
                                                     "high_freq_factor": high}}
    with pytest.raises(ValueError, match="low_freq_factor and high_freq_factor"):
        ModelConfig.from_dict(cfg)


def test_sliding_window_caps_max_model_len(tmp_path):
    """Mistral v0.1's window: within it, attention to every earlier key is the window's attention, so the engine
    serves up to the window by default, gives transformers' tokens there, and refuses a longer max_model_len."""
    model = make_family(tmp_path, "mistral", sliding_window=48, max_pos=1024)
    with exact_engine(tmp_path, max_model_len=None) as llm:
        assert llm.max_model_len == 48
        prompts = random_prompts(2, [20, 35])
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["token_ids"] == hf_greedy(model, prompt, 10)
    with pytest.raises(ValueError, match=r"max_model_len 64 exceeds the 48 positions .*sliding_window"):
        exact_engine(tmp_path, max_model_len=64)


@pytest.mark.parametrize("extra,window", [({}, 4096), ({"sliding_window": None}, None), ({"sliding_window": 4096}, 4096)])
def test_mistral_sliding_window_defaults_as_transformers(extra, window):
    """transformers' MistralConfig sets 4096 when config.json omits sliding_window, and none when it is null."""
    cfg = {"model_type": "mistral", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "max_position_embeddings": 32768,
           **extra}
    assert ModelConfig.from_dict(cfg).sliding_window == window


def test_qwen_sliding_window_applies_only_when_switched_on():
    base = {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 1, "num_key_value_heads": 1, "max_position_embeddings": 32768, "sliding_window": 4096}
    assert ModelConfig.from_dict(base).max_model_len_limit == 32768
    on = ModelConfig.from_dict({**base, "use_sliding_window": True})
    assert on.sliding_window == 4096 and on.max_model_len_limit == 4096
    with pytest.raises(ValueError, match="sliding_window should be a positive integer"):
        ModelConfig.from_dict({**base, "use_sliding_window": True, "sliding_window": 0})


def test_unknown_family_names_the_served_ones():
    with pytest.raises(ValueError, match=r"model_type 'gemma2' is not supported; supported: \('qwen3', 'qwen2', "
                                         r"'llama', 'mistral'\)"):
        ModelConfig.from_dict({"model_type": "gemma2"})


@pytest.mark.timeout(240)
def test_tp2_with_every_llama_bias_matches_one_rank(tmp_path):
    """Column-parallel biases (q/k/v, gate/up) split with their rows, row-parallel ones (o, down) added once
    after the reduction, with the one KV head replicated on both ranks."""
    make_family(tmp_path, "llama", heads=4, kv_heads=1, vocab=511, attention_bias=True, mlp_bias=True)
    prompts = random_prompts(3, [1, 9, 40])
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    args = dict(device="cpu", dtype="float64", attention_backend="torch", num_kvcache_blocks=32,
                max_num_batched_tokens=32, max_num_seqs=4, max_model_len=128)
    with LLM(tmp_path, tensor_parallel_size=1, **args) as one:
        expected = [o["token_ids"] for o in one.generate(prompts, params)]
    with LLM(tmp_path, tensor_parallel_size=2, **args) as two:
        got = [o["token_ids"] for o in two.generate(prompts, params)]
    assert got == expected and all(len(t) == 8 for t in got)


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama", "mistral"])
def test_omitted_keys_take_the_family_defaults_transformers_gives(model_type):
    """A config.json without max_position_embeddings, num_key_value_heads or head_dim reads as transformers'
    config class reads it, which differs by family (Llama 2,048 positions, Mistral 8 KV heads, Qwen3 head_dim 128)."""
    import transformers

    name = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[model_type]
    keys = {"vocab_size": 64, "hidden_size": 256, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 32}
    theirs = getattr(transformers, f"{name}Config")(**keys)
    mine = ModelConfig.from_dict({"model_type": model_type, **keys})
    assert mine.max_position_embeddings == theirs.max_position_embeddings
    assert mine.num_key_value_heads == theirs.num_key_value_heads
    assert mine.head_dim == (getattr(theirs, "head_dim", None) or 256 // 32)
    explicit_null = ModelConfig.from_dict({"model_type": model_type, **keys, "num_key_value_heads": None})
    assert explicit_null.num_key_value_heads == 32


@pytest.mark.parametrize("act,ok", [("silu", True), ("swish", True), ("gelu", False), ("gelu_pytorch_tanh", False)])
def test_only_a_silu_gated_mlp_is_served(act, ok):
    cfg = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": 1, "hidden_act": act}
    if ok:
        ModelConfig.from_dict(cfg)
    else:
        with pytest.raises(ValueError, match=f"hidden_act '{act}' is not implemented: .*must say 'silu'"):
            ModelConfig.from_dict(cfg)


@pytest.mark.parametrize("heads,kv_heads,head_dim,problem", [
    (4, 2, 16, None), (3, 3, 16, None), (3, 2, 16, "not a multiple of num_key_value_heads 2"),
    (6, 4, 16, "not a multiple of num_key_value_heads 4"), (2, 1, 15, "head_dim 15 is odd"),
])
def test_head_layouts_attention_cannot_serve_are_refused_at_load(heads, kv_heads, head_dim, problem):
    """Such a model loaded, and every request's first step then failed, each backend in words of its own (SDPA's
    'Number of heads in key and value must divide...', a tensor size mismatch for an odd head_dim)."""
    cfg = {"model_type": "qwen3", "vocab_size": 8, "hidden_size": 32, "intermediate_size": 8, "num_hidden_layers": 1,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim}
    if problem is None:
        ModelConfig.from_dict(cfg)
    else:
        with pytest.raises(ValueError, match=problem):
            ModelConfig.from_dict(cfg)
