"""The demo checkpoint: deterministic, idempotent, and a real model transformers can load and run."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from scripts.demo_model import MARKER_NAME, build_demo_model, is_complete


def _hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_building_twice_gives_identical_files(demo_model_dir: Path, tmp_path: Path) -> None:
    again = build_demo_model(tmp_path / "again")
    first, second = _hashes(demo_model_dir), _hashes(again)
    assert first == second
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", MARKER_NAME):
        assert name in first
    # Readable by the services' own user (uid 10001 in the images): safetensors alone writes its file 0600.
    assert {p.name: oct(p.stat().st_mode & 0o444) for p in again.iterdir()} == dict.fromkeys(second, oct(0o444))


def test_complete_directory_is_returned_without_rebuilding(demo_model_dir: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in demo_model_dir.iterdir()}
    start = time.perf_counter()
    assert build_demo_model(demo_model_dir) == demo_model_dir
    assert time.perf_counter() - start < 1.0
    assert {p.name: p.stat().st_mtime_ns for p in demo_model_dir.iterdir()} == before


def test_a_complete_build_with_private_weights_is_made_readable(tmp_path: Path) -> None:
    """Demo models built before the weights were made readable kept them 0600: unreadable to uid 10001."""
    target = build_demo_model(tmp_path / "m")
    weights = target / "model.safetensors"
    weights.chmod(0o600)
    assert build_demo_model(target) == target and is_complete(target)
    assert weights.stat().st_mode & 0o777 == 0o644


def test_damaged_directory_is_rebuilt(demo_model_dir: Path, tmp_path: Path) -> None:
    target = build_demo_model(tmp_path / "m")
    (target / "tokenizer.json").write_text("{}")
    assert not is_complete(target)
    build_demo_model(target)
    assert is_complete(target)
    assert _hashes(target) == _hashes(demo_model_dir)


def test_foreign_directory_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not a demo model"):
        build_demo_model(tmp_path, force=True)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_config_tokenizer_and_generation_config_agree(demo_model_dir: Path, demo_tokenizer) -> None:
    config = json.loads((demo_model_dir / "config.json").read_text())
    gen = json.loads((demo_model_dir / "generation_config.json").read_text())
    assert config["vocab_size"] == len(demo_tokenizer)
    assert 2000 <= config["vocab_size"] <= 4000
    assert config["tie_word_embeddings"] is True
    assert config["max_position_embeddings"] == 2048
    special = {
        t: demo_tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    }
    assert sorted(gen["eos_token_id"]) == sorted([special["<|im_end|>"], special["<|endoftext|>"]])
    assert demo_tokenizer.eos_token == "<|im_end|>"
    # Special tokens are single tokens, never split by BPE.
    for token, token_id in special.items():
        assert demo_tokenizer.encode(token, add_special_tokens=False) == [token_id]


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world!",
        "今天天气很好 🌈",
        "👨‍👩‍👧‍👦 and 🇯🇵 flags",
        "unseen: 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ℵ ∑ 🦖 🪐",
        "tabs\tand\nnewlines  ",
    ],
)
def test_tokenizer_round_trips_any_text(demo_tokenizer, text: str) -> None:
    ids = demo_tokenizer.encode(text, add_special_tokens=False)
    assert demo_tokenizer.decode(ids) == text


def test_tokenizer_is_trained_not_bytes_only(demo_tokenizer) -> None:
    text = "The lighthouse keeper woke before the gulls"
    assert len(demo_tokenizer.encode(text, add_special_tokens=False)) < len(text) / 3


def test_transformers_loads_and_generates(demo_model_dir: Path, demo_tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir)
    assert model.dtype == torch.float32
    prompt = demo_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([demo_tokenizer.encode(prompt, add_special_tokens=False)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new = out[0, ids.shape[1] :]
    assert new.shape == (8,)
    assert int(new.max()) < len(demo_tokenizer)
    # Greedy decoding is deterministic, and matches an argmax over a plain forward pass.
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    assert int(new[0]) == first
    assert torch.equal(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False), out)


def test_weights_the_engine_may_not_read_are_said_so(demo_model_dir: Path, monkeypatch) -> None:
    """A volume filled as root with private weight files failed with "No such file or directory ... is the file
    complete (a partial copy or download)?": safetensors reports EACCES so. Root reads any file, so the test
    denies the read where the loader makes it."""
    from engine_service import LLM
    from engine_service.model import loader

    def denied(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(loader, "open", denied, raising=False)
    with pytest.raises(ValueError, match=r"model\.safetensors is not readable by this process .*uid 10001"):
        LLM(str(demo_model_dir), device="cpu", dtype="float32", attention_backend="torch", enforce_eager=True)


@pytest.mark.parametrize(("max_tokens", "needle"), [
    ("99999999999", "--max-tokens: sampling parameter max_tokens=99999999999: out of the range the protocol carries"),
    ("0", "--max-tokens must be at least 1, got 0"),
])
def test_the_demo_refuses_a_max_tokens_it_cannot_send_before_starting_anything(max_tokens, needle, capsys,
                                                                              monkeypatch) -> None:
    """The client refused it only once both services were up, and the demo ended in a traceback."""
    from scripts import demo

    monkeypatch.setattr(demo.subprocess, "Popen", lambda *a, **k: pytest.fail("a service was started"))
    with pytest.raises(SystemExit) as exited:
        demo.main(["--max-tokens", max_tokens])
    assert exited.value.code == 2 and needle in capsys.readouterr().err
