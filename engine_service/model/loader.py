"""Load a Hugging Face safetensors checkpoint (sharded or not) into the model, rank by rank.

Checkpoint names map onto the model's packed parameters (q/k/v -> qkv_proj, gate/up -> gate_up_proj).
A missing or unexpected weight is an error that names it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine_service.model.config import read_json

# checkpoint sub-name -> (packed parameter sub-name, shard)
PACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}
# Buffers some checkpoints carry that the model recomputes (RoPE's frequencies; the cos/sin caches that
# ColossalAI-trained Llama checkpoints save): transformers skips them as unexpected, and so does the engine.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
log = logging.getLogger(__name__)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The index's files (with a warning where a model.safetensors is there too: transformers would read it);
    else model.safetensors alone (as transformers reads a directory: other *.safetensors beside it, such as
    Mistral's consolidated.safetensors, are not the model's); else every *.safetensors."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str)
                                                                         for v in weight_map.values()):
            raise ValueError(f"{index} has no usable weight_map: it should map each tensor name to the name of its "
                             "safetensors file")
        names = sorted(set(weight_map.values()))
        files = [model_dir / n for n in names]
        absent = [n for n in names if not (model_dir / n).is_file()]  # "" or "." name the folder: no shard either
        if absent and single.is_file():
            # save_pretrained of an unsharded model into a directory that held a sharded one deletes the old
            # shards but leaves their index; transformers then reads model.safetensors, as the engine does.
            log.warning("%s lists %s, absent from %s: serving model.safetensors instead (as transformers does); "
                        "delete the stale index", index.name, absent[:5], model_dir)
            return [single]
        if absent:
            raise ValueError(f"{index.name} lists {absent[:5]}, absent from {model_dir}: is the copy or download "
                             "complete?")
        if single.is_file() and single not in files:
            # transformers reads model.safetensors first: a sharded save over an unsharded one leaves it behind
            log.warning("%s holds both model.safetensors and the shards %s lists: serving the shards (transformers "
                        "would read model.safetensors); delete the file that is stale", model_dir, index.name)
        return files
    if single.is_file():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in model_dir.glob("*.bin"))
        if pickles:
            raise ValueError(
                f"{model_dir} holds PyTorch pickle weights ({', '.join(pickles[:3])}), which the engine does not "
                "load (unpickling can run code); convert them to safetensors, e.g. "
                "AutoModelForCausalLM.from_pretrained(d).save_pretrained(d) with transformers"
            )
        raise ValueError(f"no *.safetensors weights in {model_dir}")
    return files


def _target(name: str) -> tuple[str, str | None]:
    """Map a checkpoint tensor name to (model parameter name, shard)."""
    if name.startswith("model."):
        name = name[len("model.") :]
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in PACKED:
            packed, shard = PACKED[part]
            parts[i] = packed
            return ".".join(parts), shard
    return name, None


def check_readable(path: Path) -> None:
    """Refuse a file this process may not read, in those words: safetensors reports it as "No such file or
    directory", which sent people looking for a partial download (a volume filled as root with private files)."""
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        st = path.stat()
        raise ValueError(f"{path} is not readable by this process (uid {os.getuid()}; the file belongs to uid "
                         f"{st.st_uid} with mode {st.st_mode & 0o777:o}): make the model files readable by the "
                         "service's user (uid 10001 in the images), e.g. chmod -R a+rX on the model directory") from None


def load_weights(model: nn.Module, model_dir: str | Path, tie_word_embeddings: bool) -> None:
    """Copy every checkpoint tensor into its parameter; refuse missing and unexpected ones. The parameters'
    weight_loaders are dropped once they are all filled."""
    model_dir = Path(model_dir)
    params = dict(model.named_parameters(remove_duplicate=False))
    expected: set[tuple[str, str | None]] = set()
    for pname in params:
        if tie_word_embeddings and pname == "lm_head.weight":
            continue
        shards = getattr(_owner(model, pname), "shards", None)
        if shards and pname.endswith((".weight", ".bias")) and "proj" in pname:
            expected.update((pname, s) for s, _ in shards)
        else:
            expected.add((pname, None))

    loaded: set[tuple[str, str | None]] = set()
    unexpected: list[str] = []
    tied_head: torch.Tensor | None = None  # a tied model's lm_head.weight in the checkpoint, compared below
    # (parameter, shard) -> the tensor name and file that filled it: a tensor in two files, or under two names
    # (with and without the "model." prefix), would be served from whichever came last, silently
    seen: dict[tuple[str, str | None], tuple[str, Path]] = {}
    for path in checkpoint_files(model_dir):
        check_readable(path)
        try:
            handle = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors' own error types: a truncated or corrupt file
            raise ValueError(f"{path} cannot be read as safetensors ({exc}): is the file complete (a partial "
                             "copy or download)?") from None
        with handle as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                pname, shard = _target(name)
                if (pname, shard) in seen:
                    first, where = seen[pname, shard]
                    if first == name:
                        raise ValueError(f"checkpoint tensor {name} is in both {where.name} and {path.name} in "
                                         f"{model_dir}: remove the file that is not the model's")
                    raise ValueError(f"checkpoint tensors {first} ({where.name}) and {name} ({path.name}) in "
                                     f"{model_dir} are both the model's {pname}: remove the one that is not")
                seen[pname, shard] = (name, path)
                if tie_word_embeddings and pname == "lm_head.weight":
                    tied_head = f.get_tensor(name)  # tied: the embedding is the head
                    continue
                if pname not in params:
                    unexpected.append(name)
                    continue
                param = params[pname]
                tensor = f.get_tensor(name)
                try:
                    with torch.no_grad():
                        param.weight_loader(param, tensor.to(param.dtype), shard)
                except ValueError as exc:  # a tensor the layer cannot take as it is laid out
                    raise ValueError(f"checkpoint tensor {name} {tuple(tensor.shape)}: {exc}") from exc
                except RuntimeError as exc:  # a shape that does not match config.json
                    raise ValueError(
                        f"checkpoint tensor {name} {tuple(tensor.shape)} does not fit parameter {pname} "
                        f"{tuple(param.shape)} as config.json describes it: {exc}"
                    ) from exc
                loaded.add((pname, shard))
    if unexpected:
        raise ValueError(f"unexpected weights in {model_dir}: {sorted(unexpected)[:10]}")
    missing = expected - loaded
    if tied_head is not None and ("embed_tokens.weight", None) in missing:
        # A tied checkpoint that kept the head and dropped the embedding (some exports do): transformers fills the
        # tied pair from the one it finds, so the head is the embedding here too (it was refused as missing).
        embedding = params["embed_tokens.weight"]
        try:
            with torch.no_grad():
                embedding.weight_loader(embedding, tied_head.to(embedding.dtype), None)
        except RuntimeError as exc:
            raise ValueError(f"checkpoint tensor lm_head.weight {tuple(tied_head.shape)}, serving as the tied "
                             f"embedding (the checkpoint has no embed_tokens.weight), does not fit "
                             f"{tuple(embedding.shape)} as config.json describes it: {exc}") from exc
        missing.discard(("embed_tokens.weight", None))
        tied_head = None
    if missing:
        names = sorted(f"{p}[{s}]" if s else p for p, s in missing)
        raise ValueError(f"weights missing from {model_dir}: {names[:10]}")
    if tied_head is not None:
        _check_tied_head(params["embed_tokens.weight"], tied_head)
    for param in params.values():
        # Each is a bound method of its module, a reference cycle through the whole model: the weights (and, under
        # TP, rank 0's process group, its threads and sockets) outlived close() until a cyclic collection, for good
        # after gc.freeze(); on a GPU a new engine could run out of memory beside the old weights.
        vars(param).pop("weight_loader", None)


def _check_tied_head(embedding: nn.Parameter, head: torch.Tensor) -> None:
    """A checkpoint whose config ties the head to the embedding may still carry an lm_head.weight. The engine
    serves the embedding, as vLLM does; transformers 5 serves a differing lm_head.weight instead (untied).
    Where they differ, say so: tokens then differ from transformers'."""
    mine = torch.empty_like(embedding)
    try:
        with torch.no_grad():
            embedding.weight_loader(mine, head.to(embedding.dtype), None)  # this rank's rows, as the embedding's
    except RuntimeError:
        same = False
    else:
        same = torch.equal(mine, embedding.data)
    if not same:
        log.warning("config.json sets tie_word_embeddings=true, but the checkpoint's lm_head.weight differs from "
                    "embed_tokens.weight: the engine serves the embedding as the head (as vLLM does), while "
                    "transformers 5 serves lm_head.weight; set tie_word_embeddings to false in config.json to "
                    "serve the checkpoint's head")


def _owner(model: nn.Module, pname: str) -> nn.Module:
    return model.get_submodule(pname.rsplit(".", 1)[0])
