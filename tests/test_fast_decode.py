"""Tests of fast_decode.py: the compact decoder equals transformers, the quantized layers are right,
the script runs and refuses bad input; GPU-only parts (Triton kernels, CUDA graphs, torch.compile)
are marked `gpu`.

Tolerances (relative L2 error, ‖out − ref‖ / ‖ref‖) against an fp32 reference on the same weights:
a bf16 output rounding alone gives about 3e-3, so kernels must stay under 1e-2; whole decode steps
in bf16 under 2e-2; INT4 weights change a model's logits by about 0.1 on random Gaussian weights.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ACCEL_EXAMPLES, assert_results_header, run_script, run_script_json

sys.path.insert(0, str(ACCEL_EXAMPLES))
import fast_decode as fd  # noqa: E402

SCRIPT = ACCEL_EXAMPLES / "fast_decode.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # the CI machine's 2 cores are shared; one thread is faster there
TOL = {"kernel": 1e-2, "step_bf16": 2e-2, "step_int8": 5e-2, "step_int4_vs_bf16": 0.3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    print(f"relative error {err:.2e}, max abs {(out.double() - ref.double()).abs().max().item():.2e}")
    return err


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# CPU: correctness of the decoder and of the quantized layers
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def test_greedy_tokens_equal_transformers_generate(smollm2: Path, one_thread) -> None:
    """fp32 on the CPU: the static-cache eager decoder's greedy tokens equal `generate` exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2)
    ids = tok("The capital of France is Paris. The capital of Germany is", return_tensors="pt")["input_ids"]
    ref = hf.generate(ids, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(ids))
    model = fd.model_from_hf(hf)
    ours = fd.generate(model, ids, 12)
    print(tok.decode(ours[0, ids.shape[1]:]))
    assert torch.equal(ours[:, :ref.shape[1]], ref)
    # the prompt's logits too, position by position (the cache holds 40 slots, 14 used: empty ones masked)
    model.setup_caches(1, 40)
    assert rel_err(model(ids, torch.arange(ids.shape[1])), hf(ids).logits) < 1e-5


def test_int8_weights_on_their_grid() -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 160) * 0.02
    q, s = fd.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and s.shape == (96,)
    wd = fd.dequantize_int8(q, s)
    assert ((w - wd).abs() <= s[:, None] / 2 + 1e-9).all()      # round to nearest
    q2, s2 = fd.quantize_int8(wd)                                # the grid is a fixed point
    assert torch.equal(q2, q) and torch.allclose(s2, s)


def test_int4_grid_and_packing() -> None:
    torch.manual_seed(0)
    G = 32
    w = torch.randn(64, 256) * 0.02
    q, s, z = fd.quantize_int4(w, G)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and s.shape == (64, 256 // G)
    wd = fd.dequantize_int4(q, s, z, G)
    sg = s.float().repeat_interleave(G, dim=1)
    err = (w - wd).abs()
    inside = (q > 0) & (q < 15)        # round to nearest; only the clamped ends (integer zero point) may miss by more
    assert (err[inside] <= sg[inside] / 2 * (1 + 1e-3)).all() and (err <= sg * (1 + 1e-3)).all()
    level = wd / sg + z.float().repeat_interleave(G, dim=1)      # dequantized weights sit on integer levels
    assert (level - level.round()).abs().max() < 1e-3 and level.min() > -1e-3 and level.max() < 15 + 1e-3
    packed = fd.pack_int4(q, G)
    assert packed.shape == (64, 32) and packed.dtype == torch.int32 and torch.equal(fd.unpack_int4(packed, G), q)
    # layout: field i (bits 4i..4i+3) of word j of a group holds element i*W + j, W = G/8 words
    W = G // 8
    for g, j in ((0, 0), (1, 3), (7, 2)):
        word = int(packed[5, g * W + j]) & 0xFFFFFFFF
        assert word == sum(int(q[5, g * G + i * W + j]) << (4 * i) for i in range(8))


@pytest.mark.parametrize("N, K, G", [(1, 8, 8), (37, 48, 16), (5, 192, 64), (13, 384, 128)])
def test_int4_packing_round_trip_odd_shapes(N: int, K: int, G: int) -> None:
    """Every 4-bit value (15 too, whose top field sets the int32 sign bit) survives packing."""
    torch.manual_seed(N)
    q = torch.randint(0, 16, (N, K), dtype=torch.uint8)
    q[0, -1] = 15                                             # bit 31 of the last word: negative int32
    packed = fd.pack_int4(q, G)
    assert packed.shape == (N, K // 8) and torch.equal(fd.unpack_int4(packed, G), q)
    w = torch.randn(N, K) * 0.02                              # the module stores exactly quantize_int4's q
    assert torch.equal(fd.unpack_int4(fd.Int4Linear(w, G).packed, G), fd.quantize_int4(w, G)[0])


@torch.no_grad()
def test_loader_and_quantized_model(tiny_model: Path) -> None:
    """Checkpoint names map one to one; layers are swapped, weights shrink as stored, logits stay
    within what the bits predict."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = fd.model_from_hf(hf, share_weights=False)
    names = {fd.hf_to_fast_name(k) for k in hf.state_dict()}   # every checkpoint key has a home
    assert None not in names and names == set(model.state_dict())
    x = torch.randn(3, model.args.dim)
    lin = model.layers[0].attention.wq
    for fmt, tol in (("int8", 0.02), ("int4", 0.2)):
        qlin = fd.Int8Linear(lin.weight) if fmt == "int8" else fd.Int4Linear(lin.weight, 32)
        assert torch.allclose(qlin(x), x @ qlin.dequantized().t(), atol=1e-5)
        assert rel_err(qlin(x), lin(x)) < tol
    tokens = torch.randint(0, model.args.vocab_size, (1, 24))
    model.setup_caches(1, 32)
    ref = model(tokens, torch.arange(24))
    full = fd.plain_weight_bytes(model)
    for fmt, tol, ratio in (("int8", 0.03, 0.30), ("int4", 0.2, 0.20)):
        q = fd.quantize_model(copy.deepcopy(model), fmt, 32)
        assert all(type(m) is not torch.nn.Linear for layer in q.layers for m in layer.feed_forward.children())
        q.setup_caches(1, 32)
        assert rel_err(q(tokens, torch.arange(24)), ref) < tol
        assert fd.plain_weight_bytes(q) < ratio * full   # fp32 -> 1 byte (+scales) or 0.5 byte (+scales, zeros)


def _interpreter_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("triton") is not None


_INTERPRETED_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
import fast_decode as fd
torch.manual_seed(0)
N, K = 40, 256   # int4: 4 or 2 groups, unrolled by 3: the last iteration runs past the end (masked)
worst = 0.0
for fmt, M, rms, glu, groups, G in (("int4", 1, True, True, 3, 64), ("int4", 1, False, False, 2, 32),
                                     ("int4", 3, False, False, 3, 128), ("int8", 1, True, False, 64, 0),
                                     ("bf16", 3, True, True, 64, 0)):
    lin = fd.make_linear(torch.randn(2 * N if glu else N, K) * 0.05, fmt, G)
    x = torch.randn(M, K).bfloat16()
    res = torch.randn(M, N).bfloat16()
    out = fd.fused_linear(x, lin, rms=rms, glu=glu, residual=res, eps=1e-5,
                          config=(1 if M == 1 else 16, 16, groups, 4, 2))
    ref = fd.reference_linear(x, lin, rms, glu, res)
    worst = max(worst, ((out.float() - ref).norm() / ref.norm()).item())
print(worst)
"""


@pytest.mark.skipif(not _interpreter_available(), reason="triton is not installed (its CPU interpreter checks the kernels)")
def test_triton_kernels_in_interpreter() -> None:
    """The Triton GEMV kernels (bf16 / INT8 / INT4, with fused RMSNorm, SiLU*up and residual) against
    the dequantized reference, run by Triton's CPU interpreter (TRITON_INTERPRET=1, chosen when the
    kernels are defined, hence a fresh process); slow, so few and small (odd) shapes."""
    env = {**os.environ, "TRITON_INTERPRET": "1", **ONE_THREAD}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED_CHECK, str(ACCEL_EXAMPLES)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    worst = float(proc.stdout.strip().splitlines()[-1])
    print(f"worst relative error {worst:.2e}")
    assert worst < TOL["kernel"]


# ---------------------------------------------------------------------------------------------
# CPU: the script as a reader runs it
# ---------------------------------------------------------------------------------------------
def test_script_cpu_run(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "fast_decode-cpu.json"
    result = run_script_json(
        SCRIPT, out, "--model", str(tiny_model), "--device", "cpu", "--batch-sizes", "1,2",
        "--prompt-len", "16", "--slow-new-tokens", "6", "--repeats", "1", "--group-size", "32",
        "--ppl-tokens", "96", "--ppl-context", "48", "--quiet", env=ONE_THREAD)
    assert_results_header(result)
    assert result["bandwidth_gbps"] > 0
    runs = {(r["variant"], r["batch_size"]): r for r in result["runs"]}
    for v in ("hf_generate", "eager", "eager_int8", "eager_int4", "prefill"):
        for B in (1, 2):
            assert runs[(v, B)]["tokens_per_s"] > 0
            assert 0 < runs[(v, B)]["roofline_fraction"]
    assert runs[("eager", 1)]["matches_hf_generate"] and runs[("eager", 2)]["matches_hf_generate"]
    # stored bytes: int4 < int8 < fp32 weights
    assert runs[("eager_int4", 1)]["bytes_per_step"] < runs[("eager_int8", 1)]["bytes_per_step"] \
        < runs[("eager", 1)]["bytes_per_step"]
    quality = {q["variant"].split()[0]: q for q in result["quality"]}
    assert quality["unquantized"]["kl_vs_unquantized"] == 0 and quality["unquantized"]["top1_agreement"] == 1
    assert 0 <= quality["int8"]["kl_vs_unquantized"] < quality["int4"]["kl_vs_unquantized"]
    assert quality["int8"]["tokens"] == 96
    assert out.with_suffix(".md").read_text().count("| eager |") == 2
    assert out.with_suffix(".png").stat().st_size > 0


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    proc = run_script(SCRIPT, "--model", str(gpt2), "--device", "cpu", check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "not 'llama'" in lines[0], proc.stderr[-2000:]


@pytest.mark.parametrize("argv, message", [
    (["--variants", "compiled"], "needs a CUDA GPU"),
    (["--variants", "eager,turbo"], "unknown variant"),
    (["--batch-sizes", "1,x"], "comma list of integers"),
    (["--variants", "int4"], "needs the triton package"),
])
def test_bad_inputs_found_before_loading(argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks `main` runs first; the script turns UserError into `error: ...` and exit code 2."""
    monkeypatch.setattr(fd, "triton", None)   # as on a machine without triton
    args = fd.build_parser().parse_args(["--random-weights", "llama-3-8b", "--device", "cpu", *argv])
    with pytest.raises(fd.UserError, match=message):
        fd.check_inputs(args)


# ---------------------------------------------------------------------------------------------
# GPU: Triton kernels, CUDA graphs, torch.compile
# ---------------------------------------------------------------------------------------------
def _small_gpu_model(seed: int = 0) -> fd.Transformer:
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5)
    model = fd.random_model(cfg, "cuda", torch.bfloat16, seed)
    with torch.no_grad():
        for layer in model.layers:  # norms away from 1, so folding them into the weights is tested
            layer.attention_norm.weight.uniform_(0.5, 1.5)
            layer.ffn_norm.weight.uniform_(0.5, 1.5)
        model.norm.weight.uniform_(0.5, 1.5)
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
@pytest.mark.parametrize("M", [1, 8, 32])
def test_gpu_linear_kernel_vs_dequantized(fmt: str, M: int) -> None:
    torch.manual_seed(M)
    N, K = 1000, 384   # odd N: the last column block is partial
    for rms, glu, res in ((False, False, False), (True, False, False), (True, True, False), (False, False, True)):
        lin = fd.make_linear(torch.randn(2 * N if glu else N, K, device="cuda") * 0.02, fmt, 128)
        x = torch.randn(M, K, device="cuda").bfloat16()
        r = torch.randn(M, N, device="cuda").bfloat16() if res else None
        out = torch.full((M, N), float("nan"), device="cuda", dtype=torch.bfloat16)  # every element written
        fd.fused_linear(x, lin, out=out, rms=rms, glu=glu, residual=r, eps=1e-5)
        assert not out.isnan().any()
        assert rel_err(out, fd.reference_linear(x, lin, rms, glu, r)) < TOL["kernel"]


@pytest.mark.gpu
@pytest.mark.parametrize("G", [32, 128])
@pytest.mark.parametrize("config", fd.GEMV_CANDIDATES["int4"])
def test_gpu_int4_gemv_every_config_odd_shape(config: tuple, G: int) -> None:
    """Batch 1: every INT4 launch configuration the tuner may pick, on an odd shape (N = 997, a
    partial row block; K = 5 groups of 128, or 20 of 32: the unrolled groups run past the end)."""
    torch.manual_seed(G)
    N, K = 997, 640
    for rms, glu, res in ((True, True, False), (False, False, True)):
        lin = fd.make_linear(torch.randn(2 * N if glu else N, K, device="cuda") * 0.02, "int4", G)
        x = torch.randn(1, K, device="cuda").bfloat16()
        r = torch.randn(1, N, device="cuda").bfloat16() if res else None
        out = torch.full((1, N), float("nan"), device="cuda", dtype=torch.bfloat16)
        fd.fused_linear(x, lin, out=out, rms=rms, glu=glu, residual=r, eps=1e-5, config=(1, *config))
        assert not out.isnan().any()
        assert rel_err(out, fd.reference_linear(x, lin, rms, glu, r)) < TOL["kernel"]


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 8])
def test_gpu_tinygemm_same_weights(M: int) -> None:
    """PyTorch's stock int4 kernel on our q, s, z gives our dequantized reference (packing checked)."""
    torch.manual_seed(M)
    N, K = 1000, 384
    w = torch.randn(N, K, device="cuda") * 0.02
    tiny, ours = fd.make_linear(w, "int4_tinygemm", 128), fd.make_linear(w, "int4", 128)
    x = torch.randn(M, K, device="cuda").bfloat16()
    assert fd.linear_bytes(tiny) == fd.linear_bytes(ours)   # same bytes read per step
    assert rel_err(tiny(x).float(), fd.reference_linear(x, ours)) < TOL["kernel"]


@pytest.mark.gpu
@pytest.mark.parametrize("pos", [0, 77, 200])
def test_gpu_decode_attention_vs_sdpa(pos: int) -> None:
    """RoPE + cache write + attention over slots 0..pos; NaN beyond pos changes nothing."""
    torch.manual_seed(pos)
    B, H, Hkv, D, S = 3, 8, 2, 64, 256
    args = fd.ModelArgs(dim=H * D, n_layers=1, n_heads=H, n_kv_heads=Hkv, head_dim=D, ffn_dim=1,
                        vocab_size=1, rope_theta=10000.0)
    cos, sin = fd.precompute_rope(args, S, "cuda")
    cache = fd.KVCache(B, Hkv, S, D, torch.bfloat16, "cuda")
    cache.k.normal_()
    cache.v.normal_()
    cache.k[:, :, pos + 1:] = float("nan")
    cache.v[:, :, pos + 1:] = float("nan")
    qkv = torch.randn(B, (H + 2 * Hkv) * D, device="cuda").bfloat16()
    out = torch.empty(B, H * D, device="cuda", dtype=torch.bfloat16)
    ref_k, ref_v = cache.k.float().clone(), cache.v.float().clone()
    fd.decode_attention(qkv, cos, sin, torch.tensor([pos], device="cuda"), cache, out, H, Hkv)
    q, k, v = qkv.float().view(B, H + 2 * Hkv, 1, D).split([H, Hkv, Hkv], dim=1)   # (B, heads, 1, D)
    c, s = cos[pos:pos + 1], sin[pos:pos + 1]
    q, k = fd.apply_rope(q, c, s), fd.apply_rope(k, c, s)
    ref_k[:, :, pos:pos + 1], ref_v[:, :, pos:pos + 1] = k, v
    assert rel_err(cache.k[:, :, pos].float(), k[:, :, 0]) < TOL["kernel"]
    ref = F.scaled_dot_product_attention(q, ref_k[:, :, :pos + 1], ref_v[:, :, :pos + 1], enable_gqa=True)
    assert rel_err(out.float(), ref.reshape(B, H * D)) < TOL["kernel"]


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4", "int4_tinygemm"])
@torch.no_grad()
def test_gpu_fused_graph_step_vs_eager(fmt: str) -> None:
    """Replays of the captured step give the eager decoder's logits (teacher forcing), step by step."""
    model = _small_gpu_model()
    B, T, n = 2, 70, 4
    prompt = torch.randint(0, 1000, (B, T), device="cuda")
    fused = fd.FusedDecoder(model, fmt, group=128)
    ref_model = model if fmt != "int8" else fd.quantize_model(copy.deepcopy(model), "int8", 128)
    for m in {id(model): model, id(ref_model): ref_model}.values():
        m.setup_caches(B, T + n + 4)
    fused.bind(B)
    first = fd.prefill(model, prompt, torch.arange(T, device="cuda"))
    if ref_model is not model:
        fd.prefill(ref_model, prompt, torch.arange(T, device="cuda"))
    fused.tok.copy_(first[:, 0])
    fused.pos.fill_(T)
    graph = fused.capture()
    tol = {"bf16": TOL["step_bf16"], "int8": TOL["step_int8"], "int4": TOL["step_int4_vs_bf16"],
           "int4_tinygemm": TOL["step_int4_vs_bf16"]}[fmt]
    for i in range(n):
        tok = fused.tok[:, None].clone()
        graph.replay()
        ref = ref_model(tok, torch.tensor([T + i], device="cuda"))[:, -1].float()
        assert rel_err(fused.logits, ref) < tol
    assert int(fused.pos) == T + n


@pytest.mark.gpu
@torch.no_grad()
def test_gpu_compiled_step_vs_eager() -> None:
    model = _small_gpu_model()
    prompt = torch.randint(0, 1000, (1, 20), device="cuda")
    eager = fd.generate(model, prompt, 6)
    step = torch.compile(fd.decode_one_token, mode="reduce-overhead", fullgraph=True)
    compiled = fd.generate(model, prompt, 6, step=lambda tok, pos: step(model, tok, pos))
    assert (eager == compiled).float().mean() > 0.9   # bf16: a rare near-tie may flip a token


@pytest.mark.gpu
def test_gpu_script_run(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "llama", "vocab_size": 1000, "hidden_size": 256,
                                  "intermediate_size": 768, "num_hidden_layers": 2, "num_attention_heads": 8,
                                  "num_key_value_heads": 2, "head_dim": 32}))
    out = tmp_path / "fd.json"
    result = run_script_json(SCRIPT, out, "--random-weights", str(config), "--variants",
                             "eager,fused_bf16,fused_int8,fused_int4,int4_tinygemm", "--batch-sizes", "1,8",
                             "--prompt-len", "32", "--new-tokens", "16", "--slow-new-tokens", "4",
                             "--repeats", "1", "--no-tune", "--profile", "--quiet")
    assert_results_header(result)
    names = {(r["variant"], r["batch_size"]) for r in result["runs"]}
    for v in ("fused_bf16", "fused_int8", "fused_int4", "int4_tinygemm", "bf16", "int8", "int4", "prefill"):
        assert (v, 1) in names and (v, 8) in names
    assert result["profile"] and out.with_name("fd-profile.md").exists()
