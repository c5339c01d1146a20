"""Per-request sampling parameters and their validation rules."""

from __future__ import annotations

import itertools
import json
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

# Temperatures below this are greedy: dividing logits by ~0 would overflow.
GREEDY_EPS = 1e-5
# Distinct stop token ids per request. Each is checked on every token and, below min_tokens, banned on every
# step: one request with two million of them slowed every other request on its engine 300-fold for a minute.
MAX_STOP_TOKEN_IDS = 1024
MAX_STOP_TOKEN_ENTRIES = 16 * MAX_STOP_TOKEN_IDS  # repeats included: a longer list is refused before deduplicating
# Most likely tokens a request may ask logprobs for, per generated token (OpenAI's and vLLM's default bound):
# each costs a top-k over the vocabulary and bytes on every frame.
MAX_LOGPROBS = 20
# Tokens one request may bias (logit_bias), and the bias's bound (OpenAI's: -100 bans a token, 100 forces it).
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_LOGIT_BIAS = 100.0
# float32's largest finite value: the sampler uploads repetition penalties in float32, where a larger one is inf (a
# seen token's zero logit times inf is NaN, drawn as a token), and a Python int past a float's range fails the step.
FLOAT32_MAX = 3.4028234663852886e38
# What response_format may say: None (free text), "json_object" (the output is one JSON object) or "json_schema"
# (one JSON object that json_schema describes): structured_output.py, json_schema.py.
RESPONSE_FORMATS = (None, "json_object", "json_schema")


# The fields validate() wants as Python ints, and as Python numbers (ints or floats).
_INT_FIELDS = ("max_tokens", "min_tokens", "top_k", "priority", "logprobs", "prompt_logprobs", "seed")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _python_number(value: object) -> object:
    """A numpy scalar (np.int64, np.float32: what arrays give) as the Python int or float it stands for; anything
    else as it is, for validate() to name."""
    if isinstance(value, bool | int | float) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How to sample one request's tokens and when to stop.

    temperature 0 (or below 1e-5) is greedy. top_k=-1 and top_p=1.0 and min_p=0.0 disable those filters.
    A seed makes the request's draws independent of which other requests share its batch (its tokens too in
    float64; in bf16 the forward's numbers move with the batch: docs/ENGINE.md, Sampling).
    logprobs: None returns no log-probabilities; N (0 to MAX_LOGPROBS) returns each generated token's own and
    the N most likely tokens' (outputs.TokenLogprobs), under the model's raw distribution.
    prompt_logprobs: the same (0 to MAX_LOGPROBS) for each prompt token after the first, given the tokens before it;
    returned with the first generated token. Such a request computes its whole prompt: it skips the prefix cache.
    Penalties (penalties.py), applied to the logits before temperature and filters: repetition_penalty (> 0 and
    at most float32's largest, 1.0 off) divides the positive logits of every token in the prompt or the output so far and multiplies the
    negative ones, as transformers does; presence_penalty and frequency_penalty ([-2, 2], 0.0 off) subtract
    once per token that the output holds, and once per occurrence, as OpenAI's API does.
    logit_bias: token id -> a bias in [-100, 100] added to that token's logit before penalties, temperature and
    filters (as transformers' sequence_bias for single tokens, and OpenAI's logit_bias); given as a mapping (or
    pairs), stored as (id, bias) pairs in id order.
    response_format: None for free text; "json_object" constrains the output to one JSON object (OpenAI's JSON
    mode; structured_output.py), "json_schema" to one that json_schema (a JSON Schema, as JSON text or a dict; the
    subset json_schema.py takes) describes: the request finishes when the object closes, and may be cut short by
    max_tokens. It cannot be combined with min_tokens.
    priority: scheduling order, lower first (an int32; 0 by default): the scheduler admits waiting requests in
    (priority, arrival) order and preempts running ones of a higher value for a request that does not fit.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = field(default_factory=tuple)
    response_format: str | None = None
    json_schema: str | None = None
    priority: int = 0
    # Whether any penalty is on (the request then keeps token counts on the device); set from the three, stored
    # because every step asks it of every row.
    penalized: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # numpy's scalars (np.int64, np.float32: what arrays give) as the Python numbers they stand for; validate()
        # takes Python ints and floats only.
        for name in _INT_FIELDS + _FLOAT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, bool | int | float) and isinstance(value, numbers.Real):
                if isinstance(value, numbers.Integral):
                    object.__setattr__(self, name, int(value))
                elif name in _FLOAT_FIELDS:
                    object.__setattr__(self, name, float(value))
        # Accept any iterable of ids for stop_token_ids (a list, a tuple, a set, a numpy array) but store an
        # immutable tuple of distinct ids, in their first order.
        ids = self.stop_token_ids
        if hasattr(ids, "tolist"):  # a numpy array or a tensor
            ids = ids.tolist()
        if isinstance(ids, Mapping):  # iterated, its keys alone were taken, silently
            raise ValueError(f"stop_token_ids must be a list of token ids, not a {type(ids).__name__} (logit_bias is "
                             "the field that maps token ids to values)")
        if isinstance(ids, str | bytes) or not hasattr(ids, "__iter__"):
            raise ValueError(f"stop_token_ids must be a list of token ids, got {ids!r}")
        if not hasattr(ids, "__len__"):  # a generator: read no further than the bound (it may never end)
            ids = list(itertools.islice(ids, MAX_STOP_TOKEN_ENTRIES + 1))
        if len(ids) > MAX_STOP_TOKEN_ENTRIES:  # not worth deduplicating
            raise ValueError(f"stop_token_ids must hold at most {MAX_STOP_TOKEN_ENTRIES} entries (and at most "
                             f"{MAX_STOP_TOKEN_IDS} distinct ids), got {len(ids)} entries")
        ids = tuple(map(_python_number, ids))  # a list of np.int64 too, as a prompt of them is taken
        try:
            object.__setattr__(self, "stop_token_ids", tuple(dict.fromkeys(ids)))
        except TypeError:  # an unhashable entry: validate() names it
            object.__setattr__(self, "stop_token_ids", ids)
        bias = self.logit_bias
        if hasattr(bias, "items"):
            bias = bias.items()
        if isinstance(bias, str | bytes) or not hasattr(bias, "__iter__") or getattr(bias, "ndim", None) == 0:
            raise ValueError(f"logit_bias must map token ids to biases, got {bias!r}")
        if hasattr(bias, "__len__") and len(bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"logit_bias must hold at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(bias)}")
        try:
            pairs = tuple(sorted((_python_number(t), _python_number(b)) for t, b in bias))
        except (TypeError, ValueError):  # not pairs, or ids that do not compare
            raise ValueError(f"logit_bias must map token ids to biases, got {self.logit_bias!r}") from None
        object.__setattr__(self, "logit_bias", pairs)
        if isinstance(self.json_schema, dict):  # kept as text, in its own key order (the order properties are written)
            try:
                object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
            except (TypeError, ValueError, RecursionError) as exc:
                raise ValueError(f"json_schema must be JSON-serialisable: {exc}") from None
        self.validate()
        object.__setattr__(self, "penalized", self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                           or self.frequency_penalty != 0.0)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        for name in ("max_tokens", "min_tokens", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
                raise ValueError(f"{name} must be a number, got {value!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) \
                or not -2**31 <= self.priority < 2**31:
            raise ValueError(f"priority must be an integer in [-2**31, 2**31) (lower is served first), got "
                             f"{self.priority!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be 0 or more, got {self.min_tokens}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.temperature < 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or at least 1, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= FLOAT32_MAX:
            shown = str(self.repetition_penalty)
            shown = shown if len(shown) <= 24 else f"an integer of {len(shown)} digits"
            raise ValueError(f"repetition_penalty must be a number above 0 and at most {FLOAT32_MAX:.7g} (float32's "
                             f"largest; 1.0 is off; above 1 discourages repeats), got {shown}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2] (0.0 is off), got {getattr(self, name)}")
        for name, beside in (("logprobs", "each generated one"), ("prompt_logprobs", "each prompt token")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] (the most likely tokens to return "
                                 f"beside {beside}), or None (on the wire: unset) for none; got {value!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63
        ):
            raise ValueError(f"seed must be an integer in [0, 2**63), or None (on the wire: unset) for a fresh one; "
                             f"got {self.seed!r}")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} distinct ids, got "
                             f"{len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"stop_token_ids must be non-negative integers, got {t!r}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ValueError(f"logit_bias must hold at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(self.logit_bias)}")
        for i, (t, b) in enumerate(self.logit_bias):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids, got {t!r}")
            if i and t == self.logit_bias[i - 1][0]:
                raise ValueError(f"logit_bias holds token {t} twice")
            if isinstance(b, bool) or not isinstance(b, int | float) or not -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias values must be numbers in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got "
                                 f"{b!r} for token {t}")

        if self.response_format not in RESPONSE_FORMATS:
            raise ValueError("response_format must be None (free text; on the wire: unset or RESPONSE_FORMAT_TEXT), "
                             f"'json_object' or 'json_schema', got {self.response_format!r}")
        if (self.response_format == "json_schema") != (self.json_schema is not None):
            shown = repr(self.response_format) if self.response_format else "None (free text)"
            raise ValueError("json_schema (a JSON Schema) goes with response_format 'json_schema', and that format "
                             f"needs one; got response_format {shown} and json_schema "
                             f"{'set' if self.json_schema is not None else 'unset'}")
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            raise ValueError(f"json_schema must be a JSON Schema as a dict or JSON text, got "
                             f"{type(self.json_schema).__name__}")
        if self.response_format is not None and self.min_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) cannot be combined with response_format "
                             f"{self.response_format!r}: the JSON object's end ends the output; leave min_tokens 0")
