"""Tensor-parallel workers under faults: a worker that cannot be started, hangs in a step, or is killed while it
loads; rank 0 killed; a checkpoint every rank refuses. Nothing may outlive the engine, and each failure is named
for what it is."""

from __future__ import annotations

import glob
import multiprocessing.context as mpc
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch

from engine_service import LLM
from tests.integration.tiny import make_qwen3

VOCAB = 511
TP_ARGS = dict(device="cpu", dtype="float32", attention_backend="torch", num_kvcache_blocks=16, max_num_seqs=2,
               max_num_batched_tokens=16, max_model_len=64)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _workers_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "spawn_main" in line]


def _start_with_worker_patch(model_dir, prelude: str, worker: str) -> subprocess.CompletedProcess:
    """Start a 2-rank engine on model_dir in a fresh script: `prelude` runs in both processes, `worker` (a patch)
    in the spawned worker only; the script prints 'RAISED <error>' for the RuntimeError start-up raises, else
    'STARTED'."""
    script = Path(model_dir) / "worker_patch.py"
    script.write_text(
        prelude
        + "if __name__ == '__mp_main__':\n"
        + textwrap.indent(worker, "    ")
        + "from engine_service import LLM\n"
        "if __name__ == '__main__':\n"
        "    try:\n"
        f"        LLM({str(model_dir)!r}, tensor_parallel_size=2, **{TP_ARGS!r})\n"
        "        print('STARTED')\n"
        "    except RuntimeError as exc:\n"
        "        print('RAISED', exc)\n"
    )
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=100,
                          cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.mark.timeout(120)
@pytest.mark.parametrize("size", [2, 4])
def test_a_worker_that_cannot_be_started_leaves_nothing_behind(tmp_path, monkeypatch, size):
    """WorkerGroup.__init__ took the process's torch threads (_open_group) and made its store directory before
    starting the workers: a start that raised (EAGAIN/ENOMEM from fork, EMFILE for the pipe) left the threads
    divided for good, the directory on disk, and the workers already started running."""
    from engine_service import tp

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    started: list = []
    real = mpc.SpawnProcess.start

    def start(self):
        if len(started) == size - 2:  # the last worker cannot be started
            raise OSError(11, "Resource temporarily unavailable")
        started.append(self)
        return real(self)

    monkeypatch.setattr(mpc.SpawnProcess, "start", start)
    threads = torch.get_num_threads()
    before = set(glob.glob(os.path.join(tempfile.gettempdir(), "llm-tp-*")))
    try:
        torch.set_num_threads(2)
        with pytest.raises(OSError, match="Resource temporarily unavailable"):
            LLM(tmp_path, tensor_parallel_size=size, **TP_ARGS)
        assert torch.get_num_threads() == 2
        assert set(glob.glob(os.path.join(tempfile.gettempdir(), "llm-tp-*"))) == before and not tp._STORE_DIRS
        for proc in started:
            proc.join(10)
            assert not proc.is_alive(), f"{proc.name} outlived the failed start"
    finally:
        torch.set_num_threads(threads)


HUNG_WORKER = """
import sys
if __name__ == '__mp_main__':  # the spawned worker: its 4th forward hangs holding the GIL (a stuck native call)
    import ctypes
    from engine_service import model_runner
    real, calls = model_runner.ModelRunner.execute, [0]
    def execute(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            ctypes.PyDLL(None).pause()
        return real(self, *args, **kwargs)
    model_runner.ModelRunner.execute = execute
if __name__ == '__main__':
    from engine_service import server
    server.main(sys.argv[1:])
"""


@pytest.mark.timeout(150)
def test_an_engine_failure_exit_kills_a_hung_worker(tmp_path):
    """A worker hung in a step (holding its GIL, so its parent-watch thread never runs): the watchdog fails the
    service and it exits 1, but main() ended with os._exit without stopping its workers, and the hung worker
    lived on (an orphan holding its memory, and on GPU its device) after the service had gone."""
    import grpc

    from clients.engine_client import EngineClient
    from scripts.demo import wait_serving
    from tests.support import free_port

    make_qwen3(tmp_path / "m", heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    script = tmp_path / "hung_worker.py"
    script.write_text(HUNG_WORKER)
    port, log = free_port(), tmp_path / "engine.log"
    with log.open("w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, str(script), "--model", str(tmp_path / "m"), "--host", "127.0.0.1", "--port", str(port),
             "--device", "cpu", "--dtype", "float32", "--attention-backend", "torch", "--num-kvcache-blocks", "64",
             "--max-num-seqs", "4", "--max-num-batched-tokens", "64", "--max-model-len", "256", "--metrics-port", "0",
             "--canary-interval-s", "0", "--tensor-parallel-size", "2", "--watchdog-s", "3", "--failure-linger-s", "0"],
            cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()}, stdout=out,
            stderr=subprocess.STDOUT)
    workers: list[int] = []
    try:
        wait_serving(f"127.0.0.1:{port}", proc, log, 90)
        workers = _workers_of(proc.pid)
        assert len(workers) == 1
        with EngineClient(f"127.0.0.1:{port}", timeout=60) as ec:
            with pytest.raises(grpc.RpcError) as err:
                list(ec.generate([1, 2, 3], max_tokens=50, ignore_eos=True))
        assert err.value.code() == grpc.StatusCode.INTERNAL and "watchdog" in err.value.details()
        assert proc.wait(30) == 1
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, workers)), "a hung tensor-parallel worker outlived the failed service"
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("where", "sig", "hint"), [
    ("engine_service.model_runner.load_weights", "SIGKILL", "SIGKILL: most often the kernel's out-of-memory killer"),
    ("engine_service.tp.make_group", "SIGSEGV", "SIGSEGV: a crash in native code"),
])
def test_a_worker_killed_by_a_signal_at_start_up_is_named_for_what_kills_one(tmp_path, where, sig, hint):
    """A worker SIGKILLed at start-up (the out-of-memory killer, most likely, while it loads its weights) was
    reported as 'killed by signal 9 during start-up. Workers start with `spawn`, which re-imports the main script:
    ... must do so under `if __name__ == "__main__":`': a wrong lead, fit for a worker that exited with a code (the
    re-run script raised). Killed while loading (after the group formed) it had no hint at all. A native crash
    (SIGSEGV) is said to be one."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    module, name = where.rsplit(".", 1)
    result = _start_with_worker_patch(tmp_path, "import os, signal\n",
                                      f"import {module}\n{module}.{name} = lambda *a, **k: os.kill(os.getpid(), "
                                      f"signal.{sig})\n")
    number = getattr(signal, sig).value
    assert f"RAISED tensor-parallel worker rank 1 was killed by signal {number} ({hint}" in result.stdout, \
        result.stdout[-3000:] + result.stderr[-3000:]
    assert "__main__" not in result.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_group_signal_while_a_worker_starts_is_rank_0s_alone(tmp_path, sig):
    """A Ctrl-C (or a SIGTERM to the process group) in a worker's first second, while spawn re-imported the main
    module and torch, raised KeyboardInterrupt in the worker (its traceback beside rank 0's own) or killed it
    unhandled, failing start-up from the worker's side. Sent to the worker alone there, it is now held and
    discarded, and start-up completes: the signal is rank 0's to handle."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    result = _start_with_worker_patch(tmp_path, "import os, signal, time\n",
                                      f"os.kill(os.getpid(), signal.{sig})\ntime.sleep(0.2)\n")
    assert "STARTED" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr[-3000:]


@pytest.mark.timeout(120)
def test_a_killed_rank_0_leaves_no_store_directory(tmp_path):
    """Rank 0 SIGKILLed (the OOM killer, a pod's grace period ending): its workers exit (parent watch), but the
    llm-tp-* directory stayed in /tmp for good (one per kill; the suite's own kill test leaves one a run)."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    code = (
        "import time\n"
        "from engine_service import LLM\n"
        "if __name__ == '__main__':\n"
        f"    llm = LLM({str(tmp_path)!r}, tensor_parallel_size=2, **{TP_ARGS!r})\n"
        "    print(llm.workers._dir, ' '.join(str(p.pid) for p in llm.workers.procs), flush=True)\n"
        "    time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        directory, *pids = parent.stdout.readline().split()
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 15
        while (os.path.exists(directory) or any(_alive(int(p)) for p in pids)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(int(p)) for p in pids)
        assert not os.path.exists(directory), f"{directory} outlived rank 0"
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.timeout(120)
def test_a_checkpoint_every_rank_refuses_is_one_line_under_tensor_parallelism(tmp_path):
    """tensor_parallel_size 1 reports a truncated safetensors file in one ERROR line (test_engine_lifecycle); with 2,
    the worker printed its whole traceback first (16 lines) for the same ValueError rank 0 then states."""
    from tests.e2e.test_engine_lifecycle import assert_one_line_failure

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB, dtype=torch.float32)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert_one_line_failure(["engine_service.server", "--model", str(tmp_path), "--device", "cpu",
                             "--tensor-parallel-size", "2"], f"{weights} cannot be read as safetensors")


@pytest.mark.timeout(120)
def test_a_worker_stuck_at_start_up_is_named_as_stuck_not_dead(tmp_path):
    """A worker stuck loading its weights (a hung network disk) let rank 0's first collective time out, and start-up
    failed with gloo's bare 'Timed out waiting ...ms for recv', which did not say that a worker was alive but stuck.
    (The collective timeout is cut to 3 s here; it is five minutes.)"""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    started = time.monotonic()
    result = _start_with_worker_patch(
        tmp_path,
        "import time\nfrom datetime import timedelta\nfrom engine_service import tp\n"
        "tp.COLLECTIVE_TIMEOUT = timedelta(seconds=3)\n",
        "from engine_service import model_runner\nmodel_runner.load_weights = lambda *a, **k: time.sleep(60)\n")
    assert "RAISED a tensor-parallel collective timed out during start-up while every worker was still running: " \
           "one is stuck" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert time.monotonic() - started < 60  # the stuck worker is killed, not waited for
