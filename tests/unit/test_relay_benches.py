"""scripts/output_path_bench.py and scripts/text_relay_bench.py run end to end for about a second each and report
figures that add up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_bench(name: str, args: list[str], out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", f"scripts.{name}", *args, "--json", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["command"].startswith(f"python -m scripts.{name} ")
    assert "median" in proc.stdout  # the table
    return report


def test_output_path_bench(tmp_path):
    report = run_bench("output_path_bench", ["--requests", "8", "--calls", "separate", "--logprobs", "2",
                                             "--step-ms", "5", "--seconds", "0.6", "--rounds", "2", "--warmup",
                                             "0.2"], tmp_path / "out.json")
    assert report["running"] == 8
    assert report["config"]["gil_switch_interval_ms"] == pytest.approx(0.5)  # serve() applied the service's default
    for r in report["rounds"]:
        # The virtual GPU runs a step per 5 ms at most (give or take a step at each edge of the window).
        assert 0 < r["steps"] <= r["seconds"] * 200 + 2
        assert 0 <= r["gpu_idle"] <= 1
        assert 0 <= r["late_p50_ms"] <= r["late_p99_ms"]
        assert r["aio_us_per_update"] > 0 and r["aio_cores"] > 0 and r["engine_cores"] > 0
        assert r["updates_per_s"] > 0 and r["received_updates_per_s"] > 0
    totals = report["totals"]
    # Separate calls: one update a message; the client read no more than the engine made.
    assert 0 < totals["client_messages"] == totals["client_updates"] <= totals["client_tokens"]
    assert totals["client_tokens"] <= totals["engine_tokens"]


def test_text_relay_bench(tmp_path, demo_model_dir):
    report = run_bench("text_relay_bench", ["--model", str(demo_model_dir), "--requests", "8", "--mode", "multi",
                                            "--max-tokens", "10", "--logprobs", "2", "--stop", "--seconds", "0.8",
                                            "--rounds", "2", "--warmup", "0.3"], tmp_path / "out.json")
    for r in report["rounds"]:
        assert r["tokens"] > 0 and 0 < r["messages_per_s"] <= r["tokens_per_s"]
        assert r["tokenizer_us_per_token"] > 0
        assert 0 < r["engine_steps_per_s"] <= 1000 / 5 + 2 / r["seconds"]
    totals = report["totals"]
    # Every finished request brought a token at least; the client read no more tokens than the engine sent.
    assert 0 < totals["client_finished"] <= totals["client_tokens"] <= totals["engine_tokens"]
    assert totals["client_messages"] <= totals["client_tokens"]
