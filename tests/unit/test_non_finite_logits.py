"""NaN or infinite logits fail the request they belong to (docs/ENGINE.md), at a prompt-logprob row as at a
sampled one; the requests beside it keep their tokens."""
from __future__ import annotations

import math

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
