"""KV-cache sizing at the edges, on CPU: the GPU budget (gpu_memory_utilization after other processes and the
warm-up's peak) with stand-ins for the CUDA memory queries, the errors when nothing fits and the setting they say
would fit, the CPU cap, the warm-up's full-budget step, and the decode-graph runner's per-size settings."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from engine_service.cuda_graphs import pack_decode_inputs
from engine_service.model_runner import StepInputs

BLOCK = 16
# 2 layers x 2 KV heads x 16 dims, float32: K and V of one token take 2 * 2 * 2 * 16 * 4 = 512 bytes.
BLOCK_BYTES = 512 * BLOCK


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.integration.tiny import make_qwen3

    path = tmp_path_factory.mktemp("kv_sizing")
    make_qwen3(path, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=2, dtype=torch.float32)
    return path


def _llm(model_dir, **overrides):
    from engine_service import LLM

    args = dict(device="cpu", dtype="float32", attention_backend="torch", enforce_eager=True,
                kvcache_block_size=BLOCK, num_kvcache_blocks=8, max_num_seqs=4, max_num_batched_tokens=64,
                max_model_len=100)
    args.update(overrides)
    return LLM(str(model_dir), **args)


def _fake_gpu(monkeypatch, runner, *, total, free, reserved, peak, util):
    """runner sized as on a GPU of `total` bytes with `free` free, `reserved` of them held by torch's cache."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a, **k: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a, **k: reserved)
    runner._warmup_peak_bytes = peak
    runner.config = dataclasses.replace(runner.config, num_kvcache_blocks=None, gpu_memory_utilization=util)


def test_gpu_pool_is_what_the_utilization_leaves_after_other_processes_and_the_warm_up_peak(model_dir, monkeypatch):
    with _llm(model_dir) as llm:
        runner = llm.runner
        assert runner.block_bytes() == BLOCK_BYTES
        total = 1000 * BLOCK_BYTES
        # Others hold 150 blocks' worth; torch reserved 300 (the weights and the warm-up's cache); the peak was 100.
        _fake_gpu(monkeypatch, runner, total=total, free=total - 150 * BLOCK_BYTES - 300 * BLOCK_BYTES,
                  reserved=300 * BLOCK_BYTES, peak=100 * BLOCK_BYTES + 7, util=0.5)
        monkeypatch.setattr(runner, "device", torch.device("cuda", 0))  # _decide_num_blocks takes the GPU branch
        assert runner._decide_num_blocks() == 500 - 150 - 100 - 1  # the 7 bytes over cost a whole block
        runner.config = dataclasses.replace(runner.config, num_kvcache_blocks=12)
        assert runner._decide_num_blocks() == 12  # an explicit pool is taken as it is


def _advised(message: str, flag: str) -> float:
    found = re.search(rf"raise {flag} to at least ([0-9.e-]+)", message)
    assert found, message
    return float(found.group(1))


def test_gpu_error_names_the_utilization_that_holds_one_max_model_len_sequence(model_dir, monkeypatch):
    """Not one block fits: the error says what took the memory, and the gpu_memory_utilization at which one
    sequence of max_model_len fits; that value does fit one, and 0.01 less does not."""
    with _llm(model_dir, max_model_len=100) as llm:
        runner = llm.runner
        total = 1000 * BLOCK_BYTES
        others, peak = 145 * BLOCK_BYTES, 100 * BLOCK_BYTES
        fake = dict(total=total, free=total - others, reserved=0, peak=peak)
        _fake_gpu(monkeypatch, runner, **fake, util=0.2455)  # half a block left
        with pytest.raises(ValueError, match="no GPU memory left for the KV cache") as err:
            runner._gpu_num_blocks()
        message = str(err.value)
        assert "gpu_memory_utilization=0.2455 " in message and "max_num_batched_tokens 64" in message
        util = _advised(message, "gpu_memory_utilization")
        _fake_gpu(monkeypatch, runner, **fake, util=util)
        # A 100-token sequence takes 99 slots (its last token is sampled, never stored): 7 blocks of 16.
        assert runner._gpu_num_blocks() * BLOCK + 1 >= 100
        _fake_gpu(monkeypatch, runner, **fake, util=round(util - 0.01, 2))
        assert runner._gpu_num_blocks() * BLOCK + 1 < 100


def test_gpu_error_when_even_the_whole_device_cannot_hold_a_block_names_what_to_lower(model_dir, monkeypatch):
    with _llm(model_dir) as llm:
        runner = llm.runner
        total = 100 * BLOCK_BYTES
        _fake_gpu(monkeypatch, runner, total=total, free=total - 60 * BLOCK_BYTES, reserved=0,
                  peak=45 * BLOCK_BYTES, util=1.0)
        with pytest.raises(ValueError, match="more than the whole device leaves") as err:
            runner._gpu_num_blocks()
        assert "raise gpu_memory_utilization" not in str(err.value)
        for knob in ("lower max_num_batched_tokens", "max_num_seqs", "max_model_len", "kv_cache_dtype='fp8'",
                     "tensor_parallel_size"):
            assert knob in str(err.value)


def test_cpu_cap_below_one_block_is_refused_with_the_cap_that_would_serve(model_dir):
    """A cpu_kvcache_gib under one block used to give a 1-block pool anyway (past the cap, sequences of 17 tokens
    at most); now it is refused, naming the cap for one block and for one max_model_len sequence, which work."""
    with pytest.raises(ValueError, match=r"cpu_kvcache_gib=1e-06 holds no KV block") as err:
        _llm(model_dir, num_kvcache_blocks=None, cpu_kvcache_gib=1e-6)
    one_block = _advised(str(err.value), "cpu_kvcache_gib")
    one_sequence = float(re.search(r"([0-9.e-]+) to hold one sequence of max_model_len 100", str(err.value))[1])
    with _llm(model_dir, num_kvcache_blocks=None, cpu_kvcache_gib=one_block) as llm:
        assert llm.runner.num_blocks == 1
    with _llm(model_dir, num_kvcache_blocks=None, cpu_kvcache_gib=one_sequence) as llm:
        assert llm.runner.num_blocks * BLOCK + 1 >= 100 == llm.max_model_len


@pytest.mark.parametrize(("max_model_len", "max_num_seqs", "prompts"), [
    (17, 8, [17, 17, 17, 13]),  # a 64-token budget in prompts of max_model_len, the last the remainder
    (24, 2, [24, 24]),  # at most max_num_seqs prompts
    (100, 4, [64]),  # max_model_len above the budget: one prompt of the budget
])
def test_warm_up_forwards_a_full_step_of_the_budget(model_dir, monkeypatch, max_model_len, max_num_seqs, prompts):
    """The warm-up's peak sizes the KV cache, so its first forward must be as large as a step can be: a step packs
    max_num_batched_tokens into prompt chunks of up to max_model_len each. It used to run one prompt of
    min(budget, max_model_len) tokens, a quarter of the 64-token step here when max_model_len is 17. Then one
    short prefill per WARMUP_QUERY_LENS under the longest prompt."""
    from engine_service.model_runner import ModelRunner

    with _llm(model_dir, max_model_len=max_model_len, max_num_seqs=max_num_seqs, num_kvcache_blocks=32) as llm:
        runner = llm.runner
        seen = []
        forward = runner.backend.forward

        def spy(q, k, v, k_cache, v_cache, meta, scale):
            seen.append((list(meta.q_lens), meta.slot_mapping.tolist(), meta.block_tables.tolist(), k_cache.shape[0]))
            return forward(q, k, v, k_cache, v_cache, meta, scale)

        positions = []
        model_forward = runner.model.forward

        def spy_model(ids, pos, *args, **kwargs):
            positions.append(pos.tolist())
            return model_forward(ids, pos, *args, **kwargs)

        monkeypatch.setattr(runner.backend, "forward", spy)
        monkeypatch.setattr(runner.model, "forward", spy_model)
        for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 4321)
        assert runner._warm_up() == 4321

    layers = 2
    shorts = [q for q in ModelRunner.WARMUP_QUERY_LENS if q < max(prompts)]
    assert [s[0] for s in seen[::layers]] == [prompts, *([q] for q in shorts)]
    q_lens, slots, tables, cache_blocks = seen[0]
    assert sum(q_lens) == min(64, max_num_seqs * max_model_len)
    assert positions[0] == [p for q in prompts for p in range(q)]  # each prompt from position 0
    # Every token its own slot, in its own prompt's blocks of the throwaway cache.
    assert len(set(slots)) == len(slots) and max(slots) < cache_blocks * BLOCK
    at = 0
    for q, table in zip(q_lens, tables, strict=True):
        assert [table[s // BLOCK] for s in range(q)] == [slot // BLOCK for slot in slots[at : at + q]]
        at += q


def test_pack_refuses_more_rows_than_the_halves_hold():
    """pick_size never asks for it; a caller that did got a silently longer, shifted layout."""
    with pytest.raises(ValueError, match="do not fit"):
        pack_decode_inputs([1] * 6, [0] * 6, [0] * 6, [1] * 6, [[1]] * 6, 5, half=3)  # 3 | 3 rows, lanes 3 | 2
    flat, width = pack_decode_inputs([1], [0], [0], [0], [[]], 2)
    assert width == 1 and flat[10:] == [0]  # a table row is at least one entry wide


def _decode_step(n: int) -> StepInputs:
    return StepInputs(ids=[1] * n, positions=[3] * n, slots=[3] * n, q_lens=[1] * n, ctx_lens=[4] * n,
                      tables=[[0]] * n, sample_rows=list(range(n)), num_decode=n)


def test_graph_runner_fixes_each_lane_counts_split_kv_from_the_kv_heads_per_rank(model_dir, monkeypatch):
    """The triton backend's split-KV count is fixed per captured size and per half (two-batch overlap), from that
    many lanes and the KV heads (not the query heads); the largest size runs a batch that fills it, a step whose
    ids are gathered beside prompt chunks does not."""
    from engine_service.attention import triton_kernels as tk
    from engine_service.cuda_graphs import DecodeGraphRunner

    calls = []

    def splits(num_seqs, num_kv_heads, max_seqlen_q, device):
        calls.append((num_kv_heads, max_seqlen_q))
        return 100 * num_seqs + num_kv_heads

    monkeypatch.setattr(tk, "default_num_kv_splits", splits)
    with _llm(model_dir, max_num_seqs=8) as llm:
        monkeypatch.setattr(llm.runner, "backend_name", "triton")  # only its name is read here
        graphs = DecodeGraphRunner(llm.runner, [1, 2, 7, 8], use_cuda_graphs=False, two_batch_overlap=True,
                                   halved_from=5)
        assert graphs.halves == {7: 4, 8: 4}
        assert set(calls) == {(2, 1)}  # 2 KV heads (4 query heads), one query row per lane
        assert graphs.metadata(2).cache["num_kv_splits"] == 202
        assert graphs.metadata(7, 4).cache["num_kv_splits"] == 302  # the second half of 7 lanes: 3 lanes
        assert graphs.metadata(4).cache["num_kv_splits"] == 402
        assert graphs.metadata(8, 4).cache["num_kv_splits"] == 402
        graphs.graphs = {8: None}  # captured (a stand-in)
        assert graphs.can_run(_decode_step(8)) and not graphs.can_run(_decode_step(9))
        gathered = _decode_step(3)
        gathered.gather_rows, gathered.gather_src = [0], [0]
        assert not graphs.can_run(gathered)


def test_an_explicit_gpu_pool_that_leaves_no_room_for_a_full_step_is_refused_with_what_fits(model_dir, monkeypatch):
    """num_kvcache_blocks on a GPU is taken as it is when it fits beside other processes and the warm-up's peak in
    the whole device (gpu_memory_utilization does not bind it); past that it is refused naming the most that fit,
    where allocating it failed with torch's bare out-of-memory error, or a full prefill step did mid-serving."""
    with _llm(model_dir) as llm:
        runner = llm.runner
        total = 1000 * BLOCK_BYTES
        _fake_gpu(monkeypatch, runner, total=total, free=total - 150 * BLOCK_BYTES - 300 * BLOCK_BYTES,
                  reserved=300 * BLOCK_BYTES, peak=100 * BLOCK_BYTES + 7, util=0.5)
        monkeypatch.setattr(runner, "device", torch.device("cuda", 0))
        fits = 1000 - 150 - 100 - 1
        runner.config = dataclasses.replace(runner.config, num_kvcache_blocks=fits)
        assert runner._decide_num_blocks() == fits  # above what util=0.5 sizes (249), within the device
        runner.config = dataclasses.replace(runner.config, num_kvcache_blocks=fits + 1)
        with pytest.raises(ValueError, match=f"num_kvcache_blocks={fits + 1} does not fit") as err:
            runner._decide_num_blocks()
        assert f"set num_kvcache_blocks to at most {fits}," in str(err.value)


@pytest.mark.parametrize("v2, v1, limit", [
    ("max", None, None),  # cgroup v2, unlimited
    ("1073741824", None, 1 << 30),  # cgroup v2, a pod's limits.memory
    (None, "536870912", 1 << 29),  # cgroup v1 (it was not read: a v1 pod's limit was ignored)
    (None, str((1 << 63) - 4096), None),  # cgroup v1, unlimited: a number past any RAM
    (None, None, None),  # neither
])
def test_host_memory_is_the_ram_or_a_cgroup_limit_below_it_v1_or_v2(tmp_path, v2, v1, limit):
    import os

    from engine_service.model_runner import _host_memory_bytes

    files = []
    for name, text in (("memory.max", v2), ("memory.limit_in_bytes", v1)):
        files.append(str(tmp_path / name))
        if text is not None:
            (tmp_path / name).write_text(text + "\n")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert _host_memory_bytes(tuple(files)) == (ram if limit is None else min(ram, limit))
