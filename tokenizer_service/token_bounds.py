"""A lower bound on a text's token count, for refusing a text too long for max_model_len from part of it.

The byte limit (8 MiB) is hundreds of times what max_model_len tokens are in text, and tokenizing all of an
8 MiB prompt takes 5 s and 1.6 GB. tokens_at_least finds a lower bound on the count from the text's size and
a bounded head of it instead; the text is refused only when that bound reaches max_model_len, so nothing that
the full tokenization accepts is refused, and what passes is tokenized whole, as any text is.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

HEAD_CHARS_PER_TOKEN = 8  # the first head is this many characters a max_model_len token (text runs 3 to 5)
# What a text goes on with after a cut changes the tokens of at most the head's last TAIL_WORDS pre-tokens and
# last TAIL_CHARS characters: a regex pre-tokenizer's last matches (Qwen2's `\s*[\r\n]+` takes in the newlines
# and spaces that `\s+(?!\S)` ended the head with), an added token cut in two, a normalizer's combining sequence.
# Models (BPE, WordPiece, Unigram) tokenize each pre-token on its own. tests/unit/test_big_inputs.py checks it
# on fuzzed texts and cuts, with GPT-2's pattern and Qwen2's.
TAIL_WORDS = 3
TAIL_CHARS = 64  # plus the longest added token's text


@dataclass(slots=True, frozen=True)
class _Pipeline:
    """What tokens_at_least needs to know of a tokenizer, read once per tokenizer."""

    backend: Any  # the `tokenizers` Tokenizer that transformers' encode runs, and only that
    tail_chars: int
    max_token_bytes: int | None  # the most UTF-8 bytes one token stands for, where every byte lands in a token
    head_bound: bool  # whether the head bound holds (_head_bound_holds)


_PIPELINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> _Pipeline | None


def _max_token_bytes(config: dict, alphabet: Sequence[str]) -> int | None:
    """The most bytes of text one token can stand for, when every byte of a text lands in some token: byte-level
    BPE with its whole byte alphabet, no normalizer, no pre-tokenizer that drops text, no added token that takes
    in the spaces around it. None for any other tokenizer (a normalizer or WordPiece's [UNK] can make 8 MiB of
    text into a handful of tokens)."""
    model, added = config.get("model") or {}, config.get("added_tokens") or []
    pre = config.get("pre_tokenizer") or {}
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else [pre]
    vocab = model.get("vocab")
    if (config.get("normalizer") is not None or model.get("type") != "BPE" or not isinstance(vocab, dict)
            or not any(step.get("type") == "ByteLevel" for step in steps)
            or any(step.get("type") not in ("ByteLevel", "Split") or step.get("behavior") == "Removed"
                   for step in steps)
            or any(token.get("lstrip") or token.get("rstrip") for token in added)
            or not vocab.keys() >= set(alphabet)):
        return None
    # A byte-level token has one character per byte it stands for.
    return max([len(token) for token in vocab] + [len(token["content"].encode()) for token in added])


_SPM_NORMALIZERS = frozenset({"Prepend", "Replace"})


def _spm_max_token_bytes(config: dict) -> int | None:
    """The same bound for a SentencePiece-style BPE (Llama 2, Mistral 7B): byte_fallback puts every character
    the vocabulary lacks in <0xNN> tokens (no <unk> swallows a run of them), a token covers at most its own bytes, and
    the normalizer, if any, only prepends "▁" or replaces " " with it. Its pre-tokenizer (Metaspace with
    split=False, or none) makes the whole text one pre-token, so the head bound finds nothing certain."""
    model, added = config.get("model") or {}, config.get("added_tokens") or []
    vocab, norm, pre = model.get("vocab"), config.get("normalizer"), config.get("pre_tokenizer")
    steps = (norm.get("normalizers") or []) if norm and norm.get("type") == "Sequence" else ([norm] if norm else [])
    if (model.get("type") != "BPE" or not model.get("byte_fallback") or not isinstance(vocab, dict)
            or any(step.get("type") not in _SPM_NORMALIZERS for step in steps)
            or any(step.get("type") == "Replace" and (step.get("pattern") != {"String": " "}
                                                      or step.get("content") != "\u2581") for step in steps)
            or (pre is not None and pre.get("type") != "Metaspace")
            or any(token.get("lstrip") or token.get("rstrip") for token in added)
            or not all(f"<0x{b:02X}>" in vocab for b in range(256))):
        return None
    # A token covers at most its own UTF-8 bytes of the text: a space the normalizer made "▁" was 1 byte, not 3.
    return max([len(token.encode()) for token in vocab]
               + [len(token["content"].encode()) for token in added])


def _head_bound_holds(config: dict) -> bool:
    """Whether what a text goes on with changes only its head's tail (TAIL_WORDS pre-tokens, tail_chars characters).
    Not with an added token that takes in the whitespace before it (lstrip): after Metaspace(split=True), one
    pre-token a space, it swallowed a run of any length ("hi" + 400 spaces + "[MASK]" is 2 tokens; 127 of the
    head's were counted certain, and the prompt refused). Nor with a normalized added token beside a normalizer,
    which matches on the normalized text: one that deletes characters (strip_accents, clean_text) spreads the match
    over any number of the text's characters."""
    added = config.get("added_tokens") or []
    return not any(token.get("lstrip") or (token.get("normalized") and config.get("normalizer") is not None)
                   for token in added)


def _read_pipeline(tokenizer: Any) -> _Pipeline | None:
    """The tokenizer's pipeline, None unless its encode is transformers' own over a `tokenizers` backend."""
    try:
        from tokenizers.pre_tokenizers import ByteLevel
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:
        return None
    if (not isinstance(tokenizer, TokenizersBackend) or type(tokenizer).encode is not PreTrainedTokenizerBase.encode
            or type(tokenizer)._encode_plus is not TokenizersBackend._encode_plus):
        return None  # its encode may do more than run the backend: only the full tokenization can say
    backend = tokenizer.backend_tokenizer
    config = json.loads(backend.to_str())
    longest_added = max((len(token["content"]) for token in config.get("added_tokens") or []), default=0)
    max_bytes = _max_token_bytes(config, ByteLevel.alphabet()) or _spm_max_token_bytes(config)
    return _Pipeline(backend, TAIL_CHARS + longest_added, max_bytes, _head_bound_holds(config))


def _pipeline(tokenizer: Any) -> _Pipeline | None:
    try:
        return _PIPELINES[tokenizer]
    except KeyError:
        pipeline = _PIPELINES[tokenizer] = _read_safely(tokenizer)
        return pipeline
    except TypeError:  # a tokenizer that cannot be weakly referenced: read it each time
        return _read_safely(tokenizer)


def _read_safely(tokenizer: Any) -> _Pipeline | None:
    """_read_pipeline, or None (every text tokenized whole, as before) for a tokenizer it cannot read: a bound is
    an optimisation, never a reason to refuse a tokenizer that loads."""
    try:
        return _read_pipeline(tokenizer)
    except Exception as exc:  # noqa: BLE001 -- a tokenizer.json shaped otherwise than expected
        log.warning("cannot read the tokenizer's pipeline (%s: %s): prompts too long for max_model_len are "
                    "tokenized whole before they are refused", type(exc).__name__, exc)
        return None


def warm_up(tokenizer: Any) -> None:
    """Read the tokenizer's pipeline now (its JSON: 0.3 s for a 150,000-token vocabulary), on the thread that
    loads the tokenizer, rather than on the event loop at the first request."""
    _pipeline(tokenizer)


def _certain_head_tokens(pipeline: _Pipeline, head: str) -> tuple[int, int]:
    """(how many of the head's tokens every text that starts with it has too, how many the head has)."""
    encoding = pipeline.backend.encode_batch([head], add_special_tokens=False)[0]  # the batch call lets go of the GIL
    words, offsets = encoding.word_ids, encoding.offsets
    i, tail = len(words), set()
    while i > 0 and (words[i - 1] in tail or len(tail) < TAIL_WORDS):  # None (no word) counts as one word
        tail.add(words[i - 1])
        i -= 1
    limit = len(head) - pipeline.tail_chars
    return sum(1 for _, end in offsets[:i] if end <= limit), len(words)


def _backend_as_encode_sets_it(tokenizer: Any, pipeline: _Pipeline) -> bool:
    """Whether the backend, as it is now, encodes as transformers' encode would: that call first turns off any
    truncation and padding and sets encode_special_tokens to the tokenizer's split_special_tokens."""
    backend, split = pipeline.backend, bool(getattr(tokenizer, "split_special_tokens", False))
    return backend.truncation is None and backend.padding is None and backend.encode_special_tokens == split


def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    """tokenizer.encode(text, add_special_tokens=...)'s ids. Where that encode is transformers' own over a
    `tokenizers` backend, the backend is called directly, without the offsets and the Python wrapping transformers
    builds and drops (70-165 us of a 110-token prompt, a third of its tokenization, on the event loop)."""
    pipeline = _pipeline(tokenizer)
    if pipeline is not None and _backend_as_encode_sets_it(tokenizer, pipeline):
        return pipeline.backend.encode_batch_fast([text], add_special_tokens=add_special_tokens)[0].ids
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def tokens_at_least(tokenizer: Any, text: str, max_model_len: int) -> int:
    """A lower bound on len(tokenizer.encode(text, add_special_tokens=False)), for refusing a text too long for
    max_model_len at the cost of tokenizing a head of at most about the text's length; 0 when nothing is certain.

    Two bounds. A byte-level BPE tokenizer (_max_token_bytes) gives at least one token per max_token_bytes bytes,
    whatever the text. Any transformers fast tokenizer (where _head_bound_holds) gives, for every text, the tokens
    that a head of it gives
    before its tail (its last TAIL_WORDS pre-tokens and tail_chars characters): pre-tokens are tokenized one by
    one, so what the text goes on with can change only the tail. A head 4 times as long is tried while the last
    one was mostly certain but fell short and the text is longer; one that is mostly tail (a single pre-token of
    megabytes) ends the search.
    """
    pipeline = _pipeline(tokenizer)
    if pipeline is None:
        return 0
    if not _backend_as_encode_sets_it(tokenizer, pipeline):
        return 0  # the backend as it is now would count otherwise
    bound = len(text.encode("utf-8", errors="surrogatepass")) // pipeline.max_token_bytes if pipeline.max_token_bytes else 0
    size = HEAD_CHARS_PER_TOKEN * max_model_len + pipeline.tail_chars
    while pipeline.head_bound and bound < max_model_len and size < len(text):
        sure, seen = _certain_head_tokens(pipeline, text[:size])
        bound = max(bound, sure)
        if 2 * sure < seen:
            break
        size *= 4
    return bound
