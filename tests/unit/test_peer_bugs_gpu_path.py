"""Failure modes other servers shipped in their CUDA-graph and overlap paths, checked against ours on CPU: the graph
runner's static buffers and padding lanes through the stand-in replay (the same buffers, the forward re-run), the
host staging buffers' fence against an asynchronous copy (stand-in events), and what a replayed step hands the
sampler with overlap scheduling on."""

from __future__ import annotations

import pytest
import torch

from engine_service import LLM, SamplingParams
from engine_service.cuda_graphs import DecodeGraphRunner
from engine_service.model_runner import StepInputs
from tests.integration.tiny import make_qwen3, random_prompts


def _plain_and_replayed(path, prompts, params, sizes, **kwargs):
    """(outputs of a plain engine, outputs through stand-in decode graphs with overlap scheduling, replays)."""
    with LLM(path, **kwargs) as llm:
        plain = llm.generate(prompts, params)
    with LLM(path, **kwargs, overlap_scheduling=True) as llm:
        graphs = DecodeGraphRunner(llm.runner, sizes, use_cuda_graphs=False)
        graphs.capture()
        llm.runner.graphs = graphs
        replayed = llm.generate(prompts, params)
        assert llm.stats()["num_free_blocks"] == llm.stats()["num_blocks"]
    return plain, replayed, graphs.num_replays


def _same_logprobs(want, got) -> None:
    for x, y in zip(want, got, strict=True):
        assert x.top_token_ids == y.top_token_ids
        assert x.logprob == pytest.approx(y.logprob, abs=1e-9)
        assert x.top_logprobs == pytest.approx(y.top_logprobs, abs=1e-9)


@pytest.fixture
def tiny64(tmp_path):
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=2, dtype=torch.float64)
    return tmp_path


def test_replayed_steps_hand_the_sampler_the_real_rows(tiny64):
    """Sampling or logprobs taken from a padding row of a replayed batch (or rows shifted by it): three sequences
    replay at size 4 with overlap scheduling, and their seeded draws, logprobs and prompt logprobs equal the plain
    engine's."""
    prompts = random_prompts(5, [3, 9, 17])
    params = [SamplingParams(temperature=1.0, seed=7, max_tokens=6, logprobs=3),
              SamplingParams(temperature=0.0, max_tokens=5, logprobs=2, prompt_logprobs=2),
              SamplingParams(temperature=0.9, top_p=0.8, seed=8, max_tokens=4, logprobs=1)]
    kwargs = dict(device="cpu", dtype="float64", attention_backend="torch", kvcache_block_size=8,
                  num_kvcache_blocks=32, max_num_seqs=4, max_model_len=64)
    plain, replayed, replays = _plain_and_replayed(tiny64, prompts, params, [1, 2, 4], **kwargs)
    assert replays >= 4
    for a, b in zip(plain, replayed, strict=True):
        assert a["token_ids"] == b["token_ids"]
        assert len(a["logprobs"]) == len(b["logprobs"]) == len(a["token_ids"])
        _same_logprobs(a["logprobs"], b["logprobs"])
    assert len(replayed[1]["prompt_logprobs"]) == len(prompts[1]) - 1
    _same_logprobs(plain[1]["prompt_logprobs"], replayed[1]["prompt_logprobs"])


def test_sequences_decoded_to_a_block_aligned_limit_through_graphs_scheduled_ahead(tiny64):
    """A block table one column wider than the captured width (a request decoded to max_model_len, a multiple of
    the block size, with its next position scheduled ahead): sequences ending exactly at the limit, the last block
    full, replay with the plain engine's tokens and never outgrow the static table."""
    prompts = random_prompts(6, [40, 47, 33])
    params = [SamplingParams(temperature=0.0, max_tokens=100) for _ in prompts]  # capped at max_model_len
    kwargs = dict(device="cpu", dtype="float64", attention_backend="torch", kvcache_block_size=8,
                  num_kvcache_blocks=32, max_num_seqs=4, max_model_len=48)
    plain, replayed, replays = _plain_and_replayed(tiny64, prompts, params, [1, 2, 4], **kwargs)
    assert replays >= 8
    for prompt, a, b in zip(prompts, plain, replayed, strict=True):
        assert len(prompt) + len(a["token_ids"]) == 48 and a["finish_reason"] == "length"
        assert a["token_ids"] == b["token_ids"] and b["finish_reason"] == "length"


def _eager_hidden(runner, x: StepInputs) -> torch.Tensor:
    """The model over x's rows as an eager step computes them (no padding, no static buffers)."""
    meta = runner._metadata(x.q_lens, x.ctx_lens, x.tables, x.slots, x.num_decode)
    ids = torch.tensor(x.ids, dtype=torch.long)
    return runner.model(ids, torch.tensor(x.positions, dtype=torch.long), runner.kv_caches, meta, runner.backend)


def _decode_step(tables: list[list[int]], ctx_lens: list[int], ids: list[int], bs: int) -> StepInputs:
    n = len(tables)
    positions = [c - 1 for c in ctx_lens]
    slots = [t[p // bs] * bs + p % bs for t, p in zip(tables, positions, strict=True)]
    return StepInputs(ids, positions, slots, [1] * n, ctx_lens, tables, list(range(n)), n)


@pytest.mark.parametrize("halved_from", [8, 4], ids=["one-batch", "two-halves"])
def test_stale_static_buffers_of_a_larger_batch_are_never_read(tmp_path, halved_from):
    """Stale data in the static buffers after a larger batch (block-table rows and columns, padding lanes' tables
    not reset): a step of 4 long sequences, then one of 3 short ones at the same size. Every cell the short step
    does not write is pointed at block 0, whose K and V are NaN: a kernel reading past a row's context, or a
    padding lane reading its table (context 0), would make its rows NaN. The replayed rows equal the eager step's,
    and every lane, padding included, is finite."""
    from tests.support import require_triton_interpreter

    require_triton_interpreter()
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=2, dtype=torch.float32)
    bs = 8
    with LLM(tmp_path, device="cpu", dtype="float32", attention_backend="triton", kvcache_block_size=bs,
             num_kvcache_blocks=40, max_num_seqs=4, max_model_len=64) as llm:
        runner = llm.runner
        graphs = DecodeGraphRunner(runner, [1, 2, 4], use_cuda_graphs=False, two_batch_overlap=True,
                                   halved_from=halved_from)
        assert (4 in graphs.halves) == (halved_from == 4)
        graphs.capture()
        gen = torch.Generator().manual_seed(0)
        for cache in (runner.k_cache, runner.v_cache):
            cache.copy_(torch.randn(cache.shape, generator=gen))
        with torch.inference_mode():
            long_step = _decode_step([list(range(1 + 7 * i, 8 + 7 * i)) for i in range(4)], [53, 50, 56, 49],
                                     [11, 12, 13, 14], bs)
            graphs.run(long_step)
            graphs.block_tables.zero_()  # every cell the next step does not write: block 0
            runner.k_cache[:, 0] = float("nan")
            runner.v_cache[:, 0] = float("nan")
            short_step = _decode_step([[30, 31], [32], [33, 34, 35]], [12, 3, 20], [5, 6, 7], bs)
            replayed = graphs.run(short_step).clone()
            assert bool(torch.isfinite(graphs.hidden[:4]).all()), "a lane read block 0 through a stale table"
            eager = _eager_hidden(runner, short_step)
        torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)


class _AsyncCopy:
    """A stand-in for the CUDA event recorded after a staging buffer's host->device copy: the copy reads the pinned
    buffer when it runs, which is when the event completes (synchronize); until then query() is False."""

    def __init__(self, stages, index: int, log: list):
        self.stages, self.index, self.log = stages, index, log
        self.pending: torch.Tensor | None = None

    def record(self, stream=None) -> None:
        assert self.pending is None, "a second copy from a buffer whose first has not run"
        self.pending = self.stages[self.index].clone()  # what the host meant the copy to carry

    def query(self) -> bool:
        return self.pending is None

    def synchronize(self) -> None:
        if self.pending is not None:
            # The copy runs now and reads the buffer as it is: it must still hold what was there at launch.
            self.log.append(torch.equal(self.stages[self.index], self.pending))
            self.pending = None


def test_a_staging_buffer_is_refilled_only_after_its_copy_ran(tiny64, monkeypatch):
    """A pinned host buffer refilled for step N + 2 before step N's asynchronous copy out of it ran (overlap: the
    host builds steps ahead of the device): with no copy ever completing on its own, each buffer is waited on before
    it is written again, never overwritten under a pending copy, and the two buffers alternate."""
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    with LLM(tiny64, device="cpu", dtype="float64", attention_backend="torch", kvcache_block_size=8,
             num_kvcache_blocks=32, max_num_seqs=4, max_model_len=64) as llm:
        graphs = DecodeGraphRunner(llm.runner, [1, 2, 4], use_cuda_graphs=False)
        graphs.capture()
        log: list[bool] = []
        graphs._copied = [_AsyncCopy(graphs._stages, i, log) for i in range(2)]
        with torch.inference_mode():
            for step in range(5):
                ids = [3 + step, 4 + step, 5 + step][: 1 + step % 3]
                x = _decode_step([[1, 2], [3], [4, 5]][: len(ids)], [9 + step, 2 + step, 10][: len(ids)], ids, 8)
                graphs.run(x)
                assert graphs.input_ids[: len(ids)].tolist() == ids
        assert log == [True, True, True]  # steps 2, 3 and 4 each waited for the copy two steps back
        assert [e.pending is not None for e in graphs._copied] == [True, True]
