"""tensor_parallel_size=2 over gloo on CPU gives the greedy tokens of a single rank."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time

import pytest
import torch

from engine_service import LLM, SamplingParams
from tests.integration.tiny import make_qwen3

VOCAB = 511  # not divisible by 2: the vocabulary-parallel embedding and head pad it


@pytest.mark.timeout(240)
def test_tp2_gloo_matches_tp1_with_one_kv_head_and_odd_vocab(tmp_path):
    make_qwen3(tmp_path, heads=4, kv_heads=1, head_dim=16, hidden=64, vocab=VOCAB, tie=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (1, 9, 40)]
    params = SamplingParams(temperature=0.0, max_tokens=8)
    args = dict(
        device="cpu",
        dtype="float64",
        attention_backend="torch",
        num_kvcache_blocks=32,
        max_num_batched_tokens=32,
        max_num_seqs=4,
        max_model_len=128,
    )
    with LLM(tmp_path, tensor_parallel_size=1, **args) as one:
        expected = [o["token_ids"] for o in one.generate(prompts, params)]
    assert not torch.distributed.is_initialized()  # one rank never touches torch.distributed
    with LLM(tmp_path, tensor_parallel_size=2, **args) as two:
        got = [o["token_ids"] for o in two.generate(prompts, params)]
        procs = list(two.workers.procs)
        assert len(procs) == 1 and procs[0].is_alive()
    assert got == expected
    assert not procs[0].is_alive()  # close() stops the worker


@pytest.mark.timeout(240)
def test_tp2_with_fused_ops_matches_one_rank_of_torch_ops(tmp_path):
    """The fused kernels (under the interpreter here) on each rank's share of the heads, with the single KV
    head replicated on both ranks: the greedy tokens of one rank running torch's ops, in float32."""
    from tests.support import require_triton_interpreter

    require_triton_interpreter()
    make_qwen3(tmp_path, heads=4, kv_heads=1, head_dim=16, hidden=64, vocab=VOCAB, tie=False, dtype=torch.float32)
    rng = random.Random(1)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (2, 17)]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    args = dict(device="cpu", dtype="float32", attention_backend="torch", num_kvcache_blocks=32,
                max_num_batched_tokens=32, max_num_seqs=4, max_model_len=128)
    with LLM(tmp_path, tensor_parallel_size=1, fused_ops=False, **args) as one:
        expected = [o["token_ids"] for o in one.generate(prompts, params)]
    with LLM(tmp_path, tensor_parallel_size=2, fused_ops=True, **args) as two:
        assert two.runner.fused_ops and two.runner.model.layers[0].self_attn.num_kv_heads == 1
        got = [o["token_ids"] for o in two.generate(prompts, params)]
    assert got == expected


def test_heads_not_divisible_by_tp_is_a_value_error(tmp_path):
    make_qwen3(tmp_path, heads=6, kv_heads=2, head_dim=8, hidden=32)
    with pytest.raises(ValueError, match="num_attention_heads"):
        LLM(
            tmp_path,
            device="cpu",
            tensor_parallel_size=4,
            num_kvcache_blocks=8,
            max_num_seqs=2,
            max_num_batched_tokens=16,
            max_model_len=64,
        )


@pytest.mark.timeout(180)
def test_workers_never_block_interpreter_exit(tmp_path):
    """A script that never calls close() still exits promptly, and leaves no worker behind."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    code = (
        "import sys\n"
        "from engine_service import LLM, SamplingParams\n"
        f"llm = LLM({str(tmp_path)!r}, device='cpu', tensor_parallel_size=2, num_kvcache_blocks=16,\n"
        "          max_num_seqs=2, max_num_batched_tokens=16, max_model_len=64)\n"
        "llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=2))\n"
        "print(' '.join(str(p.pid) for p in llm.workers.procs), flush=True)\n"
    )
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-3000:]
    assert time.monotonic() - start < 120
    for pid in map(int, result.stdout.split()):
        time.sleep(0.2)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
