"""The services' performance knobs: the engine's torch thread default and the detokenizer's fast decoder."""

from __future__ import annotations

import pytest

from engine_service.server import torch_threads
from engine_service.server_config import parse_config


@pytest.mark.parametrize(
    ("flags", "cuda", "cores", "default", "expected"),
    [
        ([], False, 2, 2, 1),  # small CPU machine: one thread, the gRPC threads and the tokenizer get the rest
        ([], False, 32, 32, None),  # big CPU machine: torch's own choice
        ([], False, 8, 32, 8),  # an 8-CPU quota on a 32-core node: no more threads than the quota runs
        (["--device", "cpu"], True, 2, 2, 1),
        ([], True, 2, 2, None),  # auto on a GPU machine
        ([], True, 6, 64, 6),
        (["--torch-threads", "2"], False, 1, 1, 2),  # the flag wins (at most the machine's CPUs: CI has two)
    ],
)
def test_torch_threads_default_and_flag(flags, cuda, cores, default, expected):
    config = parse_config(["--model", "m", *flags], env={})
    assert torch_threads(config, cuda_available=cuda, num_cores=cores, torch_default=default) == expected


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),  # cgroup v2, limits.cpu: "2"
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: two threads
        ({"cpu.max": "50000 100000\n"}, 1),
        ({"cpu.max": "max 100000\n"}, None),  # no quota: the affinity
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_available_cpus_honours_the_cgroup_quota(tmp_path, monkeypatch, files, expected):
    """A pod's CPU limit is a CFS quota that torch's own thread count ignores."""
    import os

    from clients.cpus import available_cpus

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert available_cpus(tmp_path) == (16 if expected is None else expected)


def test_torch_threads_reads_the_environment_and_refuses_negatives():
    assert parse_config(["--model", "m"], env={"ENGINE_TORCH_THREADS": "2"}).torch_threads == 2
    with pytest.raises(ValueError, match="torch_threads"):
        parse_config(["--model", "m", "--torch-threads", "-1"], env={})


def test_torch_threads_past_the_machines_cpus_are_refused_before_start_up():
    """torch.set_num_threads(100000) segfaulted the engine after it had bound its port, with no message (30000:
    only libgomp's "Thread creation failed")."""
    import os

    cpus = os.cpu_count()
    assert parse_config(["--model", "m", "--torch-threads", str(cpus)], env={}).torch_threads == cpus
    with pytest.raises(ValueError, match=rf"torch_threads \(100000\) is more than this machine's {cpus} CPUs"):
        parse_config(["--model", "m"], env={"ENGINE_TORCH_THREADS": "100000"})


def test_fast_decoder_gives_the_same_text_as_transformers():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tokenizer_service.text_stream import TextStream, decoder_of

    vocab = {"<eos>": 0, **{f"w{i}": i for i in range(1, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<eos>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", clean_up_tokenization_spaces=False)
    assert decoder_of(fast) is fast.backend_tokenizer
    ids = [3, 0, 5, 63, 1]
    for skip in (True, False):
        assert decoder_of(fast).decode(ids, skip_special_tokens=skip) == fast.decode(ids, skip_special_tokens=skip)
        stream = TextStream(fast, (), skip, False)
        assert "".join(stream.feed([i]) for i in ids) + stream.finish() == fast.decode(ids, skip_special_tokens=skip)
    fast.clean_up_tokenization_spaces = True  # transformers would post-process: keep its decode
    assert decoder_of(fast) is fast


def test_serving_sets_the_gil_switch_interval():
    """At Python's default switch interval (5 ms, a whole H200 decode step) the engine thread, back from a GPU wait,
    waited that long for the GIL the asyncio thread held while writing outputs. serve() sets the flag's value once
    the engine is SERVING; 0 or less is refused."""
    import sys

    from clients.engine_client import EngineClient
    from tests.fake_engine import FakeEngine
    from tests.unit.test_engine_service_fake import Running, wait_serving

    assert parse_config(["--model", "m"], env={}).gil_switch_interval_ms == 0.5
    for bad in ("0", "nan", "inf"):  # NaN passed a "<= 0" check: Python then switched threads every 9e12 s
        with pytest.raises(ValueError, match="gil_switch_interval_ms must be a positive number"):
            parse_config(["--model", "m", "--gil-switch-interval-ms", bad], env={})
    # Python keeps whole microseconds: these became 0.0, the shortest interval, 1e300 meant as "never" included.
    for bad in ("0.0001", "1e300", "1001"):
        with pytest.raises(ValueError, match=r"gil_switch_interval_ms must be in 0\.001\.\.1000"):
            parse_config(["--model", "m", "--gil-switch-interval-ms", bad], env={})
    assert parse_config(["--model", "m", "--gil-switch-interval-ms", "0.001"], env={}).gil_switch_interval_ms == 0.001
    from tokenizer_service.config import parse_config as parse_text_config

    with pytest.raises(ValueError, match="engine_wait_s must be a positive number"):
        parse_text_config(["--model", "m", "--engines", "e:1", "--engine-wait-s", "nan"], env={})
    before = sys.getswitchinterval()
    running = Running(FakeEngine(), gil_switch_interval_ms=0.7)
    try:
        with EngineClient(running.target, timeout=20) as client:
            wait_serving(client)
        assert sys.getswitchinterval() == pytest.approx(0.0007)
    finally:
        assert running.stop() == 0
        sys.setswitchinterval(before)
