"""CUDA graphs, the Triton backend and overlap scheduling through the engine, on a GPU (skipped without CUDA).

The tiny models have Qwen3-0.6B's attention shapes (16 query heads, 8 KV heads, head_dim 128) on two
layers, so these tests compile the same kernel variants the engine uses on the real model.
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1: these tests need compiled kernels (run them without it)"),
]

SHAPE = dict(heads=16, kv_heads=8, head_dim=128, hidden=256, layers=2)
MAX_NUM_SEQS = 40
SIZES = [1, 2, 4, 8, 16, 24, 32, 40]  # capture_sizes(40)


def _engine(path, **kwargs):
    from engine_service import LLM

    args = dict(
        device="cuda",
        attention_backend="triton",
        kvcache_block_size=16,
        num_kvcache_blocks=512,  # fixed: no memory-based sizing, so tests leave the GPU to others
        max_num_seqs=MAX_NUM_SEQS,
        max_num_batched_tokens=1024,
        max_model_len=1024,
    )
    args.update(kwargs)
    return LLM(path, **args)


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    from tests.integration.tiny import make_qwen3

    path = tmp_path_factory.mktemp("qwen3_bf16")
    make_qwen3(path, **SHAPE, dtype=torch.bfloat16)
    return path


@pytest.fixture(scope="module")
def fp32_model(tmp_path_factory):
    from tests.integration.tiny import make_qwen3

    path = tmp_path_factory.mktemp("qwen3_fp32")
    make_qwen3(path, **SHAPE, dtype=torch.float32)
    return path


def _requests(n: int, seed: int, max_prompt: int = 60, max_tokens: int = 24):
    """Prompts of varied lengths and varied max_tokens, so the decode batch shrinks through many sizes."""
    from engine_service import SamplingParams
    from tests.integration.tiny import VOCAB

    rng = random.Random(seed)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, max_prompt))] for _ in range(n)]
    params = [SamplingParams(temperature=0.0, max_tokens=rng.randint(1, max_tokens)) for _ in range(n)]
    return prompts, params


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_serving_compiles_no_kernel_variant_after_start_up(bf16_model, enforce_eager, monkeypatch):
    """Start-up (the warm-up, the decode tile tuner, graph capture or, eagerly, a decode per split-KV count)
    compiles every Triton variant a step can meet, so none compiles inside a timed step: prefills whose
    longest query is 2-8, 9-16 and more tokens, decode batches of 1 to 40 sequences (3, 5, 6 and 9 among
    them, whose eager split counts no captured size has), block tables of many widths, sampled and greedy
    rows add none. Run in float16, which no other test here uses; the eager case runs after the graphs case,
    which compiles the variants both share, so what it checks is what only eager decode meets: the split
    counts of batches 3, 5, 6 and 9 (11, 7, 6 and 4 on an H200), which no captured size picks."""
    from engine_service import SamplingParams
    from engine_service import sampling_kernels as sk
    from engine_service.attention import triton_kernels as tk
    from engine_service.model import fused_ops as fo
    from engine_service.model import gemm
    from tests.integration.tiny import VOCAB

    kernels = [tk._paged_attention_kernel, tk._merge_splits_kernel, tk._store_kvcache_kernel,
               sk._chunk_stats_kernel, sk._chunk_pick_kernel, fo._add_rms_norm_kernel, fo._qk_norm_rope_kernel,
               fo._silu_and_mul_kernel, gemm._gemm_kernel]

    def variants() -> dict[str, int]:  # triton's in-process cache: one entry per compiled specialisation
        return {k.__name__: sum(len(cache[0]) for cache in k.device_caches.values()) for k in kernels}

    # gpu_check.sh pins the decode and prefill tiles for these tests (no tuners at each start-up); this one runs
    # the tuners: the prefill tile they pick must be the one the warm-up compiled.
    monkeypatch.delenv(tk.DECODE_TILE_ENV, raising=False)
    monkeypatch.delenv(tk.PREFILL_TILE_ENV, raising=False)
    rng = random.Random(3)
    with _engine(bf16_model, dtype="float16", enforce_eager=enforce_eager) as llm:
        before = variants()
        assert before[tk._paged_attention_kernel.__name__] > 0
        for lo, hi, n in ((2, 8, 5), (9, 16, 5), (1, 300, 40)):
            prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(n)]
            params = [SamplingParams(temperature=rng.choice([0.0, 0.7]), max_tokens=rng.randint(1, 24))
                      for _ in range(n)]
            llm.generate(prompts, params)
        # Prompt logprobs and a logit bias (the LM head over prompt rows, the bias on fp16 logits) add none either.
        llm.generate([[rng.randrange(VOCAB) for _ in range(40)] for _ in range(4)],
                     [SamplingParams(temperature=0.7, max_tokens=4, prompt_logprobs=2, logit_bias={5: 1.5, 9: -100.0}),
                      SamplingParams(temperature=0.0, max_tokens=4, logit_bias={7: 2.0}),
                      SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=0),
                      SamplingParams(temperature=0.7, max_tokens=4)])
        for n in (3, 5, 6, 9):  # decode steps of exactly n sequences
            llm.generate([[rng.randrange(VOCAB) for _ in range(4)] for _ in range(n)],
                         [SamplingParams(temperature=0.0, max_tokens=4)] * n)
        assert variants() == before


def test_closing_the_engine_returns_its_device_memory(bf16_model):
    """bench runs transformers after the engine in one process (workload A's static batch needs some 60 GB):
    close() must give back the KV cache sized from gpu_memory_utilization, the graphs and the workspaces."""
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    llm = _engine(bf16_model, dtype="bfloat16", num_kvcache_blocks=None, gpu_memory_utilization=0.2)
    assert torch.cuda.memory_allocated() - base > 2**30  # a cache sized from memory, not a token one
    llm.generate(*_requests(8, seed=1))
    llm.close()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    # What may stay is process-wide, not the engine's: cuBLAS workspaces of torch's shared graph-capture
    # stream (tens of MiB, allocated on a process's first capture). A leaked KV cache would be gigabytes.
    assert torch.cuda.memory_allocated() - base < 256 * 2**20


def test_replay_equals_eager_bitwise_every_size(bf16_model):
    with _engine(bf16_model, dtype="bfloat16") as llm:
        graphs = llm.runner.graphs
        assert graphs is not None, "start-up turned CUDA graphs off; its log says which sizes differed"
        assert graphs.sizes == SIZES
        assert graphs.block_tables.shape == (MAX_NUM_SEQS, 1024 // 16)  # ceil(max_model_len / block)
        # The graphs' pool, as the start-up log reports it (it read negative when torch.cuda.graph's own
        # empty_cache released the warm-up's cached activations between the two readings).
        assert 0 < graphs.capture_bytes < 4 * 2**30, graphs.capture_bytes
        for seed in (11, 12):  # fresh random batches, beyond the start-up check's
            bad = [r for r in graphs.self_check(seed=seed) if not r.ok]
            assert not bad, bad


def test_greedy_tokens_with_graphs_equal_eager(fp32_model):
    prompts, params = _requests(37, seed=0)
    with _engine(fp32_model, dtype="float32") as llm:
        graphed = [o["token_ids"] for o in llm.generate(prompts, params)]
        replays = llm.runner.graphs.num_replays
    with _engine(fp32_model, dtype="float32", enforce_eager=True) as llm:
        assert llm.runner.graphs is None
        eager = [o["token_ids"] for o in llm.generate(prompts, params)]
    assert replays > 10
    assert graphed == eager


def test_padding_lanes_write_nothing_and_stay_finite(bf16_model):
    from engine_service.model_runner import StepInputs

    with _engine(bf16_model, dtype="bfloat16") as llm:
        runner, graphs = llm.runner, llm.runner.graphs
        # Three real lanes replayed at size 4: lane 3 is padding (slot -1, context 0).
        x = StepInputs(
            ids=[5, 6, 7],
            positions=[9, 0, 40],
            slots=[3 * 16 + 9, 5 * 16 + 0, 9 * 16 + 8],
            q_lens=[1, 1, 1],
            ctx_lens=[10, 1, 41],
            tables=[[3], [5], [7, 8, 9]],
            sample_rows=[0, 1, 2],
            num_decode=3,
        )
        k_before, v_before = runner.k_cache.clone(), runner.v_cache.clone()
        replays = graphs.num_replays
        logits, prompt_logprobs = runner.execute(x)
        assert prompt_logprobs is None
        torch.cuda.synchronize()
        assert graphs.num_replays == replays + 1
        assert logits.shape[0] == 3 and bool(torch.isfinite(logits).all())
        assert bool(torch.isfinite(graphs.hidden[:4]).all())
        assert graphs.slot_mapping[3].item() == -1 and graphs.context_lens[3].item() == 0
        # Only the three real slots changed, in every layer: [layers, blocks, block_size] -> (block, offset)
        for cache, before in ((runner.k_cache, k_before), (runner.v_cache, v_before)):
            changed = (cache != before).flatten(3).any(-1)
            for layer in range(changed.shape[0]):
                assert {tuple(p) for p in changed[layer].nonzero().tolist()} == {(3, 9), (5, 0), (9, 8)}


def test_split_k_gemm_replays_bitwise_and_leaves_its_counters_at_zero():
    """The decode GEMM's split-K tiles in a CUDA graph (as decode steps run them): each replay gives the eager
    launch's bits, within rounding of torch's, and every tile counter is back at zero for the next launch."""
    from engine_service.model import gemm as G

    gen = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 1024, 2048), (40, 4096, 1024), (224, 1024, 3072)):
        x = torch.randn(m, k, generator=gen).to("cuda", torch.bfloat16)
        w = (torch.randn(n, k, generator=gen) * 0.02).to("cuda", torch.bfloat16)
        for tile in [t for t in G.candidates(m, n, k, 132) if t.split_k > 1][:3]:
            workspace = G.Workspace(x.device, *tile.workspace(m, n))
            eager = G.gemm(x, w, None, tile, workspace)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                replayed = G.gemm(x, w, None, tile, workspace)
            for _ in range(3):
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(replayed, eager), (m, n, k, tile)
            assert int(workspace.counts.abs().sum()) == 0
            torch.testing.assert_close(eager, torch.nn.functional.linear(x, w), rtol=2e-2, atol=2e-2)


def test_split_k_gemms_sharing_a_workspace_in_one_graph_replay_bitwise():
    """As a decode graph runs them: split tiles of three shapes, one with a bias, one workspace, in one graph,
    replayed 200 times (the order in which a tile's programs arrive varies): the eager bits every time, counters
    back at zero, and within rounding of torch's."""
    from engine_service.model import gemm as G

    gen = torch.Generator().manual_seed(1)
    cases = []  # (x, w, bias, tile): Qwen3-0.6B's o, down and q/k/v shapes at 8 rows, the largest split each
    for n, k, bias in ((1024, 2048, False), (1024, 3072, False), (4096, 1024, True)):
        x = torch.randn(8, k, generator=gen).to("cuda", torch.bfloat16)
        w = (torch.randn(n, k, generator=gen) * 0.02).to("cuda", torch.bfloat16)
        b = torch.randn(n, generator=gen).to("cuda", torch.bfloat16) if bias else None
        tile = max((t for t in G.candidates(8, n, k, 132) if t.split_k > 1), key=lambda t: t.split_k)
        cases.append((x, w, b, tile))
    need = [t.workspace(8, w.shape[0]) for _, w, _, t in cases]
    workspace = G.Workspace(torch.device("cuda"), max(p for p, _ in need), max(c for _, c in need))
    eager = [G.gemm(x, w, b, t, workspace) for x, w, b, t in cases]
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [G.gemm(x, w, b, t, workspace) for x, w, b, t in cases]
    for _ in range(200):
        graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(o, e) for o, e in zip(outs, eager, strict=True))
    assert int(workspace.counts.abs().sum()) == 0
    for (x, w, b, _), e in zip(cases, eager, strict=True):
        torch.testing.assert_close(e, torch.nn.functional.linear(x, w, b), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("splits", [1, 4, None])
def test_attention_padding_rows_are_zeros(splits):
    from engine_service.attention import triton_kernels as tk
    from engine_service.attention.triton_ref import make_paged_batch

    gen = torch.Generator(device="cuda").manual_seed(0)
    ctx = [700, 0, 33, 0, 1, 0]  # lanes 1, 3 and 5 are padding
    b = make_paged_batch([1] * 6, ctx, 16, 8, 128, 16, dtype=torch.bfloat16, device="cuda", generator=gen)
    out = torch.full_like(b.q, float("nan"))
    tk.paged_attention(b.q, b.k_cache, b.v_cache, b.cu_seqlens_q, b.context_lens, b.block_tables,
                       128**-0.5, 1, out=out, num_kv_splits=splits)
    torch.cuda.synchronize()
    assert not bool(out.isnan().any())
    assert bool((out[[1, 3, 5]] == 0).all())
    assert bool((out[[0, 2, 4]].abs().sum(dim=(1, 2)) > 0).all())


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_triton_with_graphs_and_fused_ops_matches_all_torch(fp32_model, kv_cache_dtype):
    """kv_cache_dtype "fp8": both backends over an fp8 cache (the fused RoPE store rounding into e4m3 on the triton
    side), the graphs kept."""
    from engine_service import SamplingParams
    from tests.integration.tiny import VOCAB

    rng = random.Random(3)
    shared = [rng.randrange(VOCAB) for _ in range(40)]
    # Decodes, a prompt longer than the 512-token budget (chunked), and prefix-cache hits.
    prompts, params = _requests(20, seed=1)
    prompts += [[rng.randrange(VOCAB) for _ in range(900)], shared, shared + [1, 2, 3]]
    params += [SamplingParams(temperature=0.0, max_tokens=12)] * 3
    results = {}
    for backend in ("torch", "triton"):
        # The torch run is all torch (fused_ops off): the reference for the Triton attention, the fused
        # elementwise kernels (on by default on CUDA) and the graphs together.
        fused = None if backend == "triton" else False
        with _engine(fp32_model, dtype="float32", attention_backend=backend, max_num_batched_tokens=512,
                     fused_ops=fused, kv_cache_dtype=kv_cache_dtype) as llm:
            assert (llm.runner.graphs is None) == (backend == "torch")  # torch is not capturable
            assert llm.runner.fused_ops == (backend == "triton")
            first = [o["token_ids"] for o in llm.generate(prompts, params)]
            again = [o["token_ids"] for o in llm.generate([shared + [1, 2, 3]], params[-1])]
            assert llm.stats()["prefix_cache_hits"] > 0
        results[backend] = (first, again)
    assert results["triton"] == results["torch"]


def test_an_fp8_kv_cache_keeps_the_graphs_in_bf16(bf16_model):
    """kv_cache_dtype="fp8" on CUDA in bf16: start-up keeps the graphs (its self-check fills the fp8 cache, which
    has no normal_) and they replay bitwise on fresh batches. (Tokens against the torch backend: the fp8 case of
    test_triton_with_graphs_and_fused_ops_matches_all_torch.)"""
    with _engine(bf16_model, dtype="bfloat16", kv_cache_dtype="fp8") as llm:
        assert llm.runner.k_cache.dtype == torch.float8_e4m3fn
        graphs = llm.runner.graphs
        assert graphs is not None, "start-up turned CUDA graphs off with an fp8 cache; its log says why"
        assert not [r for r in graphs.self_check(seed=13) if not r.ok]
        llm.generate(*_requests(8, seed=2))


def test_overlap_scheduling_tokens_equal_plain_scheduling(fp32_model):
    """Greedy and seeded tokens do not depend on overlap scheduling (graphs on, fp32); logprobs, read back through
    pinned memory beside the tokens, equal transformers' log_softmax teacher-forced on the same GPU. So do prompt
    logprobs, over prompts chunked at 48 tokens (steps with prompt rows and no sampled row among them)."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from engine_service import SamplingParams

    prompts, params = _requests(30, seed=4, max_prompt=120)
    params = [
        SamplingParams(temperature=0.0, max_tokens=p.max_tokens, logprobs=i % 4) if i % 3 == 1 else
        p if i % 3 else SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=p.max_tokens, logprobs=2)
        for i, p in enumerate(params)
    ]
    params = [replace(p, prompt_logprobs=i % 3) if i % 4 == 0 else p for i, p in enumerate(params)]
    results, outs = {}, []
    for overlap in (False, True):  # outs: overlap's, whose logprobs are checked below
        with _engine(fp32_model, dtype="float32", overlap_scheduling=overlap, max_num_batched_tokens=48) as llm:
            assert llm.overlap is overlap and llm.runner.graphs is not None
            outs = llm.generate(prompts, params)
            results[overlap] = [o["token_ids"] for o in outs]
            stats = llm.stats()
            assert stats["num_free_blocks"] == stats["num_blocks"]
    assert results[True] == results[False]
    hf = AutoModelForCausalLM.from_pretrained(fp32_model, dtype=torch.float32).cuda().eval()
    for prompt, p, out in zip(prompts, params, outs, strict=True):
        if p.prompt_logprobs is not None:
            ids = torch.tensor([prompt], device="cuda")
            with torch.no_grad():
                ref = torch.log_softmax(hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float(), -1)
            ref = ref.cpu()
            assert len(out["prompt_logprobs"]) == len(prompt) - 1
            for pos, lp in enumerate(out["prompt_logprobs"]):
                assert abs(lp.logprob - ref[pos, prompt[pos + 1]].item()) <= 1e-3, (pos, lp)
                assert lp.top_logprobs == pytest.approx(ref[pos][lp.top_token_ids].tolist(), abs=1e-3)
                assert len(lp.top_token_ids) == p.prompt_logprobs
        if p.logprobs is None:
            assert out["logprobs"] is None
            continue
        ids = torch.tensor([prompt + out["token_ids"][:-1]], device="cuda")
        with torch.no_grad():
            ref = torch.log_softmax(hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float(), -1)
        ref = ref[len(prompt) - 1 :].cpu()
        assert len(out["logprobs"]) == len(out["token_ids"])
        for pos, (token, lp) in enumerate(zip(out["token_ids"], out["logprobs"], strict=True)):
            assert abs(lp.logprob - ref[pos, token].item()) <= 1e-3, (pos, lp, ref[pos, token])
            assert len(lp.top_token_ids) == p.logprobs
            assert lp.top_logprobs == pytest.approx(ref[pos][lp.top_token_ids].tolist(), abs=1e-3)


def test_launching_a_step_never_waits_for_the_device(bf16_model, monkeypatch):
    """Under torch's sync debug mode "error", every synchronising call inside ModelRunner.launch raises:
    prefill steps, decode replays, device-side input gathering, and sampling with temperature, top-k,
    top-p, min-p, seeds, banned tokens, logprobs and penalties all enqueue work without waiting. Only collect()
    waits."""
    from engine_service import SamplingParams

    prompts, params = _requests(24, seed=5)
    kinds = [
        dict(temperature=0.0),
        dict(temperature=0.6),
        dict(temperature=0.9, top_k=20, top_p=0.8, min_p=0.05),
        dict(temperature=0.7, seed=7),
        dict(temperature=0.0, min_tokens=4, stop_token_ids=[3, 4]),
        dict(temperature=0.8, logprobs=5),
        dict(temperature=0.0, prompt_logprobs=3),
        dict(temperature=0.8, logit_bias={5: 2.5, 9: -100.0}),
        dict(temperature=0.0, repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2),
    ]
    params = [SamplingParams(max_tokens=max(p.max_tokens, 5), **kinds[i % len(kinds)]) for i, p in enumerate(params)]
    with _engine(bf16_model, dtype="bfloat16", overlap_scheduling=True) as llm:
        runner = llm.runner
        launch = runner.launch
        launches = [0]

        def strict(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return launch(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                launches[0] += 1

        monkeypatch.setattr(runner, "launch", strict)
        outs = llm.generate(prompts, params)
    assert launches[0] > 20
    assert all(len(o["token_ids"]) >= 1 for o in outs)



def test_json_mode_with_graphs_and_overlap_scheduling(demo_model_dir):
    """JSON mode on the device: masks uploaded once and applied in the sampler, decode steps replayed from graphs,
    overlap scheduling suspended while a JSON-mode request runs; free-text requests beside them."""
    import json

    from engine_service import SamplingParams
    from engine_service import json_grammar as jg

    prompts = [[5 + i, 17, 99, 4 + 3 * i] for i in range(24)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=48, response_format="json_object") if i % 2 else
              SamplingParams(temperature=0.0, max_tokens=48) for i in range(24)]
    with _engine(demo_model_dir, dtype="float32", overlap_scheduling=True) as llm:
        assert llm.runner.graphs is not None and llm.json_masks is not None
        outs = llm.generate(prompts, params)
        stats = llm.stats()
        assert not llm.cursors and stats["num_free_blocks"] == stats["num_blocks"]
    closed = 0
    for p, out in zip(params, outs, strict=True):
        if p.response_format is None:
            continue
        state = jg.walk(jg.INITIAL, out["text"].encode())
        assert state is not None, out["text"]
        if out["finish_reason"] == "stop":
            assert isinstance(json.loads(out["text"]), dict)
            closed += 1
        else:
            assert len(out["token_ids"]) == 48
    assert closed >= 1


def test_pdl_changes_no_token_and_keeps_the_graphs(bf16_model, monkeypatch):
    """Programmatic dependent launch (engine_service/pdl.py) changes when kernels start, never what they
    compute: with pdl=True start-up keeps its graphs (each captured size replays bitwise equal to eager), fresh
    random batches replay bitwise too, and greedy and seeded tokens equal those of plain launches (bf16, fused
    ops, graphs, overlap scheduling, split-KV decode).

    Both engines must compute with the same GEMMs: the decode GEMM tuner picks by timing (a few microseconds,
    beside part b's timings on the same GPU), and our tile and torch's give different bits. Its timer is made to
    call every candidate equally fast and the margin to take the first, so both engines use our first candidate
    tile at every size (its launches under PDL inside the graphs too)."""
    from engine_service import SamplingParams, pdl
    from engine_service.model import gemm

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    monkeypatch.setattr(gemm, "_graph_timer", lambda device: lambda fn, calls: (fn(), 1.0)[1])
    monkeypatch.setattr(gemm, "MARGIN", 2.0)
    prompts, params = _requests(37, seed=5, max_prompt=300)
    params = [p if i % 2 else SamplingParams(temperature=0.8, seed=i, max_tokens=p.max_tokens)
              for i, p in enumerate(params)]
    with _engine(bf16_model, dtype="bfloat16") as llm:
        plain = [o["token_ids"] for o in llm.generate(prompts, params)]
    with _engine(bf16_model, dtype="bfloat16", pdl=True) as llm:
        assert pdl.launch_kwargs(torch.empty(1, device="cuda")) == {"PDL": True, "launch_pdl": True}
        graphs = llm.runner.graphs
        assert graphs is not None, "start-up turned CUDA graphs off with PDL; its log says which sizes differed"
        assert all(layer.gemms for group in llm.runner.decode_linear_groups().values() for layer in group)
        bad = [r for r in graphs.self_check(seed=21) if not r.ok]
        assert not bad, bad
        with_pdl = [o["token_ids"] for o in llm.generate(prompts, params)]
    assert with_pdl == plain
    pdl.enable(torch.device("cuda", torch.cuda.current_device()), False)  # as the next engine's start-up does
    assert pdl.launch_kwargs(torch.empty(1, device="cuda")) == {}


def test_two_batch_overlap_keeps_the_graphs_and_the_tokens(bf16_model, fp32_model):
    """Two-batch overlap (cuda_graphs.py): captured sizes of 32 and 40 run as two halves on two streams, each half's
    attention on the capture stream. Start-up keeps the graphs (each size replays bitwise equal to its eager
    forward, which runs the same halves), fresh random batches replay bitwise too (bf16), and greedy tokens equal
    eager decode in one batch (fp32), over batches that shrink through the halved sizes."""
    with _engine(bf16_model, dtype="bfloat16", two_batch_overlap=True) as llm:
        graphs = llm.runner.graphs
        assert graphs is not None, "start-up turned CUDA graphs off with two-batch overlap; its log says why"
        assert graphs.halves == {32: 16, 40: 20} and graphs.streams is not None
        for seed in (21, 22):
            bad = [r for r in graphs.self_check(seed=seed) if not r.ok]
            assert not bad, bad
    prompts, params = _requests(40, seed=4)
    with _engine(fp32_model, dtype="float32", two_batch_overlap=True) as llm:
        halved = [o["token_ids"] for o in llm.generate(prompts, params)]
        assert llm.runner.graphs.num_replays > 10
    with _engine(fp32_model, dtype="float32", enforce_eager=True) as llm:
        eager = [o["token_ids"] for o in llm.generate(prompts, params)]
    assert halved == eager
