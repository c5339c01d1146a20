"""What an fp8 KV cache does to a model's predictions: teacher-forced log-probabilities of a text under
kv_cache_dtype "auto" (the model's dtype) and "fp8", compared position by position.

The text is tokenized with the model's tokenizer and cut into windows of --window tokens; each window (after the
tokenizer's BOS, where it has one) is one request whose prompt logprobs (each token given the tokens before it)
the engine computes in prefill, which reads K and V back from the cache as decode does (stored rounded, in fp8).
Reported: the perplexity under each setting, the mean and largest |difference| of a token's log-probability, and
how often the most likely next token is the same. Run it on the checkpoint you serve: the demo model's random weights say nothing about a trained model's.

    python -m scripts.kv_cache_quality --model /path/to/hf-model-dir [--text FILE] [--device cuda]
    python -m scripts.kv_cache_quality            # the demo model on CPU: shows the tool works, nothing more
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TEXT = ROOT / "scripts" / "demo_corpus.txt"


def windows(ids: list[int], size: int, limit: int) -> list[list[int]]:
    """Consecutive windows of `size` ids (the last one only if whole), at most `limit` of them."""
    return [ids[i:i + size] for i in range(0, len(ids) - size + 1, size)][:limit]


def teacher_forced(model: str, prompts: list[list[int]], kv_cache_dtype: str, engine: dict) -> list[list[tuple]]:
    """Per window, per position after the first: (log-probability of the text's token, the most likely token)."""
    from engine_service import LLM, SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
    with LLM(model, kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False, **engine) as llm:
        results = llm.generate(prompts, params)
    return [[(lp.logprob, lp.top_token_ids[0]) for lp in r["prompt_logprobs"]] for r in results]


def compare(base: list[list[tuple]], other: list[list[tuple]]) -> dict:
    """The figures of `other` against `base` (same windows)."""
    pairs = [(b, o) for bw, ow in zip(base, other, strict=True) for b, o in zip(bw, ow, strict=True)]
    if not pairs:
        raise ValueError("no positions to compare: the text is shorter than one window")
    diffs = [abs(b[0] - o[0]) for b, o in pairs]
    return {
        "positions": len(pairs),
        "perplexity": math.exp(-sum(b[0] for b, _ in pairs) / len(pairs)),
        "perplexity_other": math.exp(-sum(o[0] for _, o in pairs) / len(pairs)),
        "mean_abs_logprob_diff": sum(diffs) / len(diffs),
        "max_abs_logprob_diff": max(diffs),
        "top1_agreement": sum(b[1] == o[1] for b, o in pairs) / len(pairs),
    }


def main(argv: list[str] | None = None) -> int:
    first, _, rest = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(prog="python -m scripts.kv_cache_quality", description=first,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--model", help="a Hugging Face model directory (default: the demo model, built if absent)")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="a UTF-8 text file (default: the demo corpus)")
    p.add_argument("--window", type=int, default=256, help="tokens a request (default 256)")
    p.add_argument("--max-windows", type=int, default=64, help="at most this many requests (default 64)")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: the engine's (float32 on CPU, the checkpoint's dtype on a GPU)")
    p.add_argument("--attention-backend", help="default: the engine's auto choice")
    p.add_argument("--json", type=Path, help="write the figures here too")
    args = p.parse_args(argv)
    if args.window < 2 or args.max_windows < 1:
        p.error("--window must be at least 2 and --max-windows at least 1")
    if not args.text.is_file():
        p.error(f"--text {args.text}: no such file")
    model = args.model
    if model is None:
        from scripts.demo_model import build_demo_model

        model = str(build_demo_model(ROOT / ".demo_model"))
        print("kv_cache_quality: the demo model has random weights: its figures only show the tool works",
              file=sys.stderr)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.model_max_length = sys.maxsize  # the text is cut into windows below; no warning about its length
    ids = tokenizer.encode(args.text.read_text(encoding="utf-8"), add_special_tokens=False)
    prompts = windows(ids, args.window, args.max_windows)
    if not prompts:
        p.error(f"--text has {len(ids)} tokens, fewer than one --window of {args.window}")
    if tokenizer.bos_token_id is not None:  # as a request would start (Llama's BOS is the attention's sink)
        prompts = [[tokenizer.bos_token_id, *window] for window in prompts]
    engine = {k: v for k, v in (("device", args.device), ("dtype", args.dtype),
                                ("attention_backend", args.attention_backend)) if v is not None}
    # The KV pool this job needs: every window at once, each its prompt and the one token it generates. The
    # engine's default (256 sequences of the model's whole context) took 1 GiB for the demo model on the CPU.
    engine.update(max_num_seqs=len(prompts), max_model_len=len(prompts[0]) + 1)
    base = teacher_forced(model, prompts, "auto", engine)
    fp8 = teacher_forced(model, prompts, "fp8", engine)
    figures = {"model": model, "text": str(args.text), "windows": len(prompts), "window": args.window,
               "engine": engine, "fp8_against_auto": compare(base, fp8)}
    f = figures["fp8_against_auto"]
    print(f"{len(prompts)} windows of {args.window} tokens, {f['positions']:,} positions: perplexity "
          f"{f['perplexity']:.4f} (auto) -> {f['perplexity_other']:.4f} (fp8); |logprob difference| mean "
          f"{f['mean_abs_logprob_diff']:.2e}, largest {f['max_abs_logprob_diff']:.2e}; the most likely next token "
          f"the same at {100 * f['top1_agreement']:.2f}% of positions")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
