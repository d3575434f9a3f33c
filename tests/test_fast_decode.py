"""fast_decode.py: the compact decoder equals transformers, cached decode equals recomputation,
the quantized layers equal their dequantized references; bench/fast_decode.py writes its schema.

Both paths run inside each test (ours and transformers', cached and recomputed, PyTorch's int
kernels and a dequantize-then-matmul reference); tolerances come from tests/tolerances.py.
GPU-only parts (torch.compile, the fused CUDA-graph step, the h200 preset) are marked `gpu`.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from conftest import (ACCEL_EXAMPLES, BENCH, assert_refusal, assert_results_header, import_example,
                      run_bench, run_script)
from tolerances import (DTYPE_ATOL, INT4_LINEAR_REL, INT8_LINEAR_REL, KERNEL_BF16_REL, LOGITS_FP32_REL,
                        RTN_VS_LIBRARY_MISMATCHES, STEP_BF16_REL, STEP_INT4_VS_BF16_REL, STEP_INT8_REL,
                        rel_err)

SCRIPT = ACCEL_EXAMPLES / "fast_decode.py"
fd = import_example(SCRIPT)


@pytest.fixture(scope="module")
def tiny_pair(tiny_model: Path):
    """(transformers model, our decoder with its own copy of the weights), float32."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return hf, fd.model_from_hf(hf, share_weights=False)


@torch.no_grad()
def test_logits_equal_transformers(tiny_pair) -> None:
    hf, model = tiny_pair
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 37))
    model.setup_caches(2, 50)  # 13 empty slots: the mask must hide them
    assert rel_err(model(ids, torch.arange(37)), hf(ids).logits) < LOGITS_FP32_REL


@torch.no_grad()
def test_cached_greedy_equals_recomputation_and_transformers(tiny_pair) -> None:
    """Static-cache decode, greedy: the same tokens as recomputing the whole sequence at every
    step without a cache, and as transformers' generate, token for token."""
    hf, model = tiny_pair
    torch.manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (2, 11))
    cached = fd.generate(model, prompt, 12)
    seq = prompt
    for _ in range(12):  # recompute: a fresh cache and the full sequence each step
        model.setup_caches(2, seq.shape[1])
        nxt = model(seq, torch.arange(seq.shape[1]))[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    ref = hf.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                      attention_mask=torch.ones_like(prompt), pad_token_id=0)
    print(cached[:, 11:].tolist())
    assert torch.equal(cached, seq) and torch.equal(cached, ref)


@torch.no_grad()
def test_greedy_equals_transformers_on_smollm2(smollm2: Path) -> None:
    """Real weights, the script's default prompt: our decoder's greedy tokens equal generate's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(smollm2)(fd.build_parser().get_default("prompt"),
                                                  return_tensors="pt")["input_ids"]
    ref = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                      attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert torch.equal(fd.generate(fd.model_from_hf(hf), ids, 8), ref)


def test_int8_codes_equal_torch_quantize_per_channel() -> None:
    """Our per-channel INT8 codes against torch's own per-channel quantizer with our scale, and
    round to nearest: |W - Ŵ| <= scale / 2."""
    torch.manual_seed(0)
    W = torch.randn(96, 160) * torch.linspace(0.01, 0.05, 160)
    q, scale, zero = fd.quantize_int8(W)
    theirs = torch.quantize_per_channel(W, scale.double(), torch.zeros(96, dtype=torch.long), 0, torch.qint8)
    mismatches = int((theirs.int_repr() != q).sum())
    print(f"{mismatches} of {q.numel()} codes differ")
    assert q.dtype == torch.int8 and scale.shape == (96,) and mismatches <= RTN_VS_LIBRARY_MISMATCHES
    err = (W - fd.dequantize_int8(q, scale, zero)).abs()
    assert (err <= scale[:, None] / 2 + DTYPE_ATOL[torch.float32]).all()


def test_int4_round_trip_on_the_grid() -> None:
    torch.manual_seed(0)
    G = 32
    W = torch.randn(64, 256) * 0.02
    q, scale, zero = fd.quantize_int4(W, G)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == zero.shape == (64, 256 // G)
    W_hat = fd.dequantize_int4(q, scale, zero)
    s = scale.float().repeat_interleave(G, dim=1)
    inside = (q > 0) & (q < 15)  # only the clamped ends (integer zero point) may miss by more
    err = (W - W_hat).abs()
    assert (err[inside] <= s[inside] / 2 + DTYPE_ATOL[torch.float32]).all()
    assert (err <= s + DTYPE_ATOL[torch.float32]).all()
    level = W_hat / s + zero.float().repeat_interleave(G, dim=1)   # integer levels 0..15
    assert (level - level.round()).abs().max() < DTYPE_ATOL[torch.float32] * 100


@pytest.mark.parametrize("N, K, G", [(96, 64, 32), (256, 128, 64), (1536, 576, 64)])
def test_cpu_int_kernels_equal_the_dequantized_reference(N: int, K: int, G: int) -> None:
    """PyTorch's CPU int8 / tinygemm int4 kernels (bf16 activations) against x @ dequantize(q)^T;
    and the quantized layer against the float layer, within what the bits predict."""
    torch.manual_seed(N)
    W = torch.randn(N, K) * 0.02
    x = torch.randn(3, K)
    ref8 = x.bfloat16().float() @ fd.dequantize_int8(*fd.quantize_int8(W)).t()
    ref4 = x.bfloat16().float() @ fd.dequantize_int4(*fd.quantize_int4(W, G)).t()
    lin8, lin4 = fd.Int8Linear(W), fd.Int4Linear(W, G)
    assert rel_err(lin8(x), ref8) < KERNEL_BF16_REL
    assert rel_err(lin4(x), ref4) < KERNEL_BF16_REL
    assert rel_err(lin8(x), x @ W.t()) < INT8_LINEAR_REL
    assert rel_err(lin4(x), x @ W.t()) < INT4_LINEAR_REL


@torch.no_grad()
def test_quantize_model_swaps_every_linear_and_shrinks_bytes(tiny_pair) -> None:
    _, model = tiny_pair
    full = fd.weight_bytes(model)
    for fmt, cls, ratio in (("int8", fd.Int8Linear, 0.30), ("int4", fd.Int4Linear, 0.20)):
        q = fd.quantize_model(copy.deepcopy(model), fmt, 32)
        assert not any(type(m) is torch.nn.Linear for m in q.modules())
        assert sum(isinstance(m, cls) for m in q.modules()) == 7 * q.config.num_hidden_layers + 1
        print(fmt, fd.weight_bytes(q) / full)
        assert fd.weight_bytes(q) < ratio * full   # fp32 -> 1 byte (+ scales) or 0.5 byte (+ scales, zeros)


def test_step_bytes_counts_weights_embedding_row_and_cache(tiny_pair) -> None:
    _, model = tiny_pair
    c = model.config
    assert fd.weight_bytes(model) == 4 * sum(p.numel() for n, p in model.named_parameters()
                                             if not n.startswith("tok_embeddings"))
    kv = 2 * 10 * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * 4
    assert fd.step_bytes(1000, c, 2, 10, 4) == 1000 + 2 * c.hidden_size * 4 + kv


# ---------------------------------------------------------------------------------------------
# The script as a reader runs it, and its refusals
# ---------------------------------------------------------------------------------------------
def test_script_runs_on_the_tiny_model(tiny_model: Path) -> None:
    proc = run_script(SCRIPT, "--model", tiny_model, "--new-tokens", "4", "--group-size", "32",
                      env={"OMP_NUM_THREADS": "1"}, timeout=300)
    for variant in ("hf_generate", "eager", "eager_int8", "eager_int4"):
        assert f"\n{variant} " in proc.stdout, proc.stdout


def test_refusals(tmp_path: Path) -> None:
    """As a reader meets them (exit code 2, one line), then the in-process checks before loading."""
    assert_refusal(run_script(SCRIPT, "--model", tmp_path / "missing", check=False), "cannot load")
    assert_refusal(run_script(SCRIPT, "--device", "cuda", check=False), "no CUDA GPU")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    parser = fd.build_parser()
    for argv, words in ((["--prompt", " "], "prompt is empty"), (["--model", str(gpt2)], "cannot load")):
        with pytest.raises(fd.Refusal, match=words):
            fd.main(parser.parse_args(argv))
    with pytest.raises(SystemExit) as stop:
        fd.main(parser.parse_args(["--new-tokens", "0"]))
    assert stop.value.code == 2


def test_non_llama_config_is_refused() -> None:
    from transformers import GPT2Config, LlamaConfig

    with pytest.raises(fd.Refusal, match="Llama"):
        fd.Transformer(GPT2Config())
    with pytest.raises(fd.Refusal, match="RoPE"):
        fd.Transformer(LlamaConfig(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}))


# ---------------------------------------------------------------------------------------------
# bench/fast_decode.py
# ---------------------------------------------------------------------------------------------
RUN_KEYS = {"variant", "batch_size", "tokens_per_s", "tokens_per_s_q1", "tokens_per_s_q3", "step_ms",
            "bytes_per_step", "achieved_gbps", "roofline_tokens_per_s", "roofline_fraction", "setup_s"}


def check_schema(result: dict, out: Path, preset: str, variants: set[str]) -> None:
    assert_results_header(result)
    assert result["preset"] == preset and result["bandwidth_gbps"] > 0
    assert {r["variant"] for r in result["runs"]} == variants
    for r in result["runs"]:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert set(r["step_ms"]) >= {"median", "q1", "q3"}
    assert result["prefill"] and "best" in result and "errors" in result
    for suffix in (".md", ".en.md", ".png"):
        assert (out / f"fast_decode-{preset}{suffix}").stat().st_size > 0


def test_bench_cpu_preset_writes_its_schema(tiny_model: Path, tmp_path: Path) -> None:
    result = run_bench("fast_decode", "cpu", tmp_path, model=tiny_model)
    check_schema(result, tmp_path, "cpu", {"hf_generate", "eager", "eager_int8", "eager_int4"})
    quality = {q["variant"].split()[0]: q for q in result["quality"]}
    assert set(quality) == {"unquantized", "int8", "int4"} and quality["int8"]["tokens"] == 96
    assert quality["unquantized"]["kl_vs_unquantized"] == 0
    eager = next(r for r in result["runs"] if r["variant"] == "eager")
    assert eager["tokens_equal_to_hf"].split("/")[0] == eager["tokens_equal_to_hf"].split("/")[1]
    assert "Command: `python bench/fast_decode.py" in (tmp_path / "fast_decode-cpu.en.md").read_text()


def test_bench_refuses_an_unwritable_folder(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    proc = run_script(BENCH / "fast_decode.py", "--preset", "cpu", "--quick", "--out", blocked / "sub",
                      check=False)
    assert_refusal(proc, "cannot write")


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------
def small_gpu_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    hf = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    model = fd.model_from_hf(hf)
    with torch.no_grad():  # norms away from 1, so folding them into the weights is tested
        for m in model.modules():
            if isinstance(m, torch.nn.RMSNorm):
                m.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_compiled_step_equals_eager() -> None:
    model = small_gpu_model()
    prompt = torch.randint(0, 1000, (1, 20), device="cuda")
    eager = fd.generate(model, prompt, 6)
    step = torch.compile(fd.decode_one_token, mode="reduce-overhead", fullgraph=True)
    compiled = fd.generate(model, prompt, 6, step=lambda tok, pos: step(model, tok, pos))
    assert (eager == compiled).float().mean() > 0.9   # bf16: a rare near-tie may flip a token


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "int4_tinygemm"])
@torch.no_grad()
def test_gpu_fused_graph_step_equals_eager(fmt: str) -> None:
    """Replays of the captured fused step give the eager decoder's logits (teacher forcing)."""
    bench = import_example(BENCH / "fast_decode.py")
    model = small_gpu_model()
    B, T, n = 2, 70, 4
    prompt = torch.randint(0, 1000, (B, T), device="cuda")
    fused = bench.FusedDecoder(model, fmt, group=128)
    ref_model = model if fmt != "int8" else fd.quantize_model(copy.deepcopy(model), "int8", 128)
    for m in {id(model): model, id(ref_model): ref_model}.values():
        m.setup_caches(B, T + n + 4)
        first = fd.prefill(m, prompt, torch.arange(T, device="cuda"))
    fused.bind(B)
    fused.tok.copy_(first[:, 0])
    fused.pos.fill_(T)
    graph = fused.capture()
    tol = {"bf16": STEP_BF16_REL, "int8": STEP_INT8_REL}.get(fmt, STEP_INT4_VS_BF16_REL)
    for i in range(n):
        tok = fused.tok[:, None].clone()
        graph.replay()
        ref = ref_model(tok, torch.tensor([T + i], device="cuda"))[:, -1].float()
        assert rel_err(fused.logits, ref) < tol
    assert int(fused.pos) == T + n


@pytest.mark.gpu
def test_gpu_bench_h200_preset_quick(tmp_path: Path) -> None:
    result = run_bench("fast_decode", "h200", tmp_path)
    check_schema(result, tmp_path, "h200", {"hf_generate", "eager", "compiled", "fused_bf16", "fused_int8",
                                             "fused_int4", "int4_tinygemm"})
    assert not result["errors"], result["errors"]
    assert result["profile"]["kernels"] and (tmp_path / "fast_decode-h200-profile.en.md").exists()
