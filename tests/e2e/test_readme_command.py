"""The README's run command, `python -m scripts.demo`, works end to end with no model given."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.e2e.conftest import ROOT


@pytest.mark.timeout(300)
def test_readme_run_command(demo_model):
    proc = subprocess.run([sys.executable, "-m", "scripts.demo", "--max-tokens", "16"], cwd=ROOT,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "both services SERVING" in proc.stderr and "both services stopped cleanly" in proc.stderr
    assert re.search(r"completion_tokens=\d+", proc.stderr)
    assert proc.stdout.strip(), "no completion text was streamed"
    for pid in map(int, re.findall(r"pid (\d+)", proc.stderr)):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # the services are gone
