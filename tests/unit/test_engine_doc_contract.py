"""docs/ENGINE.md's scheduler, KV-cache and sampling statements, held to the code that makes them true.

Each test names the statement it checks. Pure Python over the scheduler and block manager (no model, no torch
forward): a user tuning the engine relies on these rules, and a change to one must change the doc too.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine_service import sampling_params as sp_module
from engine_service.block_manager import BlockManager
from engine_service.sampling_params import SamplingParams
from engine_service.scheduler import ScheduledBatch, Scheduler
from engine_service.sequence import Sequence, Status

DOC = (Path(__file__).resolve().parents[2] / "docs" / "ENGINE.md").read_text()


def _flat(text: str) -> str:
    return " ".join(text.split())


def _step(s: Scheduler, token: int = 1):
    b = s.schedule()
    s.postprocess(b, [token if t else None for t in b.sample])
    return b


def test_the_doc_numbers_for_logprobs_and_greedy_are_the_codes():
    """"0 to `MAX_LOGPROBS`, 20" and "greedy below temperature 1e-5": the constants the validation and the sampler
    use, read from the doc so that a change on either side fails here."""
    doc = _flat(DOC)
    m = re.search(r"0 to `MAX_LOGPROBS`, (\d+)\)", doc)
    assert m and int(m.group(1)) == sp_module.MAX_LOGPROBS
    m = re.search(r"greedy below temperature ([0-9.e-]+) ", doc)
    assert m and float(m.group(1)) == sp_module.GREEDY_EPS
    assert SamplingParams(temperature=sp_module.GREEDY_EPS * 0.99).greedy
    assert not SamplingParams(temperature=sp_module.GREEDY_EPS).greedy


def test_a_prefill_chunk_takes_the_budget_left_after_one_token_per_decode():
    """"a decoding sequence computes its one token; a prefilling one computes a chunk of whatever token budget is
    left after one token is reserved per decode" - reserved also for decodes that run after the prefill (here a
    lower-priority decode behind an urgent prompt), so a step never passes max_num_batched_tokens; one-token rows
    come first in the batch."""
    s = Scheduler(BlockManager(64, 4), 8, 10)
    decoders = [Sequence(f"d{i}", [1, 2], SamplingParams(max_tokens=50, ignore_eos=True, priority=5), 256)
                for i in range(3)]
    for q in decoders:
        s.add(q)
    _step(s)  # all three prefill (2 tokens each) and sample
    long = Sequence("long", list(range(40)), SamplingParams(max_tokens=5), 256)
    s.add(long)
    for _ in range(3):
        b = _step(s)
        assert b.num_tokens == 10
        assert [q.request_id for q in b.seqs][-1] == "long" and b.num_new_tokens == [1, 1, 1, 10 - 3]
    assert s.running[0] is long  # its chunks were taken ahead of the decodes in running order


def test_when_blocks_run_out_the_most_recently_admitted_is_preempted_freed_and_requeued_at_the_front():
    """"When blocks run out, the most recently admitted running sequence is preempted (blocks freed, requeued at
    the front, recomputed later)": whichever sequence's growth ran out (here the first to need a second block is
    the newest, c; then a, the oldest, needs a third), the victim is the newest running one."""
    bm = BlockManager(6, 4, enable_prefix_caching=False)
    s = Scheduler(bm, 4, 64)
    # Each fits the pool alone (at most 4 blocks), all three do not; prompt lengths stagger when each grows.
    a = Sequence("a", [1], SamplingParams(max_tokens=14, ignore_eos=True), 256)
    b = Sequence("b", [2, 3], SamplingParams(max_tokens=14, ignore_eos=True), 256)
    c = Sequence("c", [4, 5, 6], SamplingParams(max_tokens=13, ignore_eos=True), 256)
    for q in (a, b, c):
        s.add(q)
    _step(s)
    assert a.status is b.status is c.status is Status.RUNNING
    for _ in range(50):
        if not bm.num_free_blocks:
            break
        _step(s)
    late = Sequence("late", [7], SamplingParams(max_tokens=2), 256)
    s.add(late)  # waits: no block is free
    for _ in range(50):
        _step(s)
        if s.num_preemptions:
            break
    assert s.num_preemptions == 1
    assert c.status is Status.WAITING and a.status is b.status is Status.RUNNING  # c was admitted last
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert s.waiting[0] is c  # before `late`, which arrived earlier than c's preemption
    assert bm.num_free_blocks == bm.num_blocks - len(a.block_table) - len(b.block_table)
    # Recomputed later, its tokens kept: it is readmitted over its whole length.
    length = len(c.token_ids)
    for _ in range(50):
        if c.status is Status.RUNNING:
            break
        _step(s)
    assert c.status is Status.RUNNING and c.token_ids[:length] == [4, 5, 6] + [1] * (length - 3)


def test_a_long_shared_prompt_past_the_budget_is_computed_for_the_documented_tokens():
    """"a 2,048-token prompt at a 1,536-token budget is computed for 2,560 tokens, not 2,048": two requests with the
    same prompt; the second waits one step for the blocks the first is computing, then matches the 1,536 tokens
    published and computes the other 512 itself."""
    doc = _flat(DOC)
    m = re.search(r"a ([\d,]+)-token prompt at a ([\d,]+)-token budget is computed for ([\d,]+) tokens, not ([\d,]+)", doc)
    assert m, "the measurement's sentence moved"
    prompt_len, budget, computed_doc, alone = (int(g.replace(",", "")) for g in m.groups())
    assert alone == prompt_len
    s = Scheduler(BlockManager(1024, 16), 8, budget)
    prompt = [(i * 7) % 1000 + 1 for i in range(prompt_len)]
    seqs = [Sequence(r, prompt, SamplingParams(max_tokens=2, ignore_eos=True), 8192) for r in "ab"]
    for q in seqs:
        s.add(q)
    computed = 0
    while any(q.num_output_tokens == 0 for q in seqs):
        b = s.schedule()
        for q, n in zip(b.seqs, b.num_new_tokens, strict=True):
            computed += max(0, min(q.num_computed_tokens + n, q.num_prompt_tokens) - q.num_computed_tokens)
        s.postprocess(b, [1 if t else None for t in b.sample])
    assert computed == computed_doc


def test_a_sequence_that_reaches_max_model_len_finishes_with_length():
    """"A sequence that reaches `max_model_len` finishes with `length`", before max_tokens."""
    s = Scheduler(BlockManager(16, 4), 4, 16)
    q = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True), 6)
    s.add(q)
    while q.status is not Status.FINISHED:
        _step(s)
    assert q.finish_reason == "length" and len(q.token_ids) == 6 and q.block_table == []


def test_abort_frees_the_blocks_at_once():
    """"`abort_request(id)` frees the blocks at once" (the scheduler's half of it)."""
    bm = BlockManager(16, 4)
    s = Scheduler(bm, 4, 16)
    q = Sequence("a", list(range(1, 10)), SamplingParams(max_tokens=5), 64)
    s.add(q)
    _step(s)
    assert bm.num_free_blocks < 16
    s.abort(q)
    assert bm.num_free_blocks == 16 and q.finish_reason == "abort" and not s.has_unfinished()


def test_overlap_leaves_out_a_sequence_that_the_step_in_flight_brings_to_max_len():
    """Overlap scheduling: "A sequence that N brings to `max_len` is left out of N+1"."""
    s = Scheduler(BlockManager(16, 4), 4, 16)
    short = Sequence("short", [1, 2], SamplingParams(max_tokens=2, ignore_eos=True), 64)
    other = Sequence("other", [3, 4], SamplingParams(max_tokens=10, ignore_eos=True), 64)
    s.add(short)
    s.add(other)
    _step(s)  # both sampled their first token
    n = s.schedule()  # short samples its last token here (2 outputs = max_len)
    ahead = s.schedule_ahead(n)
    assert ahead is not None and ahead.seqs == [other]
    # The same beside a prompt still prefilling (the form with prompt chunks).
    s = Scheduler(BlockManager(64, 4), 4, 6)
    short = Sequence("short", [1, 2], SamplingParams(max_tokens=2, ignore_eos=True), 64)
    long = Sequence("long", list(range(3, 15)), SamplingParams(max_tokens=4, ignore_eos=True), 64)
    s.add(short)
    s.add(long)
    _step(s)  # short prefills and samples; long takes a chunk of 4
    n = s.schedule()  # short decodes to max_len, long takes a chunk of 5 (of 12)
    assert long in n.seqs and long.num_computed_tokens + 5 < len(long)
    ahead = s.schedule_ahead(n)
    assert ahead is not None and ahead.seqs == [long]


@pytest.mark.parametrize("case", ["json", "urgent_waiting", "left_out"])
def test_overlap_hands_back_to_schedule_in_the_documented_cases(case):
    """`schedule_ahead` returns None when a JSON-mode request runs, when a waiting request has a lower priority
    value than a running one, and when a running sequence was left out of N (no budget for its chunk)."""
    s = Scheduler(BlockManager(64, 4), 4, 6)
    fmt = "json_object" if case == "json" else None
    a = Sequence("a", [1, 2], SamplingParams(max_tokens=10, ignore_eos=True, priority=5, response_format=fmt), 64)
    s.add(a)
    if case == "left_out":
        s.add(Sequence("b", [1, 3], SamplingParams(max_tokens=10, priority=5), 64))
    _step(s)
    if case == "urgent_waiting":
        s.add(Sequence("u", [9], SamplingParams(max_tokens=3, priority=0), 64))
        # (schedule() admits it into the free slot; a second one keeps one waiting)
    n = s.schedule()
    if case == "urgent_waiting":
        s.add(Sequence("u2", [9, 9], SamplingParams(max_tokens=3, priority=0), 64))
    if case == "left_out":  # a batch that left b out (as one with no budget for b's chunk does)
        assert len(n.seqs) == 2
        n = ScheduledBatch(n.seqs[:1], n.num_new_tokens[:1], n.sample[:1])
    else:
        assert s.schedule_ahead(ScheduledBatch(list(n.seqs), list(n.num_new_tokens), list(n.sample))) is None
    assert s.schedule_ahead(n) is None


def test_a_token_budget_below_max_num_seqs_is_refused_naming_both():
    """The arguments table: `max_num_batched_tokens` "must be at least `max_num_seqs`" (every running decode is
    scheduled every step); equal is taken."""
    from engine_service.config import EngineConfig

    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(7\) must be at least max_num_seqs \(8\)"):
        EngineConfig(model="m", max_num_batched_tokens=7, max_num_seqs=8)
    assert EngineConfig(model="m", max_num_batched_tokens=8, max_num_seqs=8).max_num_batched_tokens == 8


@pytest.mark.parametrize("urgent", [False, True])
def test_a_step_that_preempts_admits_nobody(urgent):
    """"Then waiting sequences are admitted ... (none in a step that preempted)": a request that fitted when the
    step began waits for the next step, even though the victim's blocks are free by then. An urgent one (a lower
    priority value) is not held back so: the room made for it before the step counts the blocks the running
    decodes take, so the victim goes first and it starts in this step."""
    bm = BlockManager(3, 4, enable_prefix_caching=False)
    s = Scheduler(bm, 4, 64)
    r = Sequence("r", [1, 2, 3, 4], SamplingParams(max_tokens=8, ignore_eos=True, priority=5), 256)
    v = Sequence("v", [5, 6, 7, 8], SamplingParams(max_tokens=8, ignore_eos=True, priority=5), 256)
    s.add(r)
    s.add(v)
    _step(s)  # one block each; both now need a second block to compute their fifth token
    assert bm.num_free_blocks == 1
    w = Sequence("w", [9], SamplingParams(max_tokens=2, priority=0 if urgent else 5), 256)
    s.add(w)  # fits the one free block
    b = _step(s)
    assert s.num_preemptions == 1 and v.status is Status.WAITING  # r took a block; v, the newest, went
    assert (w.status is Status.RUNNING and w in b.seqs) if urgent else (w.status is Status.WAITING and w not in b.seqs)


def test_the_doc_numbers_for_limits_are_the_codes():
    """The limits docs/ENGINE.md states in words (JSON mode's bounds and caches, logit_bias, stop ids, prompt
    logprobs), each as the constant the code uses: a change on either side fails here."""
    from engine_service import json_grammar, json_schema, structured_output

    doc = _flat(DOC)
    sp = sp_module
    phrases = [
        f"at most {json_grammar.MAX_WS_RUN} whitespace bytes in a row",
        f"at most {json_grammar.MAX_DEPTH} nested containers",
        f"cached by the schema's text, {json_schema.COMPILED_CACHE_SIZE} schemas)",
        f"schemas over {json_schema.MAX_SCHEMA_BYTES // 1024} KiB, {json_schema.MAX_NODES:,} nodes or "
        f"{json_schema.MAX_SCHEMA_DEPTH} levels of nesting",
        f"whose key choices pass {json_schema.MAX_KEY_CHOICES:,}",
        f"`minItems`/`maxItems` over {json_schema.MAX_ITEMS_BOUND:,}",
        f"({structured_output.MASK_CACHE_BYTES >> 20} MiB at most, each mask counted in whole "
        f"{structured_output.MASK_BLOCK_BYTES}-byte blocks",
        f"a bias in [-{sp.MAX_LOGIT_BIAS:g}, {sp.MAX_LOGIT_BIAS:g}] (at most {sp.MAX_LOGIT_BIAS_TOKENS:,} tokens;",
        f"or more than {sp.MAX_STOP_TOKEN_IDS:,} distinct ids",
        f"`prompt_logprobs=N` (0 to {sp.MAX_LOGPROBS})",
    ]
    missing = [p for p in phrases if p not in doc]
    assert not missing, missing
    assert json_schema.MAX_SCHEMA_BYTES % 1024 == 0 and structured_output.MASK_CACHE_BYTES % (1 << 20) == 0


def test_the_documented_off_values_are_the_defaults():
    """"`repetition_penalty` (...; 1.0 off)", "presence_penalty and frequency_penalty (...; 0.0 off)", priority "0 by
    default": an unset request has them, and costs no penalty slot."""
    p = SamplingParams()
    doc = _flat(DOC)
    stated = [f"`repetition_penalty` (above 0; {p.repetition_penalty} off)",
              f"`presence_penalty` and `frequency_penalty` ([-2, 2]; {p.presence_penalty} off)",
              f"lower first (vLLM's convention), {p.priority} by default"]
    assert not [phrase for phrase in stated if phrase not in doc], stated
    assert p.frequency_penalty == p.presence_penalty
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.priority) == (1.0, 0.0, 0.0, 0)
    assert p.penalized is False and SamplingParams(presence_penalty=0.1).penalized is True
    assert p.logit_bias == () and p.response_format is None and p.logprobs is None and p.prompt_logprobs is None
