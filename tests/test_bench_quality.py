"""bench/quality.py: the cpu preset runs on the tiny model (--quick) and writes the documented
quality and sweep files; the library rows and the from-scratch rows are measured on the same tokens."""

from __future__ import annotations

import json

from conftest import assert_results_header, run_bench

ROW_KEYS = {"method", "impl", "bits", "group_size", "sym", "act_order", "perplexity", "ppl_stderr",
            "kl", "top1", "eval_tokens", "size_mb", "bits_per_weight", "quantize_seconds"}


def test_cpu_preset_writes_the_schema(tiny_model, tmp_path):
    run_bench("quality", "cpu", tmp_path, model=tiny_model)
    for stem in ("quality-cpu", "gptq_sweep-cpu"):
        assert (tmp_path / f"{stem}.md").exists() and (tmp_path / f"{stem}.en.md").exists(), stem
    assert (tmp_path / "quality-cpu.png").stat().st_size > 10_000
    quality = json.loads((tmp_path / "quality-cpu.json").read_text())
    sweep = json.loads((tmp_path / "gptq_sweep-cpu.json").read_text())
    for result in (quality, sweep):
        assert_results_header(result)
        assert result["quick"] is True and result["preset"] == "cpu"
        assert {"calibration", "scored_tokens", "rows"} <= set(result)
        assert all(ROW_KEYS <= set(row) for row in result["rows"])
        assert all(row["eval_tokens"] == result["scored_tokens"] for row in result["rows"])
    combos = {(r["method"], r["impl"], r["bits"], r["sym"]) for r in quality["rows"]}
    assert combos == {("fp", "reference", 16, True), ("rtn", "scratch", 8, True),
                      *{("rtn", "scratch", b, s) for b in (4, 3) for s in (True, False)},
                      *{("gptq", "scratch", b, s) for b in (4, 3) for s in (True, False)},
                      ("awq", "scratch", 4, False), ("awq", "scratch", 3, False),
                      ("gptq", "llmcompressor", 4, True), ("awq", "llmcompressor", 4, False)}
    fp = quality["rows"][0]
    assert fp["method"] == "fp" and fp["kl"] == 0 and fp["top1"] == 1
    sizes = {b: [r["size_mb"] for r in quality["rows"] if r["bits"] == b] for b in (16, 8, 4, 3)}
    assert max(sizes[3]) < min(sizes[4]) and max(sizes[4]) < min(sizes[8]) < fp["size_mb"]
    assert "fp_perplexity" in sweep
    assert [(r["group_size"], r["act_order"]) for r in sweep["rows"]] == [(-1, True), (32, True), (64, False)]
    assert "tiny-llama" in (tmp_path / "quality-cpu.en.md").read_text()
