"""Build the small demo checkpoint that the services run on when no model is given.

The checkpoint is a Hugging Face model directory, built offline and deterministically:

- a byte-level BPE tokenizer trained with the `tokenizers` library on `scripts/demo_corpus.txt`
  (English prose, code, emoji and CJK), wrapped as a `PreTrainedTokenizerFast` with ChatML special tokens
  and a ChatML chat template;
- a tiny randomly initialised Qwen3 (fixed seed) whose vocabulary is exactly the tokenizer's, saved as
  float32 safetensors with tied embeddings;
- a `generation_config.json` whose EOS ids are `<|im_end|>` and `<|endoftext|>`.

Building twice gives byte-identical files. A marker file (`demo_model.json`) records a fingerprint of the
recipe and the SHA-256 of every file, so a later call returns at once when the directory is complete.

    python -m scripts.demo_model OUT_DIR [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

CORPUS_PATH = Path(__file__).with_name("demo_corpus.txt")
MARKER_NAME = "demo_model.json"
# Bump when the recipe changes in a way the fingerprint below cannot see (e.g. library behaviour).
RECIPE_VERSION = 1

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Includes the special tokens. The corpus is small, so merges of pairs seen once fill the tail.
BPE_VOCAB_SIZE = 2048
SEED = 1234

# ChatML, as Qwen uses it. `messages` contents are plain strings (tokenizer_service.chat normalises them).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

MODEL_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "max_position_embeddings": 2048,
}
GENERATION_DEFAULTS = {"temperature": 0.7, "top_p": 0.9, "top_k": 50}


def _recipe_fingerprint() -> str:
    """Hash of everything that decides the output, so a stale directory is rebuilt."""
    h = hashlib.sha256()
    recipe = {
        "version": RECIPE_VERSION,
        "special": SPECIAL_TOKENS,
        "bpe_vocab": BPE_VOCAB_SIZE,
        "seed": SEED,
        "template": CHAT_TEMPLATE,
        "shape": MODEL_SHAPE,
        "generation": GENERATION_DEFAULTS,
        # Library versions change serialised bytes (e.g. transformers_version in config.json).
        # Read from package metadata: importing torch just to check a finished directory would be slow.
        "libs": [version(name) for name in ("transformers", "tokenizers", "torch", "safetensors")],
    }
    h.update(json.dumps(recipe, sort_keys=True).encode())
    h.update(CORPUS_PATH.read_bytes())
    return h.hexdigest()


def _file_hashes(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MARKER_NAME
    }


def is_complete(path: str | Path) -> bool:
    """True when `path` holds a demo model built by the current recipe, with every file intact."""
    directory = Path(path)
    marker = directory / MARKER_NAME
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if recorded.get("recipe") != _recipe_fingerprint():
        return False
    try:
        return _file_hashes(directory) == recorded.get("files")
    except OSError:
        return False


def _train_tokenizer():
    """A byte-level BPE trained on the repository corpus, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        # Special tokens first, so their ids are 0, 1, 2.
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes, so any text at all (any emoji, any script) can be encoded.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS_PATH.read_text(encoding="utf-8").splitlines(keepends=True), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )


def _write_model(directory: Path, tokenizer) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=im_end,
        pad_token_id=eot,
        dtype="float32",
        **MODEL_SHAPE,
    )
    # Fork the RNG so building a model never disturbs the caller's torch random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen3ForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(directory, safe_serialization=True)
    GenerationConfig(
        bos_token_id=None,
        eos_token_id=[im_end, eot],
        pad_token_id=eot,
        do_sample=True,
        **GENERATION_DEFAULTS,
    ).save_pretrained(directory)


def build_demo_model(path: str | Path, *, force: bool = False) -> Path:
    """Build the demo checkpoint into `path` (or return it at once if already complete); returns the path."""
    target = Path(path).resolve()
    if not force and is_complete(target):
        for file in target.iterdir():  # a build from before its weights were made readable (safetensors: 0600)
            if file.stat().st_mode & 0o444 != 0o444:
                file.chmod(file.stat().st_mode | 0o444)
        return target
    if target.exists() and not target.is_dir():
        raise ValueError(f"path {str(target)!r} exists and is not a directory")
    # Never delete a directory we did not make: only an empty one or a previous demo build is replaced.
    if target.is_dir() and any(target.iterdir()) and not (target / MARKER_NAME).exists():
        raise ValueError(
            f"path {str(target)!r} is a non-empty directory that is not a demo model; choose another path"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename into place, so a crash or a concurrent reader never sees half a
    # model, and two processes building at once both end with a complete directory.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.building-", dir=target.parent))
    try:
        tokenizer = _train_tokenizer()
        tokenizer.save_pretrained(staging)
        _write_model(staging, tokenizer)
        marker = {"recipe": _recipe_fingerprint(), "files": _file_hashes(staging)}
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        if target.exists():
            if not force and is_complete(target):  # another process finished first
                return target
            shutil.rmtree(target)
        # mkdtemp makes the directory private and safetensors writes its file 0600: a model is read by the
        # services' own user (uid 10001 in the images), so everything is readable as usual.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)
        os.rename(staging, target)
    except OSError:
        # Lost a rename race to another builder: theirs is as good as ours.
        if is_complete(target):
            return target
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the deterministic demo model directory.")
    parser.add_argument("out_dir", help="directory to build (created if absent)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the directory is complete")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-shot command: the shard-writing bar is noise
    print(build_demo_model(args.out_dir, force=args.force))


if __name__ == "__main__":
    main()
