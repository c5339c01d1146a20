"""Helpers shared by test modules."""

from __future__ import annotations

import importlib.util
import os

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
