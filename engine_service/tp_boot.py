"""The first code a tensor-parallel worker runs: it watches rank 0 before importing torch.

A worker is started with spawn, and unpickling its target imports that target's module. Were the target in
`engine_service.tp`, the worker would import torch (seconds; tens of seconds on a loaded node) before it could
notice that rank 0 was gone, and a rank 0 killed during start-up left its workers running that long. This
module imports only the standard library: the worker watches rank 0 first, then unpickles the engine's
settings (which imports torch) and runs `engine_service.tp._worker_main`.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import shutil
import threading


def exit_with_parent(directory: str | None = None) -> None:
    """Exit this worker as soon as rank 0's process is gone, whatever the worker is doing (importing torch,
    waiting for the group to form, or in a collective): a pipe closing is seen only between steps. `directory`
    (the group's store) is removed first: rank 0 was killed, and no finalizer of its ran."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        mp.connection.wait([parent.sentinel])
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
        os._exit(0)

    threading.Thread(target=watch, name="tp-parent-watch", daemon=True).start()


def boot(rank, size, store_path, settings: bytes, max_model_len, conn, threads, log_format) -> None:
    """`settings` is the pickled (EngineConfig, ModelConfig): unpickled only once rank 0 is watched."""
    exit_with_parent(os.path.dirname(store_path))
    config, model_cfg = pickle.loads(settings)
    from engine_service.tp import _worker_main

    _worker_main(rank, size, store_path, config, model_cfg, max_model_len, conn, threads, log_format)
