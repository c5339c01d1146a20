"""NaN or infinite logits fail the request they belong to (docs/ENGINE.md), at a prompt-logprob row as at a
sampled one; the requests beside it keep their tokens."""
from __future__ import annotations

import math

import pytest

from engine_service.engine import LLM, NON_FINITE
from engine_service.sampling_params import SamplingParams


def _run(llm: LLM, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, dict]:
    for rid, (prompt, params) in requests.items():
        llm.add_request(rid, prompt, params)
    got = {rid: {"tokens": [], "error": None, "finish": None, "prompt_logprobs": None} for rid in requests}
    while llm.has_unfinished_requests():
        for out in llm.step():
            r = got[out.request_id]
            r["tokens"] += out.new_token_ids
            r["error"] = r["error"] or out.error
            r["finish"] = out.finish_reason or r["finish"]
            if out.prompt_logprobs is not None:
                r["prompt_logprobs"] = out.prompt_logprobs
    return got


def test_a_non_finite_prompt_logprob_row_fails_its_request_alone(demo_model_dir):
    """One entry of one prompt position's logits is poisoned with NaN, +inf or -inf (the sampled rows stay clean):
    the request that asked for prompt logprobs fails with the same error as at a sampled row, instead of finishing
    with NaN logprobs beside made-up top ids; the other request's tokens are a clean run's, and the engine serves
    on."""
    requests = {
        "asks": ([5, 9, 13, 17, 21, 25, 29, 33], SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=2)),
        "beside": ([40, 41, 42, 43, 44, 45], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
    }
    with LLM(str(demo_model_dir), device="cpu", dtype="float32", enforce_eager=True, max_model_len=64,
             num_kvcache_blocks=32) as llm:
        clean = _run(llm, requests)
        assert clean["asks"]["error"] is None and len(clean["asks"]["prompt_logprobs"]) == 7
        assert all(math.isfinite(lp.logprob) for lp in clean["asks"]["prompt_logprobs"])
        runner, model = llm.runner, llm.runner.model
        compute_logits, prompt_logprobs = model.compute_logits, runner._prompt_logprobs
        for n, poison in enumerate([float("nan"), float("inf"), float("-inf")]):
            in_prompt, poisoned_rows = [], []

            def poisoned_logits(hidden, in_prompt=in_prompt, poisoned_rows=poisoned_rows, poison=poison):
                logits = compute_logits(hidden)
                if in_prompt:
                    row = min(3, logits.shape[0] - 1)
                    logits[row, 11] = poison
                    poisoned_rows.append(row)
                return logits

            def marked(hidden, x, in_prompt=in_prompt):
                in_prompt.append(True)
                try:
                    return prompt_logprobs(hidden, x)
                finally:
                    in_prompt.pop()

            model.compute_logits, runner._prompt_logprobs = poisoned_logits, marked
            try:
                got = _run(llm, {f"{rid}-{n}": r for rid, r in requests.items()})
            finally:
                model.compute_logits, runner._prompt_logprobs = compute_logits, prompt_logprobs
            assert poisoned_rows, "the prompt-logprob rows were never computed"
            asks, beside = got[f"asks-{n}"], got[f"beside-{n}"]
            assert asks["error"] == NON_FINITE and asks["finish"] == "error", (poison, asks)
            assert asks["tokens"] == [] and asks["prompt_logprobs"] is None
            assert beside["error"] is None and beside["tokens"] == clean["beside"]["tokens"]
            stats = llm.stats()
            assert stats["num_running"] == stats["num_waiting"] == 0
        again = _run(llm, {f"{rid}-again": r for rid, r in requests.items()})
        assert again["asks-again"]["tokens"] == clean["asks"]["tokens"]
        assert [lp.logprob for lp in again["asks-again"]["prompt_logprobs"]] == [
            lp.logprob for lp in clean["asks"]["prompt_logprobs"]]


def test_min_tokens_whose_bans_cover_the_vocabulary_is_refused_at_the_door(tmp_path):
    """Below min_tokens the stop ids and EOS are banned (-inf): where they are every token of the vocabulary, the
    draw read a row of -inf (NaN probabilities) and returned some token, with no error. One id fewer is served."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    vocab = 96
    config = Qwen3Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                         eos_token_id=vocab - 1)
    Qwen3ForCausalLM(config).save_pretrained(tmp_path)
    with LLM(str(tmp_path), device="cpu", dtype="float32", enforce_eager=True, max_model_len=64,
             num_kvcache_blocks=16) as llm:
        assert llm.eos_token_ids == [vocab - 1]
        every = SamplingParams(min_tokens=2, max_tokens=4, stop_token_ids=list(range(vocab - 1)))
        try:
            llm.add_request("every", [1, 2, 3], every)
        except ValueError as exc:
            assert f"cover all {vocab} tokens of the vocabulary" in str(exc)
        else:
            pytest.fail("a request with every token banned below min_tokens was taken")
        assert not llm.has_unfinished_requests()
        # Without EOS's ban (ignore_eos), EOS is the one token left: the request is served, and writes it.
        left = SamplingParams(min_tokens=2, max_tokens=2, ignore_eos=True, stop_token_ids=list(range(vocab - 1)))
        out = llm.generate([[1, 2, 3]], left)[0]
        assert out["token_ids"] == [vocab - 1, vocab - 1]
