"""gguf_example.py: our block encoders against gguf-py's, the written file, quality, llama.cpp.

The outside references: `gguf.quants.quantize` (llama.cpp's own Python encoder, bit-exact with
ggml-quants.c) for Q8_0, Q4_0 and Q4_1, compared byte for byte on real SmolLM2 rows; the
original SmolLM2 GGUF file made by llama.cpp's converter for the tensor names and the RoPE row
permutation. The llama.cpp run needs llama-cpp-python (compiled from source, minutes): its test
is marked `llamacpp` and skipped, with that reason, where the bindings are not installed.
"""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from conftest import (QUANT_EXAMPLES, REPO_ROOT, assert_refusal, assert_results_header, import_example,
                      run_bench, run_script)
from tolerances import GGUF_BYTES_EQUAL

SCRIPT = QUANT_EXAMPLES / "gguf_example.py"
ge = import_example(SCRIPT)
HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None


@pytest.fixture(scope="module")
def smollm2_model(smollm2):
    model, tokenizer = ge.load_model(str(smollm2), torch.device("cpu"))
    return model, tokenizer


def smollm2_rows(model) -> dict[str, np.ndarray]:
    """Rows of several layers: attention and MLP weights of the first, a middle and the last layer."""
    last = model.config.num_hidden_layers - 1
    picked = {}
    for name, W in ge.gguf_tensors(model):
        if W.ndim == 2 and any(name.startswith(f"blk.{i}.") for i in (0, last // 2, last)):
            picked[name] = W[:64]  # 64 rows each keeps the test quick
    return picked


def differing_bytes(ours: np.ndarray, theirs: np.ndarray) -> int:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == np.uint8
    count = int((ours != theirs).sum())
    print(f"{count} of {ours.size} bytes differ")
    return count


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_encoders_equal_gguf_py_bit_for_bit(smollm2_model, qtype):
    import gguf

    model, _ = smollm2_model
    torch.manual_seed(0)
    gaussian = torch.randn(16, 256).numpy()
    gaussian[0, :32] = 0.0  # an all-zero block
    gaussian[1, :32] = np.linspace(-1, 1, 32)  # a block with exact ties
    rows = {**smollm2_rows(model), "gaussian": gaussian}
    assert len(rows) >= 3 * 7 + 1
    quantize, dequantize = ge.SCRATCH[qtype]
    ggml_type = gguf.GGMLQuantizationType[qtype]
    for name, W in rows.items():
        ours = ge.to_block_bytes(qtype, *quantize(torch.from_numpy(W)))
        theirs = gguf.quants.quantize(W, ggml_type)
        print(name, qtype)
        assert differing_bytes(ours, theirs) <= GGUF_BYTES_EQUAL
        # and our dequantize reads the library's blocks back to the same values
        assert np.array_equal(dequantize(*quantize(torch.from_numpy(W))).numpy(),
                              gguf.quants.dequantize(theirs, ggml_type))


def test_a_wrong_q4_0_scale_is_caught(smollm2_model, monkeypatch):
    """The comparison above fails for an encoder with d = m / -7 instead of m / -8."""
    import gguf

    model, _ = smollm2_model
    W = next(iter(smollm2_rows(model).values()))
    true_div = torch.Tensor.__truediv__

    def minus_seven(self, other):  # the encoder's `m / -8`, made `m / -7`
        return true_div(self, -7) if isinstance(other, (int, float)) and other == -8 else true_div(self, other)

    monkeypatch.setattr(torch.Tensor, "__truediv__", minus_seven)
    wrong = ge.to_block_bytes("Q4_0", *ge.quantize_q4_0(torch.from_numpy(W)))
    monkeypatch.undo()
    assert differing_bytes(wrong, gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q4_0)) > 0


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

    proc = run_script(SCRIPT, "--model", tiny_model, "--tokenizer-pre", "gpt2", "--device", "cpu",
                      "--types", "Q8_0", "Q4_0", "--out-dir", tmp_path, "--eval-tokens", "32", "--quiet")
    assert "ours = gguf-py" in proc.stdout and "Q4_0" in proc.stdout
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
    ids = tokenizer("def f(x):\n    return x * 2\n" * 8, return_tensors="pt")["input_ids"][:, :65]
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
    rows = {r["qtype"]: r for r in result["rows"]}
    assert set(rows) == set(result["settings"]["types"])
    for r in rows.values():
        for key in ("file_mb", "bits_per_weight", "tensor_types", "file_vs_memory_max_abs_diff",
                    "scratch_bytes_equal", "quantized_tensors", "linear_rel_error", "perplexity",
                    "ppl_stderr", "kl", "top1", "eval_tokens", "transformers_param_mb"):
            assert key in r, key
        assert ("llama_cpp" in r) == HAVE_LLAMA_CPP
    for suffix in (".md", ".en.md", ".png"):
        assert (tmp_path / f"gguf-cpu{suffix}").stat().st_size > 0


@pytest.mark.llamacpp
def test_llama_cpp_runs_the_written_files(smollm2_model, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install llama-cpp-python==0.3.36 "
                                            "(compiles llama.cpp, about 3.5 min on 2 cores)")
    model, tokenizer = smollm2_model
    tensors = ge.gguf_tensors(model)
    path = tmp_path / "smollm2-Q8_0.gguf"
    ge.write_gguf(path, tensors, "Q8_0", lambda w: ge.add_metadata(w, model.config, tokenizer, "Q8_0", "smollm"),
                  quiet=True)
    text, n_new = ge.generate_llama_cpp(ge.load_llama_cpp(path, threads=1), ge.PROMPT, 16)
    print(repr(text))
    assert n_new > 0
    assert "Paris" in text, "llama.cpp must load our file and answer like the FP model"
