"""RoPE scaling (linear and yarn, as Qwen3's model cards configure for long contexts) against transformers:
the same frequencies and cos/sin factor, bit for bit, and the same greedy tokens past the trained length."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from engine_service import LLM, SamplingParams
from engine_service.model.config import ModelConfig
from engine_service.model.layers import rope_frequencies
from tests.integration.tiny import exact_engine, hf_greedy, make_qwen3, random_prompts

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}

# rope_parameters beside max_position_embeddings=64 and head_dim=16
CASES = {
    "yarn": YARN,
    "yarn-no-truncate": {**YARN, "truncate": False},
    # transformers reads the key with .get("truncate", True): an explicit null is falsy, so no truncation (the
    # engine took null as absent, i.e. True: other frequencies, other tokens past the trained length)
    "yarn-truncate-null": {**YARN, "truncate": None},
    "yarn-betas": {**YARN, "beta_fast": 16, "beta_slow": 2},
    "yarn-mscale": {**YARN, "mscale": 0.707, "mscale_all_dim": 1.0},
    "yarn-attention-factor": {**YARN, "attention_factor": 1.5},
    "yarn-factor-from-lengths": {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16},
    "yarn-head-dim-1e6": {**YARN, "factor": 2.5},
    "linear": {"rope_type": "linear", "factor": 2.0},
}


def _hf_config(rope: dict, theta: float = 10000.0) -> Qwen3Config:
    return Qwen3Config(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=64, rope_parameters={**rope, "rope_theta": theta})


@pytest.mark.parametrize("name", list(CASES))
def test_frequencies_equal_transformers(name):
    theta = 1e6 if name == "yarn-head-dim-1e6" else 10000.0
    hf_cfg = _hf_config(CASES[name], theta)
    want_freq, want_factor = ROPE_INIT_FUNCTIONS[CASES[name]["rope_type"]](hf_cfg, "cpu")
    ours = ModelConfig.from_dict(json.loads(hf_cfg.to_json_string()))
    assert ours.rope_scaling is not None and ours.rope_scaling.rope_type == CASES[name]["rope_type"]
    freq, factor = rope_frequencies(16, ours.rope_theta, ours.rope_scaling)
    assert torch.equal(freq, want_freq.float()), name
    assert factor == pytest.approx(want_factor, rel=0, abs=0), name


def test_transformers4_rope_scaling_key_is_read():
    """transformers 4 wrote the same settings as rope_scaling beside a top-level rope_theta."""
    cfg = json.loads(_hf_config({}).to_json_string())
    del cfg["rope_parameters"]
    cfg.update(rope_theta=5000.0, rope_scaling=dict(YARN), max_position_embeddings=40)
    ours = ModelConfig.from_dict(cfg)
    assert ours.rope_theta == 5000.0
    assert ours.rope_scaling.factor == 4.0 and ours.rope_scaling.original_max_position_embeddings == 32
    assert ours.max_model_len_limit == 128  # 32 x 4, not the config's 40


@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_rope_scaling_added_to_a_transformers5_config_wins(tmp_path, key):
    """Qwen3's model cards say to add rope_scaling to config.json; one saved by transformers 5 already holds
    rope_parameters of type default. transformers 5 then uses the yarn settings; so must the engine, with the
    new key and with the old "type" one (Qwen2.5-era cards), which a saved rope_type "default" used to beat."""
    model = make_qwen3(tmp_path, max_pos=64)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_type"] == "default"
    added = {key: "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, rope_scaling=added)))
    ours = ModelConfig.from_dir(tmp_path)
    assert ours.rope_scaling is not None and ours.rope_scaling.rope_type == "yarn"
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert reference.config.rope_parameters["rope_type"] == "yarn"
    prompt = random_prompts(14, [10])[0]  # inside the trained length: yarn changes every position's angles
    with exact_engine(tmp_path, max_model_len=None) as llm:
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert out["token_ids"] == hf_greedy(reference, prompt, 8) != hf_greedy(model, prompt, 8)


def test_a_saved_rope_theta_survives_an_added_rope_scaling():
    """Where transformers 5 replaces a saved rope_parameters by an added rope_scaling whole (falling back to theta
    10,000 for a model trained at 1e6), the engine merges them key by key and keeps the model's theta:
    docs/ENGINE.md says so, as a difference from transformers."""
    cfg = json.loads(_hf_config({}, theta=1e6).to_json_string())
    cfg["rope_scaling"] = dict(YARN)
    ours = ModelConfig.from_dict(cfg)
    assert ours.rope_scaling.rope_type == "yarn" and ours.rope_theta == 1e6


@pytest.mark.parametrize("rope", [YARN, {"rope_type": "linear", "factor": 2.0}], ids=["yarn", "linear"])
def test_greedy_tokens_past_the_trained_length_equal_transformers(tmp_path, rope):
    model = make_qwen3(tmp_path, max_pos=64, rope_scaling=rope)
    prompts = random_prompts(11, [5, 70, 110])  # within, across and past the 64 positions of max_position_embeddings
    with exact_engine(tmp_path, max_model_len=128) as llm:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12))
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["token_ids"] == hf_greedy(model, prompt, 12)


def test_scaled_rope_changes_the_tokens(tmp_path):
    """The comparison above could pass with scaling ignored only if scaling changed nothing; it does."""
    plain = make_qwen3(tmp_path / "plain", max_pos=64, seed=3)
    scaled = make_qwen3(tmp_path / "scaled", max_pos=64, seed=3, rope_scaling=YARN)
    prompt = random_prompts(12, [110])[0]
    assert hf_greedy(plain, prompt, 12) != hf_greedy(scaled, prompt, 12)


def test_limits_and_refusals(tmp_path):
    make_qwen3(tmp_path, max_pos=64, rope_scaling=YARN)
    args = dict(device="cpu", dtype="float32", enforce_eager=True, num_kvcache_blocks=16, max_num_seqs=2)
    with LLM(tmp_path, **args) as llm:  # the default max_model_len is what yarn stretches 32 positions to
        assert llm.max_model_len == 128
    with pytest.raises(ValueError, match=r"max_model_len 129 exceeds the 128 positions.*set max_model_len to 128"):
        LLM(tmp_path, max_model_len=129, **args)

    cfg = json.loads((tmp_path / "config.json").read_text())
    refused = {
        "dynamic": ({"rope_type": "dynamic", "factor": 2.0}, r"'dynamic' is not implemented.*yarn"),
        "partial": ({**YARN, "partial_rotary_factor": 0.5}, r"partial_rotary_factor 0.5 is not implemented"),
        "factor-below-1": ({**YARN, "factor": 0.5}, r"factor of 1.0 or more.*0.5"),
        "factor-missing": ({"rope_type": "linear"}, r"factor of 1.0 or more.*None"),
    }
    for rope, message in refused.values():
        (tmp_path / "config.json").write_text(json.dumps(dict(cfg, rope_parameters={**rope, "rope_theta": 1e4})))
        with pytest.raises(ValueError, match=message):
            LLM(tmp_path, **args)


def test_rope_scaling_argument_overrides_config_json(tmp_path, caplog):
    """A model on a read-only volume cannot have its config.json edited: the engine's rope_scaling (the service's
    --rope-scaling) stretches it instead, and turns a config's scaling off with rope_type "default"."""
    import logging

    from engine_service.server_config import parse_config

    model = make_qwen3(tmp_path / "m", max_pos=64)
    prompt = random_prompts(13, [110])[0]
    reference = make_qwen3(tmp_path / "ref", max_pos=64, rope_scaling=YARN)  # the same weights (seed 0), scaled
    with caplog.at_level(logging.INFO), exact_engine(tmp_path / "m", max_model_len=None, rope_scaling=YARN) as llm:
        assert llm.max_model_len == 128
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert out["token_ids"] == hf_greedy(reference, prompt, 8) != hf_greedy(model, prompt, 8)
    assert "max_model_len 128, RoPE yarn x4 of 32" in caplog.text
    with exact_engine(tmp_path / "ref", max_model_len=None, rope_scaling={"rope_type": "default"}) as llm:
        assert llm.max_model_len == 64
    legacy = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    assert ModelConfig.from_dir(tmp_path / "m", legacy).max_model_len_limit == 128
    assert ModelConfig.from_dir(tmp_path / "ref", {"type": "default"}).rope_scaling is None
    # A factor without a type: on a config that scales, it changes that scaling's factor; on plain RoPE it was
    # dropped without a word.
    assert ModelConfig.from_dir(tmp_path / "ref", {"factor": 2.0}).rope_scaling.factor == 2.0
    with pytest.raises(ValueError, match=r"rope_scaling sets \['factor'\], which plain RoPE ignores, .* add "
                                         r"rope_type, e\.g\. \{'rope_type': 'yarn'"):
        ModelConfig.from_dir(tmp_path / "m", {"factor": "x"})

    cfg = parse_config(["--model", str(tmp_path / "m"), "--rope-scaling", json.dumps(YARN)])
    assert cfg.engine_kwargs()["rope_scaling"] == YARN
    assert parse_config(["--model", "m"]).engine_kwargs()["rope_scaling"] is None
    with pytest.raises(ValueError, match=r"rope_scaling must be a JSON object such as"):
        parse_config(["--model", "m", "--rope-scaling", "yarn"])
    with pytest.raises(ValueError, match=r"rope_scaling must be a dict"):
        LLM(tmp_path / "m", rope_scaling="yarn")


def test_a_default_max_model_len_the_pool_cannot_hold_is_lowered(tmp_path, caplog):
    """Yarn stretches the default max_model_len; a pool that cannot hold one such sequence lowers it (and says so)
    rather than advertise lengths every request would be refused at. An explicit one stays, with a warning."""
    import logging

    make_qwen3(tmp_path, max_pos=64, rope_scaling=YARN)  # 128 positions
    args = dict(device="cpu", dtype="float32", enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=4,
                max_num_seqs=2, max_num_batched_tokens=64)
    with caplog.at_level(logging.WARNING), LLM(tmp_path, **args) as llm:
        assert llm.max_model_len == 65 == llm.model_info["max_model_len"]  # 4 blocks of 16, and the sampled token
        out = llm.generate([random_prompts(1, [60])[0]], SamplingParams(temperature=0.0, max_tokens=50))[0]
        assert len(out["token_ids"]) == 5 and out["finish_reason"] == "length"
        with pytest.raises(ValueError, match=r"max_model_len is 65"):
            llm.generate([random_prompts(1, [65])[0]], SamplingParams(max_tokens=1))
    assert "max_model_len lowered from the model's 128 to 65" in caplog.text
    assert "raise num_kvcache_blocks" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING), LLM(tmp_path, max_model_len=100, **args) as llm:
        assert llm.max_model_len == 100
    assert "max_model_len 100 is more than the KV pool of 4 blocks holds for one sequence (65 tokens)" in caplog.text


def test_the_rope_table_holds_only_the_positions_the_pool_serves(tmp_path):
    """A long-context default max_model_len built a RoPE table of every position the config allows before the pool
    was sized (1 GB here in float64 for 257 servable positions), and an absurd max_position_embeddings failed with
    a bare allocation error; the table now holds what the pool can serve, with transformers' greedy tokens."""
    ref = make_qwen3(tmp_path, max_pos=4_194_304)
    args = dict(device="cpu", dtype="float64", enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=16,
                max_num_seqs=2, max_num_batched_tokens=64)
    prompt = random_prompts(2, [40])[0]
    with LLM(tmp_path, **args) as llm:
        assert llm.max_model_len == 16 * 16 + 1 == llm.runner.max_model_len == llm.runner.model.rotary.cos.shape[0]
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert out["token_ids"] == hf_greedy(ref, prompt, 8)
    config = json.loads((tmp_path / "config.json").read_text())
    config["max_position_embeddings"] = 10**12
    (tmp_path / "config.json").write_text(json.dumps(config))
    del args["num_kvcache_blocks"]
    with LLM(tmp_path, cpu_kvcache_gib=0.001, **args) as llm:  # sized from the cap, in blocks of 16 KiB
        assert llm.runner.num_blocks == int(0.001 * 2**30) // 2**14
        assert llm.max_model_len == llm.runner.num_blocks * 16 + 1 == llm.runner.model.rotary.cos.shape[0]
        assert llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8))[0]["token_ids"] == out["token_ids"]


def test_no_indexing_error_warning_for_prompts_past_the_tokenizers_length(demo_model_dir, caplog):
    """A RoPE-scaled model's tokenizer still says the unscaled model_max_length; transformers warned of "indexing
    errors" for every longer prompt the service then served correctly. Both services bound prompts themselves."""
    import logging

    from transformers import AutoTokenizer

    from tokenizer_service.server import load_tokenizer

    text = "the sea " * 2000
    plain = AutoTokenizer.from_pretrained(demo_model_dir)
    plain.model_max_length = 64
    with caplog.at_level(logging.WARNING):
        plain.encode(text)
    assert "indexing errors" in caplog.text  # what the warning looks like, so its absence means something
    caplog.clear()
    tokenizer, _, _ = load_tokenizer(str(demo_model_dir))
    with caplog.at_level(logging.WARNING), LLM(demo_model_dir, device="cpu", dtype="float32", num_kvcache_blocks=8,
                                               max_num_seqs=2) as llm:
        assert len(tokenizer.encode(text)) > 2048  # past the demo's max_position_embeddings
        llm.tokenizer.encode(text)
    assert "indexing errors" not in caplog.text


def _yarn_equal_to_transformers(hf_cfg, head_dim):
    """Yarn's frequencies and attention factor from our config reader equal transformers' bit for bit."""
    want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    ours = ModelConfig.from_dict(json.loads(hf_cfg.to_json_string()))
    freq, factor = rope_frequencies(head_dim, ours.rope_theta, ours.rope_scaling)
    assert torch.equal(freq, want_freq.float())
    assert factor == pytest.approx(want_factor, rel=0, abs=0)


def test_yarn_default_betas_at_qwen3_lengths_equal_transformers():
    """Real Qwen3 yarn configs leave beta_fast and beta_slow out: their defaults (32 and 1) matter at a real model's
    lengths (32,768 trained, head_dim 128), where the tiny cases' correction range clamps to 0 whatever beta_fast
    is, so a wrong default went unseen."""
    cfg = Qwen3Config(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                      max_position_embeddings=32768,
                      rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                                       "rope_theta": 1e6})
    _yarn_equal_to_transformers(cfg, 128)


def test_a_top_level_original_max_position_embeddings_wins_as_in_transformers():
    """With original_max_position_embeddings both at the top level and in rope_parameters, transformers takes the
    top-level one; preferring rope's changed every frequency yarn scales."""
    cfg = Qwen3Config(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=64, original_max_position_embeddings=16,
                      rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                                       "rope_theta": 10000.0})
    data = json.loads(cfg.to_json_string())
    assert data["original_max_position_embeddings"] == 16
    ours = ModelConfig.from_dict(data)
    assert ours.rope_scaling.original_max_position_embeddings == 16
    _yarn_equal_to_transformers(cfg, 16)
