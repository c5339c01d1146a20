"""The serving benchmark's model: the cpu-small preset (random Qwen3, vocabulary 8192) plus a tokenizer.

The preset has no tokenizer, and the tokenizer service needs one whose vocabulary covers every id the model
can produce. This writes a copy of the preset directory with a `tokenizers` WordLevel tokenizer of exactly
the model's vocabulary size (id i is the word `w<i>`, id 0 is the `<eos>` special token), built offline and
deterministically. Prompts go in as `prompt_token_ids`, so the tokenizer's only work in the benchmark is
incremental detokenization of the generated ids.

    python -m scripts.bench_model [OUT_DIR]      # default ~/.cache/llm-grpc-serve/presets/cpu-small-tok
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from engine_service.bench import DEFAULT_CACHE_DIR, build_preset, install_dir, preset_built_from

PRESET = "cpu-small"
EOS = "<eos>"


def build_bench_model(out: Path, cache_dir: Path = DEFAULT_CACHE_DIR) -> Path:
    """The preset's files plus tokenizer.json / tokenizer_config.json in `out` (reused when complete and built
    from the preset as it is defined now: the copied preset.json says which)."""
    preset_dir = build_preset(PRESET, cache_dir)

    def current() -> bool:
        return (out / "tokenizer.json").is_file() and (out / "config.json").is_file() and \
            preset_built_from(out) == preset_built_from(preset_dir)

    if current():
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab_size = int(json.loads((preset_dir / "config.json").read_text())["vocab_size"])
    vocab = {EOS: 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens([EOS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, unk_token=EOS)
    if len(fast) != vocab_size:
        raise RuntimeError(f"built a tokenizer of {len(fast)} ids, expected {vocab_size}")

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for f in preset_dir.iterdir():
            shutil.copy2(f, staging / f.name)
        fast.save_pretrained(staging)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    install_dir(staging, out, current)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m scripts.bench_model", description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", type=Path, default=DEFAULT_CACHE_DIR / f"{PRESET}-tok")
    print(build_bench_model(p.parse_args(argv).out))


if __name__ == "__main__":
    main()
