"""Overlap scheduling: the next decode step is scheduled and launched before the current one's tokens are read.

It must change nothing a caller sees: greedy tokens equal transformers' (float64 on CPU), seeded tokens equal
those without overlap, stops, aborts, arrivals, preemption and failures behave as before, and no KV block is
left behind. Each test also checks that steps really were scheduled ahead, so a silent fallback to plain
scheduling cannot pass for overlap.
"""

from __future__ import annotations

import pytest
import torch

from engine_service import LLM, SamplingParams
from engine_service.sequence import Status
from tests.integration.tiny import count_ahead, drain, hf_greedy, make_qwen3, random_prompts


@pytest.fixture(scope="module")
def model_and_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("overlap")
    return make_qwen3(path, heads=4, kv_heads=2), path


def _engine(path, overlap: bool = True, **kw) -> LLM:
    args = dict(
        device="cpu",
        dtype="float64",
        attention_backend="torch",
        kvcache_block_size=16,
        num_kvcache_blocks=64,
        max_num_batched_tokens=256,
        max_num_seqs=8,
        max_model_len=256,
        overlap_scheduling=overlap,
    )
    args.update(kw)
    return LLM(path, **args)



def _all_free(llm: LLM) -> bool:
    s = llm.stats()
    return s["num_free_blocks"] == s["num_blocks"] and s["num_running"] == 0 and s["num_waiting"] == 0


def test_default_is_off_on_cpu_and_tensor_parallel_refuses_it(model_and_dir):
    _, path = model_and_dir
    with LLM(path, device="cpu", max_num_seqs=2, max_model_len=64) as llm:
        assert llm.overlap is False
    with pytest.raises(ValueError, match="overlap_scheduling=True needs tensor_parallel_size 1"):
        LLM(path, device="cpu", tensor_parallel_size=2, overlap_scheduling=True)
    with pytest.raises(ValueError, match="overlap_scheduling must be"):
        LLM(path, device="cpu", overlap_scheduling="yes")


def test_greedy_tokens_equal_transformers(model_and_dir):
    model, path = model_and_dir
    prompts = random_prompts(1, [1, 15, 16, 17, 40, 100])
    lengths = [12, 3, 20, 1, 16, 9]  # requests finish at different steps: the batch shrinks under overlap
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in lengths]
    with _engine(path) as llm:
        ahead = count_ahead(llm)
        outs = llm.generate(prompts, params)
        assert _all_free(llm)
    assert ahead[0] >= 15
    for prompt, n, out in zip(prompts, lengths, outs, strict=True):
        assert out["token_ids"] == hf_greedy(model, prompt, n), f"prompt of {len(prompt)} tokens"
        assert out["finish_reason"] == "length"


def test_stop_tokens_computed_in_vain_are_dropped(model_and_dir):
    """A sampled stop token cannot be foreseen: the step already in flight computed a row for it in vain."""
    _, path = model_and_dir
    prompts = random_prompts(2, [10, 23, 31])
    free = SamplingParams(temperature=0.0, max_tokens=16)
    with _engine(path, overlap=False) as llm:
        greedy = [o["token_ids"] for o in llm.generate(prompts, free)]
    # Stop each request at a token it samples mid-way; one with min_tokens must run past its first one.
    params = [
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[greedy[0][4]]),
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[greedy[1][2]]),
        SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[greedy[2][1]], min_tokens=6),
    ]
    results = {}
    for overlap in (False, True):
        with _engine(path, overlap=overlap) as llm:
            ahead = count_ahead(llm)
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                llm.add_request(f"r{i}", prompt, p)
            results[overlap] = drain(llm)
            assert _all_free(llm)
            assert (ahead[0] > 0) == overlap
    assert results[True] == results[False]
    for i, g in enumerate(greedy[:2]):
        tokens, reason, finished = results[True][f"r{i}"]
        stop = params[i].stop_token_ids[0]
        assert reason == "stop" and finished == 1 and tokens == g[: g.index(stop) + 1]
    assert len(results[True]["r2"][0]) >= 6


def test_seeded_sampling_equals_plain_scheduling(model_and_dir):
    _, path = model_and_dir
    prompts = random_prompts(3, [5, 18, 33, 7])
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=10 + i, max_tokens=12 + 3 * i) for i in range(4)]
    outs, ahead = {}, {}
    for overlap in (False, True):
        with _engine(path, overlap=overlap, dtype="float32") as llm:
            ahead[overlap] = count_ahead(llm)
            outs[overlap] = [o["token_ids"] for o in llm.generate(prompts, params)]
    assert outs[True] == outs[False]
    assert ahead[True][0] > 0 and ahead[False][0] == 0  # the overlap run did schedule steps ahead


def test_abort_while_a_step_is_in_flight(model_and_dir):
    model, path = model_and_dir
    prompts = random_prompts(4, [12, 20, 28])
    p = SamplingParams(temperature=0.0, max_tokens=20)
    with _engine(path) as llm:
        for i, prompt in enumerate(prompts):
            llm.add_request(f"r{i}", prompt, p)
        got = {f"r{i}": [] for i in range(3)}
        for _ in range(4):
            for out in llm.step():
                got[out.request_id].extend(out.new_token_ids)
        assert llm._inflight is not None  # decoding steadily: a step is launched and not yet read back
        assert llm.abort_request("r1")
        rest = drain(llm)
        assert rest["r1"][1:] == ["abort", 1]
        assert rest["r1"][0] == []  # nothing after the abort, not even the row computed in vain
        for i in (0, 2):
            tokens, reason, _ = rest[f"r{i}"]
            assert reason == "length"
            assert got[f"r{i}"] + tokens == hf_greedy(model, prompts[i], 20)
        assert _all_free(llm)


def test_arrivals_during_decoding_are_admitted(model_and_dir):
    """A request that arrives while steps are scheduled ahead is admitted into the next step scheduled ahead."""
    model, path = model_and_dir
    first, late = random_prompts(5, [9, 14])
    p = SamplingParams(temperature=0.0, max_tokens=24)
    with _engine(path) as llm:
        ahead = count_ahead(llm)
        llm.add_request("first", first, p)
        tokens = {"first": [], "late": []}
        for _ in range(6):
            for out in llm.step():
                tokens[out.request_id].extend(out.new_token_ids)
        before = ahead[0]
        assert before > 0
        llm.add_request("late", late, p)
        rest = drain(llm)
        assert ahead[0] > before  # both decode ahead again once the late one has joined
        for rid, prompt in (("first", first), ("late", late)):
            assert tokens[rid] + rest[rid][0] == hf_greedy(model, prompt, 24)
        assert _all_free(llm)


def _count_ahead_with_prompts(llm: LLM) -> list[int]:
    """Counts the batches scheduled ahead beside prompt chunks (continued or newly admitted)."""
    count = [0]
    original = llm.scheduler.schedule_ahead

    def counting(batch):
        ahead = original(batch)
        count[0] += ahead is not None and ahead.starts is not None
        return ahead

    llm.scheduler.schedule_ahead = counting
    return count


def test_prompt_chunks_and_admissions_scheduled_ahead(model_and_dir):
    """Steps with prompt chunks are scheduled ahead too: a burst of long prompts over a small token budget (each
    prefilled over several steps while others decode), a shared prefix (a request whose next block the step in
    flight computes waits for it), min_tokens (counted one token ahead only for rows that decode), prompt
    logprobs and seeded sampling: the same tokens as without overlap and the same logprobs (to float64 rounding:
    the steps batch rows differently), greedy tokens equal to transformers', and every block back."""
    model, path = model_and_dir
    shared = random_prompts(7, [40])[0]
    prompts = [shared + p for p in random_prompts(8, [30, 50, 5, 70, 12, 33])] + random_prompts(9, [90, 3])
    params = [SamplingParams(temperature=0.0, max_tokens=10 + i) for i in range(4)]
    params += [SamplingParams(temperature=1.0, seed=3, max_tokens=9, min_tokens=6),
               SamplingParams(temperature=0.8, seed=4, max_tokens=7, prompt_logprobs=2, logprobs=1),
               SamplingParams(temperature=0.0, max_tokens=12), SamplingParams(temperature=0.0, max_tokens=5)]
    results = {}
    for overlap in (False, True):
        with _engine(path, overlap=overlap, max_num_batched_tokens=48, num_kvcache_blocks=96) as llm:
            mixed = _count_ahead_with_prompts(llm)
            outs = llm.generate(prompts, params)
            assert _all_free(llm)
            stats = llm.stats()
        results[overlap] = [(o["token_ids"], o.get("prompt_logprobs"), o.get("logprobs")) for o in outs]
        assert (mixed[0] >= 5) == overlap, mixed
    assert stats["prefix_cache_hits"] > 0  # the shared prefix was found cached
    assert [r[0] for r in results[True]] == [r[0] for r in results[False]]
    for (_, prompt_a, sampled_a), (_, prompt_b, sampled_b) in zip(results[True], results[False], strict=True):
        for a, b in zip((prompt_a or []) + (sampled_a or []), (prompt_b or []) + (sampled_b or []), strict=True):
            if a is None or b is None:  # the first prompt token has no logprob
                assert a is b
                continue
            assert a.top_token_ids == b.top_token_ids
            assert a.logprob == pytest.approx(b.logprob, abs=1e-9)
            assert a.top_logprobs == pytest.approx(b.top_logprobs, abs=1e-9)
    assert results[True][5][1] and results[True][5][2]  # prompt logprobs and logprobs were there to compare
    for i in (0, 1, 2, 3, 6, 7):
        assert results[True][i][0] == hf_greedy(model, prompts[i], params[i].max_tokens)


def test_preemption_and_max_model_len(model_and_dir):
    model, path = model_and_dir
    prompts = random_prompts(6, [60, 61, 62, 63])
    params = SamplingParams(temperature=0.0, max_tokens=30)
    # 4 requests need 24 blocks at their end; the pool has 12: schedule() preempts, schedule_ahead never does.
    with _engine(path, num_kvcache_blocks=12, max_num_batched_tokens=64) as llm:
        ahead = count_ahead(llm)
        outs = llm.generate(prompts, params)
        stats = llm.stats()
    assert ahead[0] > 0 and stats["num_preemptions"] > 0
    assert stats["num_free_blocks"] == stats["num_blocks"]
    for prompt, out in zip(prompts, outs, strict=True):
        assert out["token_ids"] == hf_greedy(model, prompt, 30)
    # A request that reaches max_model_len ends with 'length' and never computes a position past it.
    with _engine(path, max_model_len=64) as llm:
        out = llm.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=100))[0]
        assert _all_free(llm)
    assert out["finish_reason"] == "length" and len(out["token_ids"]) == 4
    assert out["token_ids"] == hf_greedy(model, prompts[0], 4)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "plain"])
def test_an_urgent_arrival_preempts_as_soon_as_without_overlap(model_and_dir, overlap):
    """Steps scheduled ahead never preempt, so a waiting request with a lower priority value than a running one
    must hand the next step back to schedule(): with max_num_seqs running long decodes, an urgent arrival
    preempts one and gets its first token within two steps, with or without overlap."""
    _, path = model_and_dir
    slow_a, slow_b, urgent = random_prompts(10, [12, 13, 9])
    slow = SamplingParams(temperature=0.0, max_tokens=60, priority=5)
    with _engine(path, overlap=overlap, max_num_seqs=2) as llm:
        ahead = count_ahead(llm)
        llm.add_request("a", slow_a, slow)
        llm.add_request("b", slow_b, slow)
        for _ in range(6):
            llm.step()
        assert (ahead[0] > 0) == overlap
        llm.add_request("urgent", urgent, SamplingParams(temperature=0.0, max_tokens=4, priority=0))
        first = None
        for i in range(2):
            if any(out.request_id == "urgent" and out.new_token_ids for out in llm.step()):
                first = i
                break
        assert first is not None, "the urgent request waited behind lower-priority decodes"
        assert llm.stats()["num_preemptions"] >= 1
        rest = drain(llm)
        assert _all_free(llm)
    assert rest["a"][1] == rest["b"][1] == "length"


def test_nan_logits_mid_decode_fail_only_that_request_once(model_and_dir, monkeypatch):
    model_ref, path = model_and_dir
    prompts = random_prompts(7, [8, 19])
    with _engine(path) as llm:
        model = llm.runner.model
        original = model.compute_logits
        calls = [0]

        def poisoned(hidden):
            logits = original(hidden)
            calls[0] += 1
            if calls[0] == 5:  # a decode step scheduled ahead: row 0 is "victim"
                logits[0] = float("nan")
            return logits

        monkeypatch.setattr(model, "compute_logits", poisoned)
        llm.add_request("victim", prompts[0], SamplingParams(temperature=0.0, max_tokens=12))
        llm.add_request("other", prompts[1], SamplingParams(temperature=0.0, max_tokens=12))
        outs = drain(llm)
        assert outs["victim"][1] == "error" and outs["victim"][2] == 1
        assert outs["other"][1] == "length"
        assert outs["other"][0] == hf_greedy(model_ref, prompts[1], 12)
        assert _all_free(llm)
        assert torch.isfinite(llm.runner.k_cache).all()


def test_step_failure_in_flight_fails_the_requests_and_frees_blocks(model_and_dir, monkeypatch):
    from engine_service.engine import EngineStepError

    _, path = model_and_dir
    with _engine(path) as llm:
        for i, prompt in enumerate(random_prompts(8, [10, 20])):
            llm.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=30))
        for _ in range(3):
            llm.step()
        assert llm._inflight is not None

        def broken(launched):
            raise RuntimeError("device lost")

        monkeypatch.setattr(llm.runner, "collect", broken)
        with pytest.raises(EngineStepError) as info:
            llm.step()
        failed = {o.request_id: o for o in info.value.outputs}
        assert set(failed) == {"r0", "r1"}
        assert all(o.finish_reason == "error" and "device lost" in o.error for o in failed.values())
        assert llm._inflight is None and not llm.has_unfinished_requests()
        assert _all_free(llm)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "plain"])
def test_an_interrupted_step_fails_its_requests_instead_of_corrupting_them(model_and_dir, overlap):
    """A KeyboardInterrupt in step() (Ctrl-C lands at the device sync in collect) dropped the step's tokens while a
    step ahead computed from them: the request went on with wrong tokens and no error. Without overlap, one landing
    after postprocess counted a token computed but never appended, and the request was never scheduled again. Both
    now end the step's requests with an error that the next step() reports (their tokens so far a prefix of the
    uninterrupted run's), the blocks freed, and the engine goes on serving."""
    _, path = model_and_dir
    params = SamplingParams(temperature=0.0, max_tokens=12)
    prompts = random_prompts(2, [10, 20])
    with _engine(path, overlap=overlap) as llm:
        for i, prompt in enumerate(prompts):
            llm.add_request(f"r{i}", prompt, params)
        want = drain(llm)
        for i, prompt in enumerate(prompts):
            llm.add_request(f"s{i}", prompt, params)
        llm.add_request("t", prompts[0], SamplingParams(temperature=0.0, max_tokens=5))  # finishes in that step
        got: dict[str, list] = {}
        for _ in range(4):
            for out in llm.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)
        where = llm.runner if overlap else llm.scheduler
        name = "collect" if overlap else "postprocess"
        real = getattr(where, name)

        def interrupted(*args):
            setattr(where, name, real)
            if not overlap:
                real(*args)  # the step's bookkeeping half done
            raise KeyboardInterrupt

        setattr(where, name, interrupted)
        with pytest.raises(KeyboardInterrupt):
            llm.step()
        ended = drain(llm)
        for i in range(2):
            tokens = got.get(f"s{i}", []) + ended[f"s{i}"][0]
            assert ended[f"s{i}"][1] == "error" and ended[f"s{i}"][2] == 1
            assert tokens == want[f"r{i}"][0][: len(tokens)] and len(tokens) < 12
        assert ended["t"][1] == "error" and "t" not in llm.seqs  # reported, its id free again
        assert _all_free(llm) and llm._inflight is None
        llm.add_request("after", prompts[0], params)  # still serving, with the same tokens
        assert drain(llm)["after"][0] == want["r0"][0]


def test_graph_runner_gathers_input_tokens_on_the_device(tmp_path):
    """Through the decode-graph runner's static buffers (replayed by re-running the forward on CPU), a batch
    scheduled ahead reads its input tokens from the previous step's sampled tokens."""
    from engine_service.cuda_graphs import DecodeGraphRunner

    model = make_qwen3(tmp_path, heads=4, kv_heads=2, layers=2)
    prompts = random_prompts(9, [3, 9, 17])
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in (9, 6, 3)]
    with _engine(tmp_path, kvcache_block_size=8, max_num_seqs=4, max_model_len=64) as llm:
        graphs = DecodeGraphRunner(llm.runner, [1, 2, 4], use_cuda_graphs=False)
        graphs.capture()
        llm.runner.graphs = graphs
        ahead = count_ahead(llm)
        outs = llm.generate(prompts, params)
        assert ahead[0] >= 5 and graphs.num_replays >= 6
        assert _all_free(llm)
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        assert out["token_ids"] == hf_greedy(model, prompt, p.max_tokens)


def test_abort_of_a_prompt_logprobs_request_whose_next_chunk_is_in_flight(model_and_dir):
    """An abort resets num_computed_tokens while the step scheduled ahead with the request's next chunk computes:
    the prompt logprobs that step returned are still counted from where the chunk started."""
    _, path = model_and_dir
    other, long = random_prompts(1, [5, 100])
    with _engine(path, overlap=True, max_num_batched_tokens=32) as llm:
        llm.add_request("o", other, SamplingParams(temperature=0.0, max_tokens=30))
        llm.add_request("pl", long, SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=1))
        first = llm.step()
        assert llm._inflight is not None and llm._inflight.batch.starts is not None
        assert llm.abort_request("pl")
        seen = drain(llm)
        assert seen["pl"][1] == "abort" and seen["o"][1] == "length" and len(seen["o"][0]) == 29
        assert [out.request_id for out in first] == ["o"]
        assert _all_free(llm)


def test_a_prefix_computed_by_the_step_in_flight_is_found_cached(model_and_dir):
    """A request sharing the prefix of a prompt that the step in flight completes waits for it and finds it cached,
    as without overlap."""
    _, path = model_and_dir
    shared = random_prompts(7, [32])[0]
    prompts = [shared + p for p in random_prompts(8, [8, 8])]
    cached, ahead = {}, {}
    for overlap in (False, True):
        with _engine(path, overlap=overlap, max_num_batched_tokens=48) as llm:
            ahead[overlap] = count_ahead(llm)
            outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6))
        cached[overlap] = [o["num_cached_tokens"] for o in outs]
    assert cached[True] == cached[False] == [0, 32]
    assert ahead[True][0] > 0 and ahead[False][0] == 0  # the overlap run did schedule steps ahead


def test_decodes_scheduled_ahead_beside_a_queue_keep_the_pure_decode_form(model_and_dir):
    """With max_num_seqs running and requests waiting, a step scheduled ahead that admits nothing is pure decode
    (no gathered rows), so CUDA graphs can replay it."""
    _, path = model_and_dir
    with _engine(path, overlap=True, max_num_seqs=2, max_num_batched_tokens=64) as llm:
        forms = []
        original = llm.scheduler.schedule_ahead

        def recording(batch):
            ahead = original(batch)
            if ahead is not None:
                forms.append((ahead.starts is None, all(r is not None for r in ahead.input_rows)))
            return ahead

        llm.scheduler.schedule_ahead = recording
        llm.generate(random_prompts(3, [10, 12, 9, 11]), SamplingParams(temperature=0.0, max_tokens=20))
    assert forms and all(pure for pure, decodes_only in forms if decodes_only)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "plain"])
@pytest.mark.parametrize("where", ["admit", "preempt"])
def test_an_interrupt_between_the_queues_puts_the_request_back_to_wait(model_and_dir, overlap, where):
    """Ctrl-C landing in the scheduler after a sequence was taken off one queue and before it was put on the other
    (admitted: off waiting, blocks taken; preempted: off running, blocks freed) left it in neither: never scheduled
    or reported again, its blocks held, and generate()'s clean-up raised "not in the waiting queue", so the user's
    Ctrl-C came out a ValueError and the batch's other requests ran on. It now goes back to wait, and finishes with
    the tokens it would have had."""
    _, path = model_and_dir
    params = SamplingParams(temperature=0.0, max_tokens=30)
    prompts = random_prompts(4, [20, 20])
    with _engine(path, overlap=overlap, num_kvcache_blocks=6) as llm:  # two need 8 blocks: one is preempted
        for i, prompt in enumerate(prompts):
            llm.add_request(f"r{i}", prompt, params)
        want = drain(llm)
        bm = llm.scheduler.bm
        real = bm.free_sequence if where == "preempt" else bm.append_slots

        def interrupted(seq, *args):
            real(seq, *args)
            halfway = (seq.status is Status.RUNNING and seq not in llm.scheduler.running if where == "preempt"
                       else seq.request_id == "s1" and seq.status is Status.WAITING)
            if halfway:
                setattr(bm, real.__name__, real)
                raise KeyboardInterrupt

        got: dict[str, list] = {}

        def step() -> None:
            for out in llm.step():
                got.setdefault(out.request_id, []).extend(out.new_token_ids)

        setattr(bm, real.__name__, interrupted)
        llm.add_request("s0", prompts[0], params)
        if where == "admit":
            step()
        llm.add_request("s1", prompts[1], params)
        with pytest.raises(KeyboardInterrupt):
            for _ in range(60):
                step()
        assert getattr(bm, real.__name__) == real  # it fired
        ended = drain(llm)
        for rid in ("s0", "s1"):  # each finished once: with its tokens, or as the interrupted step's error
            tokens, reason, count = ended[rid]
            tokens = got.get(rid, []) + tokens
            assert count == 1 and (reason == "error" or tokens == want["r" + rid[1]][0]), (rid, reason)
        assert ended["s1" if where == "admit" else "s0"][1] == "length"
        assert _all_free(llm) and not llm.seqs
        assert llm.generate([prompts[0]], params)[0]["token_ids"] == want["r0"][0]
