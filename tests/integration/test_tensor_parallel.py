"""tensor_parallel_size=2 over gloo on CPU gives the greedy tokens of a single rank."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time

import pytest
import torch

from engine_service import LLM, SamplingParams
from tests.integration.tiny import make_qwen3

VOCAB = 511  # not divisible by 2: the vocabulary-parallel embedding and head pad it


@pytest.mark.timeout(240)
def test_tp2_gloo_matches_tp1_with_one_kv_head_and_odd_vocab(tmp_path):
    make_qwen3(tmp_path, heads=4, kv_heads=1, head_dim=16, hidden=64, vocab=VOCAB, tie=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (1, 9, 40)]
    # The 40-token prompt's logprobs span two chunks and ten LM-head pieces of max_num_seqs rows, each a gather
    # that both ranks must make; penalties and logprobs are rank 0's alone.
    params = [SamplingParams(temperature=0.0, max_tokens=8),
              SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.3, logprobs=3),
              SamplingParams(temperature=0.0, max_tokens=8, prompt_logprobs=2, logprobs=0)]
    args = dict(
        device="cpu",
        dtype="float64",
        attention_backend="torch",
        num_kvcache_blocks=32,
        max_num_batched_tokens=32,
        max_num_seqs=4,
        max_model_len=128,
    )
    with LLM(tmp_path, tensor_parallel_size=1, **args) as one:
        expected = one.generate(prompts, params)
    assert not torch.distributed.is_initialized()  # one rank never touches torch.distributed
    with LLM(tmp_path, tensor_parallel_size=2, **args) as two:
        got = two.generate(prompts, params)
        procs = list(two.workers.procs)
        assert len(procs) == 1 and procs[0].is_alive()
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in expected]
    assert len(got[2]["prompt_logprobs"]) == 39 and len(got[1]["logprobs"]) == 8
    for key in ("logprobs", "prompt_logprobs"):
        for mine, theirs in zip(got, expected, strict=True):
            for a, b in zip(mine[key] or [], theirs[key] or [], strict=True):
                assert a.top_token_ids == b.top_token_ids and all(t < VOCAB for t in a.top_token_ids)
                assert a.logprob == pytest.approx(b.logprob, abs=1e-9)
                assert a.top_logprobs == pytest.approx(b.top_logprobs, abs=1e-9)
    assert not procs[0].is_alive() and procs[0].exitcode == 0  # close() stops the worker, without an abort


@pytest.mark.timeout(240)
def test_tp2_with_fused_ops_matches_one_rank_of_torch_ops(tmp_path):
    """The fused kernels (under the interpreter here) on each rank's share of the heads, with the single KV
    head replicated on both ranks: the greedy tokens of one rank running torch's ops, in float32."""
    from tests.support import require_triton_interpreter

    require_triton_interpreter()
    make_qwen3(tmp_path, heads=4, kv_heads=1, head_dim=16, hidden=64, vocab=VOCAB, tie=False, dtype=torch.float32)
    rng = random.Random(1)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (2, 17)]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    args = dict(device="cpu", dtype="float32", attention_backend="torch", num_kvcache_blocks=32,
                max_num_batched_tokens=32, max_num_seqs=4, max_model_len=128)
    with LLM(tmp_path, tensor_parallel_size=1, fused_ops=False, **args) as one:
        expected = [o["token_ids"] for o in one.generate(prompts, params)]
    with LLM(tmp_path, tensor_parallel_size=2, fused_ops=True, **args) as two:
        assert two.runner.fused_ops and two.runner.model.layers[0].self_attn.num_kv_heads == 1
        got = [o["token_ids"] for o in two.generate(prompts, params)]
    assert got == expected


@pytest.mark.timeout(120)
def test_a_setting_every_rank_refuses_is_the_value_error_of_one_rank(tmp_path):
    """Under tensor parallelism a refused setting came back as a RuntimeError blaming a worker ("exited with code
    1"), worded by which rank failed first; the service prints a ValueError alone as the reason it cannot serve."""
    make_qwen3(tmp_path, heads=4, kv_heads=1, head_dim=16, hidden=64, vocab=VOCAB, tie=False)
    args = dict(device="cpu", dtype="float32", attention_backend="flash_attn", num_kvcache_blocks=16, max_num_seqs=2,
                max_num_batched_tokens=16, max_model_len=64)
    with pytest.raises(ValueError) as one:
        LLM(tmp_path, tensor_parallel_size=1, **args)
    for _ in range(2):  # either rank may fail first
        with pytest.raises(ValueError) as two:
            LLM(tmp_path, tensor_parallel_size=2, **args)
        assert str(two.value) == str(one.value)


def test_heads_not_divisible_by_tp_is_a_value_error(tmp_path):
    make_qwen3(tmp_path, heads=6, kv_heads=2, head_dim=8, hidden=32)
    with pytest.raises(ValueError, match="num_attention_heads"):
        LLM(
            tmp_path,
            device="cpu",
            tensor_parallel_size=4,
            num_kvcache_blocks=8,
            max_num_seqs=2,
            max_num_batched_tokens=16,
            max_model_len=64,
        )


@pytest.mark.timeout(180)
@pytest.mark.parametrize("preamble", ["", "import tempfile\nscratch = tempfile.TemporaryDirectory()\n"],
                         ids=["plain", "finalizer-made-first"])
def test_workers_never_block_interpreter_exit(tmp_path, preamble):
    """A script that never calls close() still exits promptly, and leaves no worker behind: also where something
    made a weakref.finalize before the engine was imported (a TemporaryDirectory), whose atexit hook then runs
    after multiprocessing's, which joins daemonic workers without a timeout (they ignore its SIGTERM)."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    code = preamble + (
        "import sys\n"
        "from engine_service import LLM, SamplingParams\n"
        f"llm = LLM({str(tmp_path)!r}, device='cpu', tensor_parallel_size=2, num_kvcache_blocks=16,\n"
        "          max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64)\n"
        "llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=2))\n"
        "print(' '.join(str(p.pid) for p in llm.workers.procs), flush=True)\n"
    )
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - start < 120
    for pid in map(int, result.stdout.split()):
        time.sleep(0.2)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


TP_ARGS = dict(device="cpu", dtype="float32", attention_backend="torch", num_kvcache_blocks=16, max_num_seqs=2,
               max_num_batched_tokens=16, max_model_len=64)


@pytest.mark.timeout(180)
def test_a_step_failing_partway_on_rank_0_stops_the_engine_instead_of_desynchronising_it(tmp_path):
    """Rank 0 failing after the workers got a step (here its forward pass; on a GPU an OOM, or a Ctrl-C)
    leaves them in that step's collectives: every later collective would pair with a stale one, giving wrong
    tokens or a gloo abort. The engine stops its workers and refuses from then on, saying why."""
    from engine_service.engine import EngineDeadError, EngineStepError

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    with LLM(tmp_path, tensor_parallel_size=2, **TP_ARGS) as llm:
        procs = list(llm.workers.procs)
        llm.add_request("r", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4))

        def fail(*args, **kwargs) -> None:
            raise RuntimeError("injected failure between send_step and the forward pass")

        llm.runner.model.forward = fail
        with pytest.raises(EngineDeadError, match="out of step") as dead:
            llm.step()
        assert not isinstance(dead.value, EngineStepError)  # the server must not treat it as recoverable
        for proc in procs:
            proc.join(10)
            assert not proc.is_alive()
        with pytest.raises(EngineDeadError, match="make a new one"):
            llm.generate([[4, 5]], SamplingParams(temperature=0.0, max_tokens=2))


@pytest.mark.timeout(180)
def test_a_failing_on_launch_callback_fails_its_step_and_the_tensor_parallel_engine_goes_on(tmp_path):
    """The caller's on_launch runs in the middle of the forward pass; raising there left the workers in the step's
    collectives and killed the engine. Its failure now waits for the forward: the step's requests fail, as on one
    rank, the workers live, and later requests get the tokens they get on a fresh engine."""
    from engine_service.engine import EngineStepError

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    greedy = SamplingParams(temperature=0.0, max_tokens=4)
    with LLM(tmp_path, tensor_parallel_size=2, **TP_ARGS) as llm:
        want = [o["token_ids"] for o in llm.generate([[4, 5, 6], [7, 8]], greedy)]
        procs = list(llm.workers.procs)
        llm.add_request("r", [1, 2, 3], greedy)

        def fail() -> None:
            raise RuntimeError("the caller's callback failed")

        with pytest.raises(EngineStepError) as failed:
            llm.step(on_launch=fail)
        assert [(o.request_id, o.finish_reason) for o in failed.value.outputs] == [("r", "error")]
        assert "the caller's callback failed" in str(failed.value)
        assert all(proc.is_alive() for proc in procs)
        assert [o["token_ids"] for o in llm.generate([[4, 5, 6], [7, 8]], greedy)] == want


@pytest.mark.timeout(120)
def test_a_worker_dying_at_start_up_is_reported_at_once(tmp_path):
    """A script without the `__main__` guard: under spawn the worker re-runs it and dies at once. Rank 0 says so
    within seconds, naming the likely cause, instead of waiting out the group's five-minute timeout."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from engine_service import LLM\n"
        f"llm = LLM({str(tmp_path)!r}, tensor_parallel_size=2, **{TP_ARGS!r})\n"
    )
    start = time.monotonic()
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100,
                            cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode != 0
    assert "worker rank 1 exited" in result.stderr and "__main__" in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - start < 60


def _kill_rank_0_during_start_up(tmp_path, *, settle_s: float, env: dict | None = None,
                                 before_group: str = "") -> None:
    """Start a group whose rank 0 never joins it, SIGKILL rank 0 `settle_s` after its workers are launched, and
    check that every worker exits within 15 s."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    code = (
        "import os, time\n"
        "from engine_service.config import EngineConfig\n"
        "from engine_service.model.config import ModelConfig\n"
        "from engine_service.tp import WorkerGroup\n"
        "if __name__ == '__main__':\n"
        f"    config = EngineConfig.from_kwargs({str(tmp_path)!r}, tensor_parallel_size=2, **{TP_ARGS!r})\n"
        f"    {before_group or 'pass'}\n"
        f"    group = WorkerGroup(config, ModelConfig.from_dir({str(tmp_path)!r}), 64)\n"
        "    print(' '.join(str(p.pid) for p in group.procs), flush=True)\n"
        "    time.sleep(600)  # never joins the group\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **(env or {})})
    pids: list[int] = []
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert pids
        time.sleep(settle_s)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 15
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [pid for pid in pids if _alive(pid)]
        assert not alive, f"workers {alive} outlived rank 0 by 15 s"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in pids:
            if _alive(pid):
                os.kill(pid, 9)


@pytest.mark.timeout(120)
def test_workers_exit_when_rank_0_dies_during_start_up(tmp_path):
    """A worker waiting for rank 0 to form the group (rank 0 killed mid start-up, by a pod restart say) exits
    at once rather than lingering until the group's timeout."""
    _kill_rank_0_during_start_up(tmp_path, settle_s=2)  # the worker is up, waiting for rank 0 in the store


@pytest.mark.timeout(120)
def test_workers_exit_when_rank_0_dies_while_they_import_torch(tmp_path):
    """A worker watches rank 0 before it imports torch. Its import took seconds (tens of seconds on a loaded
    node, which is how CI saw a worker outlive rank 0 by 15 s): here a `torch` import that takes 60 s in the
    workers, and rank 0 killed during it. The workers exit all the same."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys, time\n"
        "if os.environ.get('TP_TEST_SLOW_TORCH'):\n"
        "    class _SlowTorch:\n"
        "        def find_spec(self, name, path=None, target=None):\n"
        "            if name == 'torch':\n"
        "                time.sleep(60)\n"
        "            return None\n"
        "    sys.meta_path.insert(0, _SlowTorch())\n"
    )
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    # Rank 0 has torch already; only the workers, started after this, import it slowly.
    _kill_rank_0_during_start_up(tmp_path, settle_s=1, env={"PYTHONPATH": path},
                                 before_group="os.environ['TP_TEST_SLOW_TORCH'] = '1'")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.timeout(180)
def test_an_engine_never_closed_still_reaps_its_workers_and_removes_its_store(tmp_path):
    import gc

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    llm = LLM(tmp_path, tensor_parallel_size=2, **TP_ARGS)
    procs, store_dir = list(llm.workers.procs), llm.workers._dir
    assert os.path.isdir(store_dir)
    del llm
    gc.collect()
    assert not os.path.exists(store_dir)
    assert all(p.exitcode is not None for p in procs)  # joined: no zombie left behind


@pytest.mark.timeout(120)
def test_workers_outlive_a_group_sigterm_and_a_dead_one_is_seen_while_idle(tmp_path):
    """A SIGTERM to the whole process group (systemd, `timeout`) killed the worker mid-drain; a worker killed
    while the engine was idle went unnoticed until a request met it; each rank kept all its threads."""
    import signal

    from engine_service.engine import EngineDeadError

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with LLM(tmp_path, tensor_parallel_size=2, **TP_ARGS) as llm:
            assert torch.get_num_threads() == 1  # two ranks share the two threads rank 0 had
            (proc,) = llm.workers.procs
            os.kill(proc.pid, signal.SIGTERM)
            time.sleep(0.5)
            assert proc.is_alive()
            out = llm.generate([[4, 5]], SamplingParams(temperature=0.0, max_tokens=2))[0]
            assert out["finish_reason"] == "length"
            llm.check_workers()  # all alive: nothing to say
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(10)
            with pytest.raises(EngineDeadError, match="tensor-parallel worker rank 1 was killed by signal 9"):
                llm.check_workers()
            with pytest.raises(EngineDeadError, match="make a new one"):
                llm.add_request("r", [1, 2], SamplingParams(max_tokens=2))
    finally:
        torch.set_num_threads(threads)


def test_store_dirs_left_by_an_os_exit_are_removed(tmp_path):
    from engine_service import tp

    directory = tmp_path / "llm-tp-x"
    directory.mkdir()
    tp._STORE_DIRS.add(str(directory))
    tp.end_all_groups()
    assert not directory.exists() and str(directory) not in tp._STORE_DIRS


@pytest.mark.timeout(120)
def test_a_worker_failing_after_the_group_formed_is_named_as_the_cause(tmp_path):
    """A worker failing while sizing its KV cache (an out-of-memory) left rank 0 with gloo's 'Connection closed by
    peer' and the worker's own error nowhere; a TP engine also left the process's torch threads halved."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    script = tmp_path / "failing_worker.py"
    script.write_text(
        "import torch\n"
        "if __name__ == '__mp_main__':  # the spawned worker only\n"
        "    from engine_service import model_runner\n"
        "    def boom(self):\n"
        "        raise RuntimeError('injected: out of memory while sizing the KV cache')\n"
        "    model_runner.ModelRunner._decide_num_blocks = boom\n"
        "from engine_service import LLM\n"
        "if __name__ == '__main__':\n"
        "    torch.set_num_threads(2)\n"
        "    try:\n"
        f"        LLM({str(tmp_path)!r}, tensor_parallel_size=2, **{TP_ARGS!r})\n"
        "    except RuntimeError as exc:\n"
        "        print('RAISED', exc)\n"
        "    print('THREADS', torch.get_num_threads())\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100,
                            cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert "RAISED tensor-parallel worker rank 1 failed: RuntimeError: injected: out of memory" in result.stdout, \
        result.stdout + result.stderr[-3000:]
    assert "THREADS 2" in result.stdout


def test_overlapping_tp_engines_give_the_process_its_threads_back():
    """Each group took its share of the count it found, and restored only its own: two TP engines open at once
    and closed in creation order left the process's threads halved."""
    from engine_service import tp

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        assert tp._open_group(2) == 2 and tp._open_group(2) == 2  # both shares of the process's 4
        tp._close_group()
        assert torch.get_num_threads() == 2
        tp._close_group()
        assert torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(threads)


def test_the_worker_that_died_is_named_not_a_peer_that_lost_it():
    """With three or more ranks, a worker killed mid-step makes every other worker's collective fail with gloo's
    "Connection closed by peer"; the first rank in order was named as the cause (rank 1, alive and well, for a
    kill of rank 2). A worker that died without a word, or failed on its own, is named before those."""
    from engine_service.tp import WorkerGroup

    class Conn:
        def __init__(self, message=None):
            self.message = message

        def poll(self):
            return self.message is not None

        def recv(self):
            return self.message

    class Proc:
        def __init__(self, exitcode):
            self.exitcode = exitcode

        def join(self, timeout=None):
            pass

    lost = ("failed", "RuntimeError: [gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:1")
    group = WorkerGroup.__new__(WorkerGroup)
    group._dead_reason, group._dead_lock = None, threading.Lock()
    group.conns = [Conn(lost), Conn(), Conn(lost)]
    group.procs = [Proc(1), Proc(-9), Proc(1)]
    assert group.dead_worker().startswith("tensor-parallel worker rank 2 was killed by signal 9 (SIGKILL")
    group._dead_reason = None  # a worker failing on its own comes before the peers that lost it too
    group.conns = [Conn(lost), Conn(("failed", "OutOfMemoryError: out of memory")), Conn(lost)]
    group.procs = [Proc(1), Proc(1), Proc(1)]
    assert group.dead_worker() == "tensor-parallel worker rank 2 failed: OutOfMemoryError: out of memory"
    group._dead_reason = None  # peers' losses alone: the first of them, as before
    group.conns, group.procs = [Conn(lost), Conn()], [Proc(1), Proc(None)]
    assert group.dead_worker().startswith("tensor-parallel worker rank 1 failed: RuntimeError")
