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
