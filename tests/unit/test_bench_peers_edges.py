"""Edge cases of transformers as the benchmark's peers (engine_service/bench_peers.py and bench's calls to it), on a
tiny random Qwen3 and on fakes of the continuous batching manager.

Each test names the bug it catches: a mutation audit found that the other tests let it through.
"""

from __future__ import annotations

import json
import shutil
import time
import types
from pathlib import Path

import pytest
import torch

from engine_service import bench, bench_peers

VOCAB = 128


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from tests.integration.tiny import make_qwen3

    path = tmp_path_factory.mktemp("peers-qwen3")
    make_qwen3(path, vocab=VOCAB, dtype=torch.float64)
    return path


def _static(model, prompts, max_tokens, temperature=0.0):
    """hf_static_once, and the tensors of its generate() calls: [(input_ids, attention_mask, output)]."""
    calls = []
    generate = model.generate

    def spy(**kwargs):
        out = generate(**kwargs)
        calls.append((kwargs["input_ids"], kwargs.get("attention_mask"), out))
        return out

    model.generate = spy
    try:
        return bench_peers.hf_static_once(model, prompts, max_tokens, temperature), calls
    finally:
        del model.generate


def _engine_greedy(path, prompts, max_tokens):
    from engine_service import LLM, SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    with LLM(str(path), device="cpu", dtype="float64", max_num_seqs=4, max_model_len=128, enforce_eager=True) as llm:
        return [o["token_ids"] for o in llm.generate(prompts, params)]


# Prompts of different lengths, each holding the pad id 0 at a real position: left padding must not move them
# and the attention mask must keep those zeros.
PROMPTS = [[5, 9, 0, 17, 33], [0, 44, 3, 101, 7, 0, 12, 90, 61], [0, 66, 21]]
MAX_TOKENS = [4, 7, 2]


# ----------------------------------------------------------------------------------------------------------------
# Static batching


def test_static_peer_greedy_tokens_equal_the_engines_in_one_left_padded_batch(model_dir):
    """The peer does the engine's work: one generate() over every request (left padding, an explicit mask, so a
    prompt's own token 0 is not taken for padding), each row run to the longest request, and in float64 its
    greedy tokens are the engine's. Right padding, a dropped mask or one generate per request all fail here."""
    model = bench_peers.load_hf_model(str(model_dir), torch.float64, "cpu", "sdpa")
    run, calls = _static(model, PROMPTS, MAX_TOKENS)
    assert len(calls) == 1
    input_ids, mask, out = calls[0]
    assert input_ids.shape == (3, 9) and mask is not None and int(mask.sum()) == sum(map(len, PROMPTS))
    assert out.shape == (3, 9 + 7)
    assert [out[i, 9 : 9 + n].tolist() for i, n in enumerate(MAX_TOKENS)] == _engine_greedy(
        model_dir, PROMPTS, MAX_TOKENS)
    assert (run.requested_tokens, run.generated_tokens, run.info["new_tokens_per_row"]) == (13, 21, 7)


def test_static_peer_ignores_the_checkpoints_generation_config(model_dir, tmp_path):
    """generate() fills every field the peer leaves None from the checkpoint's generation_config.json: a
    repetition penalty or n-gram ban there was applied, and its EOS tokens were masked until min_new_tokens (work
    the engine is not asked to do, and other tokens than the engine's)."""
    clean = bench_peers.load_hf_model(str(model_dir), torch.float64, "cpu", "sdpa")
    _, [(_, _, want)] = _static(clean, PROMPTS, MAX_TOKENS)
    shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "eos_token_id": sorted(set(want[:, 9].tolist())),  # every row's first token
        "repetition_penalty": 1.5, "no_repeat_ngram_size": 2, "min_p": 0.2, "top_k": 20, "top_p": 0.5,
    }))
    dirty = bench_peers.load_hf_model(str(tmp_path), torch.float64, "cpu", "sdpa")
    run, [(_, _, got)] = _static(dirty, PROMPTS, MAX_TOKENS)
    assert got.tolist() == want.tolist()
    assert run.generated_tokens == 21

    # Sampling: temperature only, whatever the checkpoint asks for (top_k left unset meant transformers' top_k=50).
    built = []
    get = dirty._get_logits_processor
    dirty._get_logits_processor = lambda *a, **k: built.append(get(*a, **k)) or built[-1]
    bench_peers.hf_static_once(dirty, PROMPTS, MAX_TOKENS, bench.TEMPERATURE)
    names = {type(p).__name__ for p in built[0]}
    assert "TemperatureLogitsWarper" in names
    assert not names & {"TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "RepetitionPenaltyLogitsProcessor",
                        "NoRepeatNGramLogitsProcessor"}


def test_static_progress_counts_every_generated_token(model_dir, monkeypatch, capsys):
    """The progress processor sees each of the longest request's tokens once, against that total (not the sum of
    the requests' tokens, which part d's bound would then misread)."""
    progress = bench_peers._Progress
    monkeypatch.setattr(bench_peers, "_Progress", lambda total, start: progress(total, start, every=2))
    model = bench_peers.load_hf_model(str(model_dir), torch.float64, "cpu", "sdpa")
    bench_peers.hf_static_once(model, PROMPTS, MAX_TOKENS, 0.0, progress=True)
    lines = [line.split(" after ")[0] for line in capsys.readouterr().out.splitlines() if "static: token" in line]
    assert lines == [f"  transformers static: token {n} of 7" for n in (2, 4, 6)]


def test_load_hf_model_gives_the_asked_dtype_in_eval_mode(model_dir):
    model = bench_peers.load_hf_model(str(model_dir), torch.float32, "cpu", "sdpa")
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training
    assert model.config._attn_implementation == "sdpa"


def test_a_transformers_that_ignores_the_dtype_is_refused_naming_its_version(model_dir, monkeypatch):
    """transformers before 4.56 has no from_pretrained(dtype=...): the peer would run in float32 unnoticed."""
    from transformers import AutoModelForCausalLM

    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda path, dtype, **kwargs: load(path, dtype=torch.float32, **kwargs))
    with pytest.raises(RuntimeError, match=r"transformers \S+ loaded the peer in torch.float32, not torch.bfloat16"):
        bench_peers.load_hf_model(str(model_dir), torch.bfloat16, "cpu", "sdpa")


def _plan(batches=None) -> bench.Plan:
    return bench.Plan(warmup=([[1, 2, 3]], [2]), batches=batches or [([[4, 5], [6]], [3, 4])] * 2,
                      model_dir=Path("unused"), device="cpu", dtype="float32")


def test_run_hf_static_times_each_batch_after_an_untimed_warm_up(monkeypatch):
    """The warm-up request runs first, without progress lines, and its seconds are not a run; the model's load is
    outside every figure."""
    calls = []

    def once(model, prompts, max_tokens, temperature, progress=False):
        calls.append((prompts, max_tokens, temperature, progress))
        return bench_peers.PeerRun(seconds=len(calls), requested_tokens=sum(max_tokens),
                                   generated_tokens=len(prompts) * max(max_tokens),
                                   info={"new_tokens_per_row": max(max_tokens)})

    loads = []
    monkeypatch.setattr(bench_peers, "load_hf_model", lambda *a: loads.append(a) or time.sleep(0.2) or "model")
    monkeypatch.setattr(bench_peers, "hf_static_once", once)
    result = bench.run_hf_static(_plan())
    assert loads == [("unused", torch.float32, "cpu", "sdpa")]  # BENCHMARKS.md's attention for this peer
    assert calls[0] == ([[1, 2, 3]], [2], bench.TEMPERATURE, False)
    assert calls[1:] == [([[4, 5], [6]], [3, 4], bench.TEMPERATURE, True)] * 2
    assert result.runs_s == [2, 3]
    assert (result.requested_tokens, result.generated_tokens, result.tok_s) == (7, 8, 7 / 2.5)


def test_run_hf_static_short_rows_are_an_error_not_a_figure(monkeypatch):
    """A generate() that stopped before the longest request was credited with every requested token."""
    monkeypatch.setattr(bench_peers, "load_hf_model", lambda *a: "model")
    monkeypatch.setattr(bench_peers, "hf_static_once", lambda model, prompts, max_tokens, t, progress=False:
                        bench_peers.PeerRun(1.0, sum(max_tokens), 2 * len(prompts), {"new_tokens_per_row": 2}))
    result = bench.run_hf_static(_plan())
    assert result.tok_s is None and "fewer tokens" in result.error


# ----------------------------------------------------------------------------------------------------------------
# Continuous batching, on a fake manager


class _Manager:
    """Finishes each request as it is added (minus `short` tokens for request ids in `short_ids`), handing results
    out `delay` seconds apart; records stop()."""

    continuous_batching_config = types.SimpleNamespace(num_blocks=4, page_size=8, max_batch_tokens=32)

    def __init__(self, delay=0.0, short_ids=(), running=True, fail_on=None) -> None:
        self.results, self.delay, self.short_ids, self.running, self.fail_on = [], delay, short_ids, running, fail_on
        self.stopped = self.destroyed = False

    def warmup(self):
        pass

    def start(self):
        pass

    def stop(self, block, timeout, hard_stop):
        self.stopped = True

    def destroy(self):
        self.destroyed = True

    def is_running(self):
        return self.running

    def add_request(self, prompt, request_id, max_new_tokens, eos_token_id):
        if request_id == self.fail_on:
            raise RuntimeError("boom")
        n = max_new_tokens - (request_id in self.short_ids)
        self.results.append(types.SimpleNamespace(request_id=request_id, generated_tokens=[0] * n, error=None,
                                                  is_finished=lambda: True))

    def get_result(self, timeout):
        time.sleep(self.delay)
        return self.results.pop(0) if self.results else None


class _Model:
    device = types.SimpleNamespace(type="cpu")
    config = types.SimpleNamespace(_attn_implementation="sdpa")

    def __init__(self, manager) -> None:
        self.manager = manager

    def init_continuous_batching(self, generation_config, continuous_batching_config):
        self.generation_config, self.cb_config = generation_config, continuous_batching_config
        return self.manager


def test_cb_batch_starting_past_the_deadline_bounds_nothing(monkeypatch):
    """A warm-up whose last result came after the deadline let the timed batch start late: its timed_seconds
    (deadline - start) was negative and bench published "< -35 tok/s" as the peer's bound."""
    manager = _Manager(delay=0.3)
    monkeypatch.setattr(bench_peers, "load_cb_model", lambda *a: (_Model(manager), "sdpa", "sdpa"))
    result = bench.run_hf_continuous(_plan(), timeout_s=0.1)
    assert result.tok_s is None and "no bound" in result.error
    assert "tok_s_upper_bound" not in result.info and "timed_seconds" not in result.info
    assert manager.stopped and manager.destroyed
    with pytest.raises(bench_peers.PeerTimeout) as cut:
        bench_peers.hf_continuous_runs(_Model(_Manager(delay=0.3)), ([[1]], [2]), [([[1], [2]], [3, 4])], 0.6, 0.1)
    assert cut.value.timed_seconds is None


def test_cb_repeats_that_finished_before_a_later_one_timed_out_keep_their_figure(monkeypatch):
    """A deadline hit in repeat 2 threw away repeat 1's measured run: the report kept only an upper bound from the
    sliver of time repeat 2 had (about 1,150 tok/s where repeat 1 had measured about 400)."""
    manager = _Manager(delay=0.2)
    monkeypatch.setattr(bench_peers, "load_cb_model", lambda *a: (_Model(manager), "sdpa", "sdpa"))
    batch = ([[1], [2], [3], [4]], [100] * 4)
    plan = bench.Plan(warmup=([[9]], [2]), batches=[batch, batch], model_dir=Path("x"), device="cpu",
                      dtype="float32")
    result = bench.run_hf_continuous(plan, timeout_s=1.3)  # warm-up 0.2 s, repeat 1 about 0.8 s, repeat 2 cut
    assert len(result.runs_s) == 1 and 0.7 < result.runs_s[0] < 1.3, result.runs_s
    assert result.error is None and result.tok_s == pytest.approx(400 / result.runs_s[0])
    assert "tok_s_upper_bound" not in result.info and "repeat 2 of 2 ran past the deadline" in result.info["cut_short"]
    assert manager.stopped and manager.destroyed


def test_an_engine_whose_figure_was_withdrawn_fails_the_command():
    """Requests cut short (max_model_len below a request's length) withdrew the engine's figure, and the command
    still exited 0, where a short peer fails it."""
    report = {"engine": {"error": "4 requests generated fewer tokens than requested (94 of 188)"},
              "peers": {"hf_static": {"tok_s": 600.0}}}
    assert bench.failed_contenders(report) == [bench.LABELS["engine"]]
    assert bench.failed_contenders({"engine": {"tok_s": 900.0}, "peers": {}}) == []
    assert bench.failed_contenders({"engine": None, "peers": {}}) == []  # --no-engine


def test_bench_quotes_no_bound_for_a_batch_that_had_no_time(monkeypatch):
    """bench's own guard: a timed_seconds of zero or below is no time to divide by."""
    monkeypatch.setattr(bench_peers, "load_cb_model", lambda *a: (None, "sdpa", "sdpa"))
    for seconds in (0.0, -0.2):
        monkeypatch.setattr(bench_peers, "hf_continuous_runs", lambda *a, s=seconds: (_ for _ in ()).throw(
            bench_peers.PeerTimeout("continuous batching finished 0 of 2 requests in time", s)))
        result = bench.run_hf_continuous(_plan(), timeout_s=1.0)
        assert "no bound" in result.error and "tok_s_upper_bound" not in result.info
        assert bench.failed_contenders({"peers": {"hf_continuous": result.to_json()}}) == []  # a timeout, not a crash


def test_cb_wait_says_how_many_requests_finished_before_the_deadline():
    manager = _Manager()
    manager.add_request(None, "t-0", 2, -1)
    manager.get_result = lambda timeout: manager.results.pop(0) if manager.results else time.sleep(0.05)
    manager.add_request = lambda *a, **k: None  # only t-0 will ever finish
    with pytest.raises(bench_peers.PeerTimeout, match="finished 1 of 2 requests"):
        bench_peers._cb_wait(manager, [[1], [2]], [2, 3], "t", time.perf_counter() + 0.3)


def test_cb_wait_stops_when_the_generation_thread_died():
    """A dead manager thread was waited on until the deadline (an hour by default) and then called a timeout."""
    start = time.perf_counter()
    manager = _Manager(running=False)
    manager.add_request = lambda *a, **k: None
    with pytest.raises(RuntimeError, match="thread stopped"):
        bench_peers._cb_wait(manager, [[1]], [2], "t", start + 30)
    assert time.perf_counter() - start < 5


def test_cb_manager_is_stopped_when_a_request_fails_to_add():
    manager = _Manager(fail_on="run0-1")
    with pytest.raises(RuntimeError, match="boom"):
        bench_peers.hf_continuous_runs(_Model(manager), ([[1]], [2]), [([[1], [2]], [3, 4])], 0.6, 30.0)
    assert manager.stopped and manager.destroyed


def test_cb_runs_take_each_batch_on_its_own_after_the_warm_up():
    """Each batch's clock starts at that batch (one started before the loop gave later batches the earlier ones'
    seconds too), and the manager is configured for the longest request of the warm-up and every batch."""
    model = _Model(_Manager(delay=0.05))
    runs = bench_peers.hf_continuous_runs(model, ([[1]], [2]), [([[1], [2], [3]], [3, 4, 6]), ([[3]], [5])],
                                          0.0, 30.0)
    assert [(r.requested_tokens, r.generated_tokens) for r in runs] == [(13, 13), (5, 5)]
    assert all(r.info["num_blocks"] == 4 for r in runs)
    assert runs[0].seconds >= 0.15 and 0.05 <= runs[1].seconds < runs[0].seconds
    config = model.generation_config
    assert (config.max_new_tokens, config.do_sample, config.top_k, config.eos_token_id) == (6, False, 0, None)
    # On the CPU the cache holds twice the blocks of the largest batch (three one-block requests), not the 60-90%
    # of the machine's RAM transformers sizes it to by default.
    assert model.cb_config.num_blocks == 2 * 3


def test_cb_cache_on_the_cpu_is_sized_to_the_workload_and_on_a_gpu_left_to_transformers():
    from transformers import ContinuousBatchingConfig

    page = ContinuousBatchingConfig().page_size
    batches = [([[1] * (page - 1)], [1]), ([[1] * page, [2]], [1, page + 1])]  # 1 block; 2 + 2 blocks
    cpu = types.SimpleNamespace(device=types.SimpleNamespace(type="cpu"))
    assert bench_peers.cb_cache_config(cpu, batches).num_blocks == 2 * 4
    gpu = types.SimpleNamespace(device=types.SimpleNamespace(type="cuda"))
    assert bench_peers.cb_cache_config(gpu, batches) is None


def test_cb_short_requests_are_an_error_not_a_figure(monkeypatch):
    """bench credited the continuous batching peer with every requested token even when the manager generated
    fewer (the engine's own figure is an error then)."""
    manager = _Manager(short_ids=("run0-1",))
    monkeypatch.setattr(bench_peers, "load_cb_model", lambda *a: (_Model(manager), "sdpa", "sdpa"))
    result = bench.run_hf_continuous(_plan(batches=[([[4, 5], [6]], [3, 4])]), timeout_s=30.0)
    assert result.tok_s is None and "fewer tokens" in result.error
    assert result.info["requests_with_wrong_length"] == 1


def test_load_cb_model_falls_back_through_the_candidates(monkeypatch):
    tried = []

    def load(model_dir, dtype, device, name):
        tried.append(name)
        if name != "paged|eager":
            raise ValueError(f"{name} refused")
        return types.SimpleNamespace(config=types.SimpleNamespace(_attn_implementation="eager"))

    monkeypatch.setattr(bench_peers, "load_hf_model", load)
    _, requested, effective = bench_peers.load_cb_model("m", torch.float32, "cpu")
    assert (tried, requested, effective) == (list(bench_peers.CB_ATTN_CANDIDATES), "paged|eager", "eager")

    monkeypatch.setattr(bench_peers, "load_hf_model", lambda *a: (_ for _ in ()).throw(ImportError("no kernels")))
    with pytest.raises(RuntimeError, match="no continuous-batching attention.*sdpa: no kernels; paged"):
        bench_peers.load_cb_model("m", torch.float32, "cpu")


# ----------------------------------------------------------------------------------------------------------------
# bench: a peer that crashes


def test_a_crashing_peer_is_recorded_and_loses_no_other_figure(monkeypatch, tmp_path):
    """A peer's exception (a transformers API it lacks, out of memory) ended bench before the report was written,
    losing the engine's figure measured before it and every later peer's."""
    (tmp_path / "config.json").write_text('{"vocab_size": 128}')
    monkeypatch.setattr(bench, "build_preset", lambda name, cache_dir: tmp_path)
    monkeypatch.setattr(bench, "run_engine", lambda plan, kwargs: bench.Result(runs_s=[1.0], requested_tokens=8))

    def static(plan):
        raise TypeError("generate() got an unexpected keyword argument 'x'")

    monkeypatch.setattr(bench, "run_hf_static", static)
    monkeypatch.setattr(bench, "run_hf_continuous", lambda plan, t: bench.Result(runs_s=[2.0], requested_tokens=8))
    out = tmp_path / "r.json"
    report = bench.main(["--preset", "cpu-small", "--peers", "all", "--num-seqs", "2", "--device", "cpu",
                         "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["engine"]["tok_s"] == 8.0 and report["peers"]["hf_continuous"]["tok_s"] == 4.0
    error = report["peers"]["hf_static"]["error"]
    assert "TypeError" in error and "unexpected keyword argument 'x'" in error and "transformers" in error
    assert report["ratios"] == {"engine_vs_hf_continuous": 2.0}


def test_a_crashed_or_short_peer_fails_the_command_a_timed_out_one_does_not():
    report = {"peers": {"hf_static": {"error": "OutOfMemoryError: x"},
                        "hf_continuous": {"error": "timed out", "info": {"timed_out": True}}}}
    assert bench.failed_contenders(report) == [bench.LABELS["hf_static"]]
    report["peers"]["hf_static"] = {"tok_s": 600.0}
    assert bench.failed_contenders(report) == []
