"""gguf_example.py: the written file, quality, the importance matrix, llama.cpp's quantizer and runtime.

The outside references: the original SmolLM2 GGUF file made by llama.cpp's converter, for the
tensor names and the RoPE row permutation; `gguf.quants.quantize` for the bytes of the written
file; the model's own modules, for the importance matrix; llama.cpp itself (llama-cpp-python,
compiled from source by `make setup`), which must accept our importance matrix and run our files.
Its tests are marked `llamacpp` and skipped, with that reason, where the bindings are not installed.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from conftest import (QUANT_EXAMPLES, REPO_ROOT, assert_refusal, assert_results_header, import_example,
                      run_bench, run_script)

SCRIPT = QUANT_EXAMPLES / "gguf_example.py"
ge = import_example(SCRIPT)
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


def code_ids(tokenizer, n: int) -> torch.Tensor:
    """(1, n) token ids of a short repeated Python snippet: text the tiny model's tokenizer knows."""
    ids = tokenizer("def f(x):\n    return x * 2\n" * 32, return_tensors="pt")["input_ids"][:, :n]
    assert ids.shape[1] == n
    return ids


def needs_llama_cpp() -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: `make setup` compiles it "
                                            "(about 2 minutes on 2 cores), or pip install llama-cpp-python==0.3.36")


@pytest.fixture(scope="module")
def smollm2_model(smollm2):
    model, tokenizer = ge.load_model(str(smollm2), torch.device("cpu"))
    return model, tokenizer


def test_names_and_rope_permutation_match_the_original_smollm2_file(smollm2_model):
    """SmolLM2's FP32 folder was decoded from a GGUF made by llama.cpp's own converter, so our
    mapping (names, q/k permutation, tied output) must give back that file's tensors exactly."""
    import gguf

    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import assets

    model, _ = smollm2_model
    ours = dict(ge.gguf_tensors(model))
    original = gguf.GGUFReader(assets.smollm2_gguf_path())
    assert set(ours) == {t.name for t in original.tensors}
    worst = 0.0
    for t in original.tensors:
        decoded = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours[t.name].shape)
        worst = max(worst, float(np.abs(decoded - ours[t.name]).max()))
    print("max abs difference against the original file:", worst)
    assert worst == 0.0


def test_written_file_holds_the_library_encoding_and_loads_in_transformers(tiny_model, tmp_path):
    import gguf

    proc = run_script(SCRIPT, "--model", tiny_model, "--tokenizer-pre", "gpt-2", "--device", "cpu",
                      "--types", "Q8_0", "Q4_0", "--out-dir", tmp_path, "--eval-tokens", "32", "--quiet")
    assert "gguf-py" in proc.stdout and "Q4_0" in proc.stdout
    assert not list(tmp_path.glob("*.partial"))
    model, tokenizer = ge.load_model(str(tiny_model), torch.device("cpu"))
    source = dict(ge.gguf_tensors(model))
    reader = gguf.GGUFReader(tmp_path / "tiny-llama-Q4_0.gguf")
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == model.config.vocab_size
    assert {t.name for t in reader.tensors} == set(source)
    types = {}
    for t in reader.tensors:  # every tensor is the library's encoding of the original weight
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        library = gguf.quants.quantize(source[t.name], t.tensor_type)
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), library.view(np.uint8).reshape(-1))
    assert types["Q8_0"] == 1 and types["F32"] == 2 * 2 + 1  # embedding in Q8_0; norms in F32
    # transformers dequantizes on load: as many FP32 parameters as the original model
    loaded = {qtype: ge.load_gguf_in_transformers(tmp_path / f"tiny-llama-{qtype}.gguf", torch.device("cpu"))
              for qtype in ("Q8_0", "Q4_0")}
    ids = code_ids(tokenizer, 65)
    kl = {}
    for qtype, candidate in loaded.items():
        assert sum(p.numel() for p in candidate.parameters()) == sum(p.numel() for p in model.parameters())
        stats = ge.next_token_agreement(model, candidate, ids)
        kl[qtype] = stats["kl"].mean().item()
    print(kl)
    assert 0 <= kl["Q8_0"] < kl["Q4_0"]


def test_refusals(tiny_model, tmp_path):
    proc = run_script(SCRIPT, "--model", tmp_path / "nowhere", "--quiet", check=False)
    assert_refusal(proc, "cannot load model")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = run_script(SCRIPT, "--model", tiny_model, "--out-dir", blocker / "gguf", "--quiet", check=False)
    assert_refusal(proc, "--out-dir")
    if not torch.cuda.is_available():
        proc = run_script(SCRIPT, "--model", tiny_model, "--device", "cuda", "--quiet", check=False)
        assert_refusal(proc, "--device cuda")
    if not HAVE_LLAMA_CPP:
        proc = run_script(SCRIPT, "--model", tiny_model, "--llama-cpp", "--out-dir", tmp_path, check=False)
        assert_refusal(proc, "llama-cpp-python")
        assert not list(tmp_path.glob("*.gguf")), "nothing is written before a refusal"


@pytest.mark.parametrize("flags", [["--eval-tokens", "-1"], ["--types", "Q5_0"]])
def test_bad_flags_are_parser_errors(tiny_model, flags):
    with pytest.raises(SystemExit) as exit_info:
        ge.main(ge.build_parser().parse_args(["--model", str(tiny_model), *flags]))
    assert exit_info.value.code == 2


def test_bench_preset_cpu_writes_its_schema(tiny_model, tmp_path):
    result = run_bench("gguf_files", "cpu", tmp_path, model=tiny_model)
    assert_results_header(result)
    assert result["llama_cpp"] == ("ran" if HAVE_LLAMA_CPP else "not run: llama-cpp-python not installed")
    assert {"perplexity", "ppl_stderr", "eval_tokens", "param_mb"} <= set(result["fp32"])
    rows = {(r["qtype"], r["made_by"]): r for r in result["rows"]}
    settings = result["settings"]
    expected = {(t, "gguf-py") for t in settings["types"]}
    if HAVE_LLAMA_CPP:
        expected |= {(t, by) for t in settings["llama_cpp_types"]
                     for by in ("llama.cpp", "llama.cpp + uniform imatrix", "llama.cpp + imatrix")}
    assert set(rows) == expected
    for r in rows.values():
        for key in ("made_by", "file_mb", "bits_per_weight", "tensor_types", "linear_rel_error", "perplexity",
                    "ppl_stderr", "kl", "top1", "eval_tokens", "transformers_param_mb"):
            assert key in r, key
        assert ("llama_cpp" in r) == HAVE_LLAMA_CPP
    for suffix in (".md", ".en.md", ".png"):
        assert (tmp_path / f"gguf-cpu{suffix}").stat().st_size > 0


@pytest.mark.llamacpp
def test_llama_cpp_runs_the_written_files(smollm2_model, tmp_path):
    needs_llama_cpp()
    model, tokenizer = smollm2_model
    tensors = ge.gguf_tensors(model)
    path = tmp_path / "smollm2-Q8_0.gguf"
    ge.write_gguf(path, tensors, "Q8_0", lambda w: ge.add_metadata(w, model.config, tokenizer, "Q8_0", "smollm"),
                  quiet=True)
    text, n_new = ge.generate_llama_cpp(ge.load_llama_cpp(path, threads=1), ge.PROMPT, 16)
    print(repr(text))
    assert n_new > 0
    assert "Paris" in text, "llama.cpp must load our file and answer like the FP model"


def test_importance_matrix_is_the_mean_square_of_each_linear_input(tiny_model):
    """Checked against the model's own modules, not hooks: layer 0's attention reads
    input_layernorm(embed(ids)), so q, k and v share one vector, the mean of x_k² over tokens."""
    model, tokenizer = ge.load_model(str(tiny_model), torch.device("cpu"))
    ids = code_ids(tokenizer, 48)
    imatrix = ge.importance_matrix(model, ids, context=16)  # three windows of 16
    layers = model.config.num_hidden_layers
    names = {name for name, W in ge.gguf_tensors(model) if name.startswith("blk.") and W.ndim == 2}
    assert set(imatrix) == names and len(names) == 7 * layers
    widths = {name: W.shape[1] for name, W in ge.gguf_tensors(model) if W.ndim == 2}
    assert all(imatrix[name].shape == (widths[name],) for name in names)
    with torch.no_grad():
        x = torch.cat([model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[:, i:i + 16]))
                       for i in range(0, 48, 16)], dim=1)[0]  # (48, C)
    expected = x.pow(2).mean(0).numpy()
    for proj in ("attn_q", "attn_k", "attn_v"):
        np.testing.assert_allclose(imatrix[f"blk.0.{proj}.weight"], expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(imatrix["blk.0.ffn_down.weight"][: len(expected)], expected)


@pytest.mark.llamacpp
def test_llama_cpp_quantizer_reads_our_f16_file_and_imatrix(tiny_model, tmp_path):
    """llama.cpp quantizes our F16 file to IQ4_XS; our importance matrix changes its choices
    (some block bytes differ), a zeroed-out matrix name list is the same as none, and
    transformers loads the result with every tensor present."""
    import gguf

    needs_llama_cpp()
    model, tokenizer = ge.load_model(str(tiny_model), torch.device("cpu"))
    tensors = ge.gguf_tensors(model)
    source = tmp_path / "tiny-F16.gguf"
    ge.write_gguf(source, tensors, "F16", lambda w: ge.add_metadata(w, model.config, tokenizer, "F16", "gpt-2"),
                  quiet=True)
    ids = code_ids(tokenizer, 128)
    imatrix = ge.importance_matrix(model, ids, context=64)
    made = {}
    for label, matrix in (("plain", None), ("imatrix", imatrix), ("empty", {})):
        path = tmp_path / f"tiny-IQ4_XS-{label}.gguf"
        ge.llama_cpp_quantize(source, path, "IQ4_XS", matrix, threads=1)
        made[label] = {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes())
                       for t in gguf.GGUFReader(path).tensors}
    assert set(made["plain"]) == {name for name, _ in tensors}
    linear = [name for name, W in tensors if name.startswith("blk.") and W.ndim == 2]
    assert {made["plain"][name][0] for name in linear} <= {"IQ4_XS", "IQ4_NL", "Q5_K", "Q6_K", "Q8_0", "Q5_0"}
    assert made["empty"] == made["plain"]
    changed = [name for name in linear if made["imatrix"][name][1] != made["plain"][name][1]]
    print(f"{len(changed)} of {len(linear)} linear tensors changed by the importance matrix")
    assert changed
    loaded = ge.load_gguf_in_transformers(tmp_path / "tiny-IQ4_XS-imatrix.gguf", torch.device("cpu"))
    stats = ge.next_token_agreement(model, loaded, ids[:, :65])
    assert 0 < stats["kl"].mean().item() < 1


@pytest.mark.llamacpp
def test_llama_cpp_quantizer_failure_is_one_refusal(tmp_path):
    needs_llama_cpp()
    broken = tmp_path / "not-a-model.gguf"
    broken.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ge.Refusal, match="could not quantize not-a-model.gguf to Q4_K_M"):
        ge.llama_cpp_quantize(broken, tmp_path / "out.gguf", "Q4_K_M", None, threads=1)
    assert not (tmp_path / "out.gguf").exists(), "nothing half-written"


@pytest.mark.parametrize("flags", [["--llama-cpp"], ["--types", "Q4_K_M"]])
def test_llama_cpp_paths_refuse_without_the_bindings(tmp_path, monkeypatch, flags):
    """Where llama-cpp-python is missing, both paths that need it say so in one line."""
    real_find_spec = ge.importlib.util.find_spec
    monkeypatch.setattr(ge.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a))
    args = ge.build_parser().parse_args(["--out-dir", str(tmp_path), *flags])
    with pytest.raises(ge.Refusal, match="needs llama-cpp-python"):
        ge.check_arguments(args)
    assert not list(tmp_path.iterdir()), "nothing is written before a refusal"
