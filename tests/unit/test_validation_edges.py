"""Edges of the request and config rules: each limit at its value and one past it, and the checks no other test
reaches. Each test names the bug it catches. No model is loaded: prepare() is given prompt_token_ids (or fails
before tokenizing), so the whole file runs in a second or two."""

from __future__ import annotations

import json
import math

import pytest

from engine_service.config import EngineConfig
from engine_service.server_config import ServerConfig
from engine_service.server_config import parse_config as parse_engine_config
from engine_service.streams import TOKEN_BYTES
from engine_service.validation import sampling_params_from_proto
from protos.llmserve.engine.v1 import engine_pb2 as engine_pb
from protos.llmserve.text.v1 import text_pb2 as pb
from tokenizer_service.config import TextServerConfig
from tokenizer_service.config import parse_config as parse_text_config
from tokenizer_service.validation import (
    LOGPROB_BYTES,
    LOGPROB_BYTES_PER_ALTERNATIVE,
    MAX_JSON_SCHEMA_BYTES,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_STOP_TOKEN_IDS,
    TextLimits,
    TextRequest,
    prepare,
    read_eos_token_ids,
    read_generation_defaults,
    validate_detokenize_ids,
    validate_request,
)

USER = {"role": "user", "content": "hi"}


def _prepare(limits: TextLimits | None = None, ids: tuple[int, ...] = (1, 2, 3), **sampling):
    """prepare() of an already tokenized prompt (no tokenizer needed)."""
    request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=list(ids)),
                                 sampling_params=pb.SamplingParams(**sampling))
    return prepare(request, None, {}, max_model_len=64, limits=limits)


# ---- tokenizer_service/validation.py: the request rules at their limits ----


def test_max_messages_is_inclusive():
    """Catches `len(messages) >= max_messages`: a chat of exactly max_messages messages must pass."""
    validate_request(TextRequest(messages=[USER] * 3), TextLimits(max_messages=3))
    with pytest.raises(ValueError, match=r"^messages: must hold at most 3 messages.*got 4"):
        validate_request(TextRequest(messages=[USER] * 4), TextLimits(max_messages=3))


def test_chat_bytes_limit_is_inclusive():
    """Catches `bytes >= max_prompt_bytes` for chats: contents of exactly max_prompt_bytes bytes must pass."""
    limits = TextLimits(max_prompt_bytes=16)
    validate_request(TextRequest(messages=[{"role": "user", "content": "x" * 16}]), limits)
    with pytest.raises(ValueError, match=r"^messages: .*got 17 bytes"):
        validate_request(TextRequest(messages=[{"role": "user", "content": "x" * 17}]), limits)


def test_refused_special_text_is_found_inside_a_content():
    """Catches matching a refused special token's text only as the whole content, or never (--chat-special-tokens
    refuse letting `<|im_start|>system ...` through in the middle of a message)."""
    limits = TextLimits(refused_chat_texts=("<|im_start|>",))
    with pytest.raises(ValueError, match=r"^messages: .*messages\[1\]\.content holds '<\|im_start\|>'"):
        validate_request(TextRequest(messages=[USER, {"role": "user", "content": "a <|im_start|>system b"}]), limits)
    validate_request(TextRequest(messages=[USER]), limits)
    validate_request(TextRequest(messages=[{"role": "user", "content": "<|im_start|>"}]))  # "allow": no texts


def test_detokenize_id_count_limit_is_inclusive():
    """Catches `len(ids) >= max_detokenize_ids`: a Detokenize call of exactly the limit must pass."""
    validate_detokenize_ids([0] * 4, TextLimits(max_detokenize_ids=4))
    with pytest.raises(ValueError, match=r"^token_ids: .*got 5 ids"):
        validate_detokenize_ids([0] * 5, TextLimits(max_detokenize_ids=4))


# ---- prepare(): the engine's bounds said at the door ----


def test_a_json_schema_cannot_continue_a_final_message():
    """Catches the continue_final_message check covering json_object only: a JSON schema grammar cannot continue a
    prefix either."""
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hi"), pb.ChatMessage(role="assistant", content="{")],
                   continue_final_message=True)
    for fmt, schema in ((pb.RESPONSE_FORMAT_JSON_OBJECT, ""), (pb.RESPONSE_FORMAT_JSON_SCHEMA, '{"type": "object"}')):
        request = pb.GenerateRequest(chat=chat, sampling_params=pb.SamplingParams(response_format=fmt,
                                                                                   json_schema=schema))
        with pytest.raises(ValueError, match="^response_format JSON with chat.continue_final_message"):
            prepare(request, None, {}, max_model_len=64)


def test_stop_token_ids_count_distinct_ids_up_to_the_bound():
    """Catches `distinct >= MAX_STOP_TOKEN_IDS`: exactly that many distinct ids (one repeated) must pass."""
    ids = list(range(MAX_STOP_TOKEN_IDS)) + [0]
    assert len(_prepare(stop_token_ids=ids).engine_request.sampling_params.stop_token_ids) == len(ids)
    with pytest.raises(ValueError, match=f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} distinct ids"):
        _prepare(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))


def test_logit_bias_bound_is_inclusive_and_said_by_the_service():
    """Catches `len(logit_bias) >= MAX_LOGIT_BIAS_TOKENS`, and the bound dropped at the door."""
    full = {t: 1.0 for t in range(MAX_LOGIT_BIAS_TOKENS)}
    assert len(_prepare(logit_bias=full).engine_request.sampling_params.logit_bias) == MAX_LOGIT_BIAS_TOKENS
    with pytest.raises(ValueError, match=f"logit_bias must hold at most {MAX_LOGIT_BIAS_TOKENS} tokens, got 1025"):
        _prepare(logit_bias={**full, MAX_LOGIT_BIAS_TOKENS: 1.0})


def test_an_unknown_response_format_is_a_value_error_naming_it():
    """Catches the response_format check dropped: a number the service does not know was a KeyError (INTERNAL),
    not INVALID_ARGUMENT."""
    with pytest.raises(ValueError, match="^response_format 7 is not one this service knows"):
        _prepare(response_format=7)


def test_json_schema_goes_with_its_format_both_ways():
    """Catches the pairing checked one way only: a schema sent with the text (or json_object) format must be
    refused, not silently dropped to unconstrained output."""
    for fmt in (pb.RESPONSE_FORMAT_TEXT, pb.RESPONSE_FORMAT_JSON_OBJECT):
        with pytest.raises(ValueError, match="^json_schema .* goes with response_format"):
            _prepare(response_format=fmt, json_schema='{"type": "object"}')
    with pytest.raises(ValueError, match="^json_schema .* goes with response_format"):
        _prepare(response_format=pb.RESPONSE_FORMAT_JSON_SCHEMA)
    params = _prepare(response_format=pb.RESPONSE_FORMAT_JSON_SCHEMA, json_schema='{"type": "object"}')
    assert params.engine_request.sampling_params.response_format == engine_pb.RESPONSE_FORMAT_JSON_SCHEMA


def test_json_schema_bound_counts_utf8_bytes():
    """Catches the bound counting characters only: 40,000 'é' are 80,000 bytes, over the engine's 64 KiB."""
    schema = '{"description": "' + "é" * 40_000 + '"}'
    assert len(schema) <= MAX_JSON_SCHEMA_BYTES < len(schema.encode())
    with pytest.raises(ValueError, match=f"^json_schema must be at most {MAX_JSON_SCHEMA_BYTES} bytes"):
        _prepare(response_format=pb.RESPONSE_FORMAT_JSON_SCHEMA, json_schema=schema)


def test_prompt_logprobs_size_bound_is_inclusive():
    """Catches `size >= max_prompt_logprobs_bytes`: a prompt whose worst size is exactly the limit must pass."""
    exact = 3 * (LOGPROB_BYTES + LOGPROB_BYTES_PER_ALTERNATIVE * 1)
    _prepare(TextLimits(max_prompt_logprobs_bytes=exact), prompt_logprobs=1)
    with pytest.raises(ValueError, match=f"^prompt_logprobs=1 for a 3-token prompt would take up to {exact} bytes"):
        _prepare(TextLimits(max_prompt_logprobs_bytes=exact - 1), prompt_logprobs=1)


def test_prompt_logprobs_zero_still_counts_each_tokens_own_logprob():
    """Catches the size leaving out each prompt token's own logprob (17 bytes), or skipping prompt_logprobs=0:
    the chosen token's logprob is sent even with no alternatives."""
    with pytest.raises(ValueError, match=f"would take up to {3 * LOGPROB_BYTES} bytes"):
        _prepare(TextLimits(max_prompt_logprobs_bytes=3 * LOGPROB_BYTES - 1), prompt_logprobs=0)


# ---- model files ----


def test_generation_defaults_read_do_sample_and_top_k_as_transformers_does(tmp_path):
    """Catches a missing do_sample taken as greedy (only do_sample false is), and top_k 0 passed on (the engine
    refuses it; transformers means "disabled")."""
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"temperature": 0.6, "top_p": 0.9}))
    assert read_generation_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.9}
    path.write_text(json.dumps({"temperature": 0.6, "do_sample": False, "top_k": 0}))
    assert read_generation_defaults(str(tmp_path)) == {"temperature": 0.0, "top_k": -1}


def test_an_eos_id_equal_to_the_vocabulary_size_is_left_out(tmp_path):
    """Catches `e <= vocab_size`: id vocab_size is outside the vocabulary, as the engine counts it."""
    from types import SimpleNamespace

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [511, 512]}))
    assert read_eos_token_ids(str(tmp_path), SimpleNamespace(eos_token_id=None), 512) == {511}


# ---- tokenizer_service/config.py ----


def _text(**kw) -> TextServerConfig:
    return TextServerConfig(**{"model": "m", "engines": "e:1", **kw})


NAME_253 = ".".join(["a" * 63] * 3 + ["a" * 61])  # the longest DNS name: 3 x 63 + 61 + 3 dots


@pytest.mark.parametrize("dns", ["a..b:50051", "bad name:50051", f"{'a' * 64}:50051",
                                 f"{'.'.join(['a' * 63] * 4)}:50051", f"{NAME_253}a:50051", "llm-engine:65536"])
def test_engine_dns_names_that_no_lookup_can_find_are_refused(dns):
    """Catches the DNS name check dropped, a 64-character label, a name over 253 characters (254 too), port 65536."""
    with pytest.raises(ValueError, match="^engine_dns .* must be NAME:PORT"):
        TextServerConfig(model="m", engine_dns=dns)
    TextServerConfig(model="m", engine_dns=f"{'a' * 63}.{'b' * 61}:65535")
    TextServerConfig(model="m", engine_dns=f"{NAME_253}:65535")


def test_text_service_numbers_at_their_edges():
    """Catches off-by-ones and dropped checks in the tokenizer service's numeric settings: stream_interval 1024 and
    stream_max_wait_s 0 and reconnect_max_s == reconnect_min_s are valid; NaN/inf engine_silence_s, 0
    dns_refresh_s and 0 max_inflight are not."""
    assert _text(stream_interval=1024).stream_interval == 1024
    assert _text(stream_max_wait_s=0.0).stream_max_wait_s == 0.0
    assert _text(reconnect_min_s=1.0, reconnect_max_s=1.0).reconnect_max_s == 1.0
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="^engine_silence_s must be 0"):
            _text(engine_silence_s=bad)
    with pytest.raises(ValueError, match="^dns_refresh_s must be a positive number"):
        _text(dns_refresh_s=0.0)
    with pytest.raises(ValueError, match="^max_inflight must be at least 1"):
        _text(max_inflight=0)
    with pytest.raises(ValueError, match="^port must be in 0..65535"):
        _text(port=65536)


def test_text_service_choices_and_tls_prerequisites():
    """Catches chat_special_tokens taking any word, and engine_tls_server_name accepted without engine_tls_ca
    (it would be silently ignored: plaintext to the engines)."""
    with pytest.raises(ValueError, match="^chat_special_tokens must be 'allow' or 'refuse'"):
        parse_text_config(["--model", "m", "--engines", "e:1", "--chat-special-tokens", "deny"], env={})
    with pytest.raises(ValueError, match="^engine_tls_ca .* turns TLS to the engines on"):
        _text(engine_tls_server_name="engine.internal")


# ---- engine_service/validation.py ----


def test_engine_takes_repeated_stop_ids_and_a_full_logit_bias():
    """Catches the proto bound on stop_token_ids counting repeats (16x the distinct bound is allowed) and
    `len(logit_bias) >= MAX_LOGIT_BIAS_TOKENS` at the engine."""
    proto = engine_pb.SamplingParams(stop_token_ids=[7] * 5000,
                                     logit_bias={t: 1.0 for t in range(MAX_LOGIT_BIAS_TOKENS)})
    params = sampling_params_from_proto(proto, {})
    assert params.stop_token_ids == (7,) and len(params.logit_bias) == MAX_LOGIT_BIAS_TOKENS


# ---- engine_service/config.py ----


@pytest.mark.parametrize(("kwargs", "field"), [
    (dict(kvcache_block_size=0), "kvcache_block_size"),
    (dict(max_model_len=0), "max_model_len"),
    (dict(num_kvcache_blocks=0), "num_kvcache_blocks"),
    (dict(rope_scaling={1: 4.0}), "rope_scaling"),
    (dict(overlap_scheduling=True, tensor_parallel_size=2), "overlap_scheduling"),
    (dict(overlap_scheduling="yes"), "overlap_scheduling"),
    (dict(fused_ops="yes"), "fused_ops"),
    (dict(gpu_memory_utilization=0.0), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=True), "gpu_memory_utilization"),
    (dict(seed=2**63), "seed"),
    (dict(device="cudax"), "device"),
    (dict(kv_cache_dtype="int8"), "kv_cache_dtype"),
    (dict(max_num_seqs=2, max_num_batched_tokens=1), "max_num_batched_tokens"),
])
def test_engine_config_refuses_naming_the_field(kwargs, field):
    """Catches each EngineConfig check loosened or dropped (0 accepted as a size, bool as a number, 2**63 as a
    seed, 'cudax' as a device, rope_scaling with non-string keys...)."""
    with pytest.raises(ValueError, match=field):
        EngineConfig(model="m", **kwargs)


def test_engine_config_edges_that_are_valid():
    """Catches `<=` where `<` is meant: all the memory (1.0), batched tokens equal to max_num_seqs, the last seed."""
    config = EngineConfig(model="m", gpu_memory_utilization=1.0, max_num_seqs=8, max_num_batched_tokens=8,
                          seed=2**63 - 1, device="cuda:1")
    assert (config.gpu_memory_utilization, config.max_num_batched_tokens, config.seed) == (1.0, 8, 2**63 - 1)


def test_unknown_engine_arguments_are_a_value_error_listing_the_valid_ones():
    """Catches the unknown-name check dropped: a misspelt knob was a TypeError from the dataclass."""
    with pytest.raises(ValueError, match=r"unknown engine argument\(s\) \['max_num_seq'\]; valid ones are"):
        EngineConfig.from_kwargs("m", max_num_seq=4)


# ---- engine_service/server_config.py ----


def _engine(*flags: str) -> ServerConfig:
    return parse_engine_config(["--model", "m", *flags], env={})


def test_engine_service_ports_and_durations_at_their_edges():
    """Catches port and metrics_port 65536 accepted, a zero watchdog_s accepted, NaN canary_interval_s accepted,
    and a negative max_model_len passed on."""
    for flag in ("--port", "--metrics-port"):
        with pytest.raises(ValueError, match="port must be in 0..65535"):
            _engine(flag, "65536")
        _engine(flag, "65535")
    with pytest.raises(ValueError, match="^watchdog_s must be a positive number"):
        _engine("--watchdog-s", "0")
    with pytest.raises(ValueError, match="^canary_interval_s must be 0"):
        _engine("--canary-interval-s", "nan")
    assert _engine("--canary-interval-s", "0").canary_interval_s == 0
    with pytest.raises(ValueError, match="^max_model_len must be 0"):
        _engine("--max-model-len", "-1")


def test_max_buffered_tokens_frame_bound_is_exact():
    """Catches the frame bound loosened (no 1024 bytes of overhead, or the whole message instead of half of it)."""
    tokens = 1000
    fits = 2 * (tokens * TOKEN_BYTES + 1024)
    assert _engine("--max-buffered-tokens", str(tokens), "--max-message-bytes", str(fits)).max_buffered_tokens == tokens
    with pytest.raises(ValueError, match="max_buffered_tokens .* too large for max_message_bytes"):
        _engine("--max-buffered-tokens", str(tokens), "--max-message-bytes", str(fits - 2))


def test_engine_service_flags_reach_the_engine():
    """Catches --seed or --two-batch-overlap not passed on, 'AUTO' not read as auto, and a blank --rope-scaling not
    read as unset."""
    kwargs = _engine("--seed", "7", "--two-batch-overlap", "true", "--overlap-scheduling", " AUTO ",
                     "--rope-scaling", "  ").engine_kwargs()
    assert (kwargs["seed"], kwargs["two_batch_overlap"], kwargs["overlap_scheduling"], kwargs["rope_scaling"]) == (
        7, True, None, None)


# ---- tokenizer_service/token_bounds.py ----


def test_the_token_bound_leaves_out_an_added_token_the_head_cut_in_two():
    """Catches the head's character tail shortened (no room for the longest added token, or none at all): an added
    token of many words cut by the head was counted word by word, so a prompt that fits was refused as too long."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tokenizer_service.token_bounds import tokens_at_least

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "x": 1, "xxxxxxxx": 2, "q": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    added = " ".join(["q"] * 150)  # one token of 299 characters
    tok.add_tokens([AddedToken(added, normalized=False)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    for prefix, max_model_len in (("x " * 10, 30), ("xxxxxxxx " * 190, 200)):
        text = prefix + added + " xxxxxxxx"
        real = len(fast.encode(text, add_special_tokens=False))
        assert real < max_model_len
        assert tokens_at_least(fast, text, max_model_len) <= real


@pytest.mark.parametrize(("value", "message"), [('"0.7"', "temperature must be a number, got '0.7'"),
                                                ("true", "temperature must be a number, got True"),
                                                ("[1]", "temperature must be a number, got \\[1\\]")])
def test_generation_defaults_of_the_wrong_type_fail_at_start_up(tmp_path, value, message):
    """A generation_config.json default of the wrong type was passed through: the service started, then every
    request leaving that field unset failed with INTERNAL (a TypeError setting the proto field)."""
    (tmp_path / "generation_config.json").write_text(f'{{"temperature": {value}}}')
    with pytest.raises(ValueError, match=f"generation_config.json: {message}"):
        read_generation_defaults(str(tmp_path))


def test_an_integral_float_top_k_default_is_taken_as_the_integer(tmp_path):
    """top_k 50.0 (as some writers put it) went into the proto's integer field: a TypeError on every request that
    left top_k unset. It is the integer 50; 50.5 is refused at start-up."""
    path = tmp_path / "generation_config.json"
    path.write_text('{"top_k": 50.0}')
    defaults = read_generation_defaults(str(tmp_path))
    assert defaults == {"top_k": 50} and type(defaults["top_k"]) is int
    request = pb.GenerateRequest(prompt_token_ids=pb.TokenIds(ids=[1, 2]))
    assert prepare(request, None, defaults, max_model_len=64).engine_request.sampling_params.top_k == 50
    for bad in ("50.5", "Infinity", "NaN", str(2**40), "1e10"):  # the last two: past the proto's 32 bits
        path.write_text(f'{{"top_k": {bad}}}')
        with pytest.raises(ValueError, match="top_k must be an integer, got"):
            read_generation_defaults(str(tmp_path))


def test_a_stop_token_id_generator_is_read_no_further_than_the_bound():
    """A generator has no len(): it was read whole before the entry bound applied (one of 10**9 ids ran the
    process out of memory)."""
    import itertools

    from engine_service.sampling_params import MAX_STOP_TOKEN_ENTRIES, SamplingParams

    endless = itertools.count()
    with pytest.raises(ValueError, match=f"at most {MAX_STOP_TOKEN_ENTRIES} entries"):
        SamplingParams(stop_token_ids=endless)
    assert next(endless) == MAX_STOP_TOKEN_ENTRIES + 1  # it read one past the bound, no more
    assert SamplingParams(stop_token_ids=(i for i in (3, 4, 3))).stop_token_ids == (3, 4)


def test_a_zero_dimensional_logit_bias_is_refused_by_name():
    import numpy as np

    from engine_service.sampling_params import SamplingParams

    with pytest.raises(ValueError, match="logit_bias must map token ids to biases"):  # was "len() of unsized object"
        SamplingParams(logit_bias=np.array(3))


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_canary_timeout_s_must_be_a_positive_finite_number(value):
    """--canary-timeout-s 0, negative or NaN was taken: the start-up canary then timed out at once and the engine
    never turned SERVING (readiness failed forever) instead of refusing the flag (a mutation review)."""
    with pytest.raises(ValueError, match="^canary_timeout_s must be a positive number"):
        parse_engine_config(["--model", "m", "--canary-timeout-s", value], env={})
    assert parse_engine_config(["--model", "m", "--canary-timeout-s", "0.5"], env={}).canary_timeout_s == 0.5


def test_gil_switch_interval_ms_takes_both_ends_of_its_range():
    """0.001..1000 as documented, both ends included (a mutation review: an exclusive top passed)."""
    def engine(value: str):
        return parse_engine_config(["--model", "m", "--gil-switch-interval-ms", value], env={})

    assert engine("1000").gil_switch_interval_ms == 1000 and engine("0.001").gil_switch_interval_ms == 0.001
    for bad in ("1000.5", "0.0009"):
        with pytest.raises(ValueError, match="^gil_switch_interval_ms must be in 0.001..1000"):
            engine(bad)
