"""Admission, aborts, finishing and sampling through the step API on a tiny model."""

from __future__ import annotations

import random

import pytest
import torch

from engine_service import LLM, LLMEngine, SamplingParams
from tests.integration.tiny import VOCAB, exact_engine, hf_greedy, make_qwen3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_qwen3(path, heads=4, kv_heads=2, dtype=__import__("torch").float32)
    return path


def _engine(path, **kw) -> LLMEngine:
    args = dict(
        device="cpu",
        dtype="float32",
        attention_backend="torch",
        kvcache_block_size=16,
        num_kvcache_blocks=24,
        max_num_batched_tokens=64,
        max_num_seqs=8,
        max_model_len=256,
    )
    args.update(kw)
    return LLM(path, **args)


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def _drain(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list]:
    """Step until idle; return each request's tokens and finish reason."""
    seen: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return seen
        for out in engine.step():
            entry = seen.setdefault(out.request_id, [[], None])
            entry[0].extend(out.new_token_ids)
            if out.finished:
                entry[1] = out.finish_reason
    raise AssertionError("engine did not go idle")


def _all_free(engine: LLMEngine) -> bool:
    s = engine.stats()
    return s["num_free_blocks"] == s["num_blocks"] and s["num_running"] == 0 and s["num_waiting"] == 0


# ---- bad requests are refused at admission --------------------------------------------------------
BAD_PARAMS = [
    dict(max_tokens=0),
    dict(max_tokens=-3),
    dict(min_tokens=5, max_tokens=4),
    dict(temperature=-0.1),
    dict(top_p=0.0),
    dict(top_p=1.5),
    dict(top_k=0),
    dict(top_k=-2),
    dict(min_p=-0.1),
    dict(min_p=1.1),
    dict(stop_token_ids=None),
    dict(stop_token_ids=5),
    dict(ignore_eos="no"),
    dict(ignore_eos=None),
]


@pytest.mark.parametrize(
    "kwargs", BAD_PARAMS, ids=[next(iter(k)) + "=" + str(list(k.values())) for k in BAD_PARAMS]
)
def test_bad_sampling_params_name_the_field(kwargs):
    with pytest.raises(ValueError) as err:
        SamplingParams(**kwargs)
    assert any(name in str(err.value) for name in kwargs)


def test_numpy_scalars_are_taken_as_the_numbers_they_stand_for():
    """max_tokens=np.int64(4), seed=np.int64(3) and temperature=np.float32(.5) were refused ('must be an integer')
    while top_p=np.float64 was taken, and an array of stop ids was named by its first element; out-of-range or
    non-integral values are still refused, naming the field."""
    import numpy as np

    p = SamplingParams(max_tokens=np.int64(4), seed=np.int64(3), temperature=np.float32(0.5), top_k=np.int32(5),
                       stop_token_ids=np.array([1, 2, 1]), logprobs=np.int16(2))
    assert (p.max_tokens, p.seed, p.temperature, p.top_k, p.stop_token_ids, p.logprobs) == (4, 3, 0.5, 5, (1, 2), 2)
    assert all(type(v) is int for v in (p.max_tokens, p.seed, p.top_k, p.logprobs, *p.stop_token_ids))
    assert type(p.temperature) is float
    for kwargs, field in ((dict(max_tokens=np.float64(4.0)), "max_tokens"), (dict(max_tokens=np.int64(0)), "max_tokens"),
                          (dict(temperature=np.float32("nan")), "temperature"), (dict(seed=np.int64(-1)), "seed")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)


BAD_ENGINE_ARGS = [
    dict(seed="a"),
    dict(seed=-1),
    dict(cpu_kvcache_gib="4"),
    dict(cpu_kvcache_gib=float("nan")),
    dict(enable_prefix_caching="no"),
    dict(enforce_eager="yes"),
    dict(tensor_parallel_size=True),
    dict(kvcache_block_size=True),
]


@pytest.mark.parametrize("kwargs", BAD_ENGINE_ARGS, ids=[f"{k}={v!r}" for d in BAD_ENGINE_ARGS for k, v in d.items()])
def test_bad_engine_arguments_name_the_field(kwargs):
    """Before: torch's "manual_seed expected a long", a TypeError, NaN's int conversion, or a silent truthiness."""
    from engine_service.config import EngineConfig

    with pytest.raises(ValueError) as err:
        EngineConfig(model="m", **kwargs)
    assert next(iter(kwargs)) in str(err.value)


def test_numpy_and_torch_prompts_are_token_ids(model_dir):
    import numpy as np

    with _engine(model_dir) as engine:
        params = SamplingParams(temperature=0.0, max_tokens=3)
        want = engine.generate([_prompt(5)], params)[0]["token_ids"]
        for prompt in (np.array(_prompt(5)), torch.tensor(_prompt(5)), [np.int64(t) for t in _prompt(5)]):
            assert engine.generate(prompt, params)[0]["token_ids"] == want
        assert [o["token_ids"] for o in engine.generate(torch.tensor([_prompt(5)] * 2), params)] == [want, want]


def test_a_closed_engine_refuses_clearly(model_dir):
    from engine_service.engine import EngineDeadError

    engine = _engine(model_dir)
    engine.close()
    with pytest.raises(EngineDeadError, match="closed"):
        engine.generate([_prompt(3)], SamplingParams(max_tokens=2))


def test_bad_requests_are_refused_and_engine_keeps_serving(model_dir):
    with _engine(model_dir) as engine:
        ok = SamplingParams(temperature=0.0, max_tokens=4)
        cases = {
            "empty": ([], ok, "empty"),
            "oov-high": ([1, VOCAB], ok, "vocabulary"),
            "oov-negative": ([-1, 3], ok, "vocabulary"),
            "not-int": ([1, 2.5], ok, "not an integer"),
            "exactly-max-model-len": (_prompt(256), ok, "max_model_len"),
            "one-over": (_prompt(257), ok, "max_model_len"),
            # 24 blocks of 16 = 384 slots, but max_model_len caps a request at 256 tokens = 16 blocks: fits.
            # With a smaller pool it would not: see the next test.
        }
        for name, (prompt, params, word) in cases.items():
            with pytest.raises(ValueError, match=word):
                engine.add_request(name, prompt, params)
        with pytest.raises(ValueError, match="stop_token_ids"):
            engine.add_request("oov-stop", [1, 2], SamplingParams(min_tokens=1, max_tokens=4, stop_token_ids=[VOCAB]))
        engine.add_request("good", _prompt(10), ok)
        with pytest.raises(ValueError, match="already in use"):
            engine.add_request("good", _prompt(10), ok)
        done = _drain(engine)
        assert done["good"][1] == "length" and len(done["good"][0]) == 4
        assert _all_free(engine)


def test_request_that_can_never_fit_the_pool_is_refused(model_dir):
    with _engine(model_dir, num_kvcache_blocks=4) as engine:  # 64 slots
        with pytest.raises(ValueError, match="KV blocks"):
            engine.add_request("big", _prompt(40), SamplingParams(max_tokens=30))  # 69 KV tokens -> 5 blocks
        with pytest.raises(ValueError, match="KV blocks"):
            engine.add_request("one-over", _prompt(40), SamplingParams(max_tokens=26))  # 65 KV tokens
        # 65 tokens in all, but the last is only sampled: 64 hold KV, exactly the pool.
        engine.add_request("fits", _prompt(40), SamplingParams(temperature=0.0, max_tokens=25))
        done = _drain(engine)["fits"]
        assert done[1] == "length" and len(done[0]) == 25
        assert _all_free(engine)


def test_reaching_max_model_len_finishes_with_length(model_dir):
    with _engine(model_dir, max_model_len=64) as engine:
        engine.add_request("r", _prompt(60), SamplingParams(temperature=0.0, max_tokens=100))
        tokens, reason = _drain(engine)["r"]
    assert reason == "length"
    assert len(tokens) == 4  # 60 + 4 = max_model_len


# ---- aborts free blocks in every phase ----------------------------------------------------------------
def test_abort_while_queued_prefilling_decoding_and_preempted(model_dir):
    # 8 blocks of 16 tokens; a token budget of 16 forces chunked prefill.
    with _engine(model_dir, num_kvcache_blocks=8, max_num_batched_tokens=16, max_num_seqs=4) as engine:
        p = SamplingParams(temperature=0.0, max_tokens=40)
        engine.add_request("decoding", _prompt(20, 1), p)
        engine.add_request("prefilling", _prompt(70, 2), p)
        engine.add_request("queued", _prompt(20, 3), p)
        engine.step()
        engine.step()
        seqs = engine.seqs
        assert seqs["decoding"].is_decoding
        assert 0 < seqs["prefilling"].num_computed_tokens < 70
        assert seqs["queued"].status.name == "WAITING"
        assert engine.abort_request("queued")
        assert engine.abort_request("prefilling")
        reasons = {}
        for _ in range(3):
            reasons.update({o.request_id: o.finish_reason for o in engine.step() if o.finished})
        assert reasons == {"queued": "abort", "prefilling": "abort"}
        assert engine.abort_request("decoding")
        assert not engine.abort_request("decoding")  # twice is harmless
        assert {k: v[1] for k, v in _drain(engine).items()} == {"decoding": "abort"}
        assert _all_free(engine)

        # Preempted: two requests that each need most of the pool. The aborted one must leave the waiting queue at
        # once: left there, it was readmitted, recomputed and decoded to max_tokens unseen (70 tokens, twice the
        # steps), and only then freed its blocks, so "all free" at the end held all the same.
        engine.add_request("a", _prompt(50, 4), SamplingParams(temperature=0.0, max_tokens=70))
        engine.add_request("b", _prompt(50, 5), SamplingParams(temperature=0.0, max_tokens=70))
        preempted = None
        for _ in range(500):
            engine.step()
            waiting = [s for s in engine.scheduler.waiting if s.admit_order >= 0]
            if waiting:
                preempted = waiting[0]
                break
        assert preempted is not None, "expected a preemption"
        other = ({"a", "b"} - {preempted.request_id}).pop()
        assert engine.abort_request(preempted.request_id)
        assert preempted not in engine.scheduler.waiting, "the aborted preempted sequence is still queued"
        assert preempted.status.name == "FINISHED"
        generated = preempted.num_output_tokens
        outs = _drain(engine)
        assert preempted.num_output_tokens == generated, "the aborted sequence kept decoding"
        assert outs[other][1] == "length"
        assert outs.get(preempted.request_id, [[], "abort"]) == [[], "abort"]
        assert _all_free(engine)


def test_two_requests_each_needing_most_of_the_pool_both_finish(model_dir):
    with _engine(model_dir, num_kvcache_blocks=8, max_num_batched_tokens=16, max_num_seqs=4) as engine:
        for i in range(3):
            engine.add_request(f"r{i}", _prompt(60, i), SamplingParams(temperature=0.0, max_tokens=60))
        outs = _drain(engine)
        assert all(reason == "length" and len(t) == 60 for t, reason in outs.values())
        assert engine.stats()["num_preemptions"] > 0
        assert _all_free(engine)


# ---- stopping and sampling --------------------------------------------------------------------------
def test_stop_token_ids_min_tokens_and_ignore_eos(model_dir):
    with _engine(model_dir) as engine:
        prompt = _prompt(12, 9)
        greedy = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12))[0]["token_ids"]
        stop_at = greedy[5]
        first = greedy.index(stop_at)
        out = engine.generate(
            [prompt], SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=[stop_at])
        )[0]
        assert out["finish_reason"] == "stop" and out["token_ids"] == greedy[: first + 1]
        # min_tokens bans the stop token until it is reached, so the stream goes past it.
        out = engine.generate(
            [prompt],
            SamplingParams(temperature=0.0, max_tokens=12, min_tokens=first + 1, stop_token_ids=[stop_at]),
        )[0]
        assert stop_at not in out["token_ids"][: first + 1]
        assert len(out["token_ids"]) > first + 1
        assert _all_free(engine)


def test_eos_from_generation_config_stops_unless_ignored(tmp_path, caplog):
    import json

    make_qwen3(tmp_path)
    with _engine(tmp_path) as engine:
        prompt = _prompt(12, 11)
        greedy = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10))[0]["token_ids"]
    assert "does not apply" not in caplog.text
    eos = greedy[3]
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [eos], "temperature": 0.3, "repetition_penalty": 1.05, "no_repeat_ngram_size": 3,
         "num_beams": 1}))
    with _engine(tmp_path) as engine:
        # A setting it does not apply is said at start-up, not silently dropped (num_beams 1 is "off").
        assert "generation_config.json sets no_repeat_ngram_size=3, which this engine does not apply" in caplog.text
        assert "num_beams" not in caplog.text and "repetition_penalty=1.05," not in caplog.text
        assert eos in engine.eos_token_ids
        assert engine.generation_defaults["temperature"] == 0.3
        assert engine.generation_defaults["repetition_penalty"] == 1.05
        out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10))[0]
        assert out["finish_reason"] == "stop" and out["token_ids"][-1] == eos
        out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
        assert out["token_ids"] == greedy and out["finish_reason"] == "length"


def test_an_eos_id_outside_the_vocabulary_is_ignored_not_indexed(tmp_path, caplog):
    """An EOS id past the model's vocabulary (an added tokenizer token) was kept, and the first request with
    min_tokens banned it by indexing past the logits: IndexError, and every request of that step failed."""
    import json

    make_qwen3(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, VOCAB + 88]}))
    with _engine(tmp_path) as engine:
        assert f"eos_token_id [{VOCAB + 88}]" in caplog.text and "outside the model's vocabulary" in caplog.text
        assert engine.eos_token_ids == [7]
        outs = engine.generate([_prompt(8, 1), _prompt(8, 2)],
                               [SamplingParams(temperature=0.0, max_tokens=4),
                                SamplingParams(temperature=0.0, max_tokens=4, min_tokens=2)])
        assert all(o["finish_reason"] in ("stop", "length") for o in outs), outs
        assert all(7 not in o["token_ids"][:2] for o in outs[1:])


@pytest.mark.parametrize("file", ["generation_config.json", "config.json"])
@pytest.mark.parametrize("eos", [[2, None], "</s>", 2.5, True])
def test_an_eos_token_id_that_is_not_token_ids_is_refused_naming_the_file(tmp_path, file, eos):
    """int() read true as id 1 and 2.5 as 2, and a null in a list or a token's text raised a bare TypeError or
    ValueError naming no file."""
    import json

    make_qwen3(tmp_path)
    config = json.loads((tmp_path / file).read_text()) if (tmp_path / file).is_file() else {}
    (tmp_path / file).write_text(json.dumps({**config, "eos_token_id": eos}))
    with pytest.raises(ValueError, match=rf"{file}'s eos_token_id should be a token id or a list of them"):
        _engine(tmp_path)


def test_token_ids_come_in_order_or_are_refused(model_dir):
    """A set or dict of ids ran as token ids, in some order and without repeats; only sequences are token ids."""
    import numpy as np
    import torch

    with _engine(model_dir) as engine:
        # Bytes in any form: a bytearray or memoryview ran its byte values as token ids.
        for wrong in ({30, 10, 20}, {10: "x", 20: "y"}, b"\x01\x02", frozenset({1}), bytearray(b"Hi"), memoryview(b"Hi")):
            with pytest.raises(ValueError, match=f"must be a list of integer token ids .*not a {type(wrong).__name__}"):
                engine.add_request("r", wrong, SamplingParams(max_tokens=1))
        params = SamplingParams(temperature=0.0, max_tokens=3)
        want = engine.generate([[30, 10, 20, 10]], params)[0]["token_ids"]
        for same in ((30, 10, 20, 10), np.array([30, 10, 20, 10]), torch.tensor([30, 10, 20, 10])):
            assert engine.generate([same], params)[0]["token_ids"] == want


def test_seed_gives_same_tokens_whatever_shares_the_batch(model_dir):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=16)
    prompt = _prompt(20, 12)
    with _engine(model_dir) as engine:
        alone = engine.generate([prompt], seeded)[0]["token_ids"]
        others = [_prompt(n, 100 + n) for n in (5, 33, 50)]
        crowd = engine.generate(
            others + [prompt], [SamplingParams(temperature=1.0, max_tokens=16)] * 3 + [seeded]
        )[-1]["token_ids"]
        other_seed = engine.generate([prompt], SamplingParams(temperature=1.0, seed=99, max_tokens=16))[0]
    assert alone == crowd
    assert other_seed["token_ids"] != alone


def test_seeds_that_differ_only_above_bit_31_draw_differently(model_dir):
    """torch's CPU generator keeps a seed's low 32 bits: 5, 5 + 2**32 and 5 + 2**62 drew the same tokens."""
    prompt = _prompt(20, 13)
    seeds = [5, 5 + 2**32, 5 + 2**40, 5 + 2**62]
    with _engine(model_dir) as engine:
        outs = engine.generate([prompt] * len(seeds),
                               [SamplingParams(temperature=1.0, seed=s, max_tokens=16) for s in seeds])
        again = engine.generate([prompt], SamplingParams(temperature=1.0, seed=5 + 2**62, max_tokens=16))[0]
    tokens = [tuple(o["token_ids"]) for o in outs]
    assert len(set(tokens)) == len(seeds), tokens
    assert tuple(again["token_ids"]) == tokens[-1]  # and a seed still repeats its tokens


def test_top_k_1_and_vanishing_top_p_reduce_to_greedy(model_dir):
    prompts = [_prompt(n, 200 + n) for n in (3, 17, 40)]
    with _engine(model_dir) as engine:
        greedy = [
            o["token_ids"] for o in engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=10))
        ]
        top_k = engine.generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=10))
        top_p = engine.generate(prompts, SamplingParams(temperature=1.3, top_p=1e-9, max_tokens=10))
    assert [o["token_ids"] for o in top_k] == greedy
    assert [o["token_ids"] for o in top_p] == greedy


def test_sampling_filters_keep_tokens_inside_the_allowed_set(model_dir):
    """top_k=3: every sampled token is among the 3 most likely under transformers' own logits."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    prompt = _prompt(15, 300)
    with _engine(model_dir) as engine:
        outs = engine.generate(
            [prompt] * 6, [SamplingParams(temperature=2.0, top_k=3, seed=s, max_tokens=1) for s in range(6)]
        )
    with torch.no_grad():
        top3 = ref(torch.tensor([prompt])).logits[0, -1].topk(3).indices.tolist()
    firsts = {o["token_ids"][0] for o in outs}
    assert firsts <= set(top3)
    assert len(firsts) > 1  # temperature 2 over three candidates: six seeds should not all agree


def test_nan_logits_fail_the_request_not_the_engine(model_dir, monkeypatch):
    import torch

    with _engine(model_dir) as engine:
        model = engine.runner.model
        original = model.compute_logits

        def poisoned(hidden):
            logits = original(hidden)
            logits[0] = float("nan")
            return logits

        monkeypatch.setattr(model, "compute_logits", poisoned)
        engine.add_request("victim", _prompt(8), SamplingParams(temperature=0.0, max_tokens=3))
        outs = engine.step()
        assert outs and outs[0].finish_reason == "error" and "NaN" in outs[0].error
        monkeypatch.setattr(model, "compute_logits", original)
        out = engine.generate([_prompt(8)], SamplingParams(temperature=0.0, max_tokens=3))[0]
        assert len(out["token_ids"]) == 3
        assert _all_free(engine)
        assert torch.isfinite(engine.runner.k_cache).all()


def test_several_engines_side_by_side_and_close(model_dir):
    prompt = _prompt(9, 400)
    p = SamplingParams(temperature=0.0, max_tokens=5)
    a = _engine(model_dir)
    with _engine(model_dir, kvcache_block_size=8) as b:
        assert a.generate([prompt], p)[0]["token_ids"] == b.generate([prompt], p)[0]["token_ids"]
    a.close()
    with pytest.raises(ValueError, match="unknown engine argument"):
        LLM(model_dir, not_a_flag=1)


@pytest.mark.parametrize("overlap", [False, True], ids=["plain", "overlap"])
def test_close_lets_the_model_and_kv_cache_be_freed(model_dir, overlap):
    """bench runs transformers in the same process after the engine: once closed and dropped, nothing may
    still hold the runner or its KV cache (on a GPU, 90% of the device)."""
    import gc
    import weakref

    llm = _engine(model_dir, overlap_scheduling=overlap)
    runner, cache = weakref.ref(llm.runner), weakref.ref(llm.runner.k_cache)
    llm.generate([_prompt(9, seed) for seed in range(5)], SamplingParams(temperature=0.7, max_tokens=6))
    llm.close()
    del llm
    gc.collect()
    assert runner() is None and cache() is None


def test_matches_transformers_on_the_default_pool(model_dir):
    """No num_kvcache_blocks given: the CPU default pool applies and is documented as max_num_seqs full sequences."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with LLM(model_dir, device="cpu", dtype="float64", max_num_seqs=4, max_model_len=128) as engine:
        assert engine.stats()["num_blocks"] == 4 * 128 // 16
        prompt = _prompt(30, 500)
        out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6))[0]
    assert out["token_ids"] == hf_greedy(ref, prompt, 6)


def test_text_prompts_use_the_model_tokenizer(demo_model_dir):
    with LLM(demo_model_dir, device="cpu", max_num_seqs=2, max_model_len=256) as llm:
        assert llm.tokenizer is not None
        outs = llm.generate(["Hello there", "The sea is"], SamplingParams(temperature=0.0, max_tokens=6))
        by_ids = llm.generate(
            [llm.tokenizer.encode("Hello there", add_special_tokens=False)],
            SamplingParams(temperature=0.0, max_tokens=6),
        )
        with pytest.raises(ValueError, match="the text prompt '' encodes to no tokens: give a non-empty prompt"):
            llm.generate([""], SamplingParams(max_tokens=2))  # said 'prompt_token_ids must not be empty'
        assert llm.stats()["num_running"] == llm.stats()["num_waiting"] == 0
    assert outs[0]["token_ids"] == by_ids[0]["token_ids"]
    for out in outs:
        assert out["text"] == llm.tokenizer.decode(out["token_ids"], skip_special_tokens=True)
    assert llm.eos_token_ids  # the demo model's generation_config names its EOS ids


def test_text_prompts_get_the_tokenizers_special_tokens(demo_model_dir, tmp_path):
    """A tokenizer whose post-processor adds a BOS (Llama's) gets it on a text prompt, as tokenizer(text) does:
    one more prompt token, whose logprobs start at the first text token."""
    import json
    import shutil

    model = shutil.copytree(demo_model_dir, tmp_path / "bos_model")
    spec = json.loads((model / "tokenizer.json").read_text())
    bos = next(t["id"] for t in spec["added_tokens"] if t["content"] == "<|endoftext|>")
    spec["post_processor"] = {"type": "TemplateProcessing",
                              "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                         {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [bos],
                                                                   "tokens": ["<|endoftext|>"]}}}
    (model / "tokenizer.json").write_text(json.dumps(spec))
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=0)
    with LLM(model, device="cpu", max_num_seqs=2, max_model_len=256) as llm:
        text_ids = llm.tokenizer.encode("Hello there", add_special_tokens=False)
        by_text, by_ids = llm.generate(["Hello there", [bos, *text_ids]], params)
    assert len(by_text["prompt_logprobs"]) == len(text_ids)  # BOS + the text, less the first token
    assert by_text["token_ids"] == by_ids["token_ids"]


def test_on_launch_runs_once_per_step_before_the_forward(model_dir, monkeypatch):
    calls = []
    with _engine(model_dir) as engine:
        model = engine.runner.model
        forward = model.forward
        monkeypatch.setattr(model, "forward", lambda *a, **k: (calls.append("forward"), forward(*a, **k))[1])
        engine.add_request("r", _prompt(10), SamplingParams(temperature=0.0, max_tokens=2))
        engine.step(on_launch=lambda: calls.append("launch"))
        assert calls == ["launch", "forward"]
        engine.abort_request("r")
        calls.clear()
        engine.step(on_launch=lambda: calls.append("launch"))  # only the abort to report: nothing launches
        assert calls == []


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16", "float16"])
def test_every_dtype_runs_on_cpu(model_dir, dtype):
    import torch

    with _engine(model_dir, dtype=dtype) as engine:
        out = engine.generate([_prompt(20, 600)], SamplingParams(temperature=0.0, max_tokens=5))[0]
        assert engine.runner.k_cache.dtype == getattr(torch, dtype)
        assert engine.runner.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    assert len(out["token_ids"]) == 5 and all(0 <= t < VOCAB for t in out["token_ids"])


def test_checkpoint_problems_are_errors_that_name_the_weight(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    make_qwen3(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    args = dict(device="cpu", num_kvcache_blocks=8, max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64)

    missing = dict(tensors)
    del missing["model.layers.1.self_attn.k_proj.weight"]
    save_file(missing, weights)
    with pytest.raises(ValueError, match=r"missing.*layers\.1\.self_attn\.qkv_proj\.weight\[k\]"):
        LLM(tmp_path, **args)

    extra = dict(tensors, **{"model.layers.0.mlp.surprise.weight": tensors["model.norm.weight"].clone()})
    save_file(extra, weights)
    with pytest.raises(ValueError, match=r"unexpected.*mlp\.surprise"):
        LLM(tmp_path, **args)

    save_file(tensors, weights)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=200)))
    with pytest.raises(ValueError, match=r"down_proj\.weight .* does not fit"):
        LLM(tmp_path, **args)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, rope_scaling={"rope_type": "longrope", "factor": 4.0})))
    with pytest.raises(ValueError, match="'longrope' is not implemented"):
        LLM(tmp_path, **args)


def test_sampling_defaults_without_do_sample_are_said_at_start_up(tmp_path, caplog):
    """transformers decodes greedily when do_sample is absent; the engine samples, and now says so."""
    import json

    make_qwen3(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
    with _engine(tmp_path) as engine:
        assert engine.generation_defaults == {"temperature": 0.6, "top_p": 0.9}
    assert "sets temperature=0.6, top_p=0.9 without do_sample" in caplog.text
    caplog.clear()
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "do_sample": True}))
    with _engine(tmp_path):
        pass
    assert "without do_sample" not in caplog.text


def test_an_id_is_live_until_its_abort_is_reported(model_dir):
    """abort_request forgot the id at once: a new request under it got the old one's abort, then tokens."""
    with _engine(model_dir) as engine:
        engine.add_request("x", _prompt(6, 1), SamplingParams(temperature=0.0, max_tokens=3))
        assert engine.abort_request("x")
        with pytest.raises(ValueError, match="already in use"):
            engine.add_request("x", _prompt(6, 2), SamplingParams(temperature=0.0, max_tokens=3))
        assert [(o.request_id, o.finish_reason) for o in engine.step()] == [("x", "abort")]
        engine.add_request("x", _prompt(6, 2), SamplingParams(temperature=0.0, max_tokens=3))
        finishes = []
        while engine.has_unfinished_requests():
            finishes += [o.finish_reason for o in engine.step() if o.finished]
        assert finishes == ["length"]


def test_generate_keeps_the_outputs_of_requests_it_did_not_add(model_dir):
    """generate() dropped other requests' outputs: one added with add_request never reported its end."""
    with _engine(model_dir) as engine:
        engine.add_request("mine", _prompt(6, 3), SamplingParams(temperature=0.0, max_tokens=4))
        engine.generate([_prompt(5, 4)], SamplingParams(temperature=0.0, max_tokens=8))
        tokens, finish = [], None
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.request_id == "mine"
                tokens += out.new_token_ids
                finish = out.finish_reason or finish
        assert len(tokens) == 4 and finish == "length"
        assert _all_free(engine)


def test_stop_token_ids_are_bounded_and_deduplicated(model_dir):
    """Nothing bounded them: one request with two million ids slowed every request on its engine 300-fold."""
    from engine_service.sampling_params import MAX_STOP_TOKEN_IDS

    with pytest.raises(ValueError, match=f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} distinct ids"):
        SamplingParams(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))
    with pytest.raises(ValueError, match="at most"):
        SamplingParams(stop_token_ids=[1] * 2_000_000)
    params = SamplingParams(stop_token_ids=[5, 3, 5] * 1000)
    assert params.stop_token_ids == (5, 3)


def test_generate_keeps_what_belongs_to_requests_it_did_not_add(model_dir):
    """generate() lost or aborted requests a caller had added with add_request(): a generate request failing (NaN)
    dropped the rest of its step's outputs, another request's last token and finish among them; an id it made up
    that a caller's request held made it refuse and then abort the caller's request. Bytes ran as token ids."""
    from engine_service.model_runner import Collected

    params = SamplingParams(temperature=0.0, max_tokens=3)
    with _engine(model_dir, dtype="float64") as llm:
        taken = f"generate-{next(llm._ids) + 1}"  # the id generate() would make next
        llm.add_request("mine", _prompt(7, 1), params)
        llm.add_request(taken, _prompt(6, 2), params)
        llm.step(), llm.step()  # each has two tokens: the next step finishes them
        real = llm._complete

        def nan_for_generate(batch, collected, outputs):  # the generate request's logits are not finite
            llm._complete = real
            finite = [s.request_id in ("mine", taken) for s, take in zip(batch.seqs, batch.sample, strict=True)
                      if take]
            return real(batch, Collected(collected.tokens, finite, collected.logprobs, collected.prompt_logprobs),
                        outputs)

        llm._complete = nan_for_generate
        with pytest.raises(RuntimeError, match="failed: the model produced NaN"):
            llm.generate([_prompt(5, 3)], params)
        ends = {o.request_id: o.finish_reason for o in llm.step() if o.finished}
        assert ends == {"mine": "length", taken: "length"}, ends
        assert not llm.has_unfinished_requests() and llm.stats()["num_free_blocks"] == llm.stats()["num_blocks"]
        for bad, why in ((b"hi", TypeError), ([b"hello"], ValueError), ({"a": 1}, TypeError), (None, TypeError)):
            with pytest.raises(why):
                llm.generate(bad, params)
        with pytest.raises(TypeError, match="sampling_params must be a SamplingParams or a list"):
            llm.generate([[1, 2]], {"temperature": 0})
        assert llm.generate([_prompt(5, 3)], params)[0]["finish_reason"] == "length"


def test_add_request_checks_the_request_id(model_dir):
    """add_request took None, 5 and "" as ids; a list id failed with a bare 'unhashable type'. Long ids are taken:
    the engine service's own are a prefix and the client's id of up to 256 characters."""
    params = SamplingParams(max_tokens=1)
    with _engine(model_dir) as llm:
        for bad, why, words in ((None, TypeError, "must be a str"), (5, TypeError, "must be a str"),
                                (["a"], TypeError, "must be a str"), ("", ValueError, "must not be empty")):
            with pytest.raises(why, match=words):
                llm.add_request(bad, _prompt(4), params)
        assert not llm.has_unfinished_requests()
        long_id = "s12:345:" + "x" * 256
        llm.add_request(long_id, _prompt(4), params)
        assert [o.request_id for o in llm.step()] == [long_id]


def test_default_cpu_pool_rounds_a_partial_last_block_up(tmp_path):
    """The default CPU pool holds max_num_seqs sequences of max_model_len: a partly used last block counts whole
    (sized only at multiples of the block size, rounding down went unseen)."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, layers=2, dtype=torch.float32)
    # 100 tokens in blocks of 16: 7 blocks per sequence (the last partly used), 3 sequences.
    with exact_engine(tmp_path, num_kvcache_blocks=None, max_num_seqs=3, max_model_len=100) as llm:
        assert llm.runner.num_blocks == 3 * 7


def test_cpu_kvcache_gib_cap_counts_k_and_v_bytes(tmp_path):
    """cpu_kvcache_gib caps K and V together: a block's bytes count both (checked only as a ratio between cache
    dtypes, which a count of K alone kept)."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, layers=2, dtype=torch.float32)
    # float32 K and V: 2 (K, V) x 2 layers x 2 KV heads x 16 dims x 4 bytes = 512 bytes a token, 8 KiB a block.
    gib = 2 ** -14  # 64 KiB
    with exact_engine(tmp_path, dtype="float32", num_kvcache_blocks=None, cpu_kvcache_gib=gib, max_num_seqs=8,
                      max_model_len=512) as llm:
        assert llm.runner.block_bytes() == 2 * 2 * 2 * 16 * 4 * 16
        assert llm.runner.num_blocks == (64 << 10) // (8 << 10)  # 8
        assert llm.runner.k_cache.numel() * 4 * 2 <= 64 << 10
