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
import os
import shutil
import tempfile
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


def _worker_main(rank, size, store_path, config, model_cfg, max_model_len, conn) -> None:
    from engine_service.model_runner import ModelRunner

    torch.set_num_threads(max(1, torch.get_num_threads() // size))
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
                args=(rank, self.size, self.store_path, config, model_cfg, max_model_len, child),
                name=f"tp-worker-{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self.conns.append(parent)
            self.procs.append(proc)
        log.info("started %d tensor-parallel worker(s) (%s)", self.size - 1, "nccl" if self.cuda else "gloo")

    def rank0_info(self) -> TPInfo:
        return TPInfo(0, self.size, make_group(self.store_path, 0, self.size, self.cuda))

    def send_step(self, inputs) -> None:
        for conn in self.conns:
            conn.send(("step", inputs))

    def close(self) -> None:
        for conn in self.conns:
            try:
                conn.send(("exit", None))
            except (BrokenPipeError, OSError):
                pass
            conn.close()
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        self.conns, self.procs = [], []
        shutil.rmtree(self._dir, ignore_errors=True)
