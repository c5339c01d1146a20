"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


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


def pytest_configure(config: pytest.Config) -> None:
    """Without CUDA, Triton kernels run under the interpreter, which must be chosen before triton imports."""
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
