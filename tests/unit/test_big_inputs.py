"""Inputs within the byte limits but far past max_model_len: refused from a head of their text, cheaply, and never
when a full tokenization would have accepted them; heavy work one at a time; refusals timed and freed at once."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import threading
import time
import weakref
from pathlib import Path
from unittest import mock

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.llmserve.text.v1 import text_pb2 as pb
from tokenizer_service import servicer as servicer_module
from tokenizer_service import token_bounds, validation
from tokenizer_service.chat import encode_chat
from tokenizer_service.engine_pool import RequestFailed
from tokenizer_service.metrics import RequestTrace
from tokenizer_service.token_bounds import tokens_at_least
from tokenizer_service.validation import TextLimits, prepare

CORPUS = (Path(__file__).parents[2] / "scripts" / "demo_corpus.txt").read_text()
TOO_LONG = "prompt: must be shorter than max_model_len tokens"
# Pieces where a cut changes the tokens before it: runs of spaces and newlines, special tokens whole and cut,
# characters of several bytes and tokens, digits, punctuation runs; and sparse text (10 to 13 characters a token),
# so that heads are tried near the limit too.
PIECES = (" ", "  ", "\n", "\n\n", " \n ", "\t", "\r\n", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_",
          "|>", "<", "'s", "123", "👋", "👨‍👩‍👧", "é", "e\u0301", "你好", "...", "---", "aaaa", " x", "x ", "==",
          " wonderful", " somewhere")


def _corpus_text(nbytes: int) -> str:
    data = CORPUS.encode()
    return (data * (nbytes // len(data) + 1))[:nbytes].decode(errors="ignore")


@contextlib.contextmanager
def _heads_only(tokenizer):
    """The tokenizer without its byte bound (13 bytes a token for the demo's), as for one with long tokens or a
    normalizer: only heads of a text can refuse it."""
    pipelines, pipeline = token_bounds._PIPELINES, token_bounds._pipeline(tokenizer)
    token_bounds._PIPELINES = weakref.WeakKeyDictionary(
        {tokenizer: dataclasses.replace(pipeline, max_token_bytes=None)})
    try:
        yield tokenizer
    finally:
        token_bounds._PIPELINES = pipelines


@pytest.fixture
def heads_only(demo_tokenizer):
    with _heads_only(demo_tokenizer):
        yield demo_tokenizer


def _no_full_encode(tokenizer, monkeypatch) -> None:
    """Fail on any whole tokenization of more than 64 KiB, through tokenizer.encode or the service's own
    (token_bounds.encode, which may call the backend directly): what took 5 s and 1.6 GB for an 8 MiB prompt."""
    def guard(real):
        def encode(*args, **kwargs):
            text = next(a for a in args if isinstance(a, str))
            if len(text) > 65536:
                raise AssertionError(f"tokenized all {len(text)} characters of a prompt that cannot fit")
            return real(*args, **kwargs)
        return encode

    monkeypatch.setattr(tokenizer, "encode", guard(tokenizer.encode))
    monkeypatch.setattr(validation, "encode", guard(validation.encode))


@pytest.fixture
def no_full_encode(demo_tokenizer, monkeypatch):
    _no_full_encode(demo_tokenizer, monkeypatch)


@pytest.mark.parametrize("bound", ["bytes", "heads"])
def test_an_8_mib_prompt_or_chat_is_refused_without_tokenizing_all_of_it(request, demo_tokenizer, no_full_encode,
                                                                          bound):
    """The length rule ran on the ids of the whole text: an 8 MiB prompt (2.3 million tokens, max_model_len
    2048) took 5 s of CPU and 1.6 GB in the tokenizer service before it was refused; three at once, 5 GB."""
    if bound == "heads":
        request.getfixturevalue("heads_only")
    prompt = pb.GenerateRequest(prompt=_corpus_text(8 * 2**20 - 16))
    chat = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=_corpus_text(2000))] * 4096))
    for big, field in ((prompt, "prompt"), (chat, "chat")):
        started = time.perf_counter()
        with pytest.raises(ValueError) as refused:
            prepare(big, demo_tokenizer, {}, 2048, TextLimits())
        took = time.perf_counter() - started
        assert str(refused.value).startswith(f"{field}: must be shorter than max_model_len tokens, leaving room")
        assert "got at least " in str(refused.value) and "max_model_len is 2048" in str(refused.value)
        assert took < 3, f"{field}: {took:.2f} s to refuse (tokenizing it all took 5 s)"


def test_a_single_word_of_megabytes_is_refused_by_the_byte_bound(demo_tokenizer, no_full_encode):
    """No head can refuse one pre-token of 8 MB (a cut may change all its tokens); "a" * 8M is 8 million tokens
    of the demo model, more than 3 times the corpus text's cost. Byte-level BPE has at most 13 bytes a token."""
    for text in ("a" * 8_000_000, " " * 8_000_000, "7" * 8_000_000):
        with pytest.raises(ValueError, match=TOO_LONG):
            prepare(pb.GenerateRequest(prompt=text), demo_tokenizer, {}, 2048, TextLimits())


def _reference(demo_tokenizer, request: pb.GenerateRequest, max_model_len: int) -> list[int] | None:
    """The ids the full tokenization gives, None where it refuses them as too long."""
    if request.HasField("chat"):
        ids = encode_chat(demo_tokenizer, [{"role": m.role, "content": m.content} for m in request.chat.messages])
    else:
        ids = demo_tokenizer.encode(request.prompt, add_special_tokens=False)
    return ids if len(ids) < max_model_len else None


texts = st.lists(
    st.one_of(st.builds(lambda start, n: CORPUS[start:start + n], st.integers(0, len(CORPUS)), st.integers(1, 300)),
              st.builds(lambda piece, n: piece * n, st.sampled_from(PIECES), st.sampled_from([1, 2, 3, 7, 40, 150]))),
    min_size=1, max_size=40).map("".join).filter(bool)


@settings(max_examples=200, deadline=None)
@given(text=texts, limit=st.one_of(st.integers(-2, 2).map(lambda d: ("near", d)), st.integers(1, 400)),
       as_chat=st.booleans(), byte_bound=st.booleans(), head_chars=st.sampled_from([1, 2, 8]))
def test_near_the_limit_the_same_requests_pass_with_the_same_ids(demo_tokenizer, text, limit, as_chat, byte_bound,
                                                                 head_chars):
    """What the head refuses, the full tokenization refuses too; what passes gets exactly its ids. max_model_len
    is any, or within 2 of the text's token count: just under, at, or just over the limit. Heads shorter than
    the service's (head_chars characters a token) are tried on dense text near the limit too."""
    if as_chat:
        request = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content=text)]))
    else:
        request = pb.GenerateRequest(prompt=text)
    if isinstance(limit, tuple):
        limit = len(_reference(demo_tokenizer, request, 2**31)) + limit[1]
    max_model_len = max(1, limit)
    want = _reference(demo_tokenizer, request, max_model_len)
    with contextlib.nullcontext() if byte_bound else _heads_only(demo_tokenizer), \
            mock.patch.object(token_bounds, "HEAD_CHARS_PER_TOKEN", head_chars):
        if want is None:
            with pytest.raises(ValueError, match=TOO_LONG.replace("prompt", "chat" if as_chat else "prompt")):
                prepare(request, demo_tokenizer, {}, max_model_len, TextLimits())
        else:
            got = prepare(request, demo_tokenizer, {}, max_model_len, TextLimits())
            assert list(got.engine_request.prompt_token_ids) == want


@settings(max_examples=150, deadline=None)
@given(text=texts, cut=st.floats(0, 1))
def test_a_heads_certain_tokens_begin_every_longer_text(demo_tokenizer, text, cut):
    """The certain part of a head's tokens is where the whole text's tokens begin, cut anywhere; the bound is
    never above the whole text's count, for any max_model_len."""
    head = text[: max(1, round(len(text) * cut))]
    whole = demo_tokenizer.encode(text, add_special_tokens=False)
    with _heads_only(demo_tokenizer):
        sure, seen = token_bounds._certain_head_tokens(token_bounds._pipeline(demo_tokenizer), head)
        assert sure <= seen
        assert demo_tokenizer.encode(head, add_special_tokens=False)[:sure] == whole[:sure]
        for max_model_len in (1, 8, 64):
            assert tokens_at_least(demo_tokenizer, text, max_model_len) <= len(whole)


@pytest.fixture(scope="module")
def qwen_like():
    """Byte-level BPE split by Qwen2's pattern, with a merge of a newline and a space: a cut in a whitespace run
    then changes the tokens of the pre-token before the last too (the newline-run match takes in what the
    space-run match ended the head with), which the demo tokenizer never shows."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
               r"|\s+(?!\S)|\s+")
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = [("Ċ", "Ġ"), ("Ġ", "Ġ"), ("ĊĠ", "Ġ"), ("ĠĠ", "ĠĠ")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return PreTrainedTokenizerFast(tokenizer_object=backend)


@settings(max_examples=150, deadline=None)
@given(text=st.lists(st.sampled_from(["x", "\n", "\n\n", " ", "   ", " " * 80]), min_size=1, max_size=12).map("".join),
       cut=st.floats(0, 1))
def test_heads_are_certain_where_a_cut_changes_two_pre_tokens(qwen_like, text, cut):
    """As for the demo tokenizer, where the pre-token before the head's last one changes too (TAIL_WORDS)."""
    head = text[: max(1, round(len(text) * cut))]
    whole = qwen_like.encode(text, add_special_tokens=False)
    with _heads_only(qwen_like):
        sure, _ = token_bounds._certain_head_tokens(token_bounds._pipeline(qwen_like), head)
        assert qwen_like.encode(head, add_special_tokens=False)[:sure] == whole[:sure]
        assert tokens_at_least(qwen_like, text, 1) <= len(whole)


def test_tokenizers_it_cannot_read_are_tokenized_whole(demo_tokenizer):
    """A tokenizer that is not a plain transformers fast tokenizer may encode otherwise than its backend."""

    class Custom(type(demo_tokenizer)):
        def encode(self, text, *args, **kwargs):
            return [5] * len(text)

    custom = Custom.__new__(Custom)
    custom.__dict__.update(demo_tokenizer.__dict__)
    assert tokens_at_least(custom, "word " * 10_000, 8) == 0
    assert tokens_at_least(demo_tokenizer, "word " * 10_000, 8) >= 8


# ---- The servicer: heavy work one at a time, refusals timed and freed. ----


class _Pool:
    def __init__(self, max_model_len: int) -> None:
        self.max_model_len = max_model_len


def _servicer(demo_tokenizer, max_model_len: int = 64) -> servicer_module.TextServicer:
    return servicer_module.TextServicer(demo_tokenizer, _Pool(max_model_len), "demo", len(demo_tokenizer), {0}, {},
                                        max_inflight=100)


@pytest.mark.parametrize(("max_model_len", "digits"), [(64, 200), (10_000, 70_000)], ids=["inline", "worker"])
def test_a_refused_prompts_ids_are_freed_without_a_garbage_collection(demo_tokenizer, max_model_len, digits):
    """The refusal's traceback held the frames holding the prompt's ids; grpc's abort keeps the exception in a
    reference cycle, so each refused prompt's millions of ids lived until a full collection (1.3 GB of them)."""
    text = "7" * digits  # one token a digit: tokenized whole (the byte bound is 13 a token), then refused
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) >= max_model_len

    async def refuse() -> str:
        try:
            await _servicer(demo_tokenizer, max_model_len)._admit(pb.GenerateRequest(prompt=text), RequestTrace("1"))
        except RequestFailed as exc:
            exc.keep = exc  # a reference cycle, as grpc's abort makes one
            return exc.message
        raise AssertionError("not refused")

    gc.collect()
    gc.disable()
    try:
        message = asyncio.run(refuse())
        left = [o for o in gc.get_objects() if type(o) is list and o is not ids and o == ids]
    finally:
        gc.enable()
    assert message.startswith(TOO_LONG) and f"got {len(ids)} tokens" in message
    assert not left, "the refused prompt's ids outlived the refusal"


def test_tokenize_time_counts_refusals(demo_tokenizer):
    """Only prepared requests were observed: a refusal that took seconds was invisible."""
    servicer = _servicer(demo_tokenizer)

    def count() -> float:
        return servicer.metrics.registry.get_sample_value("llmserve:tokenize_time_seconds_count",
                                                          {"model_name": "demo"})

    async def main() -> None:
        await servicer._admit(pb.GenerateRequest(prompt="hello"), RequestTrace("ok"))
        for i, request in enumerate([pb.GenerateRequest(prompt="word " * 100), pb.GenerateRequest(prompt="")]):
            with pytest.raises(RequestFailed) as refused:
                await servicer._admit(request, RequestTrace(str(i)))
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        servicer.draining = True  # refused before any tokenizing: nothing to time
        with pytest.raises(RequestFailed):
            await servicer._admit(pb.GenerateRequest(prompt="hello"), RequestTrace("drain"))

    before = count()
    asyncio.run(main())
    assert count() - before == 3


def test_heavy_work_is_bounded_and_holds_its_slot_until_its_thread_returns(demo_tokenizer, monkeypatch):
    """Every big request was tokenized on a thread of its own at once: memory grew with how many came together.
    A caller that stops waiting leaves its thread running: the next one starts only when that one returns."""
    running, most, spans = 0, 0, []
    lock = threading.Lock()

    def slow(*args):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        started = time.monotonic()
        time.sleep(0.1)
        with lock:
            running -= 1
        spans.append((started, time.monotonic()))
        return prepare(*args)

    monkeypatch.setattr(servicer_module, "tokenize_request", slow)
    monkeypatch.setattr(servicer_module, "PREPARE_SLOTS", 2)
    big = pb.GenerateRequest(prompt="word " * (servicer_module.OFFLOAD_TOKENIZE_BYTES // 4))

    async def main() -> None:
        servicer = _servicer(demo_tokenizer, max_model_len=100_000)
        prepared = await asyncio.gather(*(servicer._admit(big, RequestTrace(str(i))) for i in range(5)))
        assert all(p.num_prompt_tokens > 0 for p in prepared)
        gone = [asyncio.ensure_future(servicer._admit(big, RequestTrace(f"gone{i}"))) for i in range(2)]
        await asyncio.sleep(0.03)
        for task in gone:
            task.cancel()  # their threads run on, holding both slots
        await servicer._admit(big, RequestTrace("next"))
        assert servicer.admitting == 0

    asyncio.run(main())
    assert most == 2
    gone_a, gone_b, after = sorted(spans[-3:])  # by start: a descheduled thread may append its span late
    assert after[0] >= min(gone_a[1], gone_b[1]), "the next request's thread started while both slots were held"


def test_a_long_tokenize_call_does_not_hold_up_generate(demo_tokenizer, monkeypatch):
    """Tokenize and Detokenize (8 MiB: 5 s, 1.4 GB, no max_model_len to bound them) run one at a time, but in a
    pool of their own: a Generate's preparation does not wait behind one."""
    release = threading.Event()

    def stuck(*args):
        release.wait(10)
        return []

    big = pb.GenerateRequest(prompt="word " * (servicer_module.OFFLOAD_TOKENIZE_BYTES // 4))

    async def main() -> float:
        servicer = _servicer(demo_tokenizer, max_model_len=100_000)
        huge = "word " * (servicer_module.OFFLOAD_API_BYTES // 4)
        tokenize = asyncio.ensure_future(servicer._off_loop(pb.TokenizeRequest(text=huge), stuck))
        await asyncio.sleep(0.05)  # the Tokenize holds the API slot
        started = time.monotonic()
        prep = await asyncio.wait_for(servicer._admit(big, RequestTrace("g")), 5)
        took = time.monotonic() - started
        assert prep.num_prompt_tokens > 0 and not tokenize.done()
        release.set()
        await tokenize
        return took

    try:
        assert asyncio.run(main()) < 5
    finally:
        release.set()


def test_a_mid_size_tokenize_call_does_not_wait_behind_a_huge_one(demo_tokenizer):
    """Tokenize calls past the Generate threshold (8 KiB) but under 64 KiB run at once on the event loop: with the
    Generate threshold, one of 10 KiB waited for the one API slot behind an 8 MiB call (1 s here, 5 s for real)."""
    release = threading.Event()

    def stuck(*args):
        release.wait(10)
        return []

    async def main() -> float:
        servicer = _servicer(demo_tokenizer, max_model_len=100_000)
        huge = pb.TokenizeRequest(text="word " * (servicer_module.OFFLOAD_API_BYTES // 4))
        held = asyncio.ensure_future(servicer._off_loop(huge, stuck))
        await asyncio.sleep(0.05)  # it holds the API slot
        mid = pb.TokenizeRequest(text="word " * (2 * servicer_module.OFFLOAD_TOKENIZE_BYTES // 5))
        assert servicer_module.OFFLOAD_TOKENIZE_BYTES < mid.ByteSize() < servicer_module.OFFLOAD_API_BYTES
        started = time.monotonic()
        ids = await asyncio.wait_for(servicer._off_loop(mid, lambda *a: [1, 2, 3]), 5)
        took = time.monotonic() - started
        assert ids == [1, 2, 3] and not held.done()
        release.set()
        await held
        return took

    try:
        assert asyncio.run(main()) < 0.5
    finally:
        release.set()


@pytest.mark.parametrize(("request_", "fragment"), [
    (pb.GenerateRequest(prompt="a" * (8 * 2**20 + 1)), "prompt: must be at most 8388608 bytes of UTF-8 "
                                                        "(max_prompt_bytes) (got 8388609 bytes)"),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")] * 4097)),
     "messages: must hold at most 4096 messages (max_messages) (got 4097)"),
    (pb.GenerateRequest(prompt="hi", stop=["x"] * 65), "stop: must be a list of at most 64 strings (max_stop_strings)"),
    (pb.GenerateRequest(prompt="hi", stop=["x" * 1025]), "at most 1024 characters (max_stop_string_chars)"),
], ids=["prompt_bytes", "messages", "stop_strings", "stop_string_chars"])
def test_door_limits_say_their_value(demo_tokenizer, request_, fragment):
    """The messages named the setting only: 'must be at most max_prompt_bytes bytes of UTF-8 (got 10000000 bytes)'
    left the caller to guess how much is allowed."""
    with pytest.raises(ValueError) as refused:
        prepare(request_, demo_tokenizer, {}, 2048, TextLimits())
    assert fragment in str(refused.value)
    assert "[request] prompt: must be at most 8388608 bytes" in validation.describe_rules()


def test_a_tokenizer_whose_pipeline_cannot_be_read_still_serves(demo_tokenizer, monkeypatch, caplog):
    """warm_up reads the pipeline at load: a tokenizer.json shaped otherwise than expected made the service
    refuse to start, where the bound only saves time (without it, texts are tokenized whole)."""
    import logging

    def odd(tokenizer):
        raise KeyError("content")

    monkeypatch.setattr(token_bounds, "_read_pipeline", odd)
    monkeypatch.setattr(token_bounds, "_PIPELINES", weakref.WeakKeyDictionary())
    with caplog.at_level(logging.WARNING, logger="tokenizer_service.token_bounds"):
        token_bounds.warm_up(demo_tokenizer)
        assert tokens_at_least(demo_tokenizer, "word " * 10_000, 100) == 0
    assert any("cannot read the tokenizer's pipeline" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def spm_tokenizers():
    """The SentencePiece-style tokenizer of tests/integration/tiny.py (Metaspace pre-tokenizer, split=False: a text
    is one pre-token), and the same in the older layout (a normalizer that prepends and replaces spaces with "▁",
    no pre-tokenizer)."""
    from tokenizers import normalizers

    from tests.integration.tiny import sentencepiece_tokenizer

    metaspace, legacy = sentencepiece_tokenizer(), sentencepiece_tokenizer()
    legacy.backend_tokenizer.pre_tokenizer = None
    legacy.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                                normalizers.Replace(" ", "▁")])
    return metaspace, legacy


@settings(max_examples=100, deadline=None)
@given(text=texts)
def test_sentencepiece_byte_bound_never_counts_more_tokens_than_there_are(spm_tokenizers, text):
    for tokenizer in spm_tokenizers:
        whole = tokenizer.encode(text, add_special_tokens=False)
        for max_model_len in (1, 8, 64):
            assert tokens_at_least(tokenizer, text, max_model_len) <= len(whole)


def test_an_8_mib_sentencepiece_prompt_is_refused_by_the_byte_bound(spm_tokenizers, monkeypatch):
    """A SentencePiece text is one pre-token, so no head bound applies, and there was no byte bound: an 8 MiB
    prompt too long for max_model_len was tokenized whole (14 s and 2 GB for "x" * 8 MiB) before it was refused."""
    for tokenizer in spm_tokenizers:
        _no_full_encode(tokenizer, monkeypatch)
        for text in ("x" * 8_000_000, _corpus_text(8_000_000), "€" * 2_000_000):
            with pytest.raises(ValueError, match=TOO_LONG):
                prepare(pb.GenerateRequest(prompt=text), tokenizer, {}, 2048, TextLimits())


@settings(max_examples=150, deadline=None)
@given(text=st.lists(st.sampled_from(["a", "b", " ", "  ", "\n", "\t", "é", "😀", "中", "\u0301", "<|im_end|>",
                                      "<|im_start|>", "</s>", "<s>", "[UNK]", "\x00", "\ufffd"]), max_size=40).map("".join),
       special=st.booleans())
def test_the_services_encode_gives_transformers_ids(demo_tokenizer, qwen_like, spm_tokenizers, text, special):
    """token_bounds.encode calls the backend directly where transformers' encode would only run it: the ids must
    be transformers' for every text, special-token texts and add_special_tokens included, on byte-level BPE (two
    pre-tokenizer layouts) and SentencePiece (two layouts)."""
    for tokenizer in (demo_tokenizer, qwen_like, *spm_tokenizers):
        assert token_bounds.encode(tokenizer, text, special) == tokenizer.encode(text, add_special_tokens=special)


def test_the_services_encode_follows_a_tokenizer_set_to_split_special_tokens(demo_tokenizer, monkeypatch):
    """The backend's encode_special_tokens, truncation and padding are what transformers' encode sets before it
    runs the backend: a tokenizer whose settings differ from the backend's state goes through transformers."""
    text = "a<|im_end|>b"
    monkeypatch.setattr(demo_tokenizer, "split_special_tokens", True, raising=False)
    assert token_bounds.encode(demo_tokenizer, text, False) == demo_tokenizer.encode(text, add_special_tokens=False)
    monkeypatch.setattr(demo_tokenizer, "split_special_tokens", False, raising=False)
    demo_tokenizer.backend_tokenizer.enable_truncation(max_length=2)
    try:
        assert token_bounds.encode(demo_tokenizer, text, False) == demo_tokenizer.encode(text, add_special_tokens=False)
    finally:
        demo_tokenizer.backend_tokenizer.no_truncation()


def test_messages_over_4_mib_reach_both_services_with_default_limits(demo_model_dir, demo_tokenizer):
    """No test sent a message over gRPC's own 4 MiB default: a server (or client) left at that limit answered a
    5 MiB prompt RESOURCE_EXHAUSTED "Received message larger than max" and nothing noticed. With the default
    max_message_bytes (64 MiB) on both services and both clients, a 5 MiB prompt reaches the tokenizer service and
    a 5.4 MB prompt of ids reaches the engine, each refused in words for max_model_len (INVALID_ARGUMENT), and a
    Detokenize whose text is 5 MB comes back whole."""
    from clients.engine_client import EngineClient
    from clients.text_client import TextClient
    from tests.unit.test_text_service_regressions import TextServer, demo_engine

    engine = demo_engine(demo_model_dir, demo_tokenizer)  # max_model_len 100,000
    server = TextServer(demo_model_dir, engines=engine.target)
    try:
        with TextClient(server.target, timeout=30) as text, EngineClient(engine.target, timeout=30) as direct:
            for _ in range(200):  # until the tokenizer service has the engine's max_model_len
                try:
                    list(text.generate("x", max_tokens=1))
                    break
                except grpc.RpcError:
                    time.sleep(0.05)
            prompt = _corpus_text(5 * 2**20)
            with pytest.raises(grpc.RpcError) as refused:
                list(text.generate(prompt, max_tokens=1))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
            assert refused.value.details().startswith(TOO_LONG)
            word = demo_tokenizer.encode(" wonderful", add_special_tokens=False)
            assert len(word) == 1 and word[0] >= 128  # 2 bytes on the wire, 10 characters of text
            with pytest.raises(grpc.RpcError) as refused:
                list(direct.generate(word * 2_700_000, max_tokens=1))
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
            assert "max_model_len" in refused.value.details()
            assert text.detokenize(word * 500_000) == " wonderful" * 500_000
    finally:
        server.stop()
        assert engine.stop() == 0


def _case_longest_tokens(model_dir):
    """k copies of a token of max_token_bytes bytes: k tokens, and the byte bound is exactly k."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    most = token_bounds._pipeline(tokenizer).max_token_bytes
    pieces = [tokenizer.convert_tokens_to_string([p]) for p in tokenizer.backend_tokenizer.get_vocab()]
    for word in pieces + [t.content for t in tokenizer.added_tokens_decoder.values()]:
        text = word * 40
        if len(word.encode()) == most and len(tokenizer.encode(text, add_special_tokens=False)) == 40:
            return tokenizer, text
    raise AssertionError(f"no token of {most} bytes that repeats as itself")


def _case_normalizer(model_dir):
    """A normalizer (here Strip) can make many bytes few tokens: "hi" and 10,000 spaces is "hi"."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.backend_tokenizer.normalizer = normalizers.Strip()
    return tokenizer, "hi" + " " * 10_000


def _case_removing_split(model_dir):
    """A pre-tokenizer step that removes text (Split behavior "removed") before ByteLevel: 10,000 spaces between
    two words are no token at all."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\s+"), "removed"), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return tokenizer, "hi" + " " * 10_000 + "there"


def _case_backend_state(model_dir):
    """A backend left encoding special tokens' text (by another caller) while transformers' encode would not."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer, "<|im_end|>" * 60


def _case_multibyte_sentencepiece(model_dir):
    """A SentencePiece vocabulary with a CJK token of 4 characters and 12 bytes: the bound counts bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for piece in ("▁", "中", "文", "中文", "中文中文"):
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("中", "文"), ("中文", "中文")], unk_token="<unk>",
                                   byte_fallback=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        clean_up_tokenization_spaces=False)
    return tokenizer, "中文中文" * 1000


@pytest.mark.parametrize("case", [_case_longest_tokens, _case_normalizer, _case_removing_split, _case_backend_state,
                                  _case_multibyte_sentencepiece], ids=lambda case: case.__name__[6:])
def test_the_token_bound_is_never_more_than_the_real_count(demo_model_dir, case):
    """tokens_at_least is a lower bound: above the real count it refuses a prompt that fits max_model_len. Only the
    demo tokenizer and an ASCII-only SentencePiece vocabulary were tested, so these went unnoticed: a bound rounded
    up (k + 1 for k longest tokens), a byte bound under a normalizer (769 for 2 tokens) or a pre-tokenizer that
    removes text (untested until a mutation review), one counted with a backend left in another state than encode()
    sets (359 for 60), and a SentencePiece bound in characters, not bytes (2000 for 1001)."""
    tokenizer, text = case(demo_model_dir)
    n = len(tokenizer.encode(text, add_special_tokens=False))
    if case is _case_backend_state:
        assert n == 60
        tokenizer.backend_tokenizer.encode_special_tokens = True
    for max_model_len in (n + 1, 64, 1500):
        bound = tokens_at_least(tokenizer, text, max_model_len)
        assert bound <= n, f"bound {bound} > {n} tokens (max_model_len {max_model_len})"
    if case is _case_longest_tokens:
        assert tokens_at_least(tokenizer, text, n + 1) == n  # the case: the byte bound is exact here


def _lstrip_mask_tokenizer():
    """ALBERT/XLNet's layout: Unigram under Metaspace(split=True) (each space its own pre-token), [MASK] lstrip."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = [("<unk>", 0.0), ("▁", -1.0), ("▁hi", -1.0), ("h", -2.0), ("i", -2.0)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    tokenizer.add_special_tokens({"mask_token": AddedToken("[MASK]", lstrip=True, special=True)})
    return tokenizer, "hi" + " " * 400 + "[MASK]"


def _normalized_added_token_tokenizer():
    """BERT's normalizer (strip_accents deletes combining marks) and an added token matched on the normalized text."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *"abcdefghijklmnop", "-"])}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    added = "a-b-c-d-e-f-g-h-i-j-k-l-m-n-o-p"
    tokenizer.add_tokens([AddedToken(added, normalized=True, special=False)])
    return tokenizer, added[:-2] + "\u0301" * 300 + added[-2:]


@pytest.mark.parametrize("make", [_lstrip_mask_tokenizer, _normalized_added_token_tokenizer])
def test_a_prompt_an_added_token_shortens_is_not_refused_by_the_head_bound(make):
    """An added token that takes in the whitespace before it (lstrip), or one matched on a normalized text from which
    characters were deleted, swallows any number of the head's tokens: the head bound counted them certain and
    refused prompts of 2 and 1 tokens as 'at least 127 / 26'. Such tokenizers get no head bound."""
    tokenizer, text = make()
    count = len(tokenizer.encode(text, add_special_tokens=False))
    assert count <= 2 < len(text) // 8
    for max_model_len in (4, 8, 16, 32):
        assert token_bounds.tokens_at_least(tokenizer, text, max_model_len) <= count
    prepared = prepare(pb.GenerateRequest(prompt=text), tokenizer, {}, 16, TextLimits())
    assert prepared.num_prompt_tokens == len(tokenizer.encode(text))
