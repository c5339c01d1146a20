"""attention_backend selection, and imports that must stay lazy."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch

from engine_service import attention


@pytest.fixture
def installed(monkeypatch):
    import numpy

    present: set[str] = set()
    monkeypatch.setattr(attention, "_importable", lambda name: name in present)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled kernels, as on a GPU machine
    monkeypatch.setattr(numpy, "__version__", "2.3.5")  # one the interpreter works with, whatever is installed
    return present


CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_prefers_flash_attn_then_triton_on_cuda_and_torch_elsewhere(installed):
    installed |= {"flash_attn", "triton"}
    assert attention.resolve_backend_name("auto", CUDA, 256) == "flash_attn"
    assert attention.resolve_backend_name("auto", CUDA, 16) == "triton"  # block size flash-attn cannot page
    assert attention.resolve_backend_name("auto", CPU, 256) == "torch"
    installed.clear()
    assert attention.resolve_backend_name("auto", CUDA, 256) == "torch"


def test_interpreted_triton_is_never_chosen_for_cuda(installed, monkeypatch):
    """Under TRITON_INTERPRET=1 kernels run on the host: 'auto' falls back to torch on CUDA, and an explicit
    triton backend or triton sampler on CUDA is refused, naming the variable to unset."""
    from engine_service.sampler import Sampler

    installed.add("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert attention.resolve_backend_name("auto", CUDA, 16) == "torch"
    assert attention.resolve_backend_name("triton", CPU, 16) == "triton"  # the interpreter's use
    with pytest.raises(ValueError, match="unset TRITON_INTERPRET"):
        attention.resolve_backend_name("triton", CUDA, 16)
    with pytest.raises(ValueError, match="unset TRITON_INTERPRET"):
        Sampler(CUDA, seed=0, triton_sampling=True)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert attention.resolve_backend_name("auto", CUDA, 16) == "triton"


def test_explicit_choices_that_cannot_run_are_refused(installed):
    with pytest.raises(ValueError, match="flash_attn"):
        attention.resolve_backend_name("flash_attn", CUDA, 256)
    installed.add("flash_attn")
    with pytest.raises(ValueError, match="multiple of 256"):
        attention.resolve_backend_name("flash_attn", CUDA, 16)
    with pytest.raises(ValueError, match="triton"):
        attention.resolve_backend_name("triton", CPU, 16)


def test_an_fp8_kv_cache_picks_a_backend_that_reads_it(installed, monkeypatch, caplog):
    """kv_cache_dtype='fp8': flash-attn (model-dtype caches only) is never picked and is refused when named, by
    the config (so the service refuses the flags before loading anything); triton on CUDA needs compute capability
    8.9 (its e4m3 conversions): 'auto' falls back to torch below it with a warning that says the cost, an explicit
    triton is refused, naming both ways out."""
    from engine_service.config import EngineConfig

    installed |= {"flash_attn", "triton"}
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    assert attention.resolve_backend_name("auto", CUDA, 256, "fp8") == "triton"
    assert attention.resolve_backend_name("auto", CUDA, 256, "auto") == "flash_attn"
    assert attention.resolve_backend_name("triton", CUDA, 16, "fp8") == "triton"
    with pytest.raises(ValueError, match="flash_attn.*model's dtype only.*'auto', 'triton'.*or 'torch'"):
        EngineConfig("/m", attention_backend="flash_attn", kv_cache_dtype="fp8")
    assert not caplog.records
    capability[0] = (8, 0)  # an A100
    assert attention.resolve_backend_name("auto", CUDA, 16, "fp8") == "torch"
    assert "compute capability 8.0" in caplog.text and "without CUDA graphs" in caplog.text
    assert attention.resolve_backend_name("auto", CUDA, 16, "auto") == "triton"
    with pytest.raises(ValueError, match=r"compute capability 8\.9 or later.*has 8\.0.*kv_cache_dtype='auto'.*"
                                         r"attention_backend='torch'"):
        attention.resolve_backend_name("triton", CUDA, 16, "fp8")
    assert attention.resolve_backend_name("torch", CUDA, 16, "fp8") == "torch"
    assert attention.resolve_backend_name("auto", CPU, 16, "fp8") == "torch"  # no CUDA query on CPU


@pytest.mark.parametrize("version", ["2.4.0", "2.5.2", "3.0.0rc1"])
def test_interpreted_kernels_are_refused_at_start_up_with_a_numpy_the_interpreter_fails_on(
    installed, monkeypatch, version
):
    """numpy >= 2.4 breaks Triton 3.6's interpreter inside the first step; the backend and sampler choice
    refuse it up front, naming the version found and the two ways out."""
    import numpy

    from engine_service.sampler import Sampler

    installed.add("triton")
    monkeypatch.setattr(numpy, "__version__", version)
    with pytest.raises(ValueError, match=rf"numpy {re.escape(version)}.*numpy<2\.4.*attention_backend='torch'"):
        attention.resolve_backend_name("triton", CPU, 16)
    with pytest.raises(ValueError, match=r"numpy<2\.4.*triton_sampling=False"):
        Sampler(CPU, seed=0, triton_sampling=True)
    assert attention.resolve_backend_name("triton", CUDA, 16) == "triton"  # compiled kernels: numpy is moot
    assert attention.resolve_backend_name("auto", CPU, 16) == "torch"
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert attention.resolve_backend_name("triton", CPU, 16) == "triton"


def test_engine_imports_without_triton_or_flash_attn_and_core_modules_without_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'triton', 'flash_attn', 'torch'}:\n"
        "            raise ImportError(f'{name} is hidden')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import engine_service.scheduler, engine_service.block_manager, engine_service.sequence\n"
        "assert 'torch' not in sys.modules\n"
        "sys.meta_path.pop(0)\n"
        "class NoKernels:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'triton', 'flash_attn'}:\n"
        "            raise ImportError(f'{name} is hidden')\n"
        "sys.meta_path.insert(0, NoKernels())\n"
        "from engine_service import LLM\n"
        "import engine_service.engine, engine_service.model_runner\n"
        "assert 'triton' not in sys.modules and 'flash_attn' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
