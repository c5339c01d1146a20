"""The model's architecture, read from a Hugging Face config.json in either transformers format."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file as a dict; a ValueError naming the file if it cannot be read as a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


ROPE_TYPES = ("default", "linear", "yarn", "llama3")


def _rope_keys(settings: dict | None, source: str) -> dict:
    """RoPE settings with the old "type" key (Qwen2.5-era model cards) named "rope_type", before they are merged:
    merged as they were, a saved rope_type "default" beat an added "type": "yarn". source names them in an error."""
    if settings is not None and not isinstance(settings, dict):  # dict() said "dictionary update sequence ..."
        raise ValueError(f"{source} should be a JSON object such as {{\"rope_type\": \"yarn\", \"factor\": 4.0}} "
                         f"or null, not {settings!r}")
    settings = dict(settings or {})
    if "type" in settings:
        settings.setdefault("rope_type", settings.pop("type"))
    return settings
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(slots=True, frozen=True)
class RopeScaling:
    """RoPE scaling for contexts longer than the model was trained on, as transformers computes it
    (rope_type "linear", "yarn" or "llama3"; Qwen3's model cards recommend yarn beyond 32,768 tokens; Llama 3.1
    and later ship llama3)."""

    rope_type: str
    factor: float
    original_max_position_embeddings: int  # yarn: the trained length the ramp is measured against
    attention_factor: float | None = None  # yarn: scales cos and sin; None derives it from factor (and mscale)
    mscale: float | None = None
    mscale_all_dim: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    low_freq_factor: float = 1.0  # llama3: wavelengths above original / low_freq_factor are divided by factor
    high_freq_factor: float = 4.0  # llama3: those below original / high_freq_factor are kept; a ramp between

    @property
    def max_positions(self) -> int:
        """The positions the scaling stretches the trained length to. llama3's configs state their length in
        max_position_embeddings (131,072 for Llama 3.1), so it stretches nothing beyond that."""
        if self.rope_type == "llama3":
            return self.original_max_position_embeddings
        return int(self.original_max_position_embeddings * self.factor)

    @classmethod
    def from_dict(cls, rope: dict, cfg: dict, max_positions: int) -> RopeScaling | None:
        """None for plain RoPE; a ValueError that says what is wrong for a setting the engine does not serve."""
        rope_type = rope.get("rope_type") or "default"
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"RoPE scaling type {rope_type!r} is not implemented; the engine serves {ROPE_TYPES} "
                f"(for long contexts, Qwen3 recommends rope_type 'yarn')"
            )
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise ValueError(f"partial_rotary_factor {partial} is not implemented; only 1.0 (RoPE on the whole "
                             f"head) is")
        if rope_type == "default":
            return None
        # transformers: a top-level original_max_position_embeddings wins, then rope's own, then max_positions
        original = cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings")
        original = original or max_positions
        if not isinstance(original, int) or isinstance(original, bool) or original < 1:
            raise ValueError(f"RoPE scaling {rope_type!r} needs original_max_position_embeddings to be a positive "
                             f"integer (the context the model was trained at); config.json has {original!r}")
        factor = rope.get("factor")
        if factor is None and rope_type == "yarn":
            factor = max_positions / original
        if not _finite(factor) or not factor >= 1.0:
            raise ValueError(f"RoPE scaling {rope_type!r} needs a factor of 1.0 or more; config.json has {factor!r}")
        if rope_type == "linear":  # positions divided by factor: the limit is the config's length x factor
            return cls("linear", float(factor), max_positions)
        if rope_type == "llama3":
            low, high = rope.get("low_freq_factor"), rope.get("high_freq_factor")
            if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in (low, high)) \
                    or not high > low:
                raise ValueError(f"RoPE scaling 'llama3' needs low_freq_factor and high_freq_factor above 0, "
                                 f"high above low; config.json has {low!r} and {high!r}")
            return cls("llama3", float(factor), int(original), low_freq_factor=float(low),
                       high_freq_factor=float(high))
        numbers = {key: _number(rope, key, f"RoPE scaling 'yarn' {key}")
                   for key in ("attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow")}
        return cls(
            "yarn",
            float(factor),
            int(original),
            attention_factor=numbers["attention_factor"],
            mscale=numbers["mscale"],
            mscale_all_dim=numbers["mscale_all_dim"],
            beta_fast=numbers["beta_fast"] or 32.0,
            beta_slow=numbers["beta_slow"] or 1.0,
            # An explicit null is no truncation, as transformers reads it (rope.get("truncate", True) is None,
            # falsy), not the default's truncation: the frequencies must be the ones the model was trained with.
            truncate=rope.get("truncate", True) is not None and _flag(rope, "truncate", True,
                                                                       "RoPE scaling 'yarn' truncate"),
        )


def _finite(value: object) -> bool:
    """A JSON number (not a bool) that a float holds: an integer such as 2**2000 passed "< inf" and then raised
    OverflowError where it was made a float."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def _number(settings: dict, key: str, what: str) -> float | None:
    """settings[key] as a float, None where absent or null; a ValueError naming it otherwise (a string or a list
    failed deep inside the RoPE tables, naming neither the key nor the file)."""
    value = settings.get(key)
    if value is None:
        return None
    if not _finite(value):
        raise ValueError(f"config.json's {what} should be a finite number, not {value!r}")
    return float(value)


def _flag(settings: dict, key: str, default: bool, what: str | None = None) -> bool:
    """settings[key] as a bool, the default where absent or null; a ValueError for anything but a JSON boolean
    (bool("false") is True: a tied head or biases the checkpoint does not have; transformers refuses it too)."""
    value = settings.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValueError(f"config.json's {what or key} should be true or false (a JSON boolean), not {value!r}")
    return value


@dataclass(slots=True, frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str | None  # the checkpoint's dtype name, e.g. "bfloat16"
    rope_scaling: RopeScaling | None = None  # None: plain RoPE
    # The parts that differ between the families served (see FAMILY_PARTS):
    qk_norm: bool = True  # RMSNorm on each q and k head before RoPE (Qwen3)
    qkv_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # keys a query sees at most (Mistral); None: all before it

    @property
    def max_model_len_limit(self) -> int:
        """The longest sequence the model serves: max_position_embeddings, or what RoPE scaling stretches the
        trained length to (yarn: original_max_position_embeddings x factor; linear: max_position_embeddings x
        factor); at most the sliding window, since attention here sees every earlier key, which equals the
        window's attention only while a sequence fits in it."""
        limit = self.max_position_embeddings
        if self.rope_scaling is not None:
            limit = max(limit, self.rope_scaling.max_positions)
        return limit if self.sliding_window is None else min(limit, self.sliding_window)

    @classmethod
    def from_dir(cls, model_dir: str | Path, rope_scaling: dict | None = None) -> ModelConfig:
        """rope_scaling: settings whose keys replace config.json's RoPE settings (the engine's rope_scaling)."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ValueError(f"{model_dir} is not a model directory: {path} does not exist")
        cfg = read_json(path)
        if rope_scaling is not None:
            given = _rope_keys(rope_scaling, "rope_scaling")
            cfg["rope_scaling"] = {**_rope_keys(cfg.get("rope_scaling"), "config.json's rope_scaling"), **given}
            merged = {**_rope_keys(cfg.get("rope_parameters"), "config.json's rope_parameters"), **cfg["rope_scaling"]}
            ignored = sorted(set(given) - {"rope_type", "rope_theta", "partial_rotary_factor"})
            if ignored and (merged.get("rope_type") or "default") == "default":
                # Plain RoPE reads none of them: {"factor": 4} without a type was dropped without a word.
                raise ValueError(f"rope_scaling sets {ignored}, which plain RoPE ignores, and neither it nor "
                                 f"config.json names a scaling type: add rope_type, e.g. {{'rope_type': 'yarn', "
                                 f"'factor': 4.0}}; got {rope_scaling!r}")
        return cls.from_dict(cfg)

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}"
            )
        quant = cfg.get("quantization_config")
        if quant:
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise ValueError(f"quantized checkpoints are not served (quantization_config.quant_method={method!r}); "
                             "serve the unquantized (bfloat16, float16 or float32) checkpoint")
        missing = [k for k in REQUIRED_KEYS if k not in cfg]
        if missing:
            raise ValueError(f"config.json lacks {missing}, which a {model_type} config holds; is it the model's "
                             "own?")
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):  # transformers' ACT2FN takes both for SiLU
            raise ValueError(f"hidden_act {act!r} is not implemented: the engine's MLP is SiLU-gated (SwiGLU), so "
                             "config.json must say 'silu'")
        cfg = {**FAMILY_DEFAULTS[model_type], **cfg}  # what transformers' config class sets for an omitted key

        # transformers 5 keeps RoPE settings in rope_parameters; transformers 4 in rope_theta / rope_scaling. A
        # rope_scaling added to a transformers 5 config (as Qwen3's model cards say to) wins, as in transformers 5.
        rope = {**_rope_keys(cfg.get("rope_parameters"), "config.json's rope_parameters"),
                **_rope_keys(cfg.get("rope_scaling"), "config.json's rope_scaling")}
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        # A null, text or zero size used to pass here and fail later, deep in building the model or in the first
        # request's step, as a TypeError or ZeroDivisionError that named no key.
        for key in (*REQUIRED_KEYS, "max_position_embeddings", "num_key_value_heads", "head_dim"):
            value = cfg.get(key)
            if key in ("num_key_value_heads", "head_dim") and value is None:
                continue  # null: one KV head per query head, or hidden_size / heads (derived below)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config.json's {key} should be a positive integer, not {value!r}")
        for key, value in (("rms_norm_eps", cfg.get("rms_norm_eps", 1e-6)), ("rope_theta", rope_theta)):
            if not _finite(value) or not value > 0:
                raise ValueError(f"config.json's {key} should be a positive number, not {value!r}")
        max_positions = cfg["max_position_embeddings"]
        rope_scaling = RopeScaling.from_dict(rope, cfg, max_positions)
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        # Refused here, at load: otherwise the first request's step failed, each backend in words of its own.
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}: each "
                             "KV head must serve the same number of query heads (grouped-query attention)")
        if head_dim % 2:
            raise ValueError(f"head_dim {head_dim} is odd: rotary position embeddings rotate pairs of dimensions, so "
                             "it must be even")
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=max_positions,
            rope_scaling=rope_scaling,
            tie_word_embeddings=_flag(cfg, "tie_word_embeddings", False),
            torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype"),
            sliding_window=_sliding_window(model_type, cfg),
            **FAMILY_PARTS[model_type](cfg),
        )


# model_type -> the parts of the decoder it has, read from its config.json as transformers builds the model.
FAMILY_PARTS = {
    "qwen3": lambda cfg: dict(qk_norm=True, qkv_bias=_flag(cfg, "attention_bias", False),
                              o_proj_bias=_flag(cfg, "attention_bias", False)),
    "qwen2": lambda cfg: dict(qk_norm=False, qkv_bias=True),
    "llama": lambda cfg: dict(qk_norm=False, qkv_bias=_flag(cfg, "attention_bias", False),
                              o_proj_bias=_flag(cfg, "attention_bias", False),
                              mlp_bias=_flag(cfg, "mlp_bias", False)),
    "mistral": lambda cfg: dict(qk_norm=False),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILY_PARTS)
# model_type -> the values transformers' config class gives keys config.json omits (an explicit null
# num_key_value_heads or head_dim still means one per query head, or hidden_size / heads).
FAMILY_DEFAULTS = {
    "qwen3": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "head_dim": 128, "sliding_window": 4096},
    "qwen2": {"max_position_embeddings": 32768, "num_key_value_heads": 32, "sliding_window": 4096},
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 131072, "num_key_value_heads": 8, "sliding_window": 4096},
}


def _sliding_window(model_type: str, cfg: dict) -> int | None:
    """The attention window transformers applies (cfg has the family's defaults, FAMILY_DEFAULTS): Mistral's
    sliding_window (none when it is null); Qwen's only under use_sliding_window (then on some layers, which
    within the window equals full attention too)."""
    applies = model_type == "mistral" or (model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"))
    window = cfg.get("sliding_window") if applies else None
    if window is None:
        return None
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"config.json's sliding_window should be a positive integer or null, not {window!r}")
    return window
