"""compare_methods.py: the combined quality table on the tiny model, and the claims the guides make
from the committed SmolLM2 table."""

from __future__ import annotations

import json

import pytest

from conftest import QUANT_EXAMPLES, REPO_ROOT, assert_results_header, run_script_json

SCRIPT = QUANT_EXAMPLES / "compare_methods.py"
RESULTS = REPO_ROOT / "inference" / "quantization" / "results"
ROW_KEYS = {"method", "impl", "bits", "group_size", "sym", "act_order", "perplexity", "ppl_stderr", "kl", "top1",
            "size_mb", "bits_per_weight", "eval_tokens"}


def test_script_on_tiny_model(tiny_model, tmp_path):
    quality, sweep = tmp_path / "quality-cpu.json", tmp_path / "gptq_sweep-cpu.json"
    args = ["--model", tiny_model, "--calib-samples", "4", "--calib-seqlen", "128", "--eval-tokens", "1024",
            "--ctx", "128", "--sweep-groups=-1,32", "--sweep-json", sweep, "--cache-dir", tmp_path / "cache",
            "--quiet"]
    result = run_script_json(SCRIPT, quality, *args)
    assert_results_header(result)
    assert result["eval"] == {"tokens": 1024, "ctx": 128, "stride": 128, "scored_tokens": 8 * 127}
    rows = result["rows"]
    assert all(ROW_KEYS <= set(r) for r in rows)
    assert all(r["eval_tokens"] == 8 * 127 for r in rows)
    combos = {(r["method"], r["impl"], r["bits"]) for r in rows}
    assert combos == {("fp", "reference", 16), ("rtn", "scratch", 8), ("rtn", "scratch", 4), ("rtn", "scratch", 3),
                      ("gptq", "scratch", 4), ("gptq", "scratch", 3), ("awq", "scratch", 4), ("awq", "scratch", 3),
                      ("gptq", "llmcompressor", 4), ("awq", "llmcompressor", 4)}
    assert all(r["group_size"] == 64 for r in rows if r["method"] != "fp")
    fp = rows[0]
    assert fp["method"] == "fp" and fp["kl"] == pytest.approx(0, abs=1e-6)
    int8 = next(r for r in rows if r["method"] == "rtn" and r["bits"] == 8)
    assert abs(int8["perplexity"] / fp["perplexity"] - 1) < 0.005
    by_bits = {b: [r["size_mb"] for r in rows if r["bits"] == b] for b in (16, 8, 4, 3)}
    assert max(by_bits[3]) < min(by_bits[4]) < max(by_bits[4]) < min(by_bits[8]) < fp["size_mb"]
    # Markdown table and plot beside the JSON
    table = quality.with_suffix(".md").read_text()
    assert f"{8 * 127} scored tokens" in table and table.count("\n| ") == len(rows) + 2
    assert quality.with_suffix(".png").stat().st_size > 10_000
    # the sweep: per channel, 32, and act-order off at 64
    swept = json.loads(sweep.read_text())
    assert [(r["group_size"], r["act_order"]) for r in swept["rows"]] == [(-1, True), (32, True), (64, False)]
    assert swept["rows"][0]["bits_per_weight"] < swept["rows"][1]["bits_per_weight"]
    assert "Q4_1" in sweep.with_suffix(".md").read_text()
    # every row was cached: a second run recomputes nothing and gives the same table
    again = run_script_json(SCRIPT, tmp_path / "again.json", *args)
    assert again["rows"] == rows


def committed(name: str) -> dict:
    path = RESULTS / name
    if not path.exists():
        pytest.fail(f"{path} is missing: run compare_methods.py (command in its docstring)", pytrace=False)
    return json.loads(path.read_text())


def test_committed_quality_table_supports_the_guides():
    """The claims the guides make from the measured table hold in the committed results."""
    result = committed("quality-cpu.json")
    assert_results_header(result)
    assert result["eval"]["scored_tokens"] >= 4000  # the table states its token count; s.e. shown per row
    rows = {(r["method"], r["impl"], r["bits"], r["sym"]): r for r in result["rows"]}
    fp = rows["fp", "reference", 16, True]
    assert abs(rows["rtn", "scratch", 8, True]["perplexity"] / fp["perplexity"] - 1) < 0.005
    # each method beats round-to-nearest on the same grid (symmetric or asymmetric), at 4 and 3 bits
    for bits in (4, 3):
        for method, sym in (("gptq", True), ("gptq", False), ("awq", False)):
            quantized, rtn = rows[method, "scratch", bits, sym], rows["rtn", "scratch", bits, sym]
            assert quantized["perplexity"] < rtn["perplexity"], (method, bits, sym)
            assert quantized["kl"] < rtn["kl"], (method, bits, sym)
    for method, sym in (("gptq", True), ("awq", False)):
        assert rows[method, "llmcompressor", 4, sym]["perplexity"] < rows["rtn", "scratch", 4, sym]["perplexity"]
    assert (RESULTS / "quality-cpu.md").exists() and (RESULTS / "quality-cpu.png").exists()
    sweep = committed("gptq_sweep-cpu.json")
    assert [r["group_size"] for r in sweep["rows"]] == [-1, 192, 64, 32, 64]
    assert (RESULTS / "gptq_sweep-cpu.md").exists()
