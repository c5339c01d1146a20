"""scripts/kv_cache_quality.py: teacher-forced log-probabilities under an fp8 KV cache against the model's dtype."""

from __future__ import annotations

import json

import pytest

from scripts import kv_cache_quality as q


def test_windows_are_whole_and_capped():
    assert q.windows(list(range(10)), 4, 5) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert q.windows(list(range(10)), 4, 1) == [[0, 1, 2, 3]]
    assert q.windows(list(range(3)), 4, 5) == []


def test_compare_counts_each_position_once():
    base = [[(-1.0, 5), (-2.0, 6)], [(-0.5, 7)]]
    other = [[(-1.5, 5), (-2.0, 9)], [(-0.5, 7)]]
    figures = q.compare(base, other)
    assert figures["positions"] == 3
    assert figures["mean_abs_logprob_diff"] == pytest.approx(0.5 / 3)
    assert figures["max_abs_logprob_diff"] == 0.5
    assert figures["top1_agreement"] == pytest.approx(2 / 3)
    assert figures["perplexity"] == pytest.approx(2.718281828 ** (3.5 / 3))
    assert figures["perplexity_other"] == pytest.approx(2.718281828 ** (4.0 / 3))
    assert q.compare(base, base)["mean_abs_logprob_diff"] == 0.0


def test_the_tool_measures_a_difference_where_the_cache_is_fp8_and_none_where_it_is_not(demo_model_dir, tmp_path,
                                                                                        monkeypatch):
    out = tmp_path / "figures.json"
    assert q.main(["--model", str(demo_model_dir), "--window", "64", "--max-windows", "3", "--device", "cpu",
                   "--json", str(out)]) == 0
    figures = json.loads(out.read_text())["fp8_against_auto"]
    assert figures["positions"] == 3 * 63
    assert 0 < figures["mean_abs_logprob_diff"] <= figures["max_abs_logprob_diff"]
    # The same run with "fp8" standing for "auto" too: the comparison itself adds nothing.
    real = q.teacher_forced
    monkeypatch.setattr(q, "teacher_forced", lambda model, prompts, kv, engine: real(model, prompts, "auto", engine))
    assert q.main(["--model", str(demo_model_dir), "--window", "64", "--max-windows", "3", "--device", "cpu",
                   "--json", str(out)]) == 0
    same = json.loads(out.read_text())["fp8_against_auto"]
    assert same["mean_abs_logprob_diff"] == 0.0 and same["top1_agreement"] == 1.0
