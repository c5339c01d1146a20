"""Tiny random checkpoints for the engine's tests (Qwen3, and the other families it serves), built with
transformers and save_pretrained."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

VOCAB = 512


def make_qwen3(
    path: Path,
    *,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    hidden: int = 64,
    layers: int = 2,
    tie: bool = True,
    theta: float = 10000.0,
    vocab: int = VOCAB,
    max_pos: int = 1024,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    shard_size: str | None = None,
    rope_scaling: dict | None = None,
) -> Qwen3ForCausalLM:
    """Save a random Qwen3 to `path` and return it (float64, eval mode) as the reference; rope_scaling: e.g.
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}."""
    torch.manual_seed(seed)
    cfg = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=max_pos,
        tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", **(rope_scaling or {}), "rope_theta": theta},
        # A wide init makes a random model's greedy tokens vary, so comparisons mean something.
        initializer_range=0.3,
    )
    model = Qwen3ForCausalLM(cfg).to(dtype).eval()
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(path, **kwargs)
    return model


def make_family(path: Path, model_type: str, *, heads: int = 4, kv_heads: int = 2, head_dim: int = 16,
                hidden: int = 64, layers: int = 2, tie: bool = False, vocab: int = VOCAB, max_pos: int = 1024,
                seed: int = 0, dtype: torch.dtype = torch.float64, rope_scaling: dict | None = None, **extra):
    """Save a random model of `model_type` ("llama", "mistral", "qwen2", "qwen3") to `path` and return it (eval
    mode) as the reference. extra: config keys such as attention_bias, mlp_bias, sliding_window. Every bias is
    drawn at random too: transformers starts them at zero, which would hide a bias the engine did not load."""
    import transformers

    classes = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[model_type]
    config_cls = getattr(transformers, f"{classes}Config")
    model_cls = getattr(transformers, f"{classes}ForCausalLM")
    torch.manual_seed(seed)
    cfg = config_cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=max_pos,
        tie_word_embeddings=tie, rope_parameters={"rope_type": "default", **(rope_scaling or {}), "rope_theta": 10000.0},
        initializer_range=0.3, **extra,
    )
    model = model_cls(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.3)
    model.save_pretrained(path)
    return model


def random_prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    """Prompts of the given lengths, of ids drawn uniformly from the tiny vocabulary."""
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


def exact_engine(path: Path, **overrides):
    """An LLM set up for exact comparisons with transformers: float64 on CPU, torch attention, no graphs, a
    128-block pool of 16 tokens, 8 sequences; keyword arguments override."""
    from engine_service import LLM

    args = dict(device="cpu", dtype="float64", enforce_eager=True, attention_backend="torch", kvcache_block_size=16,
                num_kvcache_blocks=128, max_num_batched_tokens=512, max_num_seqs=8, max_model_len=512)
    args.update(overrides)
    return LLM(path, **args)


def generate_in(path: Path, setting: str, overrides: dict, prompts: list[list[int]], params) -> list[dict]:
    """exact_engine(path, **overrides).generate(prompts, params); a setting named "preemption" must have preempted
    (a case meant to cover preemption that did not is a broken case, not a pass)."""
    with exact_engine(path, **overrides) as llm:
        outs = llm.generate(prompts, params)
        if setting == "preemption":
            assert llm.stats()["num_preemptions"] > 0, "the case did not preempt"
    return outs


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens for one prompt (explicit attention mask, EOS disabled)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=None,
        )
    return out[0, len(prompt) :].tolist()


def to_transformers4_config(path: Path) -> None:
    """Rewrite config.json in the transformers 4 format (rope_theta and torch_dtype at the top level)."""
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    cfg["rope_scaling"] = None
    cfg["torch_dtype"] = cfg.pop("dtype", "float64")
    cfg_path.write_text(json.dumps(cfg))


def sentencepiece_tokenizer(vocab_size: int = 1000):
    """A SentencePiece-style tokenizer (as Llama 2's and Mistral 7B's, in transformers' conversion): BPE over
    "▁"-marked words trained on the demo corpus, the 256 byte tokens <0x00>..<0xFF> as ordinary vocabulary for
    characters it lacks, and the decoder Replace("▁", " "), ByteFallback, Fuse, Strip(one leading space)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = (Path(__file__).resolve().parents[2] / "scripts" / "demo_corpus.txt").read_text(encoding="utf-8")
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace()
    trained.train_from_iterator(corpus.splitlines(keepends=True),
                                trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>"],
                                                    show_progress=False))
    spec = json.loads(trained.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for piece in sorted(spec["vocab"], key=spec["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def drain(llm, max_steps: int = 5000) -> dict[str, list]:
    """Step an engine until idle: each request's [tokens, finish reason, number of finished outputs]."""
    seen: dict[str, list] = {}
    for _ in range(max_steps):
        if not llm.has_unfinished_requests():
            return seen
        for out in llm.step():
            entry = seen.setdefault(out.request_id, [[], None, 0])
            entry[0].extend(out.new_token_ids)
            entry[2] += out.finished
            if out.finished:
                entry[1] = out.finish_reason
    raise AssertionError("the engine did not go idle")


def count_ahead(llm) -> list[int]:
    """Counts the batches scheduled ahead (a one-element list, updated in place)."""
    count = [0]
    original = llm.scheduler.schedule_ahead

    def counting(batch):
        ahead = original(batch)
        count[0] += ahead is not None
        return ahead

    llm.scheduler.schedule_ahead = counting
    return count
