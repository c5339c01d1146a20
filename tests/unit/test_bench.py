"""The offline benchmark: BENCHMARKS.md's generators, the transformers peers' accounting, the report's shape."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import time

import pytest

from engine_service import bench, bench_peers


def test_workload_a_matches_the_spec_totals():
    # BENCHMARKS.md: "That gives 142,827 prompt tokens and 133,966 output tokens."
    w = bench.make_workload(bench.WORKLOAD_A)
    assert len(w.prompts) == len(w.max_tokens) == 256
    assert w.num_prompt_tokens == 142_827
    assert w.num_output_tokens == 133_966
    assert all(100 <= len(p) <= 1024 for p in w.prompts)
    assert all(0 <= t <= 10_000 for p in w.prompts for t in p)
    assert all(100 <= n <= 1024 for n in w.max_tokens)


def test_workload_b_totals_and_determinism():
    w = bench.make_workload(bench.WORKLOAD_B)
    assert len(w.prompts) == 64
    assert (w.num_prompt_tokens, w.num_output_tokens) == (8_831, 9_706)
    assert all(0 <= t <= 8_000 for p in w.prompts for t in p)
    again = bench.make_workload(bench.WORKLOAD_B)
    assert (again.prompts, again.max_tokens) == (w.prompts, w.max_tokens)


def test_overrides_bound_count_and_lengths():
    w = bench.make_workload(bench.WORKLOAD_A, num_seqs=4, max_input_len=64, max_output_len=16)
    assert len(w.prompts) == len(w.max_tokens) == 4
    assert all(1 <= len(p) <= 64 for p in w.prompts)
    assert all(1 <= n <= 16 for n in w.max_tokens)


def test_salted_prompts_keep_lengths_and_differ_in_the_first_token():
    prompts = [[5, 6, 7], [9]]
    assert bench.salted(prompts, 0, 10) is prompts
    assert bench.salted(prompts, 2, 10) == [[7, 6, 7], [1]]
    assert bench.fit_vocab([[12, 3]], 10) == [[2, 3]]


def test_bad_flags_are_argparse_errors(tmp_path, capsys):
    for argv in (
        ["--num-seqs", "0"],
        ["--no-engine", "--peers", "none"],
        ["--model", str(tmp_path)],
        ["--peers", "vllm"],
        ["--preset", "cpu-small", "--model", str(tmp_path)],
    ):
        with pytest.raises(SystemExit) as exc:
            bench.parse_args(argv)
        assert exc.value.code == 2, argv


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny-qwen3")
    Qwen3ForCausalLM(config).save_pretrained(path)
    return path


def test_hf_static_counts_only_requested_tokens(tiny_model_dir):
    import torch

    model = bench_peers.load_hf_model(str(tiny_model_dir), torch.float32, "cpu", "sdpa")
    prompts, max_tokens = [[1, 2, 3], [4, 5, 6, 7, 8], [9]], [4, 7, 2]
    run = bench_peers.hf_static_once(model, prompts, max_tokens, bench.TEMPERATURE)
    assert run.seconds > 0
    assert run.requested_tokens == 13
    # Every row of the padded batch runs to the longest request: 3 rows x 7 tokens are computed.
    assert run.generated_tokens == 21
    # With progress lines (part d of the GPU check reads them when a time limit cuts the run), the same tokens.
    torch.manual_seed(0)
    plain = bench_peers.hf_static_once(model, prompts, max_tokens, 0.0)
    torch.manual_seed(0)
    shown = bench_peers.hf_static_once(model, prompts, max_tokens, 0.0, progress=True)
    assert (shown.generated_tokens, shown.requested_tokens) == (plain.generated_tokens, plain.requested_tokens)


def test_hf_static_progress_lines(capsys):
    """Every 128 tokens but the last, how far generate() has got; the scores go through unchanged."""
    import torch

    p = bench_peers._Progress(300, start=0.0)
    scores = torch.randn(2, 5)
    assert all(p(None, scores) is scores for _ in range(300))
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" after ")[0] for line in lines] == [
        "  transformers static: token 128 of 300", "  transformers static: token 256 of 300"]


def test_left_padding_right_aligns_prompts():
    import torch

    ids, mask = bench_peers.pad_left([[3, 4], [5]], torch.device("cpu"))
    assert ids.tolist() == [[3, 4], [0, 5]]
    assert mask.tolist() == [[1, 1], [0, 1]]


@pytest.fixture(scope="module")
def report_files(tiny_model_dir, tmp_path_factory):
    """One bench run on the tiny model with both peers and a stand-in engine (the engine has its own tests)."""
    out = tmp_path_factory.mktemp("bench")

    def fake_engine(plan, kwargs):
        requested = sum(plan.batches[0][1])
        return bench.Result(runs_s=[0.5], requested_tokens=requested, generated_tokens=requested)

    argv = ["--model", str(tiny_model_dir), "--device", "cpu", "--num-seqs", "3", "--max-input-len", "8"]
    argv += ["--max-output-len", "4", "--peers", "all", "--repeats", "2"]
    argv += ["--json", str(out / "r.json"), "--plot", str(out / "r.png")]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "run_engine", fake_engine)
        report = bench.main(argv)
    return report, out


def test_report_json_schema_and_peer_accounting(report_files):
    report, out = report_files
    data = json.loads((out / "r.json").read_text())
    assert data == json.loads(json.dumps(report))
    requested = data["workload"]["output_tokens"]
    assert data["workload"]["num_seqs"] == 3
    assert data["engine"]["tok_s"] == pytest.approx(requested / 0.5)
    assert data["engine"]["seconds"] == 0.5
    assert set(data["peers"]) == {"hf_static", "hf_continuous"}
    for peer in data["peers"].values():
        assert peer["tok_s"] > 0 and peer["seconds"] > 0
        assert len(peer["runs_s"]) == 2
        assert peer["requested_tokens"] == requested
        assert peer["tok_s"] == pytest.approx(requested / peer["seconds"])
    static = data["peers"]["hf_static"]
    assert static["generated_tokens"] == 3 * static["info"]["new_tokens_per_row"]
    cb = data["peers"]["hf_continuous"]
    assert cb["generated_tokens"] == requested
    assert cb["info"]["requests_with_wrong_length"] == 0
    assert cb["info"]["attn_implementation"]["effective"]
    assert set(data["ratios"]) == {"engine_vs_hf_static", "engine_vs_hf_continuous"}


def test_table_shows_ratios(report_files):
    table = bench.format_table(report_files[0])
    assert "engine" in table and "transformers continuous" in table
    assert table.count("x") >= 6  # both ratio columns on all three rows


def test_plot_is_a_png(report_files):
    png = (report_files[1] / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk comes first
    assert width > 100 and height > 100
    assert len(png) > 1000


def test_preset_is_built_once_and_reused(tmp_path):
    path = bench.build_preset("cpu-small", tmp_path)
    config = bench.read_model_config(path)
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (4, 256, 8192)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (8, 4, 32)
    assert config["tie_word_embeddings"] is True
    stamp = (path / "config.json").stat().st_mtime_ns
    assert bench.build_preset("cpu-small", tmp_path) == path
    assert (path / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["cpu-small"]  # no staging directory left behind


def test_a_preset_built_from_another_definition_is_rebuilt_not_reused(tmp_path, monkeypatch):
    """The cache is keyed by the preset's definition: a directory built before the preset changed (or by a
    version that wrote no stamp) would have been benchmarked as the new shape."""
    path = bench.build_preset("cpu-small", tmp_path)
    changed = dataclasses.replace(bench.PRESETS["cpu-small"],
                                  config={**bench.PRESETS["cpu-small"].config, "num_hidden_layers": 2})
    monkeypatch.setitem(bench.PRESETS, "cpu-small", changed)
    assert bench.build_preset("cpu-small", tmp_path) == path
    assert bench.read_model_config(path)["num_hidden_layers"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["cpu-small"]  # the stale build removed, no staging left
    (path / bench.PRESET_STAMP).unlink()  # as an older version left it
    stamp = (path / "config.json").stat().st_mtime_ns
    assert bench.build_preset("cpu-small", tmp_path) == path
    assert (path / "config.json").stat().st_mtime_ns != stamp
    assert (path / bench.PRESET_STAMP).is_file()


def test_an_unknown_preset_is_refused_by_name_even_when_a_directory_of_that_name_exists(tmp_path):
    (tmp_path / "nope").mkdir()
    (tmp_path / "nope" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"unknown preset 'nope'; the presets are cpu-small, .*qwen3-0.6b"):
        bench.build_preset("nope", tmp_path)


def test_engine_runs_the_plan(tiny_model_dir):
    w = bench.make_workload(bench.WORKLOAD_A, num_seqs=3, max_input_len=8, max_output_len=4)
    prompts = bench.fit_vocab(w.prompts, 128)
    plan = bench.Plan(
        warmup=([prompts[0]], [2]),
        batches=[(prompts, w.max_tokens)],
        model_dir=tiny_model_dir,
        device="cpu",
        dtype="float32",
    )
    result = bench.run_engine(plan, {"enforce_eager": True})
    assert result.requested_tokens == result.generated_tokens == w.num_output_tokens
    assert result.tok_s > 0


def _small_plan(model_dir) -> bench.Plan:
    """A one-request warm-up, then one timed batch of two requests asking for 7 tokens in all."""
    return bench.Plan(
        warmup=([[1, 2, 3]], [2]),
        batches=[([[4, 5], [6]], [3, 4])],
        model_dir=model_dir,
        device="cpu",
        dtype="float32",
    )


def test_continuous_batching_past_its_deadline_is_an_error_not_a_hang(tiny_model_dir):
    plan = _small_plan(tiny_model_dir)
    result = bench.run_hf_continuous(plan, timeout_s=1e-3)
    assert result.tok_s is None
    assert "requests" in result.error
    # The deadline passed in set-up or the warm-up: no timed batch ran, so there is no bound to quote.
    assert "no bound" in result.error and "tok_s_upper_bound" not in result.info


def test_continuous_batching_bound_divides_by_the_time_the_timed_batch_had(tiny_model_dir, monkeypatch):
    """A timed batch cut short by the deadline bounds the peer by requested tokens over the time that batch
    had (deadline - its start), not over the whole deadline, part of which set-up and the warm-up used."""

    def fake_wait(manager, prompts, max_tokens, tag, deadline):
        if tag == "warmup":
            time.sleep(1.0)  # the warm-up eats a second of the deadline
            return {}
        raise bench_peers.PeerTimeout("continuous batching finished 0 of 2 requests in time")

    monkeypatch.setattr(bench_peers, "_cb_wait", fake_wait)
    plan = _small_plan(tiny_model_dir)
    result = bench.run_hf_continuous(plan, timeout_s=30.0)
    timed = result.info["timed_seconds"]
    assert 0 < timed <= 29.0
    assert result.info["tok_s_upper_bound"] == pytest.approx(7 / timed)


def test_engine_cut_short_by_max_model_len_is_an_error_not_a_figure(tiny_model_dir):
    """tok/s divided the requested tokens by the time: with max_model_len cutting requests short, the engine was
    credited with tokens it never generated (51% too fast in an audit's run)."""
    plan = bench.Plan(warmup=([[1, 2, 3]], [2]), batches=[([[4, 5, 6, 7, 8], [6]], [40, 4])],
                      model_dir=tiny_model_dir, device="cpu", dtype="float32")
    result = bench.run_engine(plan, {"enforce_eager": True, "max_model_len": 16})
    assert result.tok_s is None and result.info["requests_with_wrong_length"] == 1
    assert f"({result.generated_tokens} of {result.requested_tokens})" in result.error


class _SteppingEngine:
    """Each step takes `step_s` and gives every live request one token."""

    def __init__(self, step_s: float) -> None:
        self.step_s, self.live = step_s, {}

    def add_request(self, rid, prompt, params):
        self.live[rid] = params.max_tokens

    def has_unfinished_requests(self):
        return bool(self.live)

    def step(self):
        import types

        time.sleep(self.step_s)
        outs = []
        for rid in list(self.live):
            self.live[rid] -= 1
            if not self.live[rid]:
                del self.live[rid]
            outs.append(types.SimpleNamespace(request_id=rid, new_token_ids=[1], finished=rid not in self.live,
                                              error=None))
        return outs


def test_inprocess_clocks_start_at_arrival_as_the_grpc_client_does(monkeypatch):
    """A request due while a step ran was clocked from when the loop admitted it, after that step: its TTFT left out
    the wait the gRPC path counts (p50 100 ms against 123 ms measured from arrival, in an audit's run)."""
    from clients import serving_bench as sb

    starts: list[float] = []
    real = time.perf_counter

    def clock() -> float:
        now = real()
        starts or starts.append(now)
        return now

    monkeypatch.setattr(sb.time, "perf_counter", clock)
    n, rate = 8, 20.0
    timings, _ = sb.run_inprocess(_SteppingEngine(0.1), sb.Workload([[1, 2, 3]] * n, [3] * n), 10**6, rate)
    t0 = starts[0]
    for timing, due in zip(timings, sb.arrivals(n, rate), strict=True):
        assert timing.start == pytest.approx(t0 + due)


def test_grpc_over_inprocess_ratios_are_kept_per_concurrency():
    """The ratio's median pooled every concurrency at a rate into one figure that matched no setting; an in-process
    run that produced nothing made the report divide by zero and write nothing."""
    from clients import serving_bench as sb

    throughput = {("grpc", 1): 50.0, ("inprocess", 1): 100.0, ("grpc", 64): 100.0, ("inprocess", 64): 100.0}
    rows = [{"mode": m, "rate": float("inf"), "concurrency": c, "output_throughput": throughput[(m, c)]}
            for _ in range(3) for c in (1, 64) for m in ("grpc", "inprocess")]
    report = sb.ratio_report(rows, [1, 64], [float("inf")])
    assert report["grpc_over_inprocess_rate_inf_concurrency_1"]["median"] == 0.5
    assert report["grpc_over_inprocess_rate_inf_concurrency_64"]["median"] == 1.0
    rows[1]["output_throughput"] = 0.0  # a failed in-process run
    pairs = sb.ratio_report(rows, [1, 64], [float("inf")])["grpc_over_inprocess_rate_inf_concurrency_1"]["pairs"]
    assert math.isnan(pairs[0]) and pairs[1:] == [0.5, 0.5]


@pytest.mark.parametrize("name", ["A", "B"])
def test_the_serving_bench_draws_the_workloads_the_engine_bench_does(name):
    """The serving benchmark (a client: no torch, no engine_service) has its own copy of BENCHMARKS.md's generators;
    it must draw the requests the engine bench draws, so that a served run of workload A is the headline's work."""
    from clients import serving_bench as sb

    spec = {"A": bench.WORKLOAD_A, "B": bench.WORKLOAD_B}[name]
    ours, theirs = sb.workload(name, 151_936), bench.make_workload(spec)
    assert (ours.prompts, ours.max_tokens) == (theirs.prompts, theirs.max_tokens)
    assert sb.workload(name, 151_936, 3).prompts == theirs.prompts[:3]
    assert sb.workload_b(8192, 64).max_tokens == bench.make_workload(bench.WORKLOAD_B).max_tokens


def test_the_serving_benchmarks_model_follows_its_preset(tmp_path, monkeypatch):
    """scripts.bench_model's copy (the preset plus a tokenizer) is rebuilt when the preset it copied changed."""
    from scripts.bench_model import build_bench_model

    out = tmp_path / "tok"
    assert build_bench_model(out, tmp_path / "presets") == out
    assert (out / "tokenizer.json").is_file() and bench.read_model_config(out)["num_hidden_layers"] == 4
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    assert build_bench_model(out, tmp_path / "presets") == out
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp  # reused
    changed = dataclasses.replace(bench.PRESETS["cpu-small"],
                                  config={**bench.PRESETS["cpu-small"].config, "num_hidden_layers": 2})
    monkeypatch.setitem(bench.PRESETS, "cpu-small", changed)
    assert build_bench_model(out, tmp_path / "presets") == out
    assert bench.read_model_config(out)["num_hidden_layers"] == 2 and (out / "tokenizer.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["presets", "tok"]  # nothing stale or staged left
