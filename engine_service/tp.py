"""Tensor-parallel workers: ranks 1..N-1 in processes started with `spawn`, rank 0 in the engine's process.

Ranks meet through a FileStore in a fresh temporary directory (no fixed port, no fixed shared-memory name)
and talk over a process group of their own: NCCL on GPU, gloo on CPU. Each step, rank 0 sends the step's
flat inputs (plain lists) down a pipe to every worker; all ranks run the forward pass together, and only
rank 0 samples. Workers are daemons, so they never block the interpreter's exit, and they exit when
their pipe closes.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist

from engine_service.config import EngineConfig
from engine_service.model.config import ModelConfig
from engine_service.model.layers import TPInfo
from engine_service.model_runner import resolve_device

log = logging.getLogger(__name__)

# A collective waits this long for a peer before failing, rather than hanging the engine forever.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


def _on_cuda(config: EngineConfig) -> bool:
    return resolve_device(config.device).type == "cuda"


def make_group(store_path: str, rank: int, size: int, cuda: bool):
    """A process group of its own over a file store (not torch.distributed's global default group)."""
    store = dist.FileStore(store_path, size)
    if cuda:
        torch.cuda.set_device(rank)
        return dist.ProcessGroupNCCL(store, rank, size)
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = COLLECTIVE_TIMEOUT
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    return dist.ProcessGroupGloo(store, rank, size, opts)


def _exit_with_parent() -> None:
    """Exit this worker as soon as rank 0's process is gone, whatever the worker is doing (waiting for the
    group to form, or in a collective): a pipe closing is seen only between steps."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        mp.connection.wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


def _worker_main(rank, size, store_path, config, model_cfg, max_model_len, conn, threads) -> None:
    from engine_service.model_runner import ModelRunner

    _exit_with_parent()
    # A Ctrl-C reaches the whole process group: rank 0 handles it (and stops this worker); a worker's own
    # KeyboardInterrupt would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    tp = TPInfo(rank, size, make_group(store_path, rank, size, _on_cuda(config)))
    runner = ModelRunner(config, model_cfg, max_model_len, tp)
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return  # rank 0 is gone
        if kind == "exit":
            return
        runner.execute(payload)


class WorkerGroup:
    """Ranks 1..N-1 of one engine."""

    def __init__(self, config: EngineConfig, model_cfg: ModelConfig, max_model_len: int):
        self.size = config.tensor_parallel_size
        self.cuda = _on_cuda(config)
        if self.cuda and torch.cuda.device_count() < self.size:
            raise ValueError(
                f"tensor_parallel_size {self.size} needs {self.size} GPUs; {torch.cuda.device_count()} visible"
            )
        self._dir = tempfile.mkdtemp(prefix="llm-tp-")
        self.store_path = os.path.join(self._dir, "store")
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        for rank in range(1, self.size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main,
                # A share of rank 0's threads (the service's choice, capped at the pod's CPUs), not of the
                # host's cores, which a fresh process would count.
                args=(rank, self.size, self.store_path, config, model_cfg, max_model_len, child,
                      max(1, torch.get_num_threads() // self.size)),
                name=f"tp-worker-{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        # The lists are shared with the finalizer, which close() empties them for: it then has nothing to do.
        weakref.finalize(self, _shut_down, self.conns, self.procs, self._dir, False)
        log.info("started %d tensor-parallel worker(s) (%s)", self.size - 1, "nccl" if self.cuda else "gloo")

    def rank0_info(self) -> TPInfo:
        """Rank 0's side of the group, once every worker has joined it. A worker that exits first (a crash at
        start-up) is reported at once rather than after the group's five-minute timeout."""
        made: dict[str, object] = {}

        def join() -> None:
            try:
                made["group"] = make_group(self.store_path, 0, self.size, self.cuda)
            except BaseException as exc:  # noqa: BLE001 -- re-raised below
                made["error"] = exc

        joiner = threading.Thread(target=join, name="tp-group-join", daemon=True)
        joiner.start()
        while joiner.is_alive():
            joiner.join(0.1)
            for rank, proc in enumerate(self.procs, start=1):
                if proc.exitcode is not None:
                    raise RuntimeError(
                        f"tensor-parallel worker rank {rank} exited with code {proc.exitcode} during start-up; "
                        "its error is above. Workers start with `spawn`, which re-imports the main script: a "
                        "script that makes an LLM must do so under `if __name__ == \"__main__\":`"
                    )
        if "error" in made:
            raise made["error"]  # type: ignore[misc]
        return TPInfo(0, self.size, made["group"])

    def send_step(self, inputs) -> None:
        for conn in self.conns:
            conn.send(("step", inputs))

    def close(self, wait: bool = True) -> None:
        """Stop the workers: ask them to exit (and wait up to 10 s), or with wait=False terminate them at once
        (they may sit in a collective that will never complete)."""
        _shut_down(self.conns, self.procs, self._dir, wait)
        self.conns.clear()
        self.procs.clear()


def _shut_down(conns: list, procs: list, directory: str, wait: bool = True) -> None:
    """WorkerGroup.close(), and its finalizer: a group never closed still reaps its workers and removes its
    store's directory when it is garbage-collected or the interpreter exits."""
    for conn in conns:
        if wait:
            try:
                conn.send(("exit", None))
            except (BrokenPipeError, OSError):
                pass
        conn.close()
    for proc in procs:
        if wait:
            proc.join(timeout=10)
        if proc.is_alive():
            proc.terminate()
        proc.join(timeout=5)
    shutil.rmtree(directory, ignore_errors=True)
