"""The suite's own isolation under pytest-xdist (scripts/run_tests.sh runs it on two worker processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

_PROBE = '''
import os, tempfile
from pathlib import Path

def test_where(tmp_path):
    Path(os.environ["PROBE_OUT"], os.environ["PYTEST_XDIST_WORKER"]).write_text(
        tempfile.gettempdir() + "\\n" + os.environ["TMPDIR"])
'''


def test_each_xdist_worker_has_a_temp_directory_of_its_own_removed_when_it_exits(tmp_path):
    """Tests that count what engines leave in the temp directory (tensor parallelism's llm-tp-* stores) saw the
    other worker's engines come and go: each worker, and the processes it starts, get a directory of their own."""
    for name in ("test_a.py", "test_b.py"):  # --dist loadfile: one file a worker
        (tmp_path / name).write_text(_PROBE)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PROBE_OUT": str(out), "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("TMPDIR", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                          "-n", "2", "--dist", "loadfile", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    seen = {p.name: p.read_text().split("\n") for p in out.iterdir()}
    assert sorted(seen) == ["gw0", "gw1"], seen
    dirs = {worker: where[0] for worker, where in seen.items()}
    assert dirs["gw0"] != dirs["gw1"]
    for worker, (where, tmpdir_env) in seen.items():
        assert where == tmpdir_env, "child processes would not inherit the worker's directory"
        assert Path(where).name.startswith(f"llmserve-tests-{worker}-"), where
        assert not Path(where).exists(), f"{where} left behind by worker {worker}"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def test_each_xdist_worker_hands_out_ports_of_its_own_band_below_the_ephemeral_range():
    """A port from bind(0) is the kernel's pick from one range both workers share: between one worker's pick and
    its server's bind, the other could be handed the same number, and its server then fails to start."""
    from tests import support

    bands = [set(support.port_band(f"gw{i}")) for i in range(support.PORT_BANDS)]
    assert all(bands), bands
    for i, band in enumerate(bands):
        assert max(band) < _ephemeral_low(), f"gw{i}'s band reaches the kernel's ephemeral range"
        for j in range(i):
            assert not band & bands[j], f"gw{i} and gw{j} share ports"
    assert support.port_band("") == support.port_band("gw0"), "a run without xdist uses the first band"


def test_free_port_takes_ports_in_turn_from_its_band_and_skips_a_held_one(monkeypatch):
    import socket

    from tests import support

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setattr(support, "_next_port", None)
    band = support.port_band()
    first = support.free_port()
    assert first in band
    with socket.socket() as held:  # the port free_port would hand out next, held by someone else
        following = band.start + (first - band.start + 1) % len(band)
        held.bind(("127.0.0.1", following))
        held.listen()
        ports = [support.free_port() for _ in range(20)]
    assert following not in ports
    assert all(p in band for p in ports), ports
    assert len(set(ports + [first])) == 21, "a port handed out twice"


_CRASHING = '''
import os

def test_before():
    pass

def test_ends_its_process():
    os._exit(0)

def test_after():
    pass
'''


def test_a_test_that_ends_its_worker_fails_the_run_at_once_naming_it(tmp_path):
    """A worker's process ended by a test (os._exit in a main() under test) was replaced, and xdist's file scheduler
    then waited forever for the crashed worker's files: a CI run hung until its time limit. run_tests.sh's options
    make it fail at once, naming the test."""
    import re
    import shlex

    line = re.search(r"^SUITE=\((.*)\)$", (ROOT / "scripts" / "run_tests.sh").read_text(), re.M).group(1)
    options = [word.replace("$WORKERS", "2") for word in shlex.split(line)]
    for name in ("test_a.py", "test_b.py"):
        (tmp_path / name).write_text(_CRASHING)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("PYTEST_XDIST_WORKER", None)
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *options, str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout[-3000:] + run.stderr[-3000:]  # failed tests; not 3, an internal error
    assert "crashed while running" in run.stdout and "test_ends_its_process" in run.stdout, run.stdout[-3000:]
    assert not re.search(r"\bgw[2-9]", run.stdout), "a crashed worker was replaced: " + run.stdout[-3000:]
