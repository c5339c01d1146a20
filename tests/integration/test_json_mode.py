"""JSON mode through the engine (response_format="json_object"): every finished output is a JSON object, and the
masks change only the rows that ask for them, whatever the batch, overlap scheduling or preemption around them."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from engine_service import SamplingParams
from engine_service import json_grammar as jg
from tests.integration.tiny import exact_engine, make_qwen3

PROMPTS = ["Give me a JSON object:", "{", "The weather today", "x"]
MAX_TOKENS = 64


def _json(seed: int | None, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0 if seed is None else 1.0, seed=seed, max_tokens=MAX_TOKENS,
                          response_format="json_object", **kw)


def _check_document(out: dict) -> None:
    text = out["text"].encode()
    state = jg.walk(jg.INITIAL, text)
    assert state is not None, text  # never a token that leaves JSON
    if out["finish_reason"] == "stop":
        assert jg.is_done(state) and isinstance(json.loads(text), dict), text
    else:
        assert out["finish_reason"] == "length" and len(out["token_ids"]) == MAX_TOKENS and not jg.is_done(state)


def test_outputs_are_json_objects_and_free_text_is_not(demo_model_dir):
    prompts = PROMPTS * 4
    params = [_json(i) for i in range(len(prompts) - 1)] + [_json(None)]
    with exact_engine(demo_model_dir) as llm:
        outs = llm.generate(prompts, params)
        free = llm.generate(prompts, [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS)
                                      for i in range(len(prompts))])
        stats = llm.stats()
    assert stats["json_mask_misses"] > 0 and stats["json_mask_hits"] > stats["json_mask_misses"]
    assert stats["json_mask_compute_seconds"] > 0
    for out in outs:
        _check_document(out)
        assert llm.tokenizer.decode(out["token_ids"]) == out["text"]
    assert sum(o["finish_reason"] == "stop" for o in outs) >= 4  # the object's close ended them, not max_tokens
    assert stats["num_free_blocks"] == stats["num_blocks"] and not llm.cursors

    def is_object(text: str) -> bool:
        try:
            return isinstance(json.loads(text), dict)
        except ValueError:
            return False

    assert not any(is_object(o["text"]) for o in free)  # the masks, not the model, made the objects

    # An object that closes on the last token max_tokens allows finished by closing: stop, not length.
    i, out = next((i, o) for i, o in enumerate(outs) if o["finish_reason"] == "stop" and len(o["token_ids"]) > 1)
    with exact_engine(demo_model_dir) as llm:
        [again] = llm.generate([prompts[i]], replace(params[i], max_tokens=len(out["token_ids"])))
    assert again["token_ids"] == out["token_ids"] and again["finish_reason"] == "stop"


@pytest.mark.parametrize("setting, overrides", [
    ("overlap", {"overlap_scheduling": True}),
    ("preemption", {"num_kvcache_blocks": 14, "max_num_batched_tokens": 64}),
])
def test_masks_touch_only_their_rows_in_any_batch(demo_model_dir, setting, overrides):
    # Seeded draws in float64 do not depend on the batch: each request's tokens must be the same alone, beside
    # the others, with overlap scheduling, and through preemption.
    free = [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=MAX_TOKENS) for i in range(3)]
    constrained = [_json(i) for i in range(5)]
    prompts = [p * 6 for p in PROMPTS + PROMPTS[:4]]  # long enough that 8 requests need more than 14 blocks
    with exact_engine(demo_model_dir) as llm:
        alone_free = llm.generate(prompts[:3], free)
        alone_json = llm.generate(prompts[3:], constrained)
    with exact_engine(demo_model_dir, **overrides) as llm:
        mixed = llm.generate(prompts, free + constrained)
        stats = llm.stats()
    if setting == "preemption":
        assert stats["num_preemptions"] > 0, "the case did not preempt"
    assert [o["token_ids"] for o in mixed] == [o["token_ids"] for o in alone_free + alone_json]
    assert [o["finish_reason"] for o in mixed] == [o["finish_reason"] for o in alone_free + alone_json]
    for out in mixed[3:]:
        _check_document(out)


SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"},
        "ok": {"type": "boolean"},
        "level": {"enum": ["low", "high", None]},
        "scores": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "child": {"anyOf": [{"type": "null"}, {"$ref": "#/$defs/leaf"}]},
    },
    "required": ["id", "ok", "level"],
    "$defs": {"leaf": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}},
}


def test_json_schema_outputs_follow_the_schema(demo_model_dir):
    from tests.unit.test_json_schema import _conforms

    # A random model spends many tokens on whitespace: 128 let about half of the documents close.
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=128, response_format="json_schema",
                             json_schema=SCHEMA) for i in range(16)]
    with exact_engine(demo_model_dir) as llm:
        outs = llm.generate(PROMPTS * 4, params)
        stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and not llm.cursors
    node = llm.schemas.get(params[0].json_schema)
    finished = 0
    for out in outs:
        state = jg.walk(jg.initial(node), out["text"].encode())
        assert state is not None, out["text"]
        if out["finish_reason"] == "stop":
            value = json.loads(out["text"])
            assert _conforms(SCHEMA, value, SCHEMA) and list(value)[:3] == ["id", "ok", "level"], out["text"]
            finished += 1
        else:
            assert len(out["token_ids"]) == 128 and not jg.is_done(state)
    assert finished >= 4


def test_sentencepiece_model_outputs_follow_the_schema(tmp_path):
    """JSON mode on a Llama whose tokenizer is SentencePiece-style ("▁" words, <0xNN> byte tokens), as Llama 2's
    and Mistral 7B's: it used to be refused. The bytes the automaton walked are the tokens' decoded bytes."""
    from tests.integration.tiny import make_family, sentencepiece_tokenizer
    from tests.unit.test_json_schema import _conforms

    tokenizer = sentencepiece_tokenizer()
    make_family(tmp_path, "llama", vocab=len(tokenizer), dtype=torch.float64)
    tokenizer.save_pretrained(tmp_path)
    free = [_json(i) for i in range(6)]
    shaped = [SamplingParams(temperature=1.0, seed=i, max_tokens=128, response_format="json_schema",
                             json_schema=SCHEMA) for i in range(6)]
    with exact_engine(tmp_path) as llm:
        assert llm.model_info["json_object"] is True
        outs = llm.generate(PROMPTS[:3] * 4, free + shaped)
        node = llm.schemas.get(shaped[0].json_schema)
        vocab = llm.json_masks.token_bytes
        stats = llm.stats()
    assert stats["num_free_blocks"] == stats["num_blocks"] and not llm.cursors
    finished = 0
    for out, params in zip(outs, free + shaped, strict=True):
        data = b"".join(vocab[t] for t in out["token_ids"])
        state = jg.walk(jg.initial(node) if params.json_schema else jg.INITIAL, data)
        assert state is not None, data
        if out["finish_reason"] == "stop":
            assert data.decode().lstrip(" ") == out["text"].lstrip(" "), (data, out["text"])  # decoding strips a space
            value = json.loads(out["text"])
            assert jg.is_done(state) and isinstance(value, dict), out["text"]
            assert not params.json_schema or _conforms(SCHEMA, value, SCHEMA), out["text"]
            finished += 1
        else:
            assert len(out["token_ids"]) == params.max_tokens and not jg.is_done(state)
    assert finished >= 3

def test_refusals_name_the_problem(demo_model_dir, tmp_path):
    with pytest.raises(ValueError, match="min_tokens .* cannot be combined with response_format"):
        SamplingParams(response_format="json_object", min_tokens=1)
    with pytest.raises(ValueError, match="response_format must be None .*, 'json_object' or 'json_schema', got 'yaml'"):
        SamplingParams(response_format="yaml")
    with pytest.raises(ValueError, match="json_schema .* goes with response_format 'json_schema'"):
        SamplingParams(response_format="json_object", json_schema={"type": "object"})
    with pytest.raises(ValueError, match="json_schema .* goes with response_format 'json_schema'"):
        SamplingParams(response_format="json_schema")
    with exact_engine(demo_model_dir) as llm:
        with pytest.raises(ValueError, match="uses 'pattern', which this engine does not enforce"):
            llm.add_request("r", [1, 2, 3], SamplingParams(response_format="json_schema", json_schema={
                "type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}))
        assert not llm.has_unfinished_requests() and not llm.cursors
    make_qwen3(tmp_path / "no_tokenizer")
    with exact_engine(tmp_path / "no_tokenizer") as llm:
        assert llm.model_info["json_object"] is False
        with pytest.raises(ValueError, match="need the model's tokenizer"):
            llm.add_request("r", [1, 2, 3], _json(0))
        assert not llm.has_unfinished_requests()


def test_one_mask_lookup_per_token(demo_model_dir):
    # The check that a state has a next token and the next step's sampling share one lookup; a request that just
    # finished looks nothing up.
    with exact_engine(demo_model_dir) as llm:
        before = llm.stats()
        [out] = llm.generate([PROMPTS[0]], replace(_json(3), max_tokens=5))
        after = llm.stats()
    lookups = (after["json_mask_hits"] + after["json_mask_misses"]) - (before["json_mask_hits"] + before["json_mask_misses"])
    assert len(out["token_ids"]) == 5 and lookups == 5


def _drain(llm, outputs: dict) -> None:
    from engine_service.engine import EngineStepError

    while llm.has_unfinished_requests():
        try:
            got = llm.step()
        except EngineStepError as exc:
            got = exc.outputs
        for out in got:
            entry = outputs.setdefault(out.request_id, {"tokens": [], "reason": None, "error": None})
            entry["tokens"] += out.new_token_ids
            if out.finish_reason is not None:
                entry["reason"], entry["error"] = out.finish_reason, out.error


def test_a_mask_that_fails_to_compute_fails_its_request_alone(demo_model_dir, monkeypatch):
    import torch

    from engine_service.structured_output import JsonMasks

    compute = JsonMasks._compute
    calls = {"n": 0}

    def flaky(self, state):
        calls["n"] += 1
        if calls["n"] == 3:  # a miss mid-document (on CUDA: an out-of-memory error)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return compute(self, state)

    with exact_engine(demo_model_dir) as llm:
        monkeypatch.setattr(JsonMasks, "_compute", flaky)
        free = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        llm.add_request("free1", [5, 6, 7], free)
        llm.add_request("json", [5, 6, 8], _json(1))
        llm.add_request("free2", [5, 6, 9], free)
        outputs: dict = {}
        _drain(llm, outputs)
        stats = llm.stats()
    assert outputs["json"]["reason"] == "error" and "JSON mode failed: OutOfMemoryError" in outputs["json"]["error"]
    for rid in ("free1", "free2"):
        assert outputs[rid]["reason"] == "length" and len(outputs[rid]["tokens"]) == 20
    assert stats["num_free_blocks"] == stats["num_blocks"] and not llm.cursors and not llm.seqs


@pytest.mark.parametrize("overlap", [False, True])
def test_a_first_mask_that_fails_fails_its_request_alone_not_the_step_nor_the_engine(demo_model_dir, monkeypatch,
                                                                                       overlap):
    """A request's first mask is computed as its step is launched; its failure failed every request of that step
    (a free-text one beside it included), where docs/ENGINE.md says a mask that cannot be allocated fails its
    request. The free-text request now goes on, with the tokens it gets alone."""
    import torch

    from engine_service.structured_output import JsonMasks

    compute = JsonMasks._compute

    def failing(self, state):
        if state[0] == 0 and state[1][1] is not jg.FREE_OBJECT:  # a schema's first state: computed at launch
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return compute(self, state)

    with exact_engine(demo_model_dir, overlap_scheduling=overlap) as llm:
        monkeypatch.setattr(JsonMasks, "_compute", failing)
        free = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        llm.add_request("free", [5, 6, 9], free)
        outputs: dict = {"free": {"tokens": [], "reason": None, "error": None}}
        for out in llm.step():  # with overlap, the schema request is then admitted into a step scheduled ahead
            outputs["free"]["tokens"] += out.new_token_ids
        llm.add_request("schema", [5, 6, 8], SamplingParams(max_tokens=8, response_format="json_schema",
                                                            json_schema=SCHEMA))
        _drain(llm, outputs)
        assert outputs["schema"]["reason"] == "error" and "OutOfMemoryError" in outputs["schema"]["error"]
        [alone] = llm.generate([[5, 6, 9]], free)
        assert outputs["free"]["reason"] == "length" and outputs["free"]["tokens"] == alone["token_ids"]
        assert not llm.cursors and not llm.seqs and llm.stats()["num_free_blocks"] == llm.stats()["num_blocks"]
        monkeypatch.setattr(JsonMasks, "_compute", compute)
        [again] = llm.generate([[5, 6, 8]], SamplingParams(max_tokens=8, response_format="json_schema",
                                                           json_schema=SCHEMA))  # the engine goes on
    assert again["token_ids"]


@pytest.mark.parametrize("fmt", ["json_object", "json_schema"])
@pytest.mark.parametrize("overlap", [False, True])
def test_a_request_past_its_mask_budget_fails_alone(demo_model_dir, fmt, overlap):
    """A request whose mask misses take more of the engine's time than json_mask_budget_s fails, naming the
    setting; the requests beside it get the tokens they get alone, and nothing it held stays held."""
    schema = SCHEMA if fmt == "json_schema" else None
    shaped = SamplingParams(temperature=1.0, seed=7, max_tokens=40, response_format=fmt, json_schema=schema)
    free = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    with exact_engine(demo_model_dir, json_mask_budget_s=1e-9, overlap_scheduling=overlap) as llm:
        [alone] = llm.generate([[5, 6, 9]], free)
        llm.add_request("free1", [5, 6, 9], free)
        llm.add_request("json", [5, 6, 8], shaped)
        llm.add_request("free2", [5, 6, 9], free)
        outputs: dict = {}
        _drain(llm, outputs)
        stats = llm.stats()
        held = dict(llm.json_masks._holds)
    assert outputs["json"]["reason"] == "error", outputs["json"]
    assert "past json_mask_budget_s=1e-09 (the engine's --json-mask-budget-s)" in outputs["json"]["error"]
    for rid in ("free1", "free2"):
        assert outputs[rid]["reason"] == "length" and outputs[rid]["tokens"] == alone["token_ids"]
    assert stats["num_free_blocks"] == stats["num_blocks"] and not llm.cursors and not llm.seqs
    assert all(count == 1 for count in held.values())  # the schema cache's own hold, not the failed request's
    # Without a bound the same request runs to its end.
    with exact_engine(demo_model_dir, json_mask_budget_s=0) as llm:
        [out] = llm.generate([[5, 6, 8]], shaped)
    assert out["finish_reason"] in ("stop", "length") and out["token_ids"]
