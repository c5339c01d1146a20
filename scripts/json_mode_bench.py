"""What JSON mode costs the engine's host: indexing a vocabulary, computing and reusing masks, applying them.

    python -m scripts.json_mode_bench                # a synthetic 151,936-token byte-level vocabulary (Qwen3's size)
    python -m scripts.json_mode_bench --model DIR    # a model directory's own tokenizer
    python -m scripts.json_mode_bench --schema FILE  # documents of a JSON Schema (json_schema.py's subset)
    python -m scripts.json_mode_bench --schema FILE --short-values --max-tokens 40960 --documents 2
        # what one request's misses cost (json_mask_budget_s): the first document, then one whose shapes are cached

The synthetic vocabulary mixes what byte-level BPE vocabularies hold: words with and without a leading space, CJK
characters whole and cut mid-character, punctuation runs, newline-and-indent runs, and all 256 single bytes.
Documents are written by drawing uniformly among the allowed tokens (a worst case for the cache: a model repeats
its shapes more). With --short-values, nine draws in ten are among the allowed tokens holding a quote, colon, comma
or closing brace, where there are any: short values, as a model writes them, so a document spends its tokens on
the schema's structure (its keys), where the cache misses, rather than inside long strings.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from engine_service import json_grammar as jg
from engine_service.json_schema import compile_schema
from engine_service.sampler import Sampler, SamplingRow
from engine_service.sampling_params import SamplingParams
from engine_service.structured_output import JsonCursor, JsonMasks, token_bytes

CORPUS = Path(__file__).with_name("demo_corpus.txt")


def synthetic_vocabulary(size: int, seed: int = 0) -> list[bytes | None]:
    rng = random.Random(seed)
    words = list(dict.fromkeys(CORPUS.read_text().split()))
    cjk = [chr(c) for c in range(0x4E00, 0x9FFF)]
    punct = list('{}[]":,.;!?()-_=+*/\\\'`~<>|@#$%^&') + ["\n", "\t", "  "]
    seen = {bytes((b,)) for b in range(256)}
    out: list[bytes | None] = sorted(seen)
    while len(out) < size:
        r = rng.random()
        if r < 0.45:
            word = rng.choice(words) + (rng.choice(words)[: rng.randint(1, 5)] if rng.random() < 0.5 else "")
            piece = (" " + word).encode()
        elif r < 0.6:
            piece = rng.choice(words).encode()[: rng.randint(1, 12)]
        elif r < 0.75:
            piece = "".join(rng.choice(cjk) for _ in range(rng.randint(1, 3))).encode()
            if rng.random() < 0.3:
                piece = piece[: rng.randint(1, len(piece))]
        elif r < 0.85:
            piece = "".join(rng.choice(punct) for _ in range(rng.randint(1, 4))).encode()
        elif r < 0.9:
            piece = ("\n" + " " * rng.randint(0, 40)).encode()
        else:
            piece = (rng.choice(punct) + rng.choice(words)).encode()
        if piece not in seen:
            seen.add(piece)
            out.append(piece)
    rng.shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a model directory whose tokenizer to use")
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--rows", type=int, default=64, help="rows of the sampler timing")
    parser.add_argument("--schema", default=None, help="a JSON Schema file: write its documents instead of any object")
    parser.add_argument("--short-values", action="store_true",
                        help="draw tokens holding a quote, colon, comma or closing brace 9 times in 10 (short values)")
    args = parser.parse_args()
    if args.model:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        vocab = token_bytes(tokenizer, len(tokenizer))
    else:
        vocab = synthetic_vocabulary(151_936)
    t0 = time.perf_counter()
    masks = JsonMasks(vocab)
    print(f"vocabulary: {len(vocab)} tokens, indexed in {time.perf_counter() - t0:.2f} s")

    top = jg.FREE_OBJECT
    if args.schema:
        t0 = time.perf_counter()
        top = compile_schema(Path(args.schema).read_text())
        print(f"schema compiled in {(time.perf_counter() - t0) * 1e3:.1f} ms")
    rng = random.Random(0)
    structural = torch.tensor([bool(b) and any(c in b for c in b'":,}') for b in vocab])
    lookups: list[float] = []
    spent: list[float] = []  # each document's miss seconds, as json_mask_budget_s counts them
    tokens = finished = 0
    for _ in range(args.documents):
        cursor = JsonCursor(masks, top)
        for _ in range(args.max_tokens):
            t = time.perf_counter()
            mask = cursor.allowed()
            lookups.append(time.perf_counter() - t)
            dense = mask.dense(len(vocab))
            ids = (dense & structural).nonzero().flatten() if args.short_values and rng.random() < 0.9 else None
            if ids is None or not len(ids):
                ids = dense.nonzero().flatten()
            assert cursor.advance(int(ids[rng.randrange(len(ids))]))
            tokens += 1
            if cursor.done:
                finished += 1
                break
        spent.append(cursor.spent_s)
    lookups.sort()
    print(f"{args.documents} documents ({finished} closed), {tokens} tokens: {masks.misses} cache misses "
          f"({masks.compute_s:.2f} s, {lookups[-1] * 1e3:.1f} ms at most), lookups {lookups[len(lookups) // 2] * 1e6:.1f} us "
          f"median, {lookups[int(len(lookups) * 0.99)] * 1e3:.2f} ms p99")
    print(f"misses of one document: the first {spent[0]:.2f} s, the others {max(spent[1:], default=0.0):.2f} s at most")

    sampler = Sampler(torch.device("cpu"), 0)
    greedy = SamplingParams(temperature=0.0)
    logits = torch.randn(args.rows, len(vocab))
    for name, prefix in (("in a string", b'{"a'), ("after a colon", b'{"a":'), ("in a literal", b'{"a":tr')):
        cursor = JsonCursor(masks)
        for b in prefix:
            assert cursor.advance(vocab.index(bytes((b,))))
        mask = cursor.allowed()
        timings = []
        for rows in ([SamplingRow(greedy, None)] * args.rows, [SamplingRow(greedy, None, allowed=mask)] * args.rows):
            runs = []
            for _ in range(15):
                work = logits.clone()
                t = time.perf_counter()
                sampler.sample(work, rows)
                runs.append(time.perf_counter() - t)
            timings.append(sorted(runs)[7] * 1e3)
        print(f"sampling {args.rows} rows {name} ({mask.count} tokens allowed): {timings[0]:.2f} ms unmasked, "
              f"{timings[1]:.2f} ms masked (medians of 15)")


if __name__ == "__main__":
    main()
