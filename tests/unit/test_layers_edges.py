"""The tensor-parallel layers and the decoder's pieces, without spawning workers: each rank's share of a checkpoint
tensor for every rank (packed q/k/v with split or replicated KV heads, gate/up, row-parallel columns, a padded
vocabulary), whole models over in-process gloo ranks against transformers' logits, and RMSNorm and RoPE in the
model dtype against transformers' own modules."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
import torch

from engine_service.attention.base import AttentionMetadata
from engine_service.attention.torch_backend import TorchAttentionBackend
from engine_service.model.config import ModelConfig
from engine_service.model.decoder import (
    Attention,
    DecoderForCausalLM,
    check_tensor_parallel,
    kv_heads_per_rank,
)
from engine_service.model.layers import (
    ColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    TPInfo,
    VocabParallelEmbedding,
)
from engine_service.model.loader import load_weights
from tests.integration.tiny import make_family


def _groups(tmp_path, size: int) -> list:
    """One gloo group per rank of one process (threads stand in for the workers), as engine_service.tp makes
    them but failing a collective a rank never joins in 20 s rather than 5 minutes."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "store"), size)

    def group(rank):
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timedelta(seconds=20)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        return dist.ProcessGroupGloo(store, rank, size, opts)

    with ThreadPoolExecutor(size) as pool:
        return list(pool.map(group, range(size)))


def _on_ranks(fns) -> list:
    """Run fns[r]() for every rank at once (their collectives meet), each rank's result in rank order."""
    with ThreadPoolExecutor(len(fns)) as pool:
        return [f.result(timeout=60) for f in [pool.submit(fn) for fn in fns]]


@pytest.mark.parametrize("heads,kv_heads,size", [(4, 2, 1), (4, 2, 2), (8, 4, 2), (4, 1, 2), (4, 2, 4), (8, 2, 8),
                                                 (8, 8, 4)])
def test_each_rank_holds_the_kv_heads_its_query_heads_attend_to(heads, kv_heads, size):
    """Whole checkpoint tensors whose row r is r (head h's rows are h*d..): rank r holds query heads
    r*heads/size.., and for its local query head i the local KV head i // (its group) must be the global KV
    head that query head uses, heads / kv_heads queries per KV head, whether KV heads are split or replicated."""
    d = 2
    x = torch.eye(8)
    full = {name: torch.arange(n * d, dtype=torch.float)[:, None].expand(n * d, 8).contiguous()
            for name, n in (("q", heads), ("k", kv_heads), ("v", kv_heads))}
    for rank in range(size):
        cfg, tp = _cfg(heads, kv_heads), TPInfo(rank, size)
        check_tensor_parallel(cfg, size)
        layer = Attention(cfg, tp).qkv_proj
        layer.weight.data.fill_(float("nan"))
        for name, tensor in full.items():
            layer.weight.weight_loader(layer.weight, tensor, name)
        out = layer(x[:1])[0]  # row-sums over one input column: each output row's value is its file row
        hq, hkv = heads // size, kv_heads_per_rank(cfg, tp)
        q, k, v = out.split([hq * d, hkv * d, hkv * d])
        q_heads = (q.view(hq, d)[:, 0] / d).long().tolist()
        k_heads = (k.view(hkv, d)[:, 0] / d).long().tolist()
        assert q_heads == list(range(rank * hq, (rank + 1) * hq))
        assert torch.equal(k, v)
        for i, global_q in enumerate(q_heads):
            assert k_heads[i // (hq // hkv)] == global_q // (heads // kv_heads)
        # every row of each head in file order
        assert torch.equal(q, torch.arange(rank * hq * d, (rank + 1) * hq * d, dtype=torch.float))
        assert torch.equal(k.view(hkv, d)[:, 1] - k.view(hkv, d)[:, 0], torch.ones(hkv))


def _cfg(heads, kv_heads, inter=8):
    return ModelConfig.from_dict({"model_type": "qwen3", "vocab_size": 8, "hidden_size": 8, "intermediate_size": inter,
                                  "num_hidden_layers": 1, "num_attention_heads": heads,
                                  "num_key_value_heads": kv_heads, "head_dim": 2})


@pytest.mark.parametrize("size", [1, 2, 4])
def test_gate_up_rows_and_down_columns_are_each_ranks_slice(size):
    inter, hidden = 8, 4
    gate, up = torch.randn(inter, hidden), torch.randn(inter, hidden)
    down, bias = torch.randn(hidden, inter), torch.randn(hidden)
    per = inter // size
    for rank in range(size):
        tp = TPInfo(rank, size)
        gu = ColumnParallelLinear(hidden, [("gate", per), ("up", per)], True, tp)
        gu.weight.weight_loader(gu.weight, gate, "gate")
        gu.weight.weight_loader(gu.weight, up, "up")
        gu.bias.weight_loader(gu.bias, torch.arange(inter, dtype=torch.float), "gate")
        gu.bias.weight_loader(gu.bias, -torch.arange(inter, dtype=torch.float), "up")
        rows = slice(rank * per, (rank + 1) * per)
        assert torch.equal(gu.weight, torch.cat([gate[rows], up[rows]]))
        assert torch.equal(gu.bias, torch.cat([torch.arange(inter)[rows], -torch.arange(inter)[rows]]).float())
        dp = RowParallelLinear(inter, hidden, True, tp)
        dp.weight.weight_loader(dp.weight, down, None)
        dp.bias.weight_loader(dp.bias, bias, None)
        assert torch.equal(dp.weight, down[:, rows]) and torch.equal(dp.bias, bias)
        with pytest.raises(RuntimeError, match=rf"should be \({inter}, {hidden}\)"):
            gu.weight.weight_loader(gu.weight, gate[: inter - 1], "gate")


def test_row_parallel_adds_its_bias_once_after_the_reduction(tmp_path):
    size, inter, hidden = 2, 6, 3
    w, b, x = torch.randn(hidden, inter), torch.randn(hidden), torch.randn(5, inter)
    layers = []
    for rank, group in enumerate(_groups(tmp_path, size)):
        layer = RowParallelLinear(inter, hidden, True, TPInfo(rank, size, group))
        layer.weight.weight_loader(layer.weight, w, None)
        layer.bias.weight_loader(layer.bias, b, None)
        layers.append(layer)
    per = inter // size
    outs = _on_ranks([lambda r=r: layers[r](x[:, r * per:(r + 1) * per]) for r in range(size)])
    for out in outs:
        torch.testing.assert_close(out, x @ w.T + b)


@pytest.mark.parametrize("vocab,size", [(10, 1), (11, 2), (10, 4), (9, 4), (5, 4), (3, 4)])
def test_vocab_rows_of_each_rank_and_zero_padding(vocab, size):
    """The padded vocabulary is a multiple of size; rank r holds rows r*per.. of it, the padding (past the
    vocabulary, all of a rank's rows where it starts past the end) zero whatever the parameter held before."""
    dim = 3
    table = torch.arange(1, vocab * dim + 1, dtype=torch.float).view(vocab, dim)
    per = -(-vocab // size)
    padded = torch.cat([table, torch.zeros(per * size - vocab, dim)])
    for rank in range(size):
        for cls in (VocabParallelEmbedding, ParallelLMHead):
            layer = cls(vocab, dim, TPInfo(rank, size))
            layer.weight.data.fill_(float("nan"))
            layer.weight.weight_loader(layer.weight, table, None)
            assert torch.equal(layer.weight, padded[rank * per:(rank + 1) * per])
            with pytest.raises(RuntimeError, match=rf"should be \({vocab}, {dim}\)"):
                layer.weight.weight_loader(layer.weight, torch.cat([table, table[:1]]), None)


@pytest.mark.parametrize("vocab,size", [(11, 2), (10, 4), (5, 4)])
def test_vocab_parallel_embedding_and_head_equal_the_whole_table(tmp_path, vocab, size):
    dim = 4
    table, hidden = torch.randn(vocab, dim), torch.randn(3, dim)
    ids = torch.cat([torch.arange(vocab), torch.tensor([vocab - 1, 0])])
    groups = _groups(tmp_path, size)
    embeds, heads = [], []
    for rank in range(size):
        embed = VocabParallelEmbedding(vocab, dim, TPInfo(rank, size, groups[rank]))
        head = ParallelLMHead(vocab, dim, TPInfo(rank, size, groups[rank]))
        for layer in (embed, head):
            layer.weight.weight_loader(layer.weight, table, None)
        embeds.append(embed)
        heads.append(head)
    got = _on_ranks([lambda r=r: (embeds[r](ids), heads[r](hidden)) for r in range(size)])
    for e, logits in got:
        torch.testing.assert_close(e, table[ids])
        torch.testing.assert_close(logits, hidden @ table.T)


def _prefill_meta(t: int, block: int = 16) -> AttentionMetadata:
    blocks = -(-t // block)
    return AttentionMetadata(
        slot_mapping=torch.arange(t), cu_seqlens_q=torch.tensor([0, t], dtype=torch.int32),
        context_lens=torch.tensor([t], dtype=torch.int32),
        block_tables=torch.arange(blocks, dtype=torch.int32)[None], num_decode_seqs=0, max_seqlen_q=t,
        max_context_len=t, block_size=block, q_lens=[t], ctx_lens=[t],
    )


# (family, shape, extra config, tensor_parallel_size)
MODELS = {
    # two KV heads over four ranks: ranks 2 and 3 hold the second; a vocabulary the last rank pads
    "qwen3-kv2-tp4-tied-padded": ("qwen3", dict(heads=4, kv_heads=2, vocab=509, tie=True), {}, 4),
    # four KV heads split two a rank, biases on q/k/v only
    "qwen2-kv4-tp2": ("qwen2", dict(heads=8, kv_heads=4, head_dim=8, vocab=64), {}, 2),
    # one KV head on eight ranks, every bias, a vocabulary shorter than size * ceil(vocab / size)
    "llama-kv1-tp8-biases": ("llama", dict(heads=8, kv_heads=1, head_dim=8, vocab=13),
                             dict(attention_bias=True, mlp_bias=True), 8),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", list(MODELS))
def test_tensor_parallel_model_logits_equal_transformers(tmp_path, name, caplog):
    family, shape, extra, size = MODELS[name]
    ref = make_family(tmp_path, family, layers=2, **shape, **extra)
    if shape.get("tie"):  # a tied checkpoint that still carries the head: padded ranks must compare it equal
        from safetensors.torch import load_file, save_file

        tensors = load_file(tmp_path / "model.safetensors")
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    cfg = ModelConfig.from_dir(tmp_path)
    t = 21
    ids = torch.randint(0, cfg.vocab_size, (t,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ref(ids[None]).logits[0]
    groups = _groups(tmp_path, size)
    models = []
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        for rank in range(size):
            model = DecoderForCausalLM(cfg, TPInfo(rank, size, groups[rank]), 64, torch.float64)
            with caplog.at_level(logging.WARNING):
                load_weights(model, tmp_path, cfg.tie_word_embeddings)
            models.append(model)
    finally:
        torch.set_default_dtype(old)
    assert "differs" not in caplog.text
    kv = kv_heads_per_rank(cfg, TPInfo(0, size))

    def run(rank):
        caches = [(torch.zeros(2, 16, kv, cfg.head_dim, dtype=torch.float64),
                   torch.zeros(2, 16, kv, cfg.head_dim, dtype=torch.float64)) for _ in range(cfg.num_hidden_layers)]
        with torch.no_grad():
            hidden = models[rank](ids, torch.arange(t), caches, _prefill_meta(t), TorchAttentionBackend())
            return models[rank].compute_logits(hidden)

    for logits in _on_ranks([lambda r=r: run(r) for r in range(size)]):
        assert logits.shape == expected.shape
        torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("heads,kv_heads,inter,size,problem", [
    (6, 2, 8, 3, "must be a multiple of num_key_value_heads 2"),
    (12, 6, 8, 4, "must divide num_key_value_heads 6"),
    (6, 6, 8, 4, "must divide num_attention_heads 6"),
    (4, 4, 6, 4, "must divide intermediate_size 6"),
    (4, 2, 8, 4, None), (8, 8, 8, 2, None), (8, 1, 8, 8, None),
])
def test_tensor_parallel_sizes_the_heads_cannot_split_are_refused(heads, kv_heads, inter, size, problem):
    cfg = _cfg(heads, kv_heads, inter)
    if problem is None:
        check_tensor_parallel(cfg, size)
    else:
        with pytest.raises(ValueError, match=rf"tensor_parallel_size {size} {problem}"):
            check_tensor_parallel(cfg, size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_rms_norm_rounds_as_transformers_does(dtype):
    """Normalised in float32, rounded to the model dtype, then scaled by the weight in the model dtype."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 64, generator=g) * 3).to(dtype)
    weight = (torch.randn(64, generator=g) * 2).to(dtype)
    ref = Qwen3RMSNorm(64, eps=1e-5).to(dtype)
    mine = RMSNorm(64, 1e-5).to(dtype)
    for m in (ref, mine):
        m.weight.data.copy_(weight)
    assert torch.equal(mine(x), ref(x))
    residual = torch.randn(7, 64, generator=g).to(dtype)
    normed, total = mine.add_forward(x, residual)
    assert torch.equal(total, residual + x) and torch.equal(normed, ref(residual + x))
    assert torch.equal(mine.add_forward(x, None)[1], x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_rope_table_and_rotation_equal_transformers(dtype):
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding, apply_rotary_pos_emb

    d, positions = 32, torch.tensor([0, 1, 5, 300, 4095])
    hf_cfg = Qwen3Config(head_dim=d, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    cos, sin = Qwen3RotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=dtype), positions[None])
    mine = RotaryEmbedding(d, 4096, 1e6, dtype)
    looked = mine.lookup(positions)
    assert torch.equal(looked[0][:, 0], cos[0]) and torch.equal(looked[1][:, 0], sin[0])
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, d, generator=g).to(dtype), torch.randn(5, 2, d, generator=g).to(dtype)
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    got_q, got_k = RotaryEmbedding.apply(q, k, looked)
    assert torch.equal(got_q, ref_q[0].transpose(0, 1)) and torch.equal(got_k, ref_k[0].transpose(0, 1))


@pytest.mark.parametrize("fast,slow,truncate", [(2.0, 2.0, False), (2.0, 2.0, True), (32.0, 8.0, True)])
def test_yarn_with_a_ramp_of_no_width_equals_transformers(fast, slow, truncate):
    """Both ends of the ramp on one dimension (equal betas; or a beta_slow whose rotations do not fit the trained
    length, both ends clamped to 0), which transformers widens by 0.001 (0 / 0 otherwise)."""
    import json

    from transformers import Qwen3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from engine_service.model.layers import rope_frequencies

    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": fast,
            "beta_slow": slow, "truncate": truncate, "rope_theta": 10000.0}
    hf_cfg = Qwen3Config(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=128, rope_parameters=rope)
    want_freq, want_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    ours = ModelConfig.from_dict(json.loads(hf_cfg.to_json_string()))
    freq, factor = rope_frequencies(16, ours.rope_theta, ours.rope_scaling)
    assert torch.isfinite(freq).all() and torch.equal(freq, want_freq.float()) and factor == want_factor


def test_fused_q_and_k_norms_use_their_own_weights_and_the_configs_eps():
    """The fused q/k-norm and RoPE kernel (interpreted here) against the torch path, with an eps far from the
    default 1e-6 and distinct q and k norm weights."""
    from tests.support import require_triton_interpreter

    require_triton_interpreter()
    cfg = ModelConfig.from_dict({"model_type": "qwen3", "vocab_size": 8, "hidden_size": 32, "intermediate_size": 8,
                                 "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "head_dim": 16, "rms_norm_eps": 0.5})
    g = torch.Generator().manual_seed(0)
    plain, fused = Attention(cfg, TPInfo()), Attention(cfg, TPInfo(), fused=True)
    for p in plain.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)
    fused.load_state_dict(plain.state_dict())
    t = 5
    x, rope = torch.randn(t, 32, generator=g) * 0.1, RotaryEmbedding(16, 16, 10000.0, torch.float32)
    outs = []
    for attn in (plain, fused):
        caches = (torch.zeros(1, 16, 2, 16), torch.zeros(1, 16, 2, 16))
        outs.append(attn(rope.lookup(torch.arange(t)), x, caches, _prefill_meta(t), TorchAttentionBackend()))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("packed,parts", [("self_attn.qkv_proj", ("q", "k", "v")), ("mlp.gate_up_proj", ("gate", "up"))])
def test_a_checkpoint_that_packs_a_layer_itself_is_refused_naming_the_tensor(tmp_path, packed, parts):
    """Such a tensor maps onto the packed parameter with no part to copy into (it was a bare KeyError(None))."""
    from safetensors.torch import load_file, save_file

    make_family(tmp_path, "llama", layers=1)
    cfg = ModelConfig.from_dir(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    prefix = f"model.layers.0.{packed.split('.')[0]}."
    tensors[f"model.layers.0.{packed}.weight"] = torch.cat([tensors.pop(f"{prefix}{p}_proj.weight") for p in parts])
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = DecoderForCausalLM(cfg, TPInfo(), 64, torch.float32)
    with pytest.raises(ValueError, match=rf"model\.layers\.0\.{packed}\.weight .*packs this layer's "
                                         rf"{'/'.join(parts)} parts in one tensor") as err:
        load_weights(model, tmp_path, cfg.tie_word_embeddings)
    assert "config.json" not in str(err.value)  # the shapes agree: it is the layout, not the config
