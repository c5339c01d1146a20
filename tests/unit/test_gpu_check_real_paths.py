"""The GPU check's table read from what its parts really print, not from lines written to look like it: the CPU dry runs
fake part b's log, and a format the fakes missed goes unseen until the one-shot H200 run."""

from __future__ import annotations

import contextlib
import io
import re

import torch

from tests.support import require_triton_interpreter

require_triton_interpreter()


def test_row_b_counts_every_fused_op_verdict_part_b_prints(tmp_path, monkeypatch):
    """check_and_time_fused_ops, as part b runs it (bf16; here interpreted on a few tokens, where the interpreter's
    bf16 fails some), and row b's fused-ops count: its name list missed the two "rope alone" verdicts, so the row read
    5/5 whatever became of RoPE without q/k-norm."""
    from engine_service.attention import triton_kernels  # noqa: F401 -- the kernels, interpreted (as imported here)
    from engine_service.model import fused_ops  # noqa: F401
    from scripts import gpu_check

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the script refuses the interpreter at import
    from scripts import gpu_kernel_check as gkc

    monkeypatch.setenv("TRITON_INTERPRET", "1")

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        gkc.check_and_time_fused_ops(torch.device("cpu"), torch.Generator().manual_seed(0), False, tokens=8)
    log = printed.getvalue()
    verdicts = re.findall(r"^ +.+? (ok|FAIL): fused [\d.e+-]+, torch eager ", log, re.M)
    assert len(verdicts) == 7, log  # q, k, silu*up, add+rmsnorm, residual, and q and k of RoPE alone
    (tmp_path / "b.log").write_text(log + "\nPASS in 1s\n")
    row = gpu_check._part_results(tmp_path)["b"]
    assert f"fused ops {verdicts.count('ok')}/{len(verdicts)}" in row, row
