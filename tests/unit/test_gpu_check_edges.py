"""scripts/gpu_check.sh and the table of scripts/gpu_check.py at their edges, on the CPU: a misspelt call, a part that
fails or times out, no CUDA, an archive that cannot be written, two calls merged as docs/GPU.md says, and outputs
missing, partial or malformed. Every Python part is a stub (as in test_gpu_check_script.py); the table is the real
one."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from scripts import gpu_check  # noqa: E402

# Each part: its command recorded (with the environment the script gives it), two lines of output, and the exit code
# in $STUB_RC_<part>.
STUB = r"""#!/usr/bin/env bash
echo "$* |${HF_HUB_OFFLINE:-}|${TRANSFORMERS_OFFLINE:-}|${TRITON_INTERPRET:-}" >> "$STUB_LOG"
args="$*"
case "$args" in
  "-c "* | *"gpu_check.py summary"*) exec "$REAL_PYTHON" "$@" ;;
  *"gpu_check.py env"*) part=env ;;
  *"-m pytest"*) part=a; sleep "${STUB_A_SLEEP:-0}" ;;
  *gpu_kernel_check*) part=b ;;
  *"gpu_check.py preset"*) part=preset ;;
  *"gpu_check.py graphs"*) part=g; out=${args##*--out }; out=${out%% *}
                           [ -n "${STUB_GRAPHS:-}" ] && printf '%s' "$STUB_GRAPHS" > "$out/graphs.json" ;;
  *"gpu_check.py second"*) part=p ;;
  *hf-static*) part=d; [ -n "${STUB_D_JSON:-}" ] && printf '%s' "$STUB_D_JSON" > "${args##*--json }" ;;
  *hf-continuous*) part=e ;;
  *"gpu_check.py served"*) part=s ;;
esac
echo "$part says: first line"
echo "$part says: last line"
rc=STUB_RC_$part
exit "${!rc:-0}"
"""


def _run(tmp_path: Path, *parts: str, budget: str = "460", out: Path | None = None, **env: str):
    """gpu_check.sh with the stub for python: (exit code, its output, the calls, $OUT)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    stub = tmp_path / "python"
    stub.write_text(STUB)
    stub.chmod(0o755)
    out = out or tmp_path / "out"
    log = tmp_path / "calls.log"
    full = {**os.environ, "PYTHON": str(stub), "REAL_PYTHON": sys.executable, "STUB_LOG": str(log), "OUT": str(out),
            "GPU_CHECK_BUDGET_S": budget, "GPU_CHECK_CACHE": str(tmp_path / "cache"), "TRITON_INTERPRET": "1",
            "STUB_GRAPHS": '{"workload_A": {"tok_s": 30000.0}}', **env}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GPU_CHECK_KEEP_GOING"):
        if name not in env:
            full.pop(name, None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), *parts], env=full, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc.returncode, proc.stdout + proc.stderr, calls, out


def _status(out: Path) -> dict[str, list[str]]:
    return {line.split("\t")[0]: line.split("\t")[1:] for line in (out / "status.tsv").read_text().splitlines()}


def _limits(output: str) -> dict[str, int]:
    return {m[0]: int(m[1]) for m in re.findall(r"^\[gpu_check\] (\w+): .* \(limit (\d+)s\)$", output, re.M)}


def _summary(out: Path, capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = gpu_check.cmd_summary(out)
    return rc, capsys.readouterr().out


def _row(table: str, label: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(label))


# ---- gpu_check.sh ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("parts, budget", [(("a,b",), "460"), (("g", "x"), "460"), (("g",), "540s"), (("g",), "")])
def test_a_misspelt_call_runs_nothing_and_fails(tmp_path, parts, budget):
    """Both used to pass: "a,b" ran only env and the preset, and "540s" broke every part's arithmetic, so that no part
    ran (no status row, not even a SKIPPED one)."""
    rc, output, calls, out = _run(tmp_path, *parts, budget=budget)
    if budget == "":  # unset or empty: the default budget
        assert rc == 0 and _status(out)["g"][0] == "PASS", output
        return
    assert rc == 2 and calls == [] and "nothing was run" in output, output


def test_a_budget_with_a_leading_zero_is_decimal(tmp_path):
    rc, output, _, _ = _run(tmp_path, "b", budget="0100")
    assert rc == 0 and 90 <= _limits(output)["b"] <= 100, output  # octal would read 64


def test_without_cuda_the_check_stops_after_env_and_says_why(tmp_path):
    rc, output, calls, out = _run(tmp_path, STUB_RC_env="2")
    assert rc == 2 and "no CUDA device" in output and "env says: last line" in output, output
    assert [c for c in calls if "summary" not in c] == [calls[0]] and "gpu_check.py env" in calls[0]
    assert (out / "summary.txt").exists() and (out / "status.tsv").read_text() == ""  # returned, and nothing passed
    rc, output, _, _ = _run(tmp_path / "x", STUB_RC_env="1")
    assert rc == 2 and "failed (rc 1)" in output and "no CUDA device" not in output, output


def test_each_part_that_fails_or_times_out_has_its_status_and_the_rest_still_run(tmp_path):
    rc, output, calls, out = _run(tmp_path, "a", "b", "g", "p", "d", "e", "s", STUB_RC_a="124", STUB_RC_b="137",
                                  STUB_RC_preset="3", STUB_RC_p="1", STUB_RC_d="124", STUB_RC_s="2")
    assert rc == 1, output
    status = _status(out)
    assert {name: row[0] for name, row in status.items()} == {
        "env": "PASS", "a": "TIMEOUT", "b": "TIMEOUT", "preset": "FAIL", "g": "PASS", "p": "FAIL", "d": "TIMEOUT",
        "e": "PASS", "s": "FAIL"}
    assert status["preset"][2] == "3" and status["b"][2] == "137"  # the exit code, beside the seconds
    for name in ("a", "b", "preset", "p", "d", "s"):  # the end of a failed part's log, at once
        assert f"  {name}| {name} says: last line" in output, output
    assert "  g| " not in output.replace("  g| (", "")  # nothing of a part that passed (but for g's headline)
    # The table is printed last, whole.
    assert output.rstrip().splitlines()[-1].startswith("[gpu_check] outputs in")
    assert re.search(r"^\(s\) served workload A +FAIL ", output, re.M), output
    # No download may hold a part up on the machine without network, and the kernels are compiled, not interpreted.
    parts = [c for c in calls if "summary" not in c and not c.startswith("-c ")]
    assert parts and all(c.endswith(" |1|1|") for c in parts), parts


def test_a_budget_under_twenty_seconds_skips_the_capped_parts_and_a_short_one_caps_them(tmp_path):
    rc, output, calls, out = _run(tmp_path, "a", "b", "p", budget="19")
    assert rc == 1, output
    status = _status(out)
    assert status["a"][0] == status["b"][0] == status["preset"][0] == status["p"][0] == "SKIPPED", status
    assert not any("pytest" in c or "gpu_kernel_check" in c or "second" in c for c in calls)
    rc, output, _, out = _run(tmp_path / "x", "a", "b", "p", budget="130")
    assert rc == 0, output
    limits = _limits(output)
    assert 125 <= limits["a"] <= 130 and 125 <= limits["b"] <= 130 and limits["preset"] == 100, limits
    assert 120 <= limits["p"] <= 130, limits  # what is left of the budget, under its own 240


def test_keep_going_runs_the_peers_though_g_measured_no_workload_a_and_the_check_still_fails(tmp_path):
    """Part g exits 0 when its graph check passed, whatever became of workload A: with the peers run anyway (or not
    asked for), every status read PASS and the check passed without its headline figure."""
    rc, output, calls, out = _run(tmp_path / "g", "g", STUB_GRAPHS='{"workload_A": {"error": "x"}}')
    assert rc == 1 and list(_status(out)) == ["env", "preset", "g"], output
    rc, output, calls, out = _run(tmp_path, STUB_GRAPHS='{"workload_A": {"error": "x"}}', GPU_CHECK_KEEP_GOING="1")
    assert rc == 1 and "skipped" not in output, output
    assert all(any(needle in c for c in calls) for needle in ("gpu_check.py second", "hf-static", "hf-continuous"))
    assert {name: row[0] for name, row in _status(out).items()}["d"] == "PASS"
    assert re.search(r"^\(d\) workload A vs hf static +FAIL ", output, re.M), output  # g measured no figure


def test_the_gpu_tests_and_kernel_check_end_before_g_starts(tmp_path):
    rc, output, calls, out = _run(tmp_path, "a", "b", "g", STUB_A_SLEEP="1")
    assert rc == 0, output
    assert list(_status(out)).index("a") < list(_status(out)).index("g")


def test_outputs_stay_where_they_are_when_the_archive_cannot_be_written(tmp_path):
    (tmp_path / "file").write_text("")
    rc, output, calls, _ = _run(tmp_path, "b", out=tmp_path / "file" / "out")
    work = Path(re.search(r"could not write \S+: the outputs stay in (\S+)", output)[1])
    try:
        assert work.is_dir() and (work / "b.log").exists() and (work / "summary.txt").exists(), output
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_two_calls_merged_as_the_docs_say_give_the_whole_table(tmp_path):
    """docs/GPU.md's split: a b g p in one call, d in another; each call's archive unpacked, the second's status.tsv
    appended to the first's, its d* files copied, and summary run there: row d has both figures."""
    def unpack(name: str, *parts: str, **env: str) -> Path:
        rc, output, _, out = _run(tmp_path / name, *parts, **env)
        assert rc == 0, output
        folder = tmp_path / f"{name}_dir"
        with tarfile.open(out / "gpu_check.tgz") as tar:
            tar.extractall(folder, filter="data")
        return folder

    first = unpack("first", "a", "b", "g", "p", STUB_GRAPHS='{"workload_A": {"tok_s": 27000.0}}')
    second = unpack("second", "d", STUB_D_JSON='{"peers": {"hf_static": {"tok_s": 900.0}}}')
    with open(first / "status.tsv", "a") as f:
        f.write((second / "status.tsv").read_text())
    for path in second.glob("d*"):
        shutil.copy(path, first)
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "summary", "--out", str(first)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == gpu_check.SUMMARY_TARGET_MISSED, proc.stdout + proc.stderr
    row = _row(proc.stdout, "(d)")
    assert re.match(r"\(d\) workload A vs hf static +MISSED ", row), row
    assert "engine 27,000 tok/s, transformers static 900 tok/s (30.0x); >= 28,000: NOT MET" in row, row
    assert re.search(r"^\(a\) pytest tests/gpu +PASS ", proc.stdout, re.M)  # the first call's rows are all there


# ---- the table ---------------------------------------------------------------------------------------------------


def test_the_table_prints_every_status_over_missing_partial_or_malformed_outputs(tmp_path, capsys):
    """A part killed mid-write, or an output of an older run, used to end summary with a traceback: no table."""
    (tmp_path / "status.tsv").write_text("env\tPASS\t3\t0\ng\tTIMEOUT\t240\t124\np\tFAIL\t9\t1\nd\tPASS\t130\n\n")
    (tmp_path / "graphs.json").write_text('{"workload_A": {"tok_s": 3')  # cut short
    (tmp_path / "env.json").write_text("[]")
    (tmp_path / "e_bench_64.json").write_text("null")
    (tmp_path / "second.json").write_text(json.dumps({"pdl": {"itl": {"1": 2.0}}}))  # no workload A: a broken row
    rc, table = _summary(tmp_path, capsys)
    assert rc == 1 and "could not be read" in table and "KeyError" in table, table
    assert re.search(r"^env \+ CUDA +PASS +3 ", table, re.M), table
    assert re.search(r"^    with PDL \(p\) +FAIL +9 ", table, re.M), table
    # Row d has no engine figure: it shows g's status, which should have measured it.
    assert re.search(r"^\(d\) workload A vs hf static +TIMEOUT +130 ", table, re.M), table
    (tmp_path / "second.json").unlink()
    rc, table = _summary(tmp_path, capsys)
    assert rc == 0 and "could not be read" not in table, table


def test_rows_from_g_and_p_carry_their_status_and_seconds(tmp_path, capsys):
    (tmp_path / "status.tsv").write_text("g\tTIMEOUT\t240\t124\np\tFAIL\t17\t1\n")
    rc, table = _summary(tmp_path, capsys)
    assert rc == 0
    for label in ("(c)", "(f)", "    step split", "    device time", "    the same, prefill", "    workload A by"):
        assert re.match(r".{30}TIMEOUT +240  ", _row(table, label)), label
    for label in ("    with PDL", "    16,384 tokens", "    two-batch"):
        assert re.match(r".{30}FAIL +17  ", _row(table, label)), label
    for label in ("env", "(a)", "(d)", "(e)", "(s)"):
        assert re.match(r".{30}- +$", _row(table, label)), label


@pytest.mark.parametrize("tok_s, status, rc", [(28_000.0, "PASS", 0), (27_999.5, "MISSED", 3)])
def test_workload_a_at_the_target_passes_and_under_it_misses(tmp_path, capsys, tok_s, status, rc):
    (tmp_path / "status.tsv").write_text("g\tPASS\t3\t0\nd\tPASS\t130\t0\n")
    (tmp_path / "graphs.json").write_text(json.dumps({"workload_A": {"tok_s": tok_s}}))
    got, table = _summary(tmp_path, capsys)
    assert got == rc and re.match(rf"\(d\) workload A vs hf static +{status} ", _row(table, "(d)")), table


def test_row_e_gives_transformers_figure_its_bound_or_a_question_mark(tmp_path):
    (tmp_path / "graphs.json").write_text(json.dumps({"slice64": {"tok_s": 9000.0}}))
    for peer, shown in (({"tok_s": 1234.0}, "1,234 tok/s"),
                        ({"error": "timed out", "info": {"tok_s_upper_bound": 456.0}}, "< 456 tok/s (timed out)"),
                        ({"error": "RuntimeError: x"}, "failed (RuntimeError: x)"), ({}, "?")):
        (tmp_path / "e_bench_64.json").write_text(json.dumps({"peers": {"hf_continuous": peer}}))
        assert gpu_check._part_results(tmp_path)["e"] == (
            f"engine 9,000 tok/s (? without overlap), transformers continuous {shown}")


def test_a_crashed_static_peer_is_said_not_bounded_from_its_progress_lines(tmp_path, capsys):
    """bench records a peer's crash and exits non-zero; its progress lines bound only a run cut short by time."""
    (tmp_path / "status.tsv").write_text("g\tPASS\t3\t0\nd\tFAIL\t130\t1\n")
    (tmp_path / "graphs.json").write_text(json.dumps({"workload_A": {"tok_s": 25000.0}}))
    (tmp_path / "d.log").write_text("workload A: 256 requests, 140,000 prompt and 131,000 output tokens\n"
                                    "  transformers static: token 768 of 1024 after 160.2 s\n")
    (tmp_path / "d_bench_A.json").write_text(json.dumps({"peers": {"hf_static": {"error": "OutOfMemoryError: x"}}}))
    _, table = _summary(tmp_path, capsys)
    row = _row(table, "(d)")
    assert "transformers static failed (OutOfMemoryError: x)" in row and "cut short" not in row, row
    (tmp_path / "d_bench_A.json").unlink()  # no report: the run was cut short, and its progress bounds the peer
    assert "cut short at token 768 of 1024" in _row(_summary(tmp_path, capsys)[1], "(d)")


def test_rows_of_part_p_compare_with_the_right_figures_and_say_what_failed(tmp_path):
    g = {"workload_A": {"tok_s": 25000.0}, "slice64": {"overlap": True}, "decode_gemms": {"sizes": 2, "ours": {}},
         "itl": [{"graphs": True, "overlap": True, "batch": 1, "itl_ms": 1.5},
                 {"graphs": True, "overlap": False, "batch": 1, "itl_ms": 9.0}]}
    second = {"pins": {"LLMSERVE_PREFILL_TILE": "64,32,3,4"},
              "pdl": {"graphs_on": True, "workload_A": {"tok_s": 26000.0}, "itl": {"1": 1.25},
                      "decode_gemms": {"sizes": 2, "ours": {"o": [1]}}, "itl_error": "RuntimeError: itl"},
              "wide_budget": {"max_num_batched_tokens": 16384, "pdl": True, "workload_A": {"tok_s": 27000.0}},
              "two_batch_overlap": {"graphs_on": True, "halves": [4, 2], "workload_A": {"tok_s": 28000.0},
                                    "same_priority": {"error": "capture or self-check failed"}, "pdl": False,
                                    "pdl_dropped": "the capture with PDL failed", "itl_error": "RuntimeError: t"}}
    (tmp_path / "graphs.json").write_text(json.dumps(g))
    (tmp_path / "second.json").write_text(json.dumps(second))
    res = gpu_check._part_results(tmp_path)
    assert res["pdl"].startswith("workload A 26,000 tok/s with PDL, 25,000 without; ITL ms with/without: batch 1 "
                                 "1.25/1.50; graphs kept: True; attention tiles pinned to g's: LLMSERVE_PREFILL_TILE; "
                                 "other decode GEMM picks"), res["pdl"]
    assert res["pdl"].endswith("; ITL failed: RuntimeError: itl")
    # PDL ran: the wide budget stands beside PDL's own figure at the default budget, not the first engine's.
    assert res["wide"] == "workload A 27,000 tok/s at 16,384 tokens a step, 26,000 at the default (PDL on in both)"
    assert res["tbo"].startswith("workload A 28,000 tok/s with two-batch overlap (sizes 2+ in halves, PDL off), "
                                 "27,000 without (the row above), capture or self-check failed with the halves")
    assert res["tbo"].endswith("; PDL dropped for it (the capture with PDL failed), the row above had it"
                               "; ITL failed: RuntimeError: t")
    second = {"pdl": {"error": "engine start-up: RuntimeError: x"}, "wide_budget": {"error": "OOM"},
              "two_batch_overlap": {"error": "no halves", "graphs_on": False}}
    (tmp_path / "second.json").write_text(json.dumps(second))
    res = gpu_check._part_results(tmp_path)
    assert (res["pdl"], res["wide"], res["tbo"]) == ("engine start-up: RuntimeError: x", "failed: OOM",
                                                     "failed: no halves")


def test_row_c_counts_a_size_only_when_hidden_logits_and_finiteness_all_hold(tmp_path):
    sizes = [{"hidden_equal": True, "logits_equal": True, "finite": True},
             {"hidden_equal": True, "logits_equal": True, "finite": False},
             {"hidden_equal": True, "logits_equal": False, "finite": True},
             {"hidden_equal": False, "logits_equal": True, "finite": True}]
    (tmp_path / "graphs.json").write_text(json.dumps({"graph_check": {"ok": False, "sizes": sizes}}))
    assert gpu_check._part_results(tmp_path)["c"].startswith("1/4 sizes bitwise equal")


def test_the_profile_rows_say_when_nothing_was_recorded_or_the_profile_failed(tmp_path):
    (tmp_path / "graphs.json").write_text(json.dumps({
        "kernels": {"error": "RuntimeError: cupti"}, "prefill_kernels": {"steps": 10, "busy_ms": 0.0},
        "workload_A_by_batch": {"error": "RuntimeError: p"}, "slice64_profile": {"decode": {"gpu_ms": None}}}))
    res = gpu_check._part_results(tmp_path)
    assert res["kernels"] == "profile failed: RuntimeError: cupti"
    assert res["prefill_kernels"] == "no device kernels recorded over 10 steps (is CUPTI available?)"
    assert res["by_batch"] == "profile failed: RuntimeError: p" and "split" not in res


def test_the_markdown_table_keeps_its_columns_when_a_result_holds_a_pipe(tmp_path, capsys):
    (tmp_path / "status.tsv").write_text("s\tFAIL\t20\t1\n")
    error = "serving_bench: a | b " + "x" * 400
    (tmp_path / "served.json").write_text(json.dumps({"error": error}))
    _, table = _summary(tmp_path, capsys)
    assert _row(table, "(s)").endswith(f"  failed: {error[:300]}")  # cut short
    rows = [line for line in (tmp_path / "performance.md").read_text().splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(gpu_check.LABELS) and all(line.count("|") == 5 for line in rows), rows


# ---- the helpers -------------------------------------------------------------------------------------------------


def test_a_report_is_never_seen_half_written(tmp_path):
    """The publisher copies graphs.json every 15 s while part g rewrites it: a copy (or a kill) between the file's
    truncation and its write got no figures at all."""
    report = gpu_check._Report(tmp_path / "graphs.json")
    report["itl"] = [{"batch": i, "decode": {"x": "y" * 200}} for i in range(2000)]  # some 500 kB
    report.save()
    bad, done = [], threading.Event()

    def read():
        while not done.is_set():
            try:
                json.loads(report.path.read_text())
            except ValueError:
                bad.append(1)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(40):
            report["n"] = i
            report.save()
    finally:
        done.set()
        reader.join()
    assert not bad and json.loads(report.path.read_text())["n"] == 39
    assert [p.name for p in tmp_path.iterdir()] == ["graphs.json"]


def test_environ_puts_every_variable_back_even_after_an_error(monkeypatch):
    monkeypatch.setenv("GPU_CHECK_EDGE_A", "before")
    monkeypatch.delenv("GPU_CHECK_EDGE_B", raising=False)
    with pytest.raises(RuntimeError), gpu_check._environ({"GPU_CHECK_EDGE_A": "x", "GPU_CHECK_EDGE_B": "y"}):
        assert os.environ["GPU_CHECK_EDGE_A"] == "x" and os.environ["GPU_CHECK_EDGE_B"] == "y"
        raise RuntimeError
    assert os.environ["GPU_CHECK_EDGE_A"] == "before" and "GPU_CHECK_EDGE_B" not in os.environ


@pytest.mark.parametrize("value, on", [(None, True), ("1", True), ("0", False)])
def test_gpu_check_triton_gemm_zero_keeps_torch_gemms(monkeypatch, value, on):
    if value is None:
        monkeypatch.delenv("GPU_CHECK_TRITON_GEMM", raising=False)
    else:
        monkeypatch.setenv("GPU_CHECK_TRITON_GEMM", value)
    preset, engine, *_ = gpu_check._setup(cpu_dry_run=False)
    assert preset == gpu_check.PRESET and engine["device"] == "cuda" and engine["triton_gemm"] is on


class _Proc:
    def __init__(self, log: list, name: str, running: bool = True, hangs: bool = False):
        self.log, self.name, self.running, self.hangs, self.returncode = log, name, running, hangs, None

    def poll(self):
        return None if self.running else 0

    def send_signal(self, sig):
        self.log.append((self.name, "signal", sig))

    def wait(self, timeout=None):
        if self.hangs and ("kill" not in [e[1] for e in self.log if e[0] == self.name]):
            raise subprocess.TimeoutExpired(self.name, timeout)
        self.returncode = -9 if self.hangs else 0
        return self.returncode

    def kill(self):
        self.log.append((self.name, "kill", None))


def test_stop_services_stops_the_tokenizer_first_and_kills_one_that_hangs():
    import signal

    log: list = []
    procs = {"engine": _Proc(log, "engine", hangs=True), "tokenizer": _Proc(log, "tokenizer")}
    assert gpu_check._stop_services(procs) == {"engine": -9, "tokenizer": 0}
    assert log == [("tokenizer", "signal", signal.SIGTERM), ("engine", "signal", signal.SIGTERM),
                   ("engine", "kill", None)]
    log.clear()  # one that already exited gets no signal
    assert gpu_check._stop_services({"engine": _Proc(log, "engine", running=False)}) == {"engine": 0} and log == []


def test_free_ports_are_distinct():
    ports = gpu_check._free_ports(4)
    assert len(set(ports)) == 4 and all(0 < p < 65536 for p in ports)
