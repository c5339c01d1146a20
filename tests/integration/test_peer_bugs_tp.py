"""Tensor parallelism on CPU (gloo) against failure modes other servers shipped: worker log lines outside the
service's format, a daemonic parent, a worker killed inside a step, two engines open at once with prefix hits."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from engine_service import SamplingParams
from engine_service.engine import EngineDeadError, LLMEngine
from tests.integration.test_tp_faults import TP_ARGS
from tests.integration.tiny import make_qwen3

VOCAB = 511  # 2 does not divide it: the vocabulary-parallel layers pad it
ARGS = dict(device="cpu", dtype="float64", attention_backend="torch", kvcache_block_size=16, num_kvcache_blocks=32,
            max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128)


def _script(path, body: str) -> subprocess.CompletedProcess:
    path.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=100, cwd=os.getcwd(),
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.mark.timeout(120)
def test_a_workers_warning_is_a_line_in_rank_0s_json_log_naming_the_rank(tmp_path):
    """Workers are spawned with no logging set up: a warning every rank gives while loading went out through logging's
    last-resort handler as a bare text line among the service's JSON lines (and with no word of which rank)."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB, tie=True)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "model.safetensors")  # a tied model whose head differs: the loader warns
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    result = _script(tmp_path / "json_log.py", f"""
        from clients.logs import configure_logging
        from engine_service import LLM
        if __name__ == "__main__":
            configure_logging("INFO", "json")
            LLM({str(tmp_path)!r}, tensor_parallel_size=2, **{TP_ARGS!r}).close()
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a line that is not JSON among the service's JSON lines: {line!r}")
    tied = [r["msg"] for r in records if r["level"] == "WARNING" and "tie_word_embeddings" in r["msg"]]
    assert len(tied) == 2, tied  # rank 0's and the worker's
    assert sum(m.startswith("tensor-parallel worker rank 1: ") for m in tied) == 1, tied


@pytest.mark.timeout(60)
def test_a_daemonic_process_is_refused_before_any_worker_saying_what_to_do(tmp_path):
    """A multiprocessing.Pool worker (daemonic) cannot have children: TP start-up failed with multiprocessing's bare
    'AssertionError: daemonic processes are not allowed to have children'."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    result = _script(tmp_path / "daemonic.py", f"""
        import glob, multiprocessing, os, tempfile

        def make(_):
            from engine_service import LLM
            try:
                LLM({str(tmp_path)!r}, tensor_parallel_size=2, **{TP_ARGS!r})
            except BaseException as exc:
                return type(exc).__name__ + ": " + str(exc)
            return "STARTED"

        if __name__ == "__main__":
            before = set(glob.glob(os.path.join(tempfile.gettempdir(), "llm-tp-*")))
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                print(pool.map(make, [0])[0])
            print("LEFT", sorted(set(glob.glob(os.path.join(tempfile.gettempdir(), "llm-tp-*"))) - before))
    """)
    assert "RuntimeError: tensor_parallel_size 2 starts worker processes" in result.stdout, \
        result.stdout + result.stderr[-3000:]
    assert "not daemonic" in result.stdout and "LEFT []" in result.stdout


@pytest.mark.timeout(120)
def test_a_worker_killed_inside_a_step_fails_that_step_at_once_naming_it(tmp_path):
    """A worker dying mid-step must not leave rank 0 waiting in the step's collective (five minutes, or forever):
    the step raises EngineDeadError naming the worker and its signal, and so does every later call."""
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=VOCAB)
    engine = LLMEngine(tmp_path, tensor_parallel_size=2, **TP_ARGS)
    try:
        (proc,) = engine.workers.procs
        engine.add_request("a", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
        engine.step()
        os.kill(proc.pid, signal.SIGSTOP)  # the worker will get the next step and never run it
        raised: list[BaseException] = []

        def step() -> None:
            try:
                engine.step()
            except BaseException as exc:  # noqa: BLE001 -- asserted below
                raised.append(exc)

        stepping = threading.Thread(target=step, daemon=True)
        stepping.start()
        stepping.join(0.5)
        assert stepping.is_alive(), "the step ended without its worker"
        os.kill(proc.pid, signal.SIGKILL)
        start = time.monotonic()
        stepping.join(20)
        assert not stepping.is_alive() and time.monotonic() - start < 10
        assert isinstance(raised[0], EngineDeadError), raised
        assert "tensor-parallel worker rank 1 was killed by signal 9" in str(raised[0])
        with pytest.raises(EngineDeadError, match="rank 1 was killed by signal 9"):
            engine.add_request("b", [1, 2], SamplingParams(max_tokens=2))
        assert engine.workers is None and proc.exitcode == -signal.SIGKILL
    finally:
        engine.close()


@pytest.mark.timeout(120)
def test_two_tp_engines_open_at_once_with_prefix_hits_give_one_ranks_tokens(tmp_path):
    """Two tensor-parallel engines in one process (stores, ports and groups of their own) stepped in turn, each
    serving prompts that hit its prefix cache, a seeded draw and a logit bias on the last real token: the tokens of
    one rank, and no id from the padded columns."""
    make_qwen3(tmp_path, heads=4, kv_heads=1, head_dim=16, hidden=64, vocab=VOCAB, tie=True)
    rng = random.Random(5)
    shared = [rng.randrange(VOCAB) for _ in range(40)]
    prompts = [shared + [7], shared + [8, 9], shared + [7]]
    params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=11, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={VOCAB - 1: 100.0})]

    def serve(*engines: LLMEngine) -> list[dict[str, list[int]]]:
        """Each engine's tokens by request, the engines stepped in turn."""
        out: list[dict[str, list[int]]] = [{} for _ in engines]
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):  # one at a time: later ones hit
            for engine in engines:
                engine.add_request(str(i), prompt, p)
            while any(engine.has_unfinished_requests() for engine in engines):
                for engine, tokens in zip(engines, out, strict=True):
                    for step in engine.step():
                        tokens.setdefault(step.request_id, []).extend(step.new_token_ids)
        return out

    with LLMEngine(tmp_path, tensor_parallel_size=1, **ARGS) as one:
        (expected,) = serve(one)
    with LLMEngine(tmp_path, tensor_parallel_size=2, **ARGS) as a, LLMEngine(tmp_path, tensor_parallel_size=2,
                                                                           **ARGS) as b:
        assert a.workers.store_path != b.workers.store_path
        got = serve(a, b)
        assert all(engine.stats()["prefix_cache_hits"] > 0 for engine in (a, b))
    assert got == [expected, expected]
    assert expected["2"] == [VOCAB - 1] * 6  # the bias reached the last real column, not a padded one
