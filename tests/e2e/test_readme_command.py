"""The README's run command, `bash scripts/run_demo.sh`, works end to end with no model given.

It runs the script itself: the install step (a no-op once the test extra is installed: it covers the base
install), then the demo, which builds the demo model when absent, starts both services, streams a chat
completion and stops them.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.e2e.conftest import ROOT


@pytest.mark.timeout(300)
def test_readme_run_command():
    proc = subprocess.run(["bash", "scripts/run_demo.sh", "--max-tokens", "16"], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "both services SERVING" in proc.stderr and "both services stopped cleanly" in proc.stderr
    assert re.search(r"completion_tokens=\d+", proc.stderr)
    assert proc.stdout.strip(), "no completion text was streamed"
    for pid in map(int, re.findall(r"pid (\d+)", proc.stderr)):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the services are gone


def test_demo_failure_is_a_message_not_a_traceback(tmp_path):
    """A model the engine cannot load: the demo printed its own RuntimeError traceback around the engine's;
    now it says which service stopped, where its log is, and the log's end (the engine's one ERROR line)."""
    import sys

    proc = subprocess.run([sys.executable, "-m", "scripts.demo", "--model", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert proc.returncode == 1, proc.stderr
    assert "exited with 1 during start-up" in proc.stderr and "cannot serve" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
