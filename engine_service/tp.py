"""Tensor-parallel workers: ranks 1..N-1 in processes started with `spawn`, rank 0 in the engine's process.

Ranks meet through a FileStore in a fresh temporary directory (no fixed port, no fixed shared-memory name)
and talk over a process group of their own: NCCL on GPU, gloo on CPU. Each step, rank 0 sends the step's
flat inputs (plain lists) down a pipe to every worker; all ranks run the forward pass together, and only
rank 0 samples. Workers exit when their pipe closes or rank 0's process is gone; an engine that is never
closed stops them from its finalizer (they ignore the SIGTERM multiprocessing's exit hook sends).
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from datetime import timedelta
from multiprocessing import resource_tracker
from multiprocessing import util as mp_util

import torch
import torch.distributed as dist

from engine_service import tp_boot
from engine_service.config import EngineConfig
from engine_service.model.config import ModelConfig
from engine_service.model.layers import TPInfo
from engine_service.model_runner import resolve_device

log = logging.getLogger(__name__)

# A collective waits this long for a peer before failing, rather than hanging the engine forever.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)
# Signals a terminal or an init sends to a whole process group: rank 0's to handle (it drains), never a worker's.
_RANK0_SIGNALS = {signal.SIGINT, signal.SIGTERM}
# The store directories and worker processes of live groups: an engine service ending with os._exit (a failure,
# a stop during the load) skips the finalizers, and ends these with end_all_groups(). Its workers are killed then,
# not left to see rank 0 go: one hung in a step (holding its GIL) never would.
_STORE_DIRS: set[str] = set()
_LIVE_PROCS: set = set()
# What a worker's death by a signal most often means, said beside its number.
_NATIVE_CRASH = ": a crash in native code; a core file or the kernel log says where"
_SIGNAL_HINTS = {
    signal.SIGKILL: " (SIGKILL: most often the kernel's out-of-memory killer; check the host's memory and the "
                    "kernel log)",
    **{sig: f" ({sig.name}{_NATIVE_CRASH})" for sig in (signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS,
                                                         signal.SIGILL, signal.SIGFPE)},
}


# The process's torch thread count before its first open group, and how many groups are open: every group's
# ranks share that count, and the last group closed gives it back (groups may overlap and close in any order).
_THREADS = {"before": 0, "open": 0}
_THREADS_LOCK = threading.Lock()


def _open_group(size: int) -> int:
    """Count a new group in; its ranks' thread share."""
    with _THREADS_LOCK:
        if _THREADS["open"] == 0:
            _THREADS["before"] = torch.get_num_threads()
        _THREADS["open"] += 1
        share = max(1, _THREADS["before"] // size)
    torch.set_num_threads(share)
    return share


def _close_group() -> None:
    with _THREADS_LOCK:
        _THREADS["open"] -= 1
        if _THREADS["open"] == 0:
            torch.set_num_threads(_THREADS["before"])


def end_all_groups() -> None:
    """Kill every live group's workers and remove its store directory: for a process about to os._exit."""
    for proc in list(_LIVE_PROCS):
        try:
            proc.kill()
        except (OSError, ValueError, AttributeError):
            pass
    for directory in list(_STORE_DIRS):
        shutil.rmtree(directory, ignore_errors=True)
        _STORE_DIRS.discard(directory)


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


def _rank0_log_format() -> tuple[int, bytes | None]:
    """Rank 0's root log level and the formatter of its first root handler (the service's text or JSON lines),
    pickled, for its workers to log as it does; None for the formatter where it has none, or one that won't pickle."""
    root = logging.getLogger()
    for handler in root.handlers:
        if handler.formatter is not None:
            try:
                return root.level, pickle.dumps(handler.formatter)
            except Exception:  # noqa: BLE001 -- a formatter of the caller's own: the workers write bare messages
                break
    return root.level, None


class _RankTag(logging.Filter):
    """Names the worker in each of its records: every rank loads the same checkpoint, so a warning comes once per
    rank (rank 0's untagged)."""

    def __init__(self, rank: int):
        super().__init__()
        self.prefix = f"tensor-parallel worker rank {rank}: "

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.prefix + str(record.msg)
        return True


def _log_like_rank0(rank: int, level: int, formatter: bytes | None) -> None:
    """A spawned worker starts with no logging set up, and its warnings went out through logging's last-resort
    handler as bare text lines, among the service's JSON lines. Warnings and errors only (rank 0 says what starts)."""
    try:  # a formatter class only rank 0's main script defines (under its main guard) cannot be rebuilt here
        made = pickle.loads(formatter) if formatter is not None else None
    except Exception:  # noqa: BLE001 -- bare messages, as with no formatter
        made = None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(made if isinstance(made, logging.Formatter) else logging.Formatter("%(message)s"))
    handler.addFilter(_RankTag(rank))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(level, logging.WARNING))


def _worker_main(rank, size, store_path, config, model_cfg, max_model_len, conn, threads,
                 log_format: tuple[int, bytes | None] = (logging.WARNING, None)) -> None:
    """A worker's life, after engine_service.tp_boot has started watching rank 0."""
    _log_like_rank0(rank, *log_format)
    # A Ctrl-C or a SIGTERM to the whole process group (systemd, `timeout`, `kill -TERM -PGID`) is rank 0's to
    # handle: it drains, then stops this worker. Taken here, it would cut the running steps short.
    for sig in _RANK0_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # one held since the worker was born (WorkerGroup) is discarded
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _RANK0_SIGNALS)
    loaded = threading.Event()  # set once the model is loaded: a ValueError before it is a refusal, not a bug
    try:
        orphaned = _serve_steps(rank, size, store_path, config, model_cfg, max_model_len, conn, threads, loaded)
    except BaseException as exc:  # noqa: BLE001 -- rank 0 names it in the engine's failure
        # A setting or checkpoint every rank refuses is rank 0's to say, in one line (it raises the same
        # ValueError). Else the whole traceback, here (in rank 0's log format): rank 0 may fail (its peer gone)
        # before it reads the pipe.
        if loaded.is_set() or not isinstance(exc, ValueError):
            try:
                log.error("failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
            except BaseException:  # noqa: BLE001 -- a broken stderr or formatter: the bare traceback, as before
                traceback.print_exc()
        try:
            conn.send(("failed", f"{type(exc).__name__}: {exc}"))
        except (OSError, ValueError):
            pass
        parent = mp.parent_process()
        if parent is not None and not parent.is_alive():  # a collective failed as rank 0 was killed
            shutil.rmtree(os.path.dirname(store_path), ignore_errors=True)
        os._exit(1)
    if orphaned:  # rank 0 was killed (no finalizer ran): its store directory goes with it, as in the parent watch
        shutil.rmtree(os.path.dirname(store_path), ignore_errors=True)
    # Asked to exit, or rank 0 is gone. Not through the interpreter's teardown: it destroyed the process group's
    # threads while they could still be joined, and 1 close in 10 ended in std::terminate (SIGABRT, a core file).
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None, or closed
            pass
    os._exit(0)


def _serve_steps(rank, size, store_path, config, model_cfg, max_model_len, conn, threads,
                 loaded: threading.Event) -> bool:
    """Run rank 0's steps until it asks this worker to exit (False) or its pipe closes (True: rank 0 is gone,
    which this sees as soon as the parent watch does)."""
    from engine_service.model_runner import ModelRunner

    torch.set_num_threads(threads)
    tp = TPInfo(rank, size, make_group(store_path, rank, size, _on_cuda(config)))
    runner = ModelRunner(config, model_cfg, max_model_len, tp)
    loaded.set()
    # As rank 0 does once serving (engine_service/server.py): a full collection over the start-up heap would
    # stall this rank's step, and with it the whole group's.
    gc.collect()
    gc.freeze()
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            return True  # rank 0 is gone
        if kind == "exit":
            return False
        runner.execute(payload)


class WorkerGroup:
    """Ranks 1..N-1 of one engine."""

    def __init__(self, config: EngineConfig, model_cfg: ModelConfig, max_model_len: int):
        self.size = config.tensor_parallel_size
        self.cuda = _on_cuda(config)
        if mp.current_process().daemon:  # multiprocessing's bare "AssertionError: daemonic processes are not ..."
            raise RuntimeError(
                f"tensor_parallel_size {self.size} starts worker processes, which this process cannot: it is a "
                "daemonic multiprocessing process (a multiprocessing.Pool worker, a Process made with daemon=True), "
                "and those may not have children; make the engine in a process that is not daemonic, or use "
                "tensor_parallel_size 1")
        if self.cuda and torch.cuda.device_count() < self.size:
            raise ValueError(
                f"tensor_parallel_size {self.size} needs {self.size} GPUs; {torch.cuda.device_count()} visible"
            )
        self._dir = tempfile.mkdtemp(prefix="llm-tp-")
        _STORE_DIRS.add(self._dir)
        self.store_path = os.path.join(self._dir, "store")
        ctx = mp.get_context("spawn")
        self.conns = []
        self.procs = []
        # Every rank gets a share of the threads rank 0 was given (the service's choice, capped at the pod's
        # CPUs), rank 0 included: all ranks compute at once, so on CPU they would otherwise oversubscribe it.
        self._dead_reason: str | None = None  # what dead_worker() found, once it found it
        # dead_worker() runs on the engine's thread and the health watchdog's: one at a time, so that the one that
        # finds a worker's message gone (read by the other) does not name it by its bare exit code.
        self._dead_lock = threading.Lock()
        log_format = _rank0_log_format()
        settings = pickle.dumps((config, model_cfg))
        share = _open_group(self.size)  # the last group closed gives the process its own count back
        try:
            for rank in range(1, self.size):
                parent, child = ctx.Pipe()
                try:
                    proc = ctx.Process(
                        target=tp_boot.boot,  # watches rank 0 before it imports torch
                        args=(rank, self.size, self.store_path, settings, max_model_len, child, share, log_format),
                        name=f"tp-worker-{rank}",
                        daemon=True,
                    )
                    # Born with SIGINT and SIGTERM blocked (the mask is inherited through spawn's exec): a Ctrl-C
                    # to the terminal's process group while the worker imports torch raised KeyboardInterrupt
                    # there, a traceback beside rank 0's own, and a group SIGTERM killed it unhandled. Held,
                    # they are discarded when _worker_main ignores both; rank 0 handles them for the engine.
                    # The resource tracker is started first: its launch (within start()) unblocks both.
                    # Counted in before start(): a Ctrl-C raises KeyboardInterrupt in rank 0 as start() returns
                    # (or within it, taken by another of rank 0's threads), and a worker launched but not counted
                    # outlived the failed start by five minutes, waiting for a group that never forms (the
                    # interpreter's exit waited for it). _shut_down passes over one never launched.
                    self.conns.append(parent)
                    self.procs.append(proc)
                    _LIVE_PROCS.add(proc)
                    resource_tracker.ensure_running()
                    # Read first, blocked inside the try: a Ctrl-C taken as the block returns (CPython checks for
                    # signals there) must still find the mask restored.
                    held = signal.pthread_sigmask(signal.SIG_BLOCK, [])
                    try:
                        signal.pthread_sigmask(signal.SIG_BLOCK, _RANK0_SIGNALS)
                        proc.start()
                    finally:
                        signal.pthread_sigmask(signal.SIG_SETMASK, held)
                except BaseException:
                    parent.close()  # _shut_down closes it again, harmlessly, once it is counted in
                    raise
                finally:
                    child.close()
        except BaseException:
            # A worker that cannot be started (fork's EAGAIN or ENOMEM, no file descriptor for its pipe): stop
            # those that were, give the threads back, remove the directory.
            procs = list(self.procs)
            _shut_down(self.conns, self.procs, self._dir, False)
            if not procs:
                _close_group()  # _shut_down gives them back only for a group with workers
            raise
        # The lists are shared with the finalizer, which close() empties them for: it then has nothing to do.
        # multiprocessing's own finalizer, with an exit priority: at interpreter exit it runs before
        # multiprocessing sends SIGTERM to daemonic children and joins them without a timeout. Workers ignore
        # SIGTERM, so a weakref.finalize, whose atexit hook can run after that join (where something had made one
        # before multiprocessing was imported: a tempfile.TemporaryDirectory, say), left the exit hanging forever.
        mp_util.Finalize(self, _shut_down, args=(self.conns, self.procs, self._dir, False), exitpriority=0)
        log.info("started %d tensor-parallel worker(s) (%s), %d torch thread(s) per rank", self.size - 1,
                 "nccl" if self.cuda else "gloo", share)

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
            dead = self.dead_worker()
            if dead is not None and " failed: ValueError: " in dead:
                # A setting or checkpoint every rank refuses: the same ValueError one rank raises.
                raise ValueError(dead.split(" failed: ValueError: ", 1)[1])
            if dead is not None and " failed: " in dead:
                raise RuntimeError(f"{dead} (during start-up)")
            if dead is not None and " was killed by signal " in dead:  # not the main guard (it says what it was)
                raise RuntimeError(f"{dead}, during start-up")
            if dead is not None:
                raise RuntimeError(
                    f"{dead} during start-up. Workers start with `spawn`, which re-imports the main script: a "
                    "script that makes an LLM must do so under `if __name__ == \"__main__\":`"
                )
        if "error" in made:
            raise made["error"]  # type: ignore[misc]
        return TPInfo(0, self.size, made["group"])

    def dead_worker(self, grace: float = 0.0) -> str | None:
        """Why the group cannot go on, if a worker has exited or is exiting (its own error when it could send
        it: a crash, an out-of-memory; else its exit code or signal); None while every worker lives. Cheap: a
        poll and a waitpid each. grace: wait that long for a worker that may be on its way out (rank 0's step
        failed: its peer's socket closes before the peer can be reaped)."""
        with self._dead_lock:
            return self._find_dead(grace)

    def _find_dead(self, grace: float) -> str | None:
        if self._dead_reason is not None:
            return self._dead_reason  # its message was read from the pipe once: it is not there any more
        conns, procs = list(self.conns), list(self.procs)
        if len(conns) != len(procs):
            return None  # closing
        found: list[tuple[int, int, str]] = []  # (preference, rank, reason)
        for rank, (conn, proc) in enumerate(zip(conns, procs, strict=True), start=1):
            try:
                sent = conn.poll()  # a worker writes only to say it failed; EOF: it is gone
            except (OSError, ValueError):
                sent = False
            proc.join(5.0 if sent else grace)
            code = proc.exitcode
            if code is None and not sent:
                continue
            if not sent:  # it may have said why while we waited for it to exit
                try:
                    sent = conn.poll()
                except (OSError, ValueError):
                    pass
            reason = ("failed" if code is None else f"exited with code {code}" if code >= 0
                      else f"was killed by signal {-code}{_SIGNAL_HINTS.get(-code, '')}")
            message = None
            if sent:
                try:
                    message = conn.recv()
                    if message[0] == "failed":
                        reason = f"failed: {message[1]}"
                except (EOFError, OSError):
                    pass
            # A worker whose own collective broke because a peer died ("Connection closed by peer") is a
            # consequence; a worker that died without a word (a signal, an exit) or failed on its own is the cause.
            secondary = message is not None and "peer" in str(message[1]).lower()
            found.append((1 if secondary else 0, rank, f"tensor-parallel worker rank {rank} {reason}"))
            if secondary:
                grace = max(grace, 1.0)  # the peer it lost is on its way out, or gone
        if not found:
            return None
        self._dead_reason = min(found)[2]
        return self._dead_reason

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
    if procs:  # not shut down yet (close() empties the lists the finalizer shares)
        _close_group()
    for conn in conns:
        if wait:
            try:
                conn.send(("exit", None))
            except (BrokenPipeError, OSError):
                pass
        conn.close()
    for proc in procs:
        if proc.pid is not None:  # None: never launched (its start() failed)
            if wait:
                proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()  # workers ignore SIGTERM (a process group's is rank 0's to handle)
            proc.join(timeout=5)
        _LIVE_PROCS.discard(proc)
    shutil.rmtree(directory, ignore_errors=True)
    _STORE_DIRS.discard(directory)
