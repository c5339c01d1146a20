"""Shared pytest fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Under pytest-xdist (scripts/run_tests.sh) each worker gets a temp directory of its own, for it and the
# processes it starts: tests that look for what an engine leaves there (tensor parallelism's llm-tp-* stores)
# would otherwise see the other worker's engines come and go. Removed when the worker exits.
if os.environ.get("PYTEST_XDIST_WORKER"):
    _WORKER_TMP = tempfile.mkdtemp(prefix=f"llmserve-tests-{os.environ['PYTEST_XDIST_WORKER']}-")
    os.environ["TMPDIR"] = tempfile.tempdir = _WORKER_TMP
    atexit.register(shutil.rmtree, _WORKER_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The deterministic demo checkpoint (tiny Qwen3 + byte-level BPE), built once per test session."""
    from scripts.demo_model import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo_model") / "model")


@pytest.fixture(scope="session")
def demo_tokenizer(demo_model_dir: Path):
    """The demo checkpoint's tokenizer, loaded through transformers."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.fixture(autouse=True)
def _stop_signals_restored():
    """Each test leaves SIGINT's and SIGTERM's handlers and the main thread's signal mask as it found them. A
    service's main() called in-process installs clients.stop_signals' recorder, and a later test's Ctrl-C (a real
    SIGINT) then raised nothing."""
    import signal

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield
    for sig, handler in handlers.items():
        if handler is not None:  # None: installed outside Python, left as it is
            signal.signal(sig, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def pytest_configure(config: pytest.Config) -> None:
    """Without CUDA, Triton kernels run under the interpreter, which must be chosen before triton imports."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
