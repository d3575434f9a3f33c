"""gguf_example.py: writing GGUF, the exact round trip, quality through transformers, llama.cpp.

The llama.cpp run needs llama-cpp-python, which compiles llama.cpp from source (minutes): its
test is marked `llamacpp` and skipped, with that reason, where the bindings are not installed.
Everything else (writing, reading back, names, quality) runs in CI.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from conftest import import_example, QUANT_EXAMPLES, assert_results_header, run_script, run_script_json

SCRIPT = QUANT_EXAMPLES / "gguf_example.py"


def load_module():

    return import_example(SCRIPT)


ge = load_module()


def test_write_read_and_evaluate_tiny(tiny_model, tmp_path):
    out = tmp_path / "gguf.json"
    result = run_script_json(SCRIPT, out, "--model", tiny_model, "--tokenizer-pre", "gpt2", "--device", "cpu",
                             "--bits", "8", "4", "--out-dir", tmp_path, "--eval-tokens", "300", "--context", "128",
                             "--no-llama-cpp", "--quiet")
    assert_results_header(result)
    assert result["versions"]["gguf"]
    rows = {r["qtype"]: r for r in result["rows"]}
    assert set(rows) == {"Q8_0", "Q4_0"}
    for qtype, r in rows.items():
        print(qtype, {k: r[k] for k in ("file_vs_memory_max_abs_diff", "scratch_vs_gguf_max_abs_diff", "linear_rel_error", "kl", "top1")})
        assert r["file_vs_memory_max_abs_diff"] == 0.0, "the file must decode to exactly what was quantized"
        assert r["scratch_vs_gguf_max_abs_diff"] == 0.0, "our torch block code must match gguf-py bit for bit"
        assert r["eval_tokens"] == 299 and r["kl"] >= 0
        # transformers dequantizes on load: the loaded model is as large as the FP32 one
        assert r["transformers_param_mb"] == pytest.approx(result["fp32_param_mb"])
    assert rows["Q4_0"]["tensor_types"]["Q8_0"] == 1  # the token embedding stays Q8_0
    assert rows["Q8_0"]["linear_rel_error"] < 0.01 < rows["Q4_0"]["linear_rel_error"] < 0.15
    assert rows["Q8_0"]["kl"] < rows["Q4_0"]["kl"]
    assert rows["Q4_0"]["file_mb"] < rows["Q8_0"]["file_mb"]
    assert result["llama_cpp"].startswith("not asked")
    assert out.with_suffix(".md").read_text().count("\n|") >= 4

    import gguf

    reader = gguf.GGUFReader(tmp_path / "tiny-llama-Q4_0.gguf")
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 512
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.ffn_down.weight"} <= names


def test_names_and_rope_permutation_match_the_original_smollm2_file(smollm2):
    """SmolLM2's FP32 folder was decoded from a GGUF made by llama.cpp's own converter, so our
    mapping (names, q/k permutation, tied output) must give back that file's tensors exactly."""
    import gguf
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(QUANT_EXAMPLES.parent.parent.parent / "tools"))
    import assets

    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    ours = dict(ge.gguf_tensors(model))
    original = gguf.GGUFReader(assets.smollm2_gguf_path())
    assert set(ours) == {t.name for t in original.tensors}
    worst = 0.0
    for t in original.tensors:
        decoded = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours[t.name].shape)
        worst = max(worst, float(np.abs(decoded - ours[t.name]).max()))
    print("max abs difference against the original file:", worst)
    assert worst == 0.0


def test_bad_bits_is_one_line_error(tiny_model):
    proc = run_script(SCRIPT, "--model", tiny_model, "--bits", "5", "--quiet", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error:" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.llamacpp
def test_llama_cpp_runs_the_written_files(smollm2, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36 "
                                            "(compiles llama.cpp, about 3.5 min on 2 cores)")
    result = run_script_json(SCRIPT, tmp_path / "gguf.json", "--model", smollm2, "--bits", "8",
                             "--out-dir", tmp_path, "--no-perplexity", "--max-new-tokens", "16",
                             "--threads", "1", "--repeats", "1", "--quiet")
    assert result["llama_cpp"] == "ran"
    (q8,) = result["rows"]
    print(q8["llama_cpp"])
    assert q8["llama_cpp"]["new_tokens"] > 0 and q8["llama_cpp"]["tokens_per_s"] > 0
    assert "Paris" in q8["llama_cpp"]["text"], "llama.cpp must load our file and answer like the FP model"
