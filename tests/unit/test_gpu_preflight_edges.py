"""CUDA-only paths run on CPU before a GPU session spends device time on them: gpu_check part p's warm-up on an
engine whose max_model_len is the model's (as every GPU engine there is), and two-batch overlap's stream plumbing
with stand-ins for the CUDA stream calls."""

from __future__ import annotations

import contextlib

import torch

from engine_service.attention.base import AttentionBackend
from engine_service.model_runner import StepInputs


def _engine(path, **overrides):
    from engine_service import LLM

    args = dict(device="cpu", dtype="float32", attention_backend="torch", enforce_eager=True, kvcache_block_size=8,
                num_kvcache_blocks=64, max_num_seqs=8, max_num_batched_tokens=64)
    args.update(overrides)
    return LLM(str(path), **args)


def test_gpu_check_warm_takes_the_engines_max_model_len_when_none_was_given(tmp_path, monkeypatch):
    """Part p's engines leave max_model_len unset (config.max_model_len None): _warm read the config's and raised
    TypeError before every timed run, so part p measured nothing. Its prefill is the budget, at most the engine's
    max_model_len less the two tokens it generates."""
    from scripts.gpu_check import _warm
    from tests.integration.tiny import make_qwen3

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=2, dtype=torch.float32, max_pos=48)
    with _engine(tmp_path) as llm:
        assert llm.config.max_model_len is None and llm.max_model_len == 48
        prompts = []
        generate = llm.generate

        def spy(batch, params):
            prompts.extend(len(p) for p in batch)
            return generate(batch, params)

        monkeypatch.setattr(llm, "generate", spy)
        _warm(llm)
        llm.scheduler.max_num_batched_tokens = 20
        _warm(llm)
    assert prompts == [46, 20]


class _Stream:
    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def wait_stream(self, other: _Stream) -> None:
        self.log.append(("wait", self.name, other.name))


class _OutBackend(AttentionBackend):
    """The torch backend taking `out=` as the triton backend does (the only one graphs capture), noting the stream
    its attention is issued on."""

    def __init__(self, inner, current: list, log: list):
        self.inner, self.current, self.log = inner, current, log
        self.name, self.takes_stored_kv = inner.name, inner.takes_stored_kv

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, out=None):
        self.log.append(("attention", self.current[-1].name))
        got = self.inner.forward(q, k, v, k_cache, v_cache, meta, scale)
        return got if out is None else out.copy_(got)


def test_two_batch_overlap_on_streams_matches_one_stream_and_joins_them(tmp_path, monkeypatch):
    """cuda_graphs._forward_halves' CUDA branch (each half on a stream of its own, both halves' attention on the
    calling stream through _AttentionOn, the halves joined back before their rows are put in order) with stand-ins
    for torch.cuda's stream calls: the same hidden states as on one stream, every attention on the calling stream,
    each side stream forked from it first and joined into it, and each half's output recorded on it."""
    from engine_service.cuda_graphs import DecodeGraphRunner
    from tests.integration.tiny import make_qwen3

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=2, dtype=torch.float32)
    log: list = []
    current = [_Stream("main", log)]

    @contextlib.contextmanager
    def on(stream):
        current.append(stream)
        try:
            yield
        finally:
            current.pop()

    n = 6
    x = StepInputs(ids=[3, 5, 7, 9, 11, 13], positions=[4, 9, 2, 7, 1, 12], slots=[4, 17, 26, 39, 41, 60],
                   q_lens=[1] * n, ctx_lens=[5, 10, 3, 8, 2, 13], tables=[[0], [1, 2], [3], [4], [5], [6, 7]],
                   sample_rows=list(range(n)), num_decode=n)
    with _engine(tmp_path, max_model_len=128) as llm:
        runner = llm.runner
        runner.backend = _OutBackend(runner.backend, current, log)
        graphs = DecodeGraphRunner(runner, [1, 2, 4, 7], use_cuda_graphs=False, two_batch_overlap=True,
                                   halved_from=4)
        assert graphs.halves == {4: 2, 7: 4} and graphs.streams is None  # CPU: one stream
        graphs.capture()
        one_stream = graphs.run(x).clone()
        recorded = []
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
        monkeypatch.setattr(torch.cuda, "stream", on)
        monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: recorded.append(stream.name))
        graphs.streams = (_Stream("half0", log), _Stream("half1", log))
        log.clear()
        on_streams = graphs.run(x).clone()
    assert torch.equal(on_streams, one_stream)
    assert {name for what, name, *_ in log if what == "attention"} == {"main"}
    assert sum(what == "attention" for what, *_ in log) == 2 * 2  # two layers, two halves
    waits = [entry[1:] for entry in log if entry[0] == "wait"]
    assert waits[:2] == [("half0", "main"), ("half1", "main")]  # forked from the calling stream
    assert waits[-2:] == [("main", "half0"), ("main", "half1")]  # joined back before the rows are gathered
    assert recorded == ["main", "main"] and len(current) == 1
