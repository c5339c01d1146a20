"""scripts/gpu_check.sh's orchestration (order, time limits, the pinned tile, status and exit code), run on
the CPU with every Python part replaced by a stub that records how it was called. The parts themselves are
tested elsewhere (test_cuda_graph_helpers.py runs part g's flow at toy sizes); this is the shell around them,
which a GPU session would otherwise be the first to run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

STUB = """#!/usr/bin/env bash
echo "$* |tile=${LLMSERVE_DECODE_TILE:-}|${LLMSERVE_PREFILL_TILE:-}" >> "$STUB_LOG"
case "$*" in
  *"import grpc_health"*) [ -n "${STUB_IMPORT_ERROR:-}" ] && { echo "$STUB_IMPORT_ERROR" >&2; exit 1; }
                          exec "$REAL_PYTHON" "$@" ;;
  "-c "*) exec "$REAL_PYTHON" "$@" ;;
  *"gpu_check.py summary"*) exec "$REAL_PYTHON" "$@" ;;
  *"gpu_check.py graphs"*) args="$*"; out=${args##*--out }; out=${out%% *}
                          [ -n "${STUB_GRAPHS:-}" ] && printf '%s' "$STUB_GRAPHS" > "$out/graphs.json"
                          echo "(d) engine, workload A (stub)"; exit "${STUB_G_RC:-0}" ;;
esac
exit 0
"""


WORKLOAD_A_MEASURED = '{"workload_A": {"tok_s": 30000.0}}'


def _run(tmp_path: Path, budget: int, g_rc: int = 0, graphs: str = WORKLOAD_A_MEASURED,
         parts: tuple[str, ...] = (), **stub_env: str) -> tuple[int, str, list[str], Path]:
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out = tmp_path / "out"
    log = tmp_path / "calls.log"
    env = {
        **os.environ,
        "PYTHON": str(stub),
        "REAL_PYTHON": sys.executable,
        "STUB_LOG": str(log),
        "STUB_G_RC": str(g_rc),
        "STUB_GRAPHS": graphs,
        "OUT": str(out),
        "GPU_CHECK_BUDGET_S": str(budget),
        "GPU_CHECK_CACHE": str(tmp_path / "cache"),
        **stub_env,
    }
    env.pop("LLMSERVE_DECODE_TILE", None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *parts], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr, log.read_text().splitlines() if log.exists() else [], out


def _part(calls: list[str], needle: str) -> str:
    found = [c for c in calls if needle in c]
    assert len(found) == 1, (needle, calls)
    return found[0]


def _assert_summary_last(calls: list[str]) -> None:
    """The table is built after the last part (and, with $OUT, after each stage too)."""
    last_part = max(i for i, c in enumerate(calls) if "gpu_check.py summary" not in c)
    assert "--peers hf-continuous" in calls[last_part] and len(calls) > last_part + 1, calls
    assert all("gpu_check.py summary" in c for c in calls[last_part + 1 :]), calls


def _limits(output: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"^\[gpu_check\] (\w+): .* \(limit (\d+)s\)$", output, re.M)}


def test_every_part_runs_in_order_with_its_limit_and_only_the_gpu_tests_pin_the_tile(tmp_path):
    rc, output, calls, out = _run(tmp_path, budget=460)  # the default
    assert rc == 0, output
    order = [next(i for i, c in enumerate(calls) if needle in c) for needle in (
        "gpu_check.py env", "gpu_check.py graphs", "gpu_check.py second", "--peers hf-static",
        "--peers hf-continuous")]
    assert order == sorted(order), calls
    _assert_summary_last(calls)
    a = _part(calls, "-m pytest tests/gpu")
    assert a.endswith("|tile=64,2,4,0|64,64,2,4")
    # The tiles the tests pin must be ones the engine can run: the default decode and prefill tiles.
    from engine_service.attention import triton_kernels as tk

    decode, prefill = a.rsplit("=", 1)[1].split("|")
    assert tk.parse_tile(decode) == tk.DECODE_TILES[0] and tk.parse_prefill_tile(prefill) == tk.PREFILL_TILES[0]
    others = [c for c in calls if "-m pytest tests/gpu" not in c]
    assert others and all(c.endswith("|tile=|") for c in others), others
    # The engine's figures come from one process; transformers' static batching runs without the engine.
    assert "--no-engine" in _part(calls, "--peers hf-static")
    assert "--num-seqs 64" in _part(calls, "--peers hf-continuous")
    assert "--peer-timeout 60" in _part(calls, "--peers hf-continuous")
    assert _limits(output) == {"a": 240, "b": 200, "preset": 100, "g": 240, "p": 240, "d": 330, "e": 100}
    status = [line.split("\t")[:2] for line in (out / "status.tsv").read_text().splitlines()]
    assert sorted(status) == sorted([[p, "PASS"] for p in ("env", "a", "b", "preset", "g", "p", "d", "e")])
    assert (out / "performance.md").exists()


def test_the_served_run_runs_only_when_named(tmp_path):
    """Part s (workload A through both services) takes minutes of a lease: it is not among the default parts (the
    test above), and named alone it runs after the preset with up to 300 s."""
    rc, output, calls, out = _run(tmp_path, budget=460, parts=("s",))
    assert rc == 0, output
    served = _part(calls, "gpu_check.py served")
    assert "--cache-dir" in served and calls.index(served) > calls.index(_part(calls, "gpu_check.py preset"))
    assert _limits(output)["s"] == 300
    status = dict(line.split("\t")[:2] for line in (out / "status.tsv").read_text().splitlines())
    assert status.get("s") == "PASS" and "g" not in status and "d" not in status


def test_the_served_run_without_the_services_packages_is_refused_before_anything_runs(tmp_path):
    """The GPU machine's image has no grpcio-health-checking or grpcio-reflection, which both services import:
    part s failed at its first import, after env and the preset had run. Named without them importable, the check
    now stops before any part, naming the import error and scripts/gpu_wheels.sh."""
    error = "ModuleNotFoundError: No module named 'grpc_health'"
    rc, output, calls, out = _run(tmp_path, budget=460, parts=("a", "s"), STUB_IMPORT_ERROR=error)
    assert rc == 2, output
    assert error in output and "scripts/gpu_wheels.sh" in output and "carry" in output
    assert not [c for c in calls if "gpu_check.py" in c or "pytest" in c or "bench" in c], calls  # not even env
    # Importable (the wheels carried, or the packages installed): the same call runs.
    rc, output, calls, out = _run(tmp_path, budget=460, parts=("s",))
    assert rc == 0 and _part(calls, "gpu_check.py served"), output


def test_outputs_come_back_as_few_files_with_every_log_in_the_archive(tmp_path):
    """The device tool brings back at most 8 files from $OUT: the 14 outputs (a log per part, JSON, the table)
    written there flat lost the engine's figures. $OUT gets the main ones loose and all of them in one archive."""
    import tarfile

    rc, output, calls, out = _run(tmp_path, budget=300, graphs='{"workload_A": {"tok_s": 30000.0}}')
    assert rc == 0, output
    work = Path(re.search(r"--out (\S+)", _part(calls, "gpu_check.py graphs"))[1])
    assert work != out and not work.exists()  # the work folder is gone; $OUT holds what matters
    back = sorted(p.name for p in out.iterdir())
    # env.json is the real env part's; the stub writes none.
    assert back == ["gpu_check.tgz", "graphs.json", "performance.md", "status.tsv", "summary.txt"], back
    with tarfile.open(out / "gpu_check.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
    logs = {f"{p}.log" for p in ("env", "a", "b", "preset", "g", "p", "d", "e")}
    assert logs | {"status.tsv", "summary.txt"} <= names
    assert (out / "summary.txt").read_text() in output
    assert "  g| (d) engine, workload A (stub)" in output  # the headline printed as soon as g ends


def test_a_run_killed_during_the_engine_part_still_returns_its_figures(tmp_path):
    """Outputs reached $OUT only between stages: a run killed from outside during part g (the longest, with workload
    A's figure) returned neither g's figures nor a table. A background publisher now refreshes $OUT while it runs."""
    import signal
    import time

    stub = tmp_path / "python"
    stub.write_text(STUB.replace('exit "${STUB_G_RC:-0}" ;;', 'sleep 30; exit 0 ;;'))
    stub.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(stub), "REAL_PYTHON": sys.executable, "STUB_LOG": str(tmp_path / "calls.log"),
           "STUB_GRAPHS": '{"workload_A": {"tok_s": 31000.0}}', "OUT": str(out), "GPU_CHECK_PUBLISH_S": "1",
           "GPU_CHECK_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (out / "graphs.json").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # a publish after g's figures were written, with the table as it stands
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the device tool's limit: nothing gets to clean up
        proc.wait()
    assert "31000" in (out / "graphs.json").read_text()
    assert "(d) workload A" in (out / "summary.txt").read_text()
    status = dict(line.split("\t")[:2] for line in (out / "status.tsv").read_text().splitlines())
    assert status["env"] == "PASS" and "g" not in status  # g had not ended


def test_an_exhausted_budget_still_runs_the_acceptance_parts_at_their_floors(tmp_path):
    rc, output, calls, out = _run(tmp_path, budget=0)
    assert rc == 1, output  # the parts skipped for want of time count as not passed
    assert not any("-m pytest tests/gpu" in c or "gpu_kernel_check" in c for c in calls)
    assert _limits(output) == {"g": 100, "d": 240, "e": 70}
    assert "--peer-timeout 30" in _part(calls, "--peers hf-continuous")
    status = dict(line.split("\t")[:2] for line in (out / "status.tsv").read_text().splitlines())
    assert status["a"] == status["b"] == status["preset"] == "SKIPPED"
    assert status["p"] == "SKIPPED"  # not an acceptance part: no floor past the budget
    assert status["g"] == status["d"] == status["e"] == "PASS"


def test_a_failing_part_fails_the_check_and_the_rest_still_run(tmp_path):
    rc, output, calls, out = _run(tmp_path, budget=300, g_rc=1)
    assert rc == 1
    status = dict(line.split("\t")[:2] for line in (out / "status.tsv").read_text().splitlines())
    assert status["g"] == "FAIL" and status["d"] == status["e"] == "PASS"
    _assert_summary_last(calls)


def test_no_workload_a_from_the_engine_skips_the_peers(tmp_path):
    """Fail fast: when part g measured no workload A (the engine did not start, say), a second engine (part p)
    would fail alike and transformers' runs have nothing to stand beside and would spend some four minutes of a 15-minute device lease; they are skipped and
    the check fails. GPU_CHECK_KEEP_GOING=1 runs them anyway."""
    for graphs in ('{"workload_A": {"error": "RuntimeError: no"}}', ""):
        (tmp_path / "x").mkdir()
        rc, output, calls, out = _run(tmp_path / "x", budget=300, g_rc=1, graphs=graphs)
        assert rc == 1, output
        assert not any("--peers" in c or "gpu_check.py second" in c for c in calls), calls
        status = dict(line.split("\t")[:2] for line in (out / "status.tsv").read_text().splitlines())
        assert status["g"] == "FAIL" and status["p"] == status["d"] == status["e"] == "SKIPPED", status
        assert "p, d and e skipped" in output
        import shutil

        shutil.rmtree(tmp_path / "x")


def test_workload_a_under_the_target_fails_the_check(tmp_path):
    """Every part exiting 0 is not enough: workload A under 28,000 tok/s is an acceptance miss, so row d says
    MISSED and the script exits non-zero; at the target it passes."""
    for case in ("under", "over"):
        (tmp_path / case).mkdir()
    rc, output, _, _ = _run(tmp_path / "under", budget=300, graphs='{"workload_A": {"tok_s": 20000.0}}')
    assert rc == 1, output
    assert re.search(r"^\(d\) workload A vs hf static +MISSED ", output, re.M), output
    rc, output, _, _ = _run(tmp_path / "over", budget=300, graphs='{"workload_A": {"tok_s": 30000.0}}')
    assert rc == 0, output
    assert re.search(r"^\(d\) workload A vs hf static +PASS ", output, re.M), output


def test_part_d_in_a_call_of_its_own_keeps_its_status_and_says_where_the_engine_figure_is(tmp_path):
    """The two-call split (docs/GPU.md: a b g p, then d): the second call has no part g, so no graphs.json. Row d
    read FAIL ('engine ? tok/s') though d passed, inviting a pointless rerun of the scarce device time."""
    (tmp_path / "status.tsv").write_text("env\tPASS\t10\t0\npreset\tPASS\t5\t0\nd\tPASS\t200\t0\n")
    (tmp_path / "d_bench_A.json").write_text('{"peers": {"hf_static": {"tok_s": 658.0}}}')
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "summary", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("(d)"))
    assert re.match(r"\(d\) workload A vs hf static +PASS ", row), row
    assert "658 tok/s" in row and "the call that ran part g" in row, row


WHEEL_STUB = """#!/usr/bin/env bash
if [ "$1 $2 $3" = "-m pip download" ]; then
  echo "$*" >> "$STUB_LOG"
  dest=""; prev=""
  for arg in "$@"; do [ "$prev" = "--dest" ] && dest=$arg; prev=$arg; done
  for arg in "$@"; do
    case $arg in
      *==*) name=${arg%%==*}; module=${name#grpcio-}; module=grpc_${module%-checking}
            "$REAL_PYTHON" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1], 'w').writestr(sys.argv[2], '')" \\
              "$dest/${name//-/_}-${arg##*==}-py3-none-any.whl" "$module/__init__.py" ;;
    esac
  done
  exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def test_gpu_wheels_fetches_the_pinned_versions_and_unpacks_them_where_gpu_check_looks(tmp_path):
    """scripts/gpu_wheels.sh asks pip for the versions pyproject.toml pins (grpcio's generated code needs the same
    version on both sides), with no dependencies and wheels only, and unpacks them into .whl/site, the folder
    gpu_check.sh puts on PYTHONPATH; run again, it starts from an empty .whl."""
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "gpu_wheels.sh"
    script.write_text((REPO / "scripts" / "gpu_wheels.sh").read_text())
    pyproject = (REPO / "pyproject.toml").read_text()
    (tmp_path / "pyproject.toml").write_text(pyproject)
    stub, log = tmp_path / "python", tmp_path / "pip.log"
    stub.write_text(WHEEL_STUB)
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "REAL_PYTHON": sys.executable, "STUB_LOG": str(log)}
    (tmp_path / ".whl" / "site" / "stale").mkdir(parents=True)
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    asked = log.read_text().split()
    pins = sorted(re.findall(r'"(grpcio-(?:health-checking|reflection)==[^"]+)"', pyproject))
    assert len(pins) == 2 and sorted(a for a in asked if "==" in a) == pins, asked
    assert "--no-deps" in asked and "--only-binary=:all:" in asked
    site = tmp_path / ".whl" / "site"
    assert sorted(p.name for p in site.iterdir()) == ["grpc_health", "grpc_reflection"]
    # A pyproject without an exact pin is refused, naming the package, before anything is downloaded.
    (tmp_path / "pyproject.toml").write_text(pyproject.replace('"grpcio-reflection==', '"grpcio-reflection>='))
    log.unlink()
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "grpcio-reflection" in run.stderr and not log.exists(), run.stderr
