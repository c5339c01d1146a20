"""The CUDA-graph runner's host-side logic, on CPU: the size ladder, padded packing, and the whole replay
path with a stand-in for graph replay (same static buffers and padding lanes, forward re-run eagerly)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine_service.cuda_graphs import capture_sizes, pack_decode_inputs, pick_size
from engine_service.host_copy import rows_to_device


def test_capture_sizes_ladder():
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 24, 32] + list(range(48, 257, 16))
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 24, 32, 40]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(1) == [1]
    assert capture_sizes(50) == [1, 2, 4, 8, 16, 24, 32, 48, 50]


def test_pick_size_smallest_that_fits():
    sizes = [1, 2, 4, 8, 16, 24, 32, 48]
    assert [pick_size(sizes, n) for n in (1, 2, 3, 5, 16, 17, 33, 48)] == [1, 2, 4, 8, 16, 24, 48, 48]
    assert pick_size(sizes, 49) is None


def test_pack_pads_lanes_and_tables():
    tables = [[7, 8, 9], [4], [5, 6]]
    flat, width = pack_decode_inputs([11, 12, 13], [40, 3, 20], [146, 51, 99], [41, 4, 21], tables, 5)
    s = 5
    assert width == 3
    assert flat[:s] == [11, 12, 13, 0, 0]  # ids: padding lanes read token 0
    assert flat[s : 2 * s] == [40, 3, 20, 0, 0]  # positions
    assert flat[2 * s : 3 * s] == [146, 51, 99, -1, -1]  # slot -1: the KV store skips padding lanes
    assert flat[3 * s : 4 * s] == [41, 4, 21, 0, 0]  # context 0: attention writes zeros
    assert flat[4 * s : 5 * s] == [0, 2, 1, 3, 4]  # attention's launch order: longest first, then padding
    assert flat[5 * s :] == [7, 8, 9, 4, 0, 0, 5, 6, 0]  # real rows only, each padded to the widest
    # A full batch has no padding lanes.
    flat, width = pack_decode_inputs([1], [0], [0], [1], [[3]], 1)
    assert (flat, width) == ([1, 0, 0, 1, 0, 3], 1)


def test_pack_in_two_halves_balances_rows_and_maps_them_back():
    """Two-batch overlap: rows 0..ceil(n/2) go to the first half's lanes, the rest to the second's, each padded
    after its real lanes; each half's launch order is in its own lanes; the row lanes put the output back in row
    order; every lane's table is sent."""
    tables = [[7, 8, 9], [4], [5, 6]]
    flat, width = pack_decode_inputs([11, 12, 13], [40, 3, 20], [146, 51, 99], [41, 4, 21], tables, 6, half=3)
    s = 6
    assert width == 3
    assert flat[:s] == [11, 12, 0, 13, 0, 0]  # rows 0, 1 | row 2: two lanes, then one
    assert flat[s : 2 * s] == [40, 3, 0, 20, 0, 0]
    assert flat[2 * s : 3 * s] == [146, 51, -1, 99, -1, -1]
    assert flat[3 * s : 4 * s] == [41, 4, 0, 21, 0, 0]
    assert flat[4 * s : 5 * s] == [0, 1, 2, 0, 1, 2]  # each half's order in its own lanes: longest first, padding
    assert flat[5 * s : 6 * s] == [0, 1, 3, 2, 4, 5]  # row -> lane: real rows first, then the padding lanes
    assert flat[6 * s :] == [7, 8, 9, 4, 0, 0, 0, 0, 0, 5, 6, 0, 0, 0, 0, 0, 0, 0]
    lanes = flat[5 * s : 6 * s]
    ids = flat[:s]
    assert [ids[lane] for lane in lanes[:3]] == [11, 12, 13]
    with pytest.raises(ValueError, match="do not fit"):
        pack_decode_inputs([1] * 5, [0] * 5, [0] * 5, [1] * 5, [[1]] * 5, 5, half=2)


def test_rows_to_device_pads_ragged_block_tables_with_zeros():
    """The eager steps' block tables: rows of any length, padded with 0 to the widest (0 keeps gathers in range)."""
    rng = random.Random(0)
    rows = [[rng.randrange(1, 10_000) for _ in range(rng.randrange(1, 40))] for _ in range(64)]
    width = max(map(len, rows))
    got = rows_to_device(rows, width, torch.int32, torch.device("cpu"))
    want = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int32)
    assert got.dtype == torch.int32 and torch.equal(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stand_in_replay_gives_eager_tokens(tmp_path, backend):
    """Decode through the graph runner's static buffers (padded to 1, 2, 4 lanes) gives the eager tokens."""
    if backend == "triton":
        from tests.support import require_triton_interpreter

        require_triton_interpreter()
    from engine_service import LLM, SamplingParams
    from engine_service.cuda_graphs import DecodeGraphRunner
    from tests.integration.tiny import VOCAB, make_qwen3

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=2, dtype=torch.float32)
    rng = random.Random(0)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (3, 9, 17)]
    # Different lengths, so the decode batch shrinks 3 -> 2 -> 1 (sizes 4, 2 and 1, with padding lanes).
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in (6, 4, 2)]
    kwargs = dict(
        device="cpu",
        dtype="float32",
        attention_backend=backend,
        kvcache_block_size=8,
        num_kvcache_blocks=32,
        max_num_seqs=4,
        max_model_len=64,
    )
    with LLM(tmp_path, **kwargs) as llm:
        eager = [o["token_ids"] for o in llm.generate(prompts, params)]
    # The replayed run also schedules ahead (as on CUDA): its decode inputs are gathered on the device.
    with LLM(tmp_path, **kwargs, overlap_scheduling=True) as llm:
        graphs = DecodeGraphRunner(llm.runner, [1, 2, 4], use_cuda_graphs=False)
        graphs.capture()
        assert all(r.ok for r in graphs.self_check(seed=1))
        llm.runner.graphs = graphs
        replayed = [o["token_ids"] for o in llm.generate(prompts, params)]
        # The last step decoded one sequence at size 1; steps with 3 sequences used size 4 with 1 padding lane.
        assert graphs.num_replays >= 5
        assert graphs.block_tables.shape == (4, 8)  # width ceil(max_model_len / block_size)
    assert replayed == eager


def test_stand_in_replay_decodes_to_a_max_model_len_not_a_multiple_of_block_size(tmp_path):
    """The static block table must be ceil(max_model_len / block_size) wide: rounded down (66 // 8 = 8 blocks) it
    had no column for positions 64 and 65, and decoding there through the graph runner failed ("index 8 is out of
    bounds"); every other CPU test uses a max_model_len that is a multiple of the block size, where the two agree.
    A 60-token prompt decoded to the limit through the replay path gives the eager tokens."""
    from engine_service import LLM, SamplingParams
    from engine_service.cuda_graphs import DecodeGraphRunner
    from tests.integration.tiny import VOCAB, make_qwen3

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=2, dtype=torch.float32)
    rng = random.Random(0)
    prompt = [rng.randrange(VOCAB) for _ in range(60)]
    params = SamplingParams(temperature=0.0, max_tokens=100)  # capped at max_model_len: 6 tokens
    kwargs = dict(device="cpu", dtype="float32", attention_backend="torch", kvcache_block_size=8,
                  num_kvcache_blocks=32, max_num_seqs=4, max_model_len=66)
    with LLM(tmp_path, **kwargs) as llm:
        eager = llm.generate([prompt], params)[0]
    with LLM(tmp_path, **kwargs) as llm:
        graphs = DecodeGraphRunner(llm.runner, [1, 2, 4], use_cuda_graphs=False)
        graphs.capture()
        assert graphs.block_tables.shape == (4, 9)  # ceil(66 / 8)
        llm.runner.graphs = graphs
        replayed = llm.generate([prompt], params)[0]
        assert graphs.num_replays == 5  # every decode step; the last stores position 64, in the ninth block
    assert len(eager["token_ids"]) == 6 and eager["finish_reason"] == "length"
    assert replayed["token_ids"] == eager["token_ids"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_stand_in_replay_in_two_halves_gives_the_tokens_of_one_batch(tmp_path, backend):
    """Two-batch overlap on the CPU (one stream, the same computation): every captured size from 2 on runs as two
    halves through the static buffers, padding lanes in both halves (the first half padded too, so the gather back
    into row order moves rows), and greedy tokens equal those of decode in one batch (float64 exact on the torch
    backend; float32 on triton, whose interpreter computes its dots in float32); replay equals the eager forward it
    stands in for, at every size."""
    if backend == "triton":
        from tests.support import require_triton_interpreter

        require_triton_interpreter()
    from engine_service import LLM, SamplingParams
    from engine_service.cuda_graphs import DecodeGraphRunner
    from tests.integration.tiny import VOCAB, make_qwen3

    dtype = "float32" if backend == "triton" else "float64"
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=2,
               dtype=torch.float32 if backend == "triton" else torch.float64)
    rng = random.Random(3)
    prompts = [[rng.randrange(VOCAB) for _ in range(n)] for n in (3, 9, 17, 5, 11)]
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in (5, 4, 2, 5, 3)]  # 5 -> 4 -> 3 -> 2 running
    # The triton backend with the fused kernels, as on CUDA: each half's RoPE kernel stores its K/V in the cache.
    kwargs = dict(device="cpu", dtype=dtype, attention_backend=backend, kvcache_block_size=8,
                  num_kvcache_blocks=64, max_num_seqs=8, max_model_len=64, fused_ops=backend == "triton")
    with LLM(tmp_path, **kwargs) as llm:
        eager = [o["token_ids"] for o in llm.generate(prompts, params)]
    with LLM(tmp_path, **kwargs, overlap_scheduling=True) as llm:
        graphs = DecodeGraphRunner(llm.runner, [1, 2, 8], use_cuda_graphs=False, two_batch_overlap=True,
                                   halved_from=2)
        assert graphs.halves == {2: 1, 8: 4}
        graphs.capture()
        assert all(r.ok for r in graphs.self_check(seed=1))
        llm.runner.graphs = graphs
        loads = []
        load = graphs._load
        graphs._load = lambda ids, *rest: (loads.append((len(ids), rest[-1])), load(ids, *rest))[1]
        replayed = [o["token_ids"] for o in llm.generate(prompts, params)]
        assert graphs.num_replays >= 4
    # 5, 4 and 3 rows at size 8: the first half (4 lanes) holds 3 or 2 of them, so rows 3.. came from lanes 4..
    assert {(5, 8), (4, 8), (3, 8)} <= set(loads), loads
    assert replayed == eager


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "folded-matmul"])
def test_padding_lane_inputs_in_static_buffers(tmp_path, monkeypatch, fused):
    """Three sequences at size 4: the padding lane's inputs (slot -1, context 0, token 0, launched last), and its
    attention rows exactly zero and every hidden row finite, on both torch attention paths. The padding lane sees key
    0 only so that its softmax is finite: without that, torch's fused SDPA happens to return zeros for a fully masked
    row, but the matmul path (torch without SDPA's enable_gqa) made the lane NaN; and the lane's output must be
    zeroed, not attention over key 0."""
    from engine_service import LLM
    from engine_service.attention import torch_backend
    from engine_service.cuda_graphs import DecodeGraphRunner
    from engine_service.model_runner import StepInputs
    from tests.integration.tiny import make_qwen3

    if fused and not torch_backend.SDPA_GQA:
        pytest.skip("this torch's scaled_dot_product_attention has no enable_gqa")
    monkeypatch.setattr(torch_backend, "SDPA_GQA", fused)
    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=1, dtype=torch.float32)
    with LLM(tmp_path, device="cpu", dtype="float32", attention_backend="torch", kvcache_block_size=8,
             num_kvcache_blocks=16, max_num_seqs=4, max_model_len=64) as llm:
        graphs = DecodeGraphRunner(llm.runner, [1, 2, 4], use_cuda_graphs=False)
        graphs.capture()
        attention_outs = []
        forward = graphs.backend.forward

        def recording_forward(*args):
            out = forward(*args)
            attention_outs.append(out.clone())
            return out

        monkeypatch.setattr(graphs.backend, "forward", recording_forward)
        # Stale contents, as a used cache holds: the key 0 a padding lane sees (block 0 of its zero table) is not 0.
        gen = torch.Generator().manual_seed(0)
        for cache in (llm.runner.k_cache, llm.runner.v_cache):
            cache.copy_(torch.randn(cache.shape, generator=gen))
        x = StepInputs(ids=[5, 6, 7], positions=[9, 0, 16], slots=[25, 32, 88], q_lens=[1, 1, 1],
                       ctx_lens=[10, 1, 17], tables=[[2, 3], [4], [9, 10, 11]], sample_rows=[0, 1, 2],
                       num_decode=3)
        assert graphs.can_run(x)
        hidden = graphs.run(x)
        assert hidden.shape == (3, 32) and bool(torch.isfinite(graphs.hidden[:4]).all())
        assert len(attention_outs) == 1  # one layer, one replay
        (out,) = attention_outs
        assert out.shape[0] == 4 and bool(torch.isfinite(out).all())
        assert bool((out[3] == 0).all()), "the padding lane's attention output is not zero"
        assert bool((out[:3].abs().sum(dim=(1, 2)) > 0).all())
        assert graphs.slot_mapping[:4].tolist() == [25, 32, 88, -1]
        assert graphs.context_lens[:4].tolist() == [10, 1, 17, 0]
        assert graphs.input_ids[:4].tolist() == [5, 6, 7, 0]
        assert graphs.block_tables[:3, :3].tolist() == [[2, 3, 0], [4, 0, 0], [9, 10, 11]]
        assert graphs.seq_order[:4].tolist() == [2, 0, 1, 3]  # attention's launch order: longest first, padding last
        assert graphs.metadata(4).seq_order.data_ptr() == graphs.seq_order.data_ptr()  # what a graph reads
        # A step with a prefill row, or more sequences than the largest graph, runs eagerly.
        mixed = StepInputs([1, 2, 3], [0, 0, 1], [0, 8, 9], [1, 2], [1, 2], [[0], [1]], [0, 2], 1)
        assert not graphs.can_run(mixed)
        five = StepInputs([1] * 5, [0] * 5, list(range(5)), [1] * 5, [1] * 5, [[0]] * 5, [], 5)
        assert not graphs.can_run(five)


def test_eager_decode_steps_launch_attention_longest_first(tmp_path):
    """The eager path's metadata carries the launch order for decode-only steps on the triton backend; steps
    with a prefill, and other backends, have none."""
    from tests.support import require_triton_interpreter

    require_triton_interpreter()
    from engine_service import LLM
    from tests.integration.tiny import make_qwen3

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=1, dtype=torch.float32)
    for backend in ("triton", "torch"):
        with LLM(tmp_path, device="cpu", dtype="float32", attention_backend=backend, kvcache_block_size=8,
                 num_kvcache_blocks=16, max_num_seqs=4, max_model_len=64) as llm:
            meta = llm.runner._metadata([1, 1, 1, 1], [5, 9, 2, 9], [[0], [1, 2], [3], [4, 5]], [4, 8, 25, 40], 4)
            mixed = llm.runner._metadata([1, 3], [5, 9], [[0], [1, 2]], [4, 6, 7, 8], 1)
            assert mixed.seq_order is None
            if backend == "torch":
                assert meta.seq_order is None
            else:
                assert meta.seq_order.dtype == torch.int32 and meta.seq_order.tolist() == [1, 3, 0, 2]


def _dry_run_graphs(tmp_path, expect_rc: int):
    """scripts/gpu_check.py's part g at toy sizes on CPU; (its output folder, graphs.json)."""
    import json

    from scripts import gpu_check

    out = tmp_path / "out"
    out.mkdir()
    assert gpu_check.cmd_graphs(out, tmp_path / "presets", cpu_dry_run=True) == expect_rc
    return out, json.loads((out / "graphs.json").read_text())


def _table(out, capsys, status: str) -> str:
    """The table gpu_check.sh prints last, for these status.tsv lines."""
    from scripts import gpu_check

    (out / "status.tsv").write_text(status)
    capsys.readouterr()  # what the parts printed
    rc = gpu_check.cmd_summary(out)
    table = capsys.readouterr().out
    assert rc == (gpu_check.SUMMARY_TARGET_MISSED if " MISSED " in _row(table, "(d)") else 0)
    return table


def _row(table: str, prefix: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(prefix))


def test_the_served_run_on_cpu_streams_through_both_services_and_reports(tmp_path, capsys):
    """Part s of the GPU check at toy sizes: both services as processes on a model whose vocabulary is larger than its
    tokenizer's (as the preset's with the demo tokenizer on the GPU: generated ids past the tokenizer detokenize to
    nothing), 4 requests of workload B through them and through an engine in this process, both services stopped
    cleanly, and the table's row."""
    import json

    from scripts import gpu_check

    out = tmp_path / "out"
    out.mkdir()
    assert gpu_check.cmd_served(out, tmp_path / "presets", cpu_dry_run=True) == 0
    report = json.loads((out / "served.json").read_text())
    model = Path(report["model"])
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    assert len(json.loads((model / "tokenizer.json").read_text())["model"]["vocab"]) < vocab
    assert report["exit_codes"] == {"engine": 0, "tokenizer": 0} and "error" not in report
    for mode in ("grpc", "inprocess"):
        assert report[mode]["failed"] == 0 and report[mode]["output_throughput"] > 0, report[mode]
    assert report["num_requests"] == 4 and report["ratio"] > 0
    row = _row(_table(out, capsys, "s\tPASS\t20\t0\n"), "(s)")
    assert " PASS " in row and "through both services" in row and "failed 0" in row


def test_gpu_check_script_flow_on_cpu(tmp_path, capsys):
    """scripts/gpu_check.py's graphs part (check, throughput slice, profile, ITL) and its table, at toy
    sizes on CPU, so the one-shot GPU session does not find a bug in the script itself."""
    import json

    from scripts import gpu_check

    out, report = _dry_run_graphs(tmp_path, 0)
    assert report["graph_check"]["ok"] and len(report["graph_check"]["sizes"]) == 4  # sizes 1, 2, 4, 8
    assert report["slice64"]["tok_s"] > 0 and report["slice64_profile"]["decode"]["steps"] > 0
    assert report["slice64"]["overlap"] is True and report["slice64_no_overlap"]["overlap"] is False
    assert report["slice64_no_overlap"]["tok_s"] > 0
    # Workload A (the engine's half of part d) ran on the same engine, requested tokens over seconds.
    a = report["workload_A"]
    assert a["num_seqs"] == 8 and a["requested_tokens"] == a["generated_tokens"] > 0
    assert a["tok_s"] == pytest.approx(a["requested_tokens"] / a["seconds"])
    # The slice is workload A's first requests: no timed run may find another's prompts in the prefix cache.
    for key in ("workload_A", "slice64", "slice64_no_overlap"):
        assert report[key]["prefix_cache_hit_tokens"] == 0, key
    assert {(r["graphs"], r["overlap"], r["batch"]) for r in report["itl"]} == {
        (True, True, 1), (True, True, 8), (False, True, 1), (False, True, 8), (True, False, 8)
    }
    hf_tok_s = a["tok_s"] / 7  # part d's figure, as bench --no-engine --peers hf-static writes it
    (out / "d_bench_A.json").write_text(json.dumps({"engine": None, "peers": {"hf_static": {"tok_s": hf_tok_s}}}))
    table = _table(out, capsys, "g\tPASS\t3\t0\nd\tPASS\t130\t0\n")
    assert "4/4 sizes bitwise equal" in table and "ITL ms, graphs/eager: batch 1" in table
    d_row = _row(table, "(d)")
    assert f"engine {a['tok_s']:,.0f} tok/s, transformers static {hf_tok_s:,.0f} tok/s (7.0x)" in d_row
    # Toy sizes on a CPU: both runs went through, and the figure is under 28,000 tok/s, which fails the check.
    assert " MISSED " in d_row and "NOT MET" in d_row
    # The kernel breakdown: workload A's steps 5-9 (8 requests at toy sizes, all running), CPU ops standing in.
    k = report["kernels"]
    assert k["steps"] == 5 and k["mean_running"] == 8 and k["busy_ms"] > 0
    assert sum(g["ms"] for g in k["groups"].values()) == pytest.approx(k["busy_ms"])
    assert k["groups"]["matmul"]["ms"] > 0 and 0 < k["busy_share"] <= 1
    assert "device time by kernel" in table and "5 decode steps mid workload A, 8 running" in table
    # And for the prefill: its first steps (steps 2-4 at toy sizes), prompts chunked beside decode rows.
    p = report["prefill_kernels"]
    assert p["steps"] == 3 and p["busy_ms"] > 0 and p["groups"]["matmul"]["ms"] > 0
    assert "3 prefill steps of workload A" in _row(table, "    the same, prefill")
    # Workload A again under the step profiler: every step in one group, its output tokens all accounted for.
    groups = report["workload_A_by_batch"]
    assert groups[0]["group"] == "mixed" and groups[0]["steps"] > 0
    assert all(g["group"].startswith("decode 1-") or g["group"] == "mixed" for g in groups)  # batches <= 8
    assert sum(g["steps"] for g in groups) >= max(a["requested_tokens"] // 8, 1)
    assert all(g["seconds"] > 0 and g["wall_ms"] == pytest.approx(1e3 * g["seconds"] / g["steps"]) for g in groups)
    assert "mixed: " in _row(table, "    workload A by batch")
    itl_row = _row(table, "(f)")
    assert "batch 8 graphs without overlap" in itl_row and "?" not in itl_row
    # Part p, a second engine in a process of its own (here a call), started with the wider token budget:
    # workload A (salted apart) with every token, and its row beside the first engine's figure (PDL needs CUDA,
    # so the narrow figure is the first engine's here).
    assert gpu_check.cmd_second(out, tmp_path / "presets", cpu_dry_run=True) == 0
    second = json.loads((out / "second.json").read_text())
    assert second["pdl"] == {"skipped": "needs CUDA"} and second["pins"] == {}  # torch backend: no tiles
    wide = second["wide_budget"]
    assert wide["max_num_batched_tokens"] == gpu_check.WIDE_BUDGET and wide["pdl"] is False
    assert wide["workload_A"]["requested_tokens"] == wide["workload_A"]["generated_tokens"] == a["requested_tokens"]
    table = _table(out, capsys, "g\tPASS\t3\t0\np\tPASS\t2\t0\nd\tPASS\t130\t0\n")
    row = _row(table, f"    {gpu_check.WIDE_BUDGET:,} tokens a step")
    assert " PASS " in row and (f"workload A {wide['workload_A']['tok_s']:,.0f} tok/s at {gpu_check.WIDE_BUDGET:,} "
                                f"tokens a step, {a['tok_s']:,.0f} at the default (PDL off in both)") in row
    assert "skipped: needs CUDA" in _row(table, "    with PDL")
    # Then the same engine's decode graphs captured again with two-batch overlap (halves from size 2 on here).
    tbo = second["two_batch_overlap"]
    assert tbo["graphs_on"] is True and tbo["halves"] == [2, 4, 8]
    assert tbo["workload_A"]["generated_tokens"] == a["requested_tokens"] and set(tbo["itl"]) == {"1", "8"}
    assert tbo["same_priority"]["workload_A"]["generated_tokens"] == a["requested_tokens"] and tbo["pdl"] is False
    row = _row(table, "    two-batch overlap")
    assert " PASS " in row and f"workload A {tbo['workload_A']['tok_s']:,.0f} tok/s with two-batch overlap" in row
    markdown = (out / "performance.md").read_text()
    assert "| (f) decode ITL | PASS | 3 | ITL ms, graphs/eager: batch 1" in markdown


def test_gpu_check_keeps_measuring_when_graph_capture_fails(tmp_path, monkeypatch, capsys):
    """A capture that raises (the likeliest failure on a first GPU run) is reported in graphs.json and the
    table, and (e) and (f) are still measured, eagerly, rather than the part dying with no figures."""
    from engine_service.cuda_graphs import DecodeGraphRunner

    def fail(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(DecodeGraphRunner, "capture", fail)
    out, report = _dry_run_graphs(tmp_path, 1)
    assert not report["graph_check"]["ok"] and "stream is capturing" in report["graph_check"]["error"]
    assert report["slice64"]["tok_s"] > 0 and report["slice64_no_overlap"]["tok_s"] > 0
    assert {r["graphs"] for r in report["itl"]} == {False} and len(report["itl"]) == 2
    assert "capture failed: RuntimeError" in _row(_table(out, capsys, "g\tFAIL\t3\t1\n"), "(c)")


@pytest.mark.parametrize("how", ["raises", "short"])
def test_gpu_check_still_checks_the_graphs_when_workload_a_fails(tmp_path, monkeypatch, capsys, how):
    """The engine's workload A run raising (say, out of memory), or coming back with a request short of its tokens
    (no figure: printing it raised a TypeError that ended part g), is reported, in graphs.json and row d, and the
    graph check, an acceptance point of its own, still runs in the same process. Part d here stopped before
    writing its JSON: transformers' figure comes from its log."""
    from engine_service import bench

    real = bench.time_engine

    def fail(llm, plan, result):
        if how == "raises":
            raise RuntimeError("CUDA out of memory")
        real(llm, plan, result)
        result.error, result.runs_s = "1 requests generated fewer tokens than asked: CUDA out of memory", []
        return result

    monkeypatch.setattr(bench, "time_engine", fail)
    out, report = _dry_run_graphs(tmp_path, 0)
    if how == "raises":
        assert report["workload_A"] == {"error": "RuntimeError: CUDA out of memory"}
    else:
        assert "CUDA out of memory" in report["workload_A"]["error"] and not report["workload_A"].get("tok_s")
    assert report["graph_check"]["ok"] and report["slice64"]["tok_s"] > 0
    (out / "d.log").write_text("workload A: 256 requests\n  transformers static: 119.30 s, 1,123 tok/s\n")
    d_row = _row(_table(out, capsys, "g\tPASS\t3\t0\nd\tPASS\t130\t0\n"), "(d)")
    assert "FAIL" in d_row and "engine ? tok/s, transformers static 1,123 tok/s" in d_row
    assert "CUDA out of memory" in d_row


def test_gpu_check_row_d_bounds_transformers_static_when_its_time_ran_out(tmp_path):
    """Part d cut by its time limit (the first H200 run: transformers 5.17 did not finish in 172 s) leaves
    its progress lines: row d gives an upper bound on transformers' rate from them, and the ratio as a floor."""
    import json

    from scripts import gpu_check

    (tmp_path / "graphs.json").write_text(json.dumps({"workload_A": {"tok_s": 22846.0}}))
    (tmp_path / "d.log").write_text(
        "workload A: 256 requests, 142,827 prompt tokens, 133,966 output tokens; qwen3-0.6b\n"
        "  transformers static: token 128 of 1024 after 20.0 s\n"
        "  transformers static: token 256 of 1024 after 41.0 s\n")
    row = gpu_check._part_results(tmp_path)["d"]
    # The 768 steps left take at least 21 s a 128 as the steps between the lines did (the 20 s before the first
    # held the prefill: scaling the whole 41 s by 1024 / 256 gave 817, which a fast prefill could put under the
    # real rate).
    bound = 133_966 / (41.0 + 768 * 21.0 / 128)  # 802 tok/s
    assert f"transformers static < {bound:,.0f} tok/s (cut short at token 256 of 1024 after 41 s)" in row
    assert f"(> {22846 / bound:.1f}x)" in row
    # One progress line: the seconds so far alone bound the run.
    (tmp_path / "d.log").write_text(
        "workload A: 256 requests, 142,827 prompt tokens, 133,966 output tokens; qwen3-0.6b\n"
        "  transformers static: token 128 of 1024 after 20.0 s\n")
    assert f"transformers static < {133_966 / 20.0:,.0f} tok/s" in gpu_check._part_results(tmp_path)["d"]
    # The final line, when there is one, is the figure.
    (tmp_path / "d.log").write_text("  transformers static: token 256 of 1024 after 41.0 s\n"
                                    "  transformers static: 150.00 s, 893 tok/s\n")
    assert "transformers static 893 tok/s (25.6x)" in gpu_check._part_results(tmp_path)["d"]
    # Where the decode GEMM tuner picked Triton tiles, from part g's report.
    (tmp_path / "graphs.json").write_text(json.dumps({"workload_A": {"tok_s": 22846.0}, "decode_gemms": {
        "sizes": 21, "ours": {"qkv": [1, 2], "o": list(range(21)), "gate_up": [], "down": [8]}}}))
    assert gpu_check._part_results(tmp_path)["d"].endswith(
        "; decode GEMMs ours at qkv 2/21, o 21/21, gate_up 0/21, down 1/21 sizes")


def _start_up_engine(tmp_path, backend: str, kv_cache_dtype: str = "auto"):
    """A small eager engine on CPU for the start-up warm-up tests: 2 layers, 2 KV heads, max_num_seqs 8, a
    64-token budget."""
    from engine_service import LLM
    from tests.integration.tiny import make_qwen3

    make_qwen3(tmp_path, heads=4, kv_heads=2, head_dim=16, hidden=32, layers=2, dtype=torch.float32)
    return LLM(str(tmp_path), device="cpu", dtype="float32", attention_backend=backend, enforce_eager=True,
               kvcache_block_size=8, num_kvcache_blocks=32, max_num_seqs=8, max_num_batched_tokens=64,
               max_model_len=128, kv_cache_dtype=kv_cache_dtype)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_prefill_tile_tuning_gets_a_scratch_cache_that_holds_its_step(tmp_path, monkeypatch, kv_cache_dtype):
    """ModelRunner._tune_prefill_attention (CUDA-only at start-up), on CPU with the tuner stood in: the scratch
    cache has exactly the blocks the tuning step uses, in the model's per-rank shapes; a tuner failure keeps the
    default tile, and only a malformed LLMSERVE_PREFILL_TILE stops start-up. An fp8 KV cache is tuned over in
    its own dtype with the model's queries."""
    from engine_service.attention import triton_kernels as tk

    llm = _start_up_engine(tmp_path, "torch", kv_cache_dtype)
    runner = llm.runner
    seen = []

    def tuner(k, v, heads, tokens, prompt, decode_rows, decode_len, q_dtype):
        assert k.dtype == v.dtype == (torch.float8_e4m3fn if kv_cache_dtype == "fp8" else torch.float32)
        assert q_dtype == torch.float32
        seen.append((tuple(k.shape), tuple(v.shape), heads, tokens, prompt, decode_rows, decode_len))
        return tk.PREFILL_TILES[1], {tk.PREFILL_TILES[1]: 1.0}

    try:
        monkeypatch.setattr(tk, "tune_prefill_tile", tuner)
        monkeypatch.delenv(tk.PREFILL_TILE_ENV, raising=False)
        runner._tune_prefill_attention()
        # 64-token budget, 8 seqs: 4 decode rows over 64 keys, then a 60-token prompt, in 8-token blocks.
        blocks = tk.prefill_tuning_blocks(64, 64, 4, 64, 8)
        assert blocks == 4 * 8 + 8
        assert seen == [((blocks, 8, 2, 16), (blocks, 8, 2, 16), 4, 64, 64, 4, 64)]

        def failing(*args):
            raise ValueError("some internal error")

        monkeypatch.setattr(tk, "tune_prefill_tile", failing)
        runner._tune_prefill_attention()  # logged, not raised: the default tile stays
        monkeypatch.setenv(tk.PREFILL_TILE_ENV, "bad")
        with pytest.raises(ValueError, match="some internal error"):
            runner._tune_prefill_attention()
    finally:
        llm.close()


def test_warm_up_meets_every_query_tile_and_the_sampler_before_serving(tmp_path, monkeypatch):
    """ModelRunner._warm_up (run at start-up on CUDA), here on CPU with stand-ins for the CUDA memory calls:
    a forward at the token budget, then short prefills of every WARMUP_QUERY_LENS length (each query tile
    of the attention kernels compiles before serving), then the sampler on max_num_seqs rows with filters and a
    bias, without either, and with a bias alone; the sampler's generator is left as it was, and the peak it measured is returned."""
    from engine_service.model_runner import ModelRunner

    llm = _start_up_engine(tmp_path, "torch")
    runner = llm.runner
    try:
        seen_q_lens: list[int] = []
        forward = runner.backend.forward

        def spy_forward(q, k, v, k_cache, v_cache, meta, scale):
            seen_q_lens.append(meta.max_seqlen_q)
            return forward(q, k, v, k_cache, v_cache, meta, scale)

        sampled: list[tuple[int, set[int]]] = []
        sample = runner.sampler.sample

        def spy_sample(logits, rows):
            sampled.append((logits.shape[0], {(r.params.top_k, bool(r.params.logit_bias)) for r in rows}))
            return sample(logits, rows)

        monkeypatch.setattr(runner.backend, "forward", spy_forward)
        monkeypatch.setattr(runner.sampler, "sample", spy_sample)
        for name in ("empty_cache", "reset_peak_memory_stats", "synchronize"):
            monkeypatch.setattr(torch.cuda, name, lambda *a, **k: None)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 12_345)
        state = runner.sampler.generator.get_state()

        assert runner._warm_up() == 12_345
        layers = 2
        expected = [64, *ModelRunner.WARMUP_QUERY_LENS]  # the budget (64 tokens), then every short length
        assert seen_q_lens == [q for q in expected for _ in range(layers)]
        # max_num_seqs rows: filtered and biased; plain (the kernels with their finite check); biased only (without)
        assert sampled == [(8, {(50, True)}), (8, {(-1, False)}), (8, {(-1, True)})]
        assert torch.equal(runner.sampler.generator.get_state(), state)
    finally:
        llm.close()


def test_eager_decode_warm_up_meets_every_split_count_and_writes_nothing(tmp_path, monkeypatch):
    """ModelRunner._warm_up_eager_decode (run at start-up on CUDA when decode runs eagerly), here with the
    triton backend under the interpreter and a stand-in for the CUDA split heuristic: one decode forward per
    split-KV count, at the smallest batch that picks it, and the KV cache is left as it was."""
    from tests.support import require_triton_interpreter

    require_triton_interpreter()
    from engine_service.attention import triton_kernels as tk

    llm = _start_up_engine(tmp_path, "triton")
    runner = llm.runner
    try:
        # As on a GPU with 8 multiprocessors: ceil(16 / programs) splits, at most 16, for decode only.
        def splits(num_seqs, num_kv_heads, max_seqlen_q, device):
            return 1 if max_seqlen_q > 1 else min(16, -(-16 // (num_seqs * num_kv_heads)))

        monkeypatch.setattr(tk, "default_num_kv_splits", splits)
        monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
        seen: list[tuple[int, int, list[int]]] = []
        forward = runner.backend.forward

        def spy_forward(q, k, v, k_cache, v_cache, meta, scale):
            seen.append((len(meta.q_lens), meta.max_seqlen_q, meta.slot_mapping.tolist()))
            out = forward(q, k, v, k_cache, v_cache, meta, scale)
            assert torch.isfinite(out).all()
            return out

        monkeypatch.setattr(runner.backend, "forward", spy_forward)
        runner.k_cache.normal_()
        runner.v_cache.normal_()
        k_before, v_before = runner.k_cache.clone(), runner.v_cache.clone()

        runner._warm_up_eager_decode()

        # kv_heads 2, batches 1-8: splits 8, 4, 3, 2, 2, 2, 2, 1 -> first batches 1, 2, 3, 4 and 8.
        layers = 2
        assert [(n, q) for n, q, _ in seen] == [(n, 1) for n in (1, 2, 3, 4, 8) for _ in range(layers)]
        assert all(slots == [-1] * n for n, _, slots in seen)
        assert torch.equal(runner.k_cache, k_before) and torch.equal(runner.v_cache, v_before)
    finally:
        llm.close()


def test_gpu_check_reports_the_gpu_tests_even_when_cut_short(tmp_path):
    """Part a's row: pytest's closing line, or, when the part's time limit killed pytest before it, the
    tests `-v` had reported passed and failed by then (real pytest output, cut where a kill would)."""
    import subprocess
    import sys

    from scripts import gpu_check

    (tmp_path / "test_sample.py").write_text(
        "import pytest\n\n\ndef test_one():\n    assert True\n\n\n"
        "@pytest.mark.parametrize('x', ['a b'])\ndef test_two(x):\n    assert x\n\n\n"
        "def test_three():\n    assert 1 == 2\n"
    )
    log = tmp_path / "a.log"
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "test_sample.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    log.write_text(run.stdout)
    assert run.returncode == 1
    closing = gpu_check._pytest_result(log)
    assert "1 failed, 2 passed" in closing and not closing.startswith("cut short")

    lines = run.stdout.splitlines()
    last_result = max(i for i, line in enumerate(lines) if "test_three FAILED" in line)
    log.write_text("\n".join(lines[: last_result + 1]) + "\n")  # killed right after the last test
    assert gpu_check._pytest_result(log).startswith("cut short: 2 passed, 1 failed before it stopped")
    log.write_text("\n".join(lines[: last_result - 1]) + "\n")  # killed while test_two ran
    assert gpu_check._pytest_result(log).startswith("cut short: 1 passed before it stopped")

    # A run that ended with every test in error (a module fixture failing) is complete, not cut short.
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n\n\n@pytest.fixture(scope='module')\ndef broken():\n    raise RuntimeError('no GPU')\n\n\n"
        "def test_a(broken):\n    pass\n\n\ndef test_b(broken):\n    pass\n"
    )
    run = subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "test_sample.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    log.write_text(run.stdout)
    assert "2 errors in" in gpu_check._pytest_result(log)


def test_gpu_check_row_b_reports_the_fused_ops_and_their_timing(tmp_path):
    """Row b of the table reads gpu_kernel_check's fused-ops lines (verdicts and the per-layer timing) apart
    from the attention cases, from the lines check_and_time_fused_ops prints."""
    from scripts import gpu_check

    verdicts = ["ok", "ok", "FAIL", "ok", "ok"]
    names = ["q-norm+rope q", "q-norm+rope k", "silu*up", "add+rmsnorm", "residual"]
    lines = ["  case decode qwen3 ok", "  case prefill qwen3 FAIL (NaN left in output)", "",
             "fused elementwise ops, torch.bfloat16, 256 tokens of a Qwen3-0.6B layer, max abs error against "
             "float64 from the same inputs:"]
    lines += [f"  {n:14s} {v}: fused 0.0044, torch eager 0.0044; 99.99% of elements equal to eager"
              for n, v in zip(names, verdicts, strict=True)]
    lines += [f"  one layer's elementwise work in a CUDA graph, batch 256, {label}: {us} us (x28 layers: ...)"
              for label, us in (("eager torch ops", "95.3"), ("fused kernels", "12.1"))]
    lines += ["", "launch order: workload A's decode step 212, 215 sequences of 319-1236 keys (mean 781), block 16, "
              "default splits", "            tile          batch order        longest first   gain",
              "        64,2,4,0   183.0 us  3770 GB/s   165.2 us  4176 GB/s  10.8%",
              "        64,3,4,0   190.0 us  3631 GB/s   170.0 us  4058 GB/s  11.8%"]
    lines += ["", "fp8 KV cache: workload A's decode step 212, 215 sequences (mean 781 keys), block 16, longest first, "
              "us (GB/s of the cache read)", "            tile           bf16 cache            fp8 cache  fp8 gain",
              "        64,2,4,0   165.0 us  4180 GB/s    95.5 us  3611 GB/s     72.8%"]
    lines += ["", "decode GEMM tiles, bf16, max abs error against a float32 reference (NaN-poisoned outputs)",
              "  gemm qkv       1 rows 64x64x128/2      ok: 0.0156, torch 0.0156",
              "  gemm down    224 rows 128x128x64/16    FAIL: 0.25, torch 0.0156, NOT the same bits twice",
              "  gemm o        64 rows 64x64x128/8      ok: 0.0078, torch 0.0156"]
    (tmp_path / "b.log").write_text("\n".join(lines + ["", "FAIL in 40s", ""]))
    row = gpu_check._part_results(tmp_path)["b"]
    assert row.startswith("1/2 attention cases")
    assert "fused ops 4/5 (a layer's elementwise work 95.3 us eager, 12.1 us fused)" in row
    assert "decode step 212 of workload A launched longest first 165.2 us (4176 GB/s), in batch order 183.0 us" in row
    assert "; over an fp8 KV cache 95.5 us (3611 GB/s of it) against 165.0 us" in row
    assert "decode GEMM tiles 2/3 (" in row
    assert row.endswith("overall FAIL")


def test_step_inputs_slots_of_prefill_chunks_are_each_positions_block_slot():
    """A chunk's slots are built a block at a time: for chunks starting and ending anywhere in a block, with
    decode rows beside them, each position p's slot is still table[p // bs] * bs + p % bs."""
    import random
    from types import SimpleNamespace

    from engine_service.model_runner import ModelRunner

    rng = random.Random(0)
    for bs in (1, 4, 16):
        seqs, counts = [], []
        for _ in range(12):
            start, n = rng.randrange(0, 70), rng.choice([1, 1, 2, 5, 16, 17, 40])
            table = rng.sample(range(1000), -(-(start + n) // bs))
            seqs.append(SimpleNamespace(num_computed_tokens=start, block_table=table, token_ids=list(range(start + n)),
                                        prompt_logprobs=None))
            counts.append(n)
        batch = SimpleNamespace(seqs=seqs, num_new_tokens=counts, sample=[True] * len(seqs), input_rows=None,
                                starts=None)
        x = ModelRunner.step_inputs(batch, bs)
        want = [s.block_table[p // bs] * bs + p % bs for s, n in zip(seqs, counts, strict=True)
                for p in range(s.num_computed_tokens, s.num_computed_tokens + n)]
        assert x.slots == want and len(x.ids) == len(want)


def test_gpu_check_second_engine_pins_g_tiles_and_fails_without_its_figures(tmp_path):
    """Part p compares a second engine with part g's: it pins g's attention tiles (the decode one only where g
    launched decode longest first, as a pinned tile is), and it fails where PDL lost the graphs or a figure is
    missing. Its rows say whether the two engines' decode GEMM picks were the same."""
    import json

    from engine_service.attention import triton_kernels as tk
    from scripts import gpu_check

    g = {"prefill_tile": {"k": [64, 32, 3, 4]}, "decode_tile": {"k": [64, 2, 4, 1]},
         "decode_order_us": {"k": [177.2, 191.6]}}
    pins = gpu_check._pins(g)
    assert pins == {tk.PREFILL_TILE_ENV: "64,32,3,4", tk.DECODE_TILE_ENV: "64,2,4,1"}
    assert tk.parse_prefill_tile(pins[tk.PREFILL_TILE_ENV]) == (64, 32, 3, 4)
    assert tk.parse_tile(pins[tk.DECODE_TILE_ENV]) == (64, 2, 4, 1)
    assert gpu_check._pins({**g, "decode_order_us": {"k": [200.0, 191.6]}}) == {tk.PREFILL_TILE_ENV: "64,32,3,4"}
    assert gpu_check._pins({}) == {}

    wide = {"max_num_batched_tokens": 16384, "pdl": True, "workload_A": {"tok_s": 26000.0}}
    pdl = {"graphs_on": True, "workload_A": {"tok_s": 25800.0}, "itl": {"1": 1.2, "64": 1.8},
           "decode_gemms": {"sizes": 21, "ours": {"o": [1, 2]}}}
    tbo = {"graphs_on": True, "halves": [32, 48], "workload_A": {"tok_s": 27000.0}, "itl": {"1": 1.2, "64": 1.7},
           "same_priority": {"workload_A": {"tok_s": 26500.0}}, "pdl": True}
    assert gpu_check._second_ok({"pdl": pdl, "wide_budget": wide, "two_batch_overlap": tbo})
    assert not gpu_check._second_ok({"pdl": {**pdl, "graphs_on": False}, "wide_budget": wide,
                                     "two_batch_overlap": tbo})
    assert not gpu_check._second_ok({"pdl": pdl, "wide_budget": {"error": "RuntimeError: x"},
                                     "two_batch_overlap": tbo})
    assert not gpu_check._second_ok({"pdl": pdl, "wide_budget": wide,
                                     "two_batch_overlap": {"error": "x", "graphs_on": False}})
    assert not gpu_check._second_ok({"pdl": pdl, "wide_budget": wide})
    assert gpu_check._second_ok({"pdl": {"skipped": "needs CUDA"}, "wide_budget": wide, "two_batch_overlap": tbo})

    (tmp_path / "graphs.json").write_text(json.dumps({
        "workload_A": {"tok_s": 25400.0}, "decode_gemms": {"sizes": 21, "ours": {"o": [1, 2, 4]}},
        "itl": [{"graphs": True, "overlap": True, "batch": 1, "itl_ms": 1.23}]}))
    (tmp_path / "second.json").write_text(json.dumps({"pins": pins, "pdl": pdl, "wide_budget": wide,
                                                      "two_batch_overlap": tbo}))
    res = gpu_check._part_results(tmp_path)
    assert res["pdl"].startswith("workload A 25,800 tok/s with PDL, 25,400 without; ITL ms with/without: "
                                 "batch 1 1.20/1.23, batch 64 1.80/?")
    assert f"pinned to g's: {tk.PREFILL_TILE_ENV}, {tk.DECODE_TILE_ENV}; other decode GEMM picks" in res["pdl"]
    assert res["wide"] == ("workload A 26,000 tok/s at 16,384 tokens a step, 25,800 at the default "
                           "(PDL on in both)")
    assert res["tbo"] == ("workload A 27,000 tok/s with two-batch overlap (sizes 32+ in halves, PDL on), 26,000 "
                          "without (the row above), 26,500 tok/s with the halves at the attention's stream priority; ITL ms "
                          "batch 1 1.20, batch 64 1.70; our GEMMs given up for torch's in the halves: none")


def test_gpu_kernel_check_split_table_uses_workload_a_steps_at_each_batch_size(monkeypatch, capsys):
    """Part b's split-count table: for each batch size, the first decode step of workload A with at most that
    many requests running (their real context lengths), every split count timed longest first, one cell under
    each header ('-' where a count failed), the default and the fastest marked, a default outside the headers
    after the row. Run here with the kernel and timer stood in (the real ones need CUDA)."""
    import re

    from engine_service import bench
    from engine_service.attention import triton_kernels as tk
    from scripts.workload_a_model import live_contexts

    monkeypatch.delenv("TRITON_INTERPRET")  # the script refuses the interpreter; nothing here compiles
    from scripts import gpu_kernel_check as gkc

    calls = []

    def attention(*a, num_kv_splits, seq_order, out):
        calls.append((int(a[4].numel()), num_kv_splits, seq_order.tolist()))
        if num_kv_splits == 2:
            raise RuntimeError("out of resources")

    monkeypatch.setattr(tk, "paged_attention", attention)
    monkeypatch.setattr(tk, "default_num_kv_splits", lambda seqs, kv_heads, q, dev: 7 if seqs < 40 else 1)
    monkeypatch.setattr(gkc, "_time", lambda fn: (fn(), 100.0 + abs(calls[-1][1] - 3))[1])  # 3 splits fastest
    monkeypatch.setattr(tk, "_decode_order_timings", {})
    gkc.time_split_counts(torch.device("cpu"), torch.Generator().manual_seed(0), running=(16, 64),
                          splits=(1, 2, 3))
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("running"))
    rows = [line for line in lines if re.match(r" +\d+ +\d+ +\d+ ", line)]
    workload = bench.make_workload(bench.WORKLOAD_A)
    assert len(rows) == 2, lines
    for want, row in zip((16, 64), rows, strict=True):
        running, step, keys = map(int, row.split()[:3])
        lens = live_contexts(workload, step)
        assert running == len(lens) <= want < len(live_contexts(workload, step - 1)), (want, step)
        assert keys == sum(lens) // len(lens)
        default = 7 if running < 40 else 1
        assert [(n, order) for seqs, n, order in calls if seqs == running] == [
            (n, gkc.longest_first(lens)) for n in sorted({1, 2, 3, default})]

        def under(n: int, row=row) -> str:  # the 16 characters under header "splits n"
            end = header.index(f"splits {n}") + len(f"splits {n}")
            return row[end - 16 : end]

        assert re.fullmatch(r" *102\.0 \( *\d+\)" + ("\\*" if default == 1 else " ") + " ", under(1)), row
        assert under(2).strip() == "-"  # it failed
        assert re.fullmatch(r" *100\.0 \( *\d+\) \+", under(3)), row
        assert bool(re.search(r"   default 7: 104\.0 \( *\d+\)\*$", row)) == (default == 7), row
    assert any(line.startswith("split counts:") and "longest first" in line for line in lines), lines
    # Where the tuner found batch order faster for these shapes, the engine's launches (and so these) ignore the
    # order: the title says so rather than claiming longest first.
    nh, nkv, hd = gkc._QWEN
    key = tk._tile_key(torch.empty(1, nh, hd, dtype=torch.bfloat16), torch.empty(1, 16, nkv, hd, dtype=torch.bfloat16))
    tk._decode_order_timings[key] = (2.0, 1.0)
    gkc.time_split_counts(torch.device("cpu"), torch.Generator().manual_seed(0), running=(16,), splits=(1,))
    title = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("split counts:"))
    assert "batch order (the tuner's verdict)" in title and "longest first" not in title, title


def test_gpu_check_second_engine_measures_the_rest_without_pdl_when_pdl_fails(tmp_path, monkeypatch):
    """Part p on a device where the engine cannot start with PDL: PDL's row says so, and a second start without it
    still measures the wider token budget (rather than leaving part p's later rows empty). A CPU engine stands in
    for the GPU's, with CUDA's queries faked."""
    import json

    import engine_service
    from scripts import gpu_check

    real_setup, real_llm = gpu_check._setup, engine_service.LLM
    monkeypatch.setattr(gpu_check, "_setup", lambda cpu_dry_run: real_setup(True))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    starts = []

    def llm(*args, pdl=False, **kwargs):
        starts.append(pdl)
        if pdl:
            raise RuntimeError("PTX JIT compilation failed")
        return real_llm(*args, **kwargs)

    monkeypatch.setattr(engine_service, "LLM", llm)
    out = tmp_path / "out"
    out.mkdir()
    assert gpu_check.cmd_second(out, tmp_path / "presets") == 1  # PDL failed: part p fails
    report = json.loads((out / "second.json").read_text())
    assert starts == [True, False]
    assert "PTX JIT compilation failed" in report["pdl"]["error"]
    wide = report["wide_budget"]
    assert wide["pdl"] is False and wide["workload_A"]["generated_tokens"] == wide["workload_A"]["requested_tokens"] > 0


def test_graphs_that_fail_in_halves_are_captured_again_without_them(tmp_path, monkeypatch, caplog):
    """build_decode_graphs: graphs with sizes in two halves whose capture fails are captured again as one batch a
    step (a warning says so), rather than leaving decode eager; graphs without halves that fail are not retried."""
    import logging

    from engine_service.cuda_graphs import DecodeGraphRunner, build_decode_graphs

    llm = _start_up_engine(tmp_path, "torch")
    llm.runner.backend_name = "triton"  # build_decode_graphs captures only that backend's graphs
    real_capture, captures = DecodeGraphRunner.capture, []

    def capture(self):
        captures.append(bool(self.halves))
        if self.halves:
            raise RuntimeError("operation not permitted when stream is capturing")
        return real_capture(self)

    monkeypatch.setattr(DecodeGraphRunner, "capture", capture)
    with caplog.at_level(logging.WARNING, logger="engine_service.cuda_graphs"):
        graphs = build_decode_graphs(llm.runner, two_batch_overlap=True, use_cuda_graphs=False, halved_from=2)
    assert captures == [True, False] and graphs is not None and graphs.halves == {}
    assert "capturing again without it" in caplog.text
    captures.clear()
    monkeypatch.setattr(DecodeGraphRunner, "self_check", lambda self, seed=0: [_Bad()])
    assert build_decode_graphs(llm.runner, two_batch_overlap=False, use_cuda_graphs=False) is None
    assert captures == [False]


class _Bad:
    size, ok, hidden_equal, logits_equal, finite, max_abs_diff = 1, False, False, False, True, 1.0


def test_gpu_check_warm_ups_each_prefill_the_whole_budget(tmp_path):
    """gpu_check's _warm, before each timed run of part p: the same prompt every call was answered from the prefix
    cache after the first, so the warm-ups after a capture emptied the allocator prefilled one block, not the
    step-sized prefill they exist for."""
    from scripts.gpu_check import _warm

    with _start_up_engine(tmp_path, "torch") as llm:
        for _ in range(3):
            before = llm.stats()
            _warm(llm)
            after = llm.stats()
            assert after["prefix_cache_queries"] - before["prefix_cache_queries"] >= 56  # the 64-token budget's blocks
            assert after["prefix_cache_hits"] == before["prefix_cache_hits"]


def test_row_s_without_a_ratio_is_written_not_a_crash(tmp_path, capsys):
    """A served.json with both runs but no ratio (null) made the summary raise formatting None, and the table printed
    last (every part's row) was lost; the ratio reads '?' as the table's other missing figures do."""
    import json

    run = {"output_throughput": 25_000.0, "ttft_ms_p50": 1.0, "ttft_ms_p99": 2.0, "itl_ms_p50": 3.0,
           "itl_ms_p99": 4.0, "failed": 0}
    (tmp_path / "served.json").write_text(json.dumps({"workload": "A", "num_requests": 256, "grpc": run,
                                                      "inprocess": run, "ratio": None}))
    row = _row(_table(tmp_path, capsys, "s\tPASS\t20\t0\n"), "(s)")
    assert "through both services 25,000 tok/s, in-process 25,000 (ratio ?)" in row
