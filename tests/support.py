"""Helpers shared by test modules."""

from __future__ import annotations

import importlib.util
import itertools
import os
import random
import socket

import pytest


def in_ci() -> bool:
    """Whether this run is CI's (CI=true), where a check that cannot run must fail, not skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(available: bool, what: str) -> None:
    """Skip when a tool the test extra installs is missing on a developer's machine; fail under CI=true.

    In CI the test extra is always installed, so a missing tool means a broken install: it must turn the
    run red, not quietly skip the acceptance check.
    """
    if available:
        return
    if in_ci():
        pytest.fail(f"{what} is missing, but CI installs the test extra: the install is broken")
    pytest.skip(f"{what} is not installed (pip install -e '.[test]')", allow_module_level=True)


def require_triton_interpreter() -> None:
    """Skip a module whose Triton kernels run on CPU under the interpreter when this process compiles them.

    The interpreter is chosen for the whole process before triton is imported: tests/conftest.py chooses it
    on machines without CUDA; on a CUDA machine scripts/run_tests.sh runs these tests in their own pytest
    process with TRITON_INTERPRET=1, and tests/gpu in another without it. With a numpy the interpreter fails
    on (2.4 and later) it skips, saying so, and fails under CI=true, as `require` does for a missing tool.
    """
    from engine_service.attention import check_interpreter_numpy, triton_interpreted

    require(importlib.util.find_spec("triton") is not None, "triton (the test extra pins triton==3.6.*)")
    if not triton_interpreted():
        import torch

        if in_ci() and not torch.cuda.is_available():
            pytest.fail(f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} on a CI machine without CUDA: "
                        "the Triton acceptance tests would not run; leave it unset (tests/conftest.py sets it)")
        pytest.skip("TRITON_INTERPRET is not 1 in this process: these tests run Triton kernels on CPU under "
                    "the interpreter (scripts/run_tests.sh runs them with it set)", allow_module_level=True)
    try:
        check_interpreter_numpy("the Triton kernel tests", "run scripts/run_tests.sh, whose venv pins it")
    except ValueError as exc:  # as for a missing tool: the reason on a developer's machine, red under CI
        if in_ci():
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc), allow_module_level=True)


# Ports for servers a test starts as processes (or tells where to listen). Asking the kernel for port 0 and
# handing the number on leaves a gap before the server binds it, in which the other pytest-xdist worker's same
# call can be handed the same number (the kernel picks from one shared ephemeral range), and a server refuses a
# port in use. So each worker takes ports from a band of its own, below the ephemeral range (32768 and up on
# Linux), in turn from a random start, skipping any port something holds.
PORT_BAND_BASE, PORT_BAND_SIZE, PORT_BANDS = 20000, 1000, 12


def port_band(worker: str | None = None) -> range:
    """The ports this pytest worker hands out ("gw3" -> the fourth band; no xdist -> the first)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "") if worker is None else worker
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0
    start = PORT_BAND_BASE + (index % PORT_BANDS) * PORT_BAND_SIZE
    return range(start, start + PORT_BAND_SIZE)


_next_port = None


def free_port(*hosts: str) -> int:
    """A port of this worker's band that nothing holds on each of hosts (default 127.0.0.1); handed out in turn,
    so one process gets a port again only after the band's other thousand."""
    global _next_port
    band = port_band()
    if _next_port is None:
        _next_port = itertools.chain(range(random.choice(band), band.stop), itertools.cycle(band))
    for _ in range(len(band)):
        port = next(_next_port)
        try:
            for host in hosts or ("127.0.0.1",):
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free port in {band} (ports {band.start}-{band.stop - 1}) on {hosts or '127.0.0.1'}")
