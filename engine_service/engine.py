"""The engine: admission and validation, the step loop, and the offline `LLM.generate`.

A request's life: add_request() validates it and queues a Sequence; each step() asks the scheduler for a
batch, the model runner computes it and samples, and the scheduler appends the tokens, publishes full
blocks to the prefix cache and finishes sequences. step() returns each request's new tokens.

Overlap scheduling (on by default on a single CUDA GPU; off under tensor parallelism): the next batch
(decodes, prompt chunks, admissions) is scheduled and launched before the current one's tokens are read back
(Scheduler.schedule_ahead), so the host's per-step work runs while the device computes instead of between its
steps.
"""

from __future__ import annotations

import itertools
import logging
import numbers
import time
from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass
from pathlib import Path

import torch

from engine_service.block_manager import BlockManager
from engine_service.config import EngineConfig
from engine_service.json_grammar import FREE_OBJECT
from engine_service.json_grammar import INITIAL as INITIAL_STATE
from engine_service.json_grammar import describe as describe_state
from engine_service.json_schema import SchemaCache
from engine_service.model.config import ModelConfig, read_json
from engine_service.model.layers import TPInfo
from engine_service.model_runner import Collected, Launched, ModelRunner
from engine_service.outputs import FINISH_ERROR, FINISH_LENGTH, FINISH_STOP, StepOutput, TokenLogprobs
from engine_service.sampler import LogitBias, LogprobRows, SamplingRow
from engine_service.sampling_params import SamplingParams
from engine_service.scheduler import ScheduledBatch, Scheduler
from engine_service.sequence import Sequence, Status
from engine_service.structured_output import JsonCursor, JsonMasks, MaskBudgetError, token_bytes
from engine_service.validation import check_prompt

log = logging.getLogger(__name__)

# Why a request fails whose sampled row, or a prompt-logprob row, had NaN or infinite logits.
NON_FINITE = "the model produced NaN or infinite logits for this request"

# generation_config.json fields that change what transformers' generate() produces but that this engine does not
# apply, with the value that means "off". The engine applies temperature, top_p, top_k, min_p, the repetition,
# presence and frequency penalties, do_sample and eos_token_id (and a request's own max_tokens and min_tokens).
GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                           "frequency_penalty")
UNAPPLIED_GENERATION_FIELDS: dict[str, object] = {
    "no_repeat_ngram_size": 0,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "num_beams": 1, "num_return_sequences": 1,
    "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
    "max_new_tokens": None, "min_new_tokens": None, "min_length": 0,
}


def unapplied_generation_settings(gen_cfg: dict) -> dict[str, object]:
    """The fields of a generation_config.json that ask for something this engine does not do."""
    return {k: gen_cfg[k] for k, off in UNAPPLIED_GENERATION_FIELDS.items()
            if gen_cfg.get(k) is not None and gen_cfg[k] != off and gen_cfg[k] != []}

# One of them makes a tokenizer (as the tokenizer service counts them); tokenizer_config.json alone does not.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(slots=True)
class _InFlight:
    """A launched step whose tokens have not been read back yet."""

    batch: ScheduledBatch
    launched: Launched


class EngineStepError(RuntimeError):
    """step() failed; the requests of that step were failed and freed. `outputs` reports them."""

    def __init__(self, message: str, outputs: list[StepOutput]):
        super().__init__(message)
        self.outputs = outputs


class EngineDeadError(RuntimeError):
    """The engine cannot continue (a tensor-parallel step failed partway, or close() was called): make a new one."""


def _read_json(path: Path) -> dict:
    """The file's JSON object, {} when there is no such file; a ValueError naming the file if it is not JSON."""
    return read_json(path) if path.is_file() else {}


def mix_seed(seed: int) -> int:
    """splitmix64 of a request's 64-bit seed: torch's CPU generator keeps only a seed's low 32 bits, so seeds that
    differ only above bit 31 (base + (i << 32)) drew the same tokens; mixed, every bit moves the low 32."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return z ^ (z >> 31)


def _eos_ids(config: dict, name: str) -> list[int]:
    """The eos_token_id of a config file already read (name: the file's): a token id, a list of them, or null; a
    ValueError naming the file and key otherwise (int() turned true into id 1 and 2.5 into 2, and a null in a list
    or a token's text raised a bare TypeError or ValueError). The tokenizer service reads the same rule
    (tokenizer_service.validation.read_eos_token_ids)."""
    value = config.get("eos_token_id")
    values = value if isinstance(value, list) else [] if value is None else [value]
    if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        raise ValueError(f"{name}'s eos_token_id should be a token id or a list of them (integers), not {value!r}")
    return values


def _what(value: object) -> str:
    """What a caller passed for sampling_params, for an error: its type's name, or the class itself named."""
    if value is SamplingParams:  # its call forgotten: the type's name, "type", named nothing the caller wrote
        return "the class SamplingParams itself: pass an instance, SamplingParams(...)"
    return type(value).__name__


class LLMEngine:
    """The step API: add_request / abort_request / step. Not thread-safe: call it from one thread."""

    def __init__(self, model: str | Path, **kwargs):
        self.config = EngineConfig.from_kwargs(str(model), **kwargs)
        model_dir = Path(self.config.model)
        self.model_cfg = ModelConfig.from_dir(model_dir, self.config.rope_scaling)
        limit = self.model_cfg.max_model_len_limit
        max_model_len = self.config.max_model_len or limit
        if max_model_len > limit:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the {limit} positions the model serves (config.json's "
                f"max_position_embeddings, or its RoPE scaling's original_max_position_embeddings x factor; at "
                f"most its sliding_window, as the engine's attention sees every earlier key, which is the window's "
                f"attention only within it); set max_model_len to {limit} or less"
            )
        self.max_model_len = max_model_len
        self.tokenizer = self._load_tokenizer(model_dir)
        gen_cfg = _read_json(model_dir / "generation_config.json")
        eos = set(_eos_ids(gen_cfg, "generation_config.json"))
        eos |= set(_eos_ids(_read_json(model_dir / "config.json"), "config.json"))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(int(self.tokenizer.eos_token_id))
        outside = sorted(e for e in eos if not 0 <= e < self.model_cfg.vocab_size)
        if outside:  # the model can never produce them; banning them under min_tokens would index past the logits
            log.warning("eos_token_id %s (tokenizer, generation_config.json or config.json) is outside the model's "
                        "vocabulary [0, %d): ignored", outside, self.model_cfg.vocab_size)
        self.eos_token_ids = sorted(set(eos) - set(outside))
        self.generation_defaults = self._generation_defaults(gen_cfg, model_dir / "generation_config.json")
        unapplied = unapplied_generation_settings(gen_cfg)
        if unapplied:
            log.warning("generation_config.json sets %s, which this engine does not apply: its outputs will differ "
                        "from transformers' generate() with that config (it applies temperature, top_p, top_k, "
                        "min_p, the repetition, presence and frequency penalties, do_sample and eos_token_id)",
                        ", ".join(f"{k}={v!r}" for k, v in unapplied.items()))
        sampling = {k: v for k, v in self.generation_defaults.items()
                    if k in ("temperature", "top_p", "top_k", "min_p") and (k != "temperature" or v != 0.0)}
        if sampling and "do_sample" not in gen_cfg:
            log.warning("generation_config.json sets %s without do_sample: this engine samples with them by default "
                        "(as vLLM does), where transformers' generate() would decode greedily; requests choose "
                        "with their own temperature", ", ".join(f"{k}={v!r}" for k, v in sampling.items()))

        self.workers = None
        tp = TPInfo()
        if self.config.tensor_parallel_size > 1:
            from engine_service.model.decoder import check_tensor_parallel
            from engine_service.tp import WorkerGroup

            check_tensor_parallel(self.model_cfg, self.config.tensor_parallel_size)

            self.workers = WorkerGroup(self.config, self.model_cfg, max_model_len)
        try:
            if self.workers is not None:
                tp = self.workers.rank0_info()
            self.runner = ModelRunner(self.config, self.model_cfg, max_model_len, tp)
        except BaseException as exc:
            if self.workers is not None:
                # A worker that failed (an out-of-memory sizing its KV cache) is the cause of rank 0's error; a
                # ValueError (a setting or checkpoint every rank refuses) is raised as one rank raises it.
                failing = isinstance(exc, Exception) and not isinstance(exc, ValueError)
                why = self.workers.dead_worker(grace=1.0) if failing else None
                self.workers.close(wait=False)  # they may wait for a group or a collective that never comes
                if why is not None and why not in str(exc):  # rank0_info may have said it already
                    raise RuntimeError(f"{why} (rank 0: {type(exc).__name__}: {exc})") from exc
                # gloo says "Timed out waiting ... for recv" of a collective, its store "Wait timeout" (which of
                # them fires first depends on how far the live ranks got, so on the machine's load)
                if failing and why is None and any(word in str(exc).lower() for word in ("timed out", "timeout")):
                    raise RuntimeError(
                        "a tensor-parallel collective timed out during start-up while every worker was still "
                        "running: one is stuck (a slow or hung weight load, a hung device), not dead (rank 0: "
                        f"{type(exc).__name__}: {exc})") from exc
            raise
        try:
            self._set_up(eos, max_model_len, model_dir)
        except BaseException:
            if self.workers is not None:  # a failure (or a Ctrl-C) past the runner must not leave them running
                self.workers.close(wait=False)
                self.workers = None
            raise

    def _set_up(self, eos: set[int], max_model_len: int, model_dir: Path) -> None:
        """What __init__ builds once the model runner stands: the block manager, the scheduler, the request
        tables and the JSON masks."""
        self._dead: str | None = None  # why the engine cannot continue (EngineDeadError), once it cannot
        self.block_manager = BlockManager(
            self.runner.num_blocks, self.config.kvcache_block_size, self.config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager, self.config.max_num_seqs, self.config.max_num_batched_tokens, eos
        )
        self.seqs: dict[str, Sequence] = {}
        self.generators: dict[str, torch.Generator] = {}
        self.biases: dict[str, LogitBias] = {}  # requests with a logit_bias: it on the device
        self.cursors: dict[str, JsonCursor] = {}  # requests with a response_format: their place in the document
        self._pending: list[StepOutput] = []  # aborts to report on the next step
        self._pending_ids: set[str] = set()  # their request ids: still in use until reported
        self._inflight: _InFlight | None = None  # a step scheduled ahead, launched, not yet read back
        overlap = self.config.overlap_scheduling
        if overlap is None:
            overlap = self.runner.device.type == "cuda" and self.workers is None
        self.overlap = overlap
        max_model_len = self.max_model_len = self._fit_max_model_len(max_model_len)
        rope = self.model_cfg.rope_scaling
        log.info(
            "engine ready: %d KV blocks of %d tokens, max_num_seqs %d, max_model_len %d, RoPE %s, overlap "
            "scheduling %s",
            self.runner.num_blocks,
            self.config.kvcache_block_size,
            self.config.max_num_seqs,
            max_model_len,
            "unscaled" if rope is None else f"{rope.rope_type} x{rope.factor:g} of {rope.original_max_position_embeddings}",
            "on" if overlap else "off",
        )
        self.json_masks, self.json_refusal = self._json_masks()
        # json_schema texts, compiled; a schema's masks are kept while this cache or a live request holds its root.
        masks = self.json_masks
        self.schemas = SchemaCache() if masks is None else SchemaCache(on_add=masks.hold, on_evict=masks.release)
        self.model_info = {
            "model_name": model_dir.resolve().name,
            "vocab_size": self.model_cfg.vocab_size,
            "eos_token_ids": list(self.eos_token_ids),
            "max_model_len": max_model_len,
            "block_size": self.config.kvcache_block_size,
            "json_object": self.json_masks is not None,  # response_format json_object and json_schema are served
        }

    def _fit_max_model_len(self, max_model_len: int) -> int:
        """max_model_len, lowered to what the KV pool holds for one sequence when it was the model's default (a
        yarn-scaled model's 131,072 over a 4 GiB CPU pool); a warning either way when the pool holds less."""
        servable = self.runner.num_blocks * self.config.kvcache_block_size + 1  # the last token takes no slot
        if max_model_len <= servable:
            return max_model_len
        knob = ("num_kvcache_blocks" if self.config.num_kvcache_blocks is not None
                else "gpu_memory_utilization" if self.runner.device.type == "cuda" else "cpu_kvcache_gib")
        if self.config.max_model_len is None:
            log.warning("max_model_len lowered from the model's %d to %d, the longest sequence the KV pool of %d "
                        "blocks holds; raise %s for longer ones, or set max_model_len", max_model_len, servable,
                        self.runner.num_blocks, knob)
            return servable
        log.warning("max_model_len %d is more than the KV pool of %d blocks holds for one sequence (%d tokens): "
                    "requests that could grow past that are refused; raise %s or lower max_model_len",
                    max_model_len, self.runner.num_blocks, servable, knob)
        return max_model_len

    @staticmethod
    def _load_tokenizer(model_dir: Path):
        """The model's tokenizer, None without tokenizer files (token-id prompts need none); a ValueError that
        names the directory's tokenizer files when they are there but cannot be loaded."""
        present = [f for f in TOKENIZER_FILES if (model_dir / f).is_file()]
        if not present:
            return None
        for name in ("tokenizer.json", "tokenizer_config.json"):  # a corrupt one is named, not just its parse error
            if (model_dir / name).is_file():
                _read_json(model_dir / name)
        from transformers import AutoTokenizer

        try:  # local_files_only: a directory name must never turn into Hub lookups
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except Exception as exc:  # transformers' and tokenizers' own types
            raise ValueError(f"the tokenizer in {model_dir} ({', '.join(present)}) cannot be loaded: {exc}; fix the "
                             "files, or remove them to serve token-id prompts only") from None
        # max_model_len bounds prompts; the tokenizer's model_max_length (often a RoPE-scaled model's unscaled
        # length) only made transformers warn of "indexing errors" that never happen.
        tokenizer.model_max_length = int(1e30)
        return tokenizer

    def _json_masks(self) -> tuple[JsonMasks | None, str]:
        """The JSON mode's token masks for this model's tokenizer, or None and why requests for it are refused."""
        if self.tokenizer is None:
            return None, ("response_format json_object and json_schema need the model's tokenizer, and this model "
                          "directory has none; add its tokenizer files")
        try:
            vocab = token_bytes(self.tokenizer, self.model_cfg.vocab_size)
        except ValueError as exc:
            return None, str(exc)
        t0 = time.perf_counter()
        masks = JsonMasks(vocab, self.runner.device)
        if not masks.allowed(INITIAL_STATE).count:
            return None, ("response_format json_object and json_schema need tokens for \"{\" and whitespace, which "
                          "this tokenizer lacks")
        log.info("JSON mode ready: the vocabulary indexed by bytes in %.2f s", time.perf_counter() - t0)
        return masks, ""

    @staticmethod
    def _generation_defaults(gen_cfg: dict, path: Path) -> dict:
        """Every request's defaults, checked here as a request's own values are: a value out of range or of the
        wrong type stops the load (else each request leaving that field unset would be refused for it)."""
        defaults = {
            k: gen_cfg[k] for k in GENERATION_DEFAULT_KEYS if gen_cfg.get(k) is not None
        }
        if gen_cfg.get("do_sample") is False:
            defaults["temperature"] = 0.0
        top_k = defaults.get("top_k")
        if isinstance(top_k, float) and top_k.is_integer():
            defaults["top_k"] = int(top_k)  # 50.0, as some writers put it
        if defaults.get("top_k") == 0:
            defaults["top_k"] = -1  # transformers' "disabled"
        try:
            SamplingParams(**defaults).validate()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc} (it would be every request's default)") from None
        return defaults

    # ---- admission -----------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams
    ) -> None:
        """Validate and queue a request; raises ValueError naming the problem, and the engine keeps serving."""
        self._check_alive()
        if not isinstance(request_id, str):
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        if not request_id:  # no length limit here: the servicer's ids are a prefix and the client's (up to 256)
            raise ValueError("request_id must not be empty")
        if request_id in self.seqs or request_id in self._pending_ids:
            raise ValueError(f"request_id {request_id!r} is already in use by a live request (or one whose end "
                             "the next step() reports)")
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {_what(sampling_params)}")
        sampling_params.validate()
        vocab = self.model_cfg.vocab_size
        for t in sampling_params.stop_token_ids:
            if t >= vocab:
                raise ValueError(f"stop_token_ids holds {t}, outside the vocabulary [0, {vocab})")
        if sampling_params.logit_bias and sampling_params.logit_bias[-1][0] >= vocab:  # ids in order: the last
            raise ValueError(f"logit_bias holds token {sampling_params.logit_bias[-1][0]}, outside the vocabulary "
                             f"[0, {vocab})")
        if sampling_params.min_tokens:
            banned = set(sampling_params.stop_token_ids) | set(() if sampling_params.ignore_eos else self.eos_token_ids)
            if len(banned) >= vocab:  # every logit -inf below min_tokens: the draw read NaN, unflagged
                raise ValueError(f"min_tokens {sampling_params.min_tokens} bans the stop token ids and EOS until it is "
                                 f"reached, and they cover all {vocab} tokens of the vocabulary, which leaves none "
                                 "to sample; list fewer stop_token_ids or drop min_tokens")
        for name in ("logprobs", "prompt_logprobs"):
            if (k := getattr(sampling_params, name)) is not None and k > vocab:
                raise ValueError(f"{name} is {k}, more tokens than the vocabulary holds ({vocab})")
        if sampling_params.response_format is not None and self.json_masks is None:
            raise ValueError(self.json_refusal)
        top = self.schemas.get(sampling_params.json_schema) if sampling_params.json_schema is not None else FREE_OBJECT
        prompt = self._validate_prompt(prompt_token_ids)
        bm = self.block_manager
        worst = min(len(prompt) + sampling_params.max_tokens, self.max_model_len)
        need = bm.blocks_needed(worst - 1)  # the last token is sampled, never fed back: it takes no KV slot
        if need > bm.num_blocks:
            raise ValueError(
                f"request needs {need} KV blocks of {bm.block_size} tokens (prompt {len(prompt)} + max_tokens "
                f"{sampling_params.max_tokens}, capped at max_model_len {self.max_model_len}) but the pool "
                f"has only {bm.num_blocks}; lower max_tokens or shorten the prompt"
            )
        seq = Sequence(request_id, prompt, sampling_params, self.max_model_len)
        # What can fail (a device allocation) comes first; the request is registered only once all of it is made.
        generator = bias = None
        if sampling_params.seed is not None:
            generator = torch.Generator(device=self.runner.device)
            generator.manual_seed(mix_seed(sampling_params.seed))
        if sampling_params.logit_bias:  # on the device once, not uploaded every step
            bias = self.runner.sampler.bias_tensors(sampling_params)
        if generator is not None:
            self.generators[request_id] = generator
        if bias is not None:
            self.biases[request_id] = bias
        if sampling_params.response_format is not None:
            self.cursors[request_id] = JsonCursor(self.json_masks, top, self.config.json_mask_budget_s)
            if sampling_params.json_schema is not None:
                self.json_masks.hold(top)  # released by _forget
        self.seqs[request_id] = seq
        self.scheduler.add(seq)

    def _validate_prompt(self, prompt_token_ids) -> list[int]:
        # Bytes in any form are text, not ids (a bytearray or memoryview ran its byte values as token ids); a set
        # or dict has no order (and a set no repeats): its ids would run in some order, silently.
        refused = str | bytes | bytearray | memoryview | Set | Mapping
        if not isinstance(prompt_token_ids, refused) and hasattr(prompt_token_ids, "tolist"):
            prompt_token_ids = prompt_token_ids.tolist()  # a numpy array or a torch tensor: its elements as ints
        if isinstance(prompt_token_ids, refused) or not hasattr(prompt_token_ids, "__len__"):
            raise ValueError("prompt_token_ids must be a list of integer token ids (a list, tuple, array or tensor), "
                             f"not a {type(prompt_token_ids).__name__}")
        prompt = list(prompt_token_ids)
        # Plain ints (what the service and most callers pass) are checked in one pass: the ABC check per token
        # took 50 ms for a 131k-token prompt, on the engine's loop.
        if not all(type(t) is int for t in prompt):
            for i, t in enumerate(prompt):
                if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                    raise ValueError(f"prompt_token_ids[{i}] = {t!r} is not an integer token id")
            prompt = [int(t) for t in prompt]  # numpy integers included
        check_prompt(prompt, self.model_cfg.vocab_size, self.max_model_len)
        return prompt

    def abort_request(self, request_id: str) -> bool:
        """Free the request's blocks at once; the next step() reports it with finish reason 'abort'. False for an id
        no live request holds (finished, already aborted, never added); a TypeError for one that is not a str."""
        if not isinstance(request_id, str):  # a list failed as "unhashable type"; 5 answered False
            raise TypeError(f"request_id must be a str, got {type(request_id).__name__}")
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.abort(seq)
        self._forget(seq)
        self._pending.append(self._output(seq, []))
        self._pending_ids.add(request_id)
        return True

    def displaceable(self, priority: int) -> tuple[str, int] | None:
        """(request id, priority) of the waiting request that a request of `priority` would displace from a full
        queue (Scheduler.displaceable), or None; the caller aborts it. The service's queue limit uses it; the
        Python API has no queue limit."""
        seq = self.scheduler.displaceable(priority)
        return None if seq is None else (seq.request_id, seq.params.priority)

    # ---- the loop ------------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._pending) or self._inflight is not None

    def step(self, on_launch: Callable[[], None] | None = None) -> list[StepOutput]:
        """Run one scheduled batch; return new tokens per request (and finish reasons).

        With overlap scheduling, the step after this one is scheduled and launched (when schedule_ahead
        can foresee it) before this one's tokens are read back, so the device computes it while the host
        appends tokens, checks stops and builds outputs; the next step() collects it.

        on_launch, if given, is called once per forward pass, once its inputs are built (just before it on
        CPU, just after its kernels are enqueued on CUDA; see ModelRunner.execute), so that a caller can do
        its own work while the model computes.
        """
        self._check_alive()
        if on_launch is not None and not callable(on_launch):  # called at the forward, it failed the step's requests
            raise TypeError(f"on_launch must be a callable taking no arguments, or None; got "
                            f"{type(on_launch).__name__}")
        outputs, self._pending = self._pending, []
        self._pending_ids.clear()
        current, self._inflight = self._inflight, None
        if current is not None and not any(s.status is Status.RUNNING for s in current.batch.seqs):
            current = None  # every sequence in it finished or was aborted: nothing to read back
        if current is None:
            if not self.scheduler.has_unfinished():
                return outputs
            try:
                batch = self.scheduler.schedule()
            except BaseException:  # Ctrl-C between taking a sequence off one queue and putting it on the other
                self.scheduler.recover(self.seqs.values())
                raise
            if not batch.seqs:
                return outputs
            current = self._launch(batch, on_launch, outputs)
        try:
            if self.overlap:
                ahead = self.scheduler.schedule_ahead(current.batch)
                if ahead is not None:
                    self._inflight = self._launch(ahead, on_launch, outputs, previous=current)
            try:
                collected = self.runner.collect(current.launched)
            except Exception as exc:  # a kernel failure surfaces at the sync
                raise self._step_failed(exc, outputs, current.batch) from exc
            self._complete(current.batch, collected, outputs)
        except Exception:
            raise
        except BaseException as exc:  # KeyboardInterrupt (the sync in collect is where Ctrl-C lands), SystemExit
            # The step's tokens are lost or half appended, and a step ahead may compute from them: carrying on
            # gave its requests wrong tokens with no error, or left one never scheduled again. They fail, and the
            # next step() reports them (with what this one finished before the interrupt); the engine stays usable.
            # First, one schedule_ahead left halfway between the queues goes back to waiting.
            self.scheduler.recover(self.seqs.values())
            failed = self._step_failed(RuntimeError(f"step() was interrupted ({type(exc).__name__})"), outputs,
                                       current.batch)
            self._pending = failed.outputs + self._pending
            self._pending_ids = {o.request_id for o in self._pending}
            raise
        return outputs

    def _launch(self, batch: ScheduledBatch, on_launch, outputs, previous: _InFlight | None = None) -> _InFlight:
        ahead = previous is not None
        # Rows that decode a token the previous step is still sampling: their sequences will have one more token.
        behind = batch.input_rows if ahead else None
        rows: list[SamplingRow] = []
        doomed: list[tuple[Sequence, str]] = []  # requests whose JSON-mode mask failed: they fail once launched
        try:
            for i, (s, take) in enumerate(zip(batch.seqs, batch.sample, strict=True)):
                if not take:
                    continue
                row_ahead = behind is not None and behind[i] is not None
                try:
                    rows.append(self._sampling_row(s, row_ahead))
                except Exception as exc:  # a mask computed here (a cache miss) can fail, on CUDA with OOM
                    if s.params.response_format is None:
                        raise
                    doomed.append((s, self._json_failure(s, exc)))
                    # Its row samples unmasked; the token is never kept: the request is failed below, before
                    # this step completes, as an abort while a step is in flight is.
                    rows.append(self._sampling_row(s, row_ahead, masked=False))
        except Exception as exc:  # any other row failing fails the step, not the engine
            raise self._step_failed(exc, outputs, batch, previous.batch if ahead else None) from exc
        try:
            launched = self.runner.launch(
                batch, rows, self.workers, on_launch, previous.launched if ahead else None
            )
        except BaseException as exc:
            if self.workers is not None and self.runner.ranks_in_step:
                # The workers got the step and may sit in its collectives, which rank 0 left: every later
                # collective would pair with a stale one (wrong tokens, or gloo aborting the process). A failure
                # before the step was sent, or after rank 0's forward pass (its sampler), leaves them in step.
                why = self.workers.dead_worker(grace=1.0)  # a dead worker is the cause, not rank 0's broken pipe
                self._kill(f"{why}, and a step failed on rank 0 ({type(exc).__name__}: {exc})" if why else
                           f"a tensor-parallel step failed partway on rank 0 ({type(exc).__name__}: {exc}), "
                           "leaving the ranks out of step")
                if isinstance(exc, Exception):
                    raise EngineDeadError(self._dead) from exc
                raise  # KeyboardInterrupt and the like, as they came; later calls get EngineDeadError
            if not isinstance(exc, Exception):
                raise
            # OOM, kernel failure: fail this step's requests, keep the pool whole.
            raise self._step_failed(exc, outputs, batch, previous.batch if ahead else None) from exc
        for seq, message in doomed:  # one request's mask fails that request, not the step's others
            outputs.append(self._fail(seq, message))
        return _InFlight(batch, launched)

    def _kill(self, why: str) -> None:
        """The engine cannot continue: stop its workers now; step() and add_request() refuse from here on."""
        self._dead = f"{why}; this engine cannot continue: make a new one"
        log.error("engine unusable: %s", self._dead)
        if self.workers is not None:
            self.workers.close(wait=False)
            self.workers = None

    def check_workers(self) -> None:
        """EngineDeadError when a tensor-parallel worker has exited: an engine loop calls it while idle, so that
        a worker killed between requests takes the service down (for a restart) before a request meets it."""
        if self.workers is not None:
            why = self.workers.dead_worker()
            if why is not None:
                self._kill(why)
        self._check_alive()

    def _check_alive(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(self._dead)

    def _step_failed(self, exc: Exception, outputs, *batches: ScheduledBatch | None) -> EngineStepError:
        """Fail the requests of the given batches and of any step in flight; the error to raise."""
        if self._inflight is not None:
            batches += (self._inflight.batch,)
            self._inflight = None
        failed: dict[Sequence, None] = {}
        for batch in batches:
            if batch is not None:
                # Also those the step finished (postprocess, JSON cursors) but did not yet report: still registered,
                # they would never be reported, their id never free again.
                failed.update((s, None) for s in batch.seqs
                              if s.status is not Status.FINISHED or self.seqs.get(s.request_id) is s)
        for seq in failed:
            if seq.status is Status.FINISHED:
                seq.finish_reason = FINISH_ERROR  # its last token was not reported: the request failed with the step
        message = f"engine step failed: {type(exc).__name__}: {exc}"
        return EngineStepError(str(exc), outputs + [self._fail(seq, message) for seq in failed])

    def _complete(self, batch: ScheduledBatch, collected: Collected, outputs) -> None:
        """Append a collected step's tokens, finish sequences, and add their outputs to `outputs`."""
        if collected.prompt_logprobs is not None:
            self._keep_prompt_logprobs(batch, collected.prompt_logprobs, outputs)
        sampled: list[int | None] = []
        it = iter(zip(collected.tokens, collected.finite, strict=True))
        for seq, take in zip(batch.seqs, batch.sample, strict=True):
            if not take:
                sampled.append(None)
                continue
            token, ok = next(it)
            if seq.status is not Status.RUNNING:
                sampled.append(None)  # finished or aborted while this step was in flight: a row in vain
                continue
            if not ok:
                outputs.append(self._fail(seq, NON_FINITE))
            sampled.append(token if ok else None)
        self.scheduler.postprocess(batch, sampled)
        if self.cursors:
            self._advance_cursors(batch, sampled, outputs)
        start = len(outputs)
        for seq, token in zip(batch.seqs, sampled, strict=True):
            if token is None:
                continue  # a prefill chunk that did not reach the end, or a request failed above
            out = self._output(seq, [token])
            if seq.prompt_logprobs is not None:  # the first token: the prompt's logprobs go with it
                out.prompt_logprobs = [lp for chunk in seq.prompt_logprobs for lp in chunk.per_row(len(chunk.rows))]
                seq.prompt_logprobs = None
            outputs.append(out)
            if seq.status is Status.FINISHED:
                self._forget(seq)
        if collected.logprobs is not None:
            self._attach_logprobs(batch, sampled, collected.logprobs, outputs[start:])

    def _advance_cursors(self, batch: ScheduledBatch, sampled: list[int | None], outputs) -> None:
        """Move JSON-mode requests along their documents; finish those whose object closed (finish reason stop).
        A token the automaton refuses (which its mask should have ruled out) fails its request."""
        for i, (seq, token) in enumerate(zip(batch.seqs, sampled, strict=True)):
            cursor = self.cursors.get(seq.request_id) if token is not None else None
            if cursor is None:
                continue
            try:
                advanced = cursor.advance(token)
                stuck = advanced and not cursor.done and seq.status is Status.RUNNING and not cursor.allowed().count
            except Exception as exc:  # one request's mask must not take the engine (and every request) down
                outputs.append(self._fail(seq, self._json_failure(seq, exc)))
                sampled[i] = None
                continue
            if not advanced:
                outputs.append(self._fail(seq, f"internal error: JSON mode sampled token {token}, which cannot "
                                               f"follow its output so far (at {describe_state(cursor.state)})"))
                sampled[i] = None
            elif cursor.done:  # the object closed: stop, also where max_tokens or max_model_len ended it there
                if seq.status is Status.RUNNING:
                    self.scheduler.finish(seq, FINISH_STOP)
                elif seq.finish_reason == FINISH_LENGTH:
                    seq.finish_reason = FINISH_STOP
            elif stuck:
                outputs.append(self._fail(seq, f"JSON mode: no token of this tokenizer continues the output at "
                                               f"{describe_state(cursor.state)}"))
                sampled[i] = None

    def _keep_prompt_logprobs(self, batch: ScheduledBatch, logprobs: LogprobRows, outputs) -> None:
        """Give each sequence its prompt logprobs from this step (those its chunk computed, as the model runner
        picked them: Sequence.prompt_logprob_positions), before postprocess advances num_computed_tokens. A sequence
        with a row of NaN (its logits were not finite there) fails, as it would at a sampled row."""
        taken = 0
        starts = batch.starts  # a batch scheduled ahead: where each row started when it was launched (an abort
        # since then reset num_computed_tokens to 0, and the rows the step computed must still be counted)
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens, strict=True)):
            if seq.prompt_logprobs is not None:
                start = seq.num_computed_tokens if starts is None else starts[i]
                k = len(seq.prompt_logprob_positions(start, start + n))
                if k and seq.status is Status.RUNNING:  # not aborted while the step was in flight
                    kept = logprobs.take(taken, taken + k, seq.params.prompt_logprobs)
                    if kept.values.isnan().any():
                        outputs.append(self._fail(seq, NON_FINITE))
                    else:
                        seq.prompt_logprobs.append(kept)
                        seq.num_prompt_logprobs += k
                taken += k
        if taken != len(logprobs.rows):
            raise RuntimeError(f"a step returned {len(logprobs.rows)} prompt logprobs for {taken} prompt positions")

    @staticmethod
    def _attach_logprobs(batch: ScheduledBatch, sampled: list[int | None], logprobs: list[TokenLogprobs | None],
                         outputs: list[StepOutput]) -> None:
        """Give each output (one per sequence with a token, in batch order) its row's logprobs, if it asked."""
        row, k = -1, 0  # the sampled row, the output
        for take, token in zip(batch.sample, sampled, strict=True):
            row += take
            if token is not None:
                if logprobs[row] is not None:
                    outputs[k].logprobs = [logprobs[row]]
                k += 1

    def _sampling_row(self, seq: Sequence, ahead: bool = False, masked: bool = True) -> SamplingRow:
        """ahead: for a batch scheduled ahead, whose sequences will have one more output token by then; masked=False:
        no JSON-mode mask (a row whose mask could not be computed, its request failed before its token is read)."""
        p = seq.params
        banned: tuple[int, ...] = ()
        if p.min_tokens and len(seq.token_ids) - seq.num_prompt_tokens + ahead < p.min_tokens:
            banned = tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(self.eos_token_ids))
        slot = self.runner.sampler.penalties.slot(seq) if p.penalized else -1
        cursor = self.cursors.get(seq.request_id) if p.response_format is not None and masked else None
        return SamplingRow(p, self.generators.get(seq.request_id), banned, slot,
                           self.biases.get(seq.request_id) if p.logit_bias else None,
                           cursor.allowed() if cursor is not None else None)

    @staticmethod
    def _json_failure(seq: Sequence, exc: Exception) -> str:
        """The error of a request whose JSON-mode mask failed (call it in the except block: it logs the traceback)."""
        if isinstance(exc, MaskBudgetError):  # the request's own doing, not the engine's: no traceback
            log.warning("request %s failed: %s", seq.request_id, exc)
            return str(exc)
        log.exception("JSON mode failed for request %s", seq.request_id)
        return f"JSON mode failed: {type(exc).__name__}: {exc}"

    def _fail(self, seq: Sequence, message: str) -> StepOutput:
        if seq.status is not Status.FINISHED:
            self.scheduler.finish(seq, FINISH_ERROR)
        self._forget(seq)
        out = self._output(seq, [])
        out.error = message
        return out

    def _forget(self, seq: Sequence) -> None:
        self.seqs.pop(seq.request_id, None)
        self.generators.pop(seq.request_id, None)
        self.biases.pop(seq.request_id, None)
        cursor = self.cursors.pop(seq.request_id, None)
        if cursor is not None and seq.params.json_schema is not None:
            self.json_masks.release(cursor.top)
        if seq.params.penalized:
            self.runner.sampler.penalties.release(seq.request_id)

    @staticmethod
    def _output(seq: Sequence, tokens: list[int]) -> StepOutput:
        return StepOutput(
            seq.request_id, tokens, seq.finish_reason, seq.num_prompt_tokens, seq.num_cached_tokens
        )

    # ---- introspection and lifetime ------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.block_manager
        return {
            "num_blocks": bm.num_blocks,
            "num_free_blocks": bm.num_free_blocks,
            "num_cached_blocks": bm.num_cached_blocks,
            "num_used_blocks": bm.num_blocks - bm.num_free_blocks,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "prefix_cache_queries": bm.prefix_queries,
            "prefix_cache_hits": bm.prefix_hits,
            "num_preemptions": self.scheduler.num_preemptions,
            # JSON mode's token masks: looked up in the cache, computed (and the time that took)
            "json_mask_hits": self.json_masks.hits if self.json_masks is not None else 0,
            "json_mask_misses": self.json_masks.misses if self.json_masks is not None else 0,
            "json_mask_compute_seconds": self.json_masks.compute_s if self.json_masks is not None else 0.0,
        }

    def close(self) -> None:
        """Release the model, the KV cache and any tensor-parallel workers."""
        for request_id in list(self.seqs):
            self.abort_request(request_id)
        self._pending.clear()
        self._pending_ids.clear()
        self._inflight = None
        if self.workers is not None:
            self.workers.close()
            self.workers = None
        self.runner = None  # type: ignore[assignment]
        self._dead = self._dead or "the engine was closed (close()): make a new one"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LLM(LLMEngine):
    """Offline generation over the step API."""

    _ids = itertools.count()

    def generate(
        self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[dict]:
        """Generate for each prompt (token ids or text); returns generated tokens and text, in input order.

        Each result: request_id, token_ids, text, finish_reason, num_cached_tokens, logprobs (a TokenLogprobs
        per token where the request's SamplingParams.logprobs is set, else None) and prompt_logprobs (one per prompt
        token after the first where SamplingParams.prompt_logprobs is set, else None)."""
        if hasattr(prompts, "tolist"):  # a numpy array or torch tensor of ids: one prompt, or a batch of rows
            one = getattr(prompts, "ndim", None) == 1
            prompts = prompts.tolist()
            if one and not prompts:  # an empty 1-D array is one empty prompt (refused), not a batch of none
                prompts = [prompts]
        if isinstance(prompts, str) or (isinstance(prompts, list | tuple) and prompts
                                        and isinstance(prompts[0], numbers.Integral)):
            prompts = [prompts]
        if not isinstance(prompts, list | tuple):
            raise TypeError("prompts must be a text, a list of token ids, or a list of those (texts, lists, arrays "
                            f"or tensors of ids), got {type(prompts).__name__}")
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if not isinstance(params, list | tuple):
            raise TypeError("sampling_params must be a SamplingParams or a list of them, one per prompt, got "
                            f"{_what(params)}")
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        ids = [self._fresh_id() for _ in prompts]
        results: dict[str, dict] = {}
        foreign: list[StepOutput] = []  # outputs of requests added with add_request(): kept for step()
        try:
            for rid, prompt, p in zip(ids, prompts, params, strict=True):
                self.add_request(rid, self._encode(prompt), p)
                results[rid] = {"request_id": rid, "token_ids": [], "finish_reason": None,
                                "logprobs": [] if p.logprobs is not None else None,
                                "prompt_logprobs": [] if p.prompt_logprobs is not None else None}
            # A set, not a scan of the results each step: the scan passed every finished one (0.56 ms a step late in
            # a generate() of 10,000 prompts, ten times that at 100,000; a step's own bookkeeping at 256 rows: 0.4 ms).
            unfinished = set(ids)
            while unfinished:
                try:
                    step = self.step()
                except EngineStepError as exc:  # other requests' failures in it are theirs to read from step()
                    foreign += [o for o in exc.outputs if o.request_id not in results]
                    raise EngineStepError(str(exc), [o for o in exc.outputs if o.request_id in results]) from exc
                failed = None
                for out in step:  # the whole step, even past a failure: the others' outputs must not be lost
                    res = results.get(out.request_id)
                    if res is None:
                        foreign.append(out)
                        continue
                    res["token_ids"].extend(out.new_token_ids)
                    if out.logprobs:
                        res["logprobs"].extend(out.logprobs)
                    if out.prompt_logprobs:
                        res["prompt_logprobs"].extend(out.prompt_logprobs)
                    if out.finished:
                        unfinished.discard(out.request_id)
                        res["finish_reason"] = out.finish_reason
                        res["num_cached_tokens"] = out.num_cached_tokens
                        if out.error and failed is None:
                            failed = out
                if failed is not None:
                    raise RuntimeError(f"request {failed.request_id} failed: {failed.error}")
        finally:
            for rid in results:  # only those it added: a colliding id refused by add_request is the caller's
                if rid in self.seqs:
                    self.abort_request(rid)
            self._pending = foreign + [o for o in self._pending if o.request_id not in results]
            self._pending_ids = {o.request_id for o in self._pending}
        for rid in ids:
            res = results[rid]
            res["text"] = (
                self.tokenizer.decode(res["token_ids"], skip_special_tokens=True) if self.tokenizer else ""
            )
        return [results[r] for r in ids]

    def _fresh_id(self) -> str:
        """A request id for generate() that no live request (one a caller added) holds."""
        while True:
            rid = f"generate-{next(self._ids)}"
            if rid not in self.seqs and rid not in self._pending_ids:
                return rid

    def _encode(self, prompt):
        """Token ids of a text prompt with the tokenizer's special tokens (Llama's BOS), as tokenizer(text) gives
        them and as the tokenizer service sends a prompt; token-id prompts as they are (add_request checks them:
        bytes, for one, are not token ids)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need tokenizer files in the model directory; pass token ids")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as exc:  # the tokenizer's own error is a TypeError naming its input types
                raise ValueError(f"the text prompt is not valid Unicode text: character {exc.start} "
                                 f"({prompt[exc.start]!r}) is a lone surrogate; give whole characters (text read "
                                 "as bytes with errors='surrogateescape' holds them: decode it as UTF-8 instead)"
                                 ) from None
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            if not ids:  # add_request would name prompt_token_ids, which the caller did not pass
                what = "a non-empty prompt" if not prompt else "text the tokenizer keeps"
                raise ValueError(f"the text prompt {prompt[:80]!r} encodes to no tokens: give {what}")
            return ids
        return prompt
