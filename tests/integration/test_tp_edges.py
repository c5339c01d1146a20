"""Tensor-parallel worker groups at their edges: what a closed, collected or ended group leaves of the process
(threads, signal mask, descriptors, the registries end_all_groups() reads), and how dead_worker() reads workers
on their way out."""

from __future__ import annotations

import gc
import glob
import multiprocessing.context as mpc
import os
import signal
import tempfile
import threading

import pytest
import torch

from engine_service import LLM, SamplingParams, tp
from engine_service.tp import WorkerGroup
from tests.integration.test_tp_faults import TP_ARGS, VOCAB, _start_with_worker_patch
from tests.integration.tiny import make_qwen3


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(120)
def test_a_closed_group_gives_back_what_it_took(tmp_path):
    """Starting workers blocks SIGINT and SIGTERM around each spawn, takes a thread share and a pipe per worker,
    and registers the group for end_all_groups(); a closed engine gives every one of them back, and a second one
    holds no more descriptors than the first left."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    mask, threads, groups = signal.pthread_sigmask(signal.SIG_BLOCK, []), torch.get_num_threads(), tp._THREADS["open"]
    live, dirs = set(tp._LIVE_PROCS), set(tp._STORE_DIRS)

    def cycle() -> None:
        llm = LLM(tmp_path, tensor_parallel_size=2, **TP_ARGS)
        with llm:
            assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask  # a Ctrl-C still reaches rank 0
            assert set(llm.workers.procs) <= tp._LIVE_PROCS and llm.workers._dir in tp._STORE_DIRS
            assert llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=2))[0]["token_ids"]
        del llm
        gc.collect()  # the group's finalizer runs too: close() left it nothing to give back twice
        assert tp._THREADS["open"] == groups and torch.get_num_threads() == threads
        assert tp._LIVE_PROCS == live and tp._STORE_DIRS == dirs

    cycle()
    fds = _fds()
    cycle()
    assert _fds() == fds


@pytest.mark.timeout(120)
def test_an_engine_never_closed_gives_back_its_threads_when_collected(tmp_path):
    """Its idle worker exits of itself when the pipe closes (and removes the store); the process's thread count and
    the registries are the finalizer's alone to give back."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    threads = torch.get_num_threads()
    live, dirs = set(tp._LIVE_PROCS), set(tp._STORE_DIRS)
    try:
        torch.set_num_threads(2)
        llm = LLM(tmp_path, tensor_parallel_size=2, **TP_ARGS)
        assert torch.get_num_threads() == 1
        del llm
        gc.collect()
        assert torch.get_num_threads() == 2
        assert tp._LIVE_PROCS == live and tp._STORE_DIRS == dirs
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(120)
def test_end_all_groups_kills_a_live_groups_workers_and_removes_its_store(tmp_path):
    """What the engine service runs before os._exit: a worker hung in a step (holding its GIL) would never see rank 0
    go, and its store directory would stay in /tmp."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    with LLM(tmp_path, tensor_parallel_size=2, **TP_ARGS) as llm:
        (proc,), directory = llm.workers.procs, llm.workers._dir
        tp.end_all_groups()
        proc.join(10)
        assert proc.exitcode == -signal.SIGKILL
        assert not os.path.exists(directory) and directory not in tp._STORE_DIRS


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["held", "within"])
def test_a_ctrl_c_while_a_worker_starts_stops_that_worker_too(tmp_path, monkeypatch, where):
    """A Ctrl-C while a worker starts raises KeyboardInterrupt in rank 0 after the launch: as the mask is restored
    after start(), where CPython runs the held SIGINT's handler, or within start(), where another of rank 0's
    threads took it. That worker was not in the group's lists yet, so the failed start left it waiting five minutes
    for a group that never forms (the interpreter's exit waiting for it). The interrupt is raised where the signal
    would raise it rather than sent: a real SIGINT's handler can run inside a finalizer the collector calls, which
    swallows its KeyboardInterrupt (once in a whole-suite run)."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    started: list = []
    real = mpc.SpawnProcess.start

    def start(self):
        real(self)
        started.append(self)
        if where == "within":
            raise KeyboardInterrupt

    class RestoringRunsTheHeldSignal:
        def __getattr__(self, name):
            return getattr(signal, name)

        def pthread_sigmask(self, how, mask):
            old = signal.pthread_sigmask(how, mask)
            if how == signal.SIG_SETMASK and started:
                raise KeyboardInterrupt
            return old

    monkeypatch.setattr(mpc.SpawnProcess, "start", start)
    if where == "held":
        monkeypatch.setattr(tp, "signal", RestoringRunsTheHeldSignal())
    threads, live = torch.get_num_threads(), set(tp._LIVE_PROCS)
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "llm-tp-*")))
    try:
        with pytest.raises(KeyboardInterrupt):
            LLM(tmp_path, tensor_parallel_size=2, **TP_ARGS)
        (proc,) = started
        proc.join(10)
        assert proc.exitcode is not None, "a worker outlived a start-up stopped by Ctrl-C"
        assert torch.get_num_threads() == threads and tp._LIVE_PROCS == live
        assert set(glob.glob(os.path.join(tempfile.gettempdir(), "llm-tp-*"))) == before
    finally:
        for proc in started:
            if proc.is_alive():
                proc.kill()
                proc.join(5)

def test_a_one_thread_process_gives_each_rank_one_thread():
    """A share of a single thread rounds down to none, which torch refuses: each rank keeps one."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert tp._open_group(4) == 1 and torch.get_num_threads() == 1
        tp._close_group()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)


@pytest.mark.timeout(120)
def test_a_worker_failing_before_the_group_forms_is_named_without_the_main_guard_hint(tmp_path):
    """A worker that raised while joining the group (its own error, sent to rank 0) is not a script missing its
    `if __name__ == "__main__":` guard."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    result = _start_with_worker_patch(
        tmp_path, "",
        "from engine_service import tp\n"
        "def make_group(*a, **k):\n"
        "    raise RuntimeError('injected: no route to the store')\n"
        "tp.make_group = make_group\n")
    assert "RAISED tensor-parallel worker rank 1 failed: RuntimeError: injected: no route to the store " \
           "(during start-up)" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert "__main__" not in result.stdout


class _Conn:
    """A worker's pipe as rank 0 sees it: `polls` answers poll() in turn (then the last one), recv() gives
    `message` once and then EOF (the worker is gone)."""

    def __init__(self, message=None, polls=None):
        self.message, self.polls = message, list(polls if polls is not None else [message is not None])

    def poll(self):
        return self.polls.pop(0) if len(self.polls) > 1 else self.polls[0]

    def recv(self):
        if self.message is None:
            raise EOFError
        message, self.message = self.message, None
        return message


class _Proc:
    """A worker that has exited with `exitcode` once rank 0 waits at least `after` seconds for it."""

    def __init__(self, exitcode, after=0.0):
        self.code, self.after, self.exitcode = exitcode, after, None if after else exitcode

    def join(self, timeout=None):
        if timeout is None or timeout >= self.after:
            self.exitcode = self.code


def _group(conns, procs) -> WorkerGroup:
    group = WorkerGroup.__new__(WorkerGroup)
    group._dead_reason, group.conns, group.procs, group._dead_lock = None, conns, procs, threading.Lock()
    return group


OOM = ("failed", "OutOfMemoryError: out of memory")
LOST = ("failed", "RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1")


def test_a_dead_workers_reason_is_kept_once_its_message_is_read():
    group = _group([_Conn(OOM)], [_Proc(1)])
    assert group.dead_worker() == "tensor-parallel worker rank 1 failed: OutOfMemoryError: out of memory"
    assert group.dead_worker() == "tensor-parallel worker rank 1 failed: OutOfMemoryError: out of memory"


def test_a_worker_that_says_why_while_rank_0_waits_for_it_is_named_by_its_error():
    """Rank 0's step failed first (its peer's socket closed), the worker's message came a moment later."""
    group = _group([_Conn(OOM, polls=[False, True])], [_Proc(1, after=0.5)])
    assert group.dead_worker(grace=1.0) == "tensor-parallel worker rank 1 failed: OutOfMemoryError: out of memory"


def test_a_peer_that_lost_a_worker_waits_for_that_worker_to_be_reaped():
    """Rank 1 says its peer closed the connection; rank 2, killed, is not reaped yet: it is the one named."""
    group = _group([_Conn(LOST), _Conn()], [_Proc(1), _Proc(-9, after=0.5)])
    assert group.dead_worker().startswith("tensor-parallel worker rank 2 was killed by signal 9 (SIGKILL")


def test_exit_codes_and_a_closing_group_are_read_as_they_are():
    assert _group([_Conn()], [_Proc(0)]).dead_worker() == "tensor-parallel worker rank 1 exited with code 0"
    assert _group([_Conn()], [_Proc(-15)]).dead_worker() == "tensor-parallel worker rank 1 was killed by signal 15"
    assert _group([_Conn()], [_Proc(None)]).dead_worker() is None
    assert _group([], [_Proc(1)]).dead_worker() is None  # close() is emptying the lists


def test_two_threads_asking_at_once_get_the_workers_own_error():
    """The engine's thread and the health watchdog both ask: the first reads the worker's message off the pipe;
    the second, finding the pipe at EOF, named the worker by its exit code alone and could keep that reason."""
    entered, release = threading.Event(), threading.Event()

    class SlowConn(_Conn):
        def recv(self):
            message = super().recv()
            entered.set()
            release.wait(5)
            return message

    group = _group([SlowConn(OOM, polls=[True])], [_Proc(1)])
    answers = {}
    first = threading.Thread(target=lambda: answers.__setitem__("first", group.dead_worker()))
    first.start()
    assert entered.wait(5)
    second = threading.Thread(target=lambda: answers.__setitem__("second", group.dead_worker()))
    second.start()
    second.join(0.5)  # the old code answered here, while the first still held the message
    release.set()
    first.join(5)
    second.join(5)
    reason = "tensor-parallel worker rank 1 failed: OutOfMemoryError: out of memory"
    assert answers == {"first": reason, "second": reason}
    assert group.dead_worker() == reason


@pytest.mark.timeout(120)
def test_cpu_kvcache_gib_caps_the_pools_of_every_rank_together(tmp_path):
    """On the CPU every rank's pool is in this machine's memory: cpu_kvcache_gib caps their K and V together. Each
    rank was sized against the whole cap, so N ranks took N times it (32 GiB at TP 8 under the default 4)."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    cap_bytes = 2**20
    args = {**TP_ARGS, "num_kvcache_blocks": None, "cpu_kvcache_gib": cap_bytes / 2**30, "max_num_seqs": 16,
            "max_model_len": 512}
    with LLM(tmp_path, tensor_parallel_size=2, **args) as llm:
        runner = llm.runner
        rank_bytes = runner.k_cache.nbytes + runner.v_cache.nbytes
        assert rank_bytes == runner.num_blocks * runner.block_bytes()
        # Both ranks' pools within the cap, and filling it to within one block of both ranks.
        assert cap_bytes - 2 * runner.block_bytes() < 2 * rank_bytes <= cap_bytes, (rank_bytes, runner.num_blocks)
    with pytest.raises(ValueError, match=r"holds no KV block: .* MiB on 2 ranks"):
        LLM(tmp_path, tensor_parallel_size=2, **{**args, "cpu_kvcache_gib": 1.5 * runner.block_bytes() / 2**30})


@pytest.mark.timeout(120)
def test_a_failure_after_the_runner_is_built_stops_the_workers_at_once(tmp_path, monkeypatch):
    """A failure (or a Ctrl-C) past the model runner, building the JSON masks say, left the workers running for as
    long as anything held the half-built engine (the exception's traceback does), not only until it was collected."""
    from engine_service.engine import LLMEngine

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    live, dirs = set(tp._LIVE_PROCS), set(tp._STORE_DIRS)

    def fail(self):
        raise RuntimeError("injected: the JSON masks could not be built")

    monkeypatch.setattr(LLMEngine, "_json_masks", fail)
    with pytest.raises(RuntimeError, match="injected") as failed:
        LLM(tmp_path, tensor_parallel_size=2, **TP_ARGS)
    assert failed.value.__traceback__ is not None  # it holds the engine's frame, so nothing was collected
    assert tp._LIVE_PROCS == live and tp._STORE_DIRS == dirs
