"""Decode at the bandwidth limit: tokens/s, achieved GB/s and roofline fraction of every variant.

Loads three teaching scripts of inference/inference-acceleration/examples/: fast_decode.py (the
compact decoder, static cache, generate, INT8/INT4 on PyTorch's kernels), decode_kernels.py
(the Triton GEMVs) and decode_attention.py (the Triton decode attention), and assembles here what no page holds: the fused
whole decode step (five kernels per layer, norm weights folded into the next matrix, q/k/v and
gate/up concatenated, the step recorded as one CUDA graph), the launch-configuration tuner, the
timing, the roofline and the quality measurement. Variants:

    hf_generate    transformers `generate` (dynamic KV cache), the baseline
    eager          our decoder, static KV cache, one Python loop; eager_int8 / eager_int4 the same
                   with Int8Linear / Int4Linear (PyTorch's own int8 and tinygemm int4 kernels)
    compiled       torch.compile(decode_one_token, mode="reduce-overhead") (CUDA graphs inside)
    fused_bf16     the fused Triton step in one CUDA graph; fused_int8 / fused_int4 with INT8
                   (per channel) or INT4 (group-wise, strips) weights
    int4_tinygemm  the same fused step with PyTorch's stock `_weight_int4pack_mm` for every linear
                   (gpt-fast's int4 path), epilogues as small PyTorch ops inside the same graph

Every decode row stores tokens/s with the spread of its repeats, bytes per step (weights as
stored + one embedding row per sequence + the KV cache at the mean length), achieved GB/s and the
fraction of the roofline (bytes per step at the measured copy bandwidth). Prefill is reported
against the measured matmul rate; on real weights the INT8 / INT4 models' perplexity, KL
divergence and top-1 agreement against the unquantized model (fake quantization: the
dequantized weights in float). Writes

    fast_decode-<preset>.{json,md,en.md}    decode rows, prefill, best per precision, quality
    fast_decode-<preset>.png                tokens/s of each variant against its roofline, batch 1
    fast_decode-<preset>-batch.png          fraction of the roofline by batch size (several batches)
    fast_decode-<preset>-profile.{md,en.md} one fused_bf16 step, GPU time per kernel (--profile)

Run: python bench/fast_decode.py --preset cpu      (the GPU run: --preset h200)
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import common  # bench/ is on sys.path: it is the folder of the script being run

ALL_VARIANTS = ["hf_generate", "eager", "eager_int8", "eager_int4", "compiled",
                "fused_bf16", "fused_int8", "fused_int4", "int4_tinygemm"]

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "about": "SmolLM2-135M float32 on one CPU thread: hf_generate, eager, eager_int8, eager_int4 "
                 "at batch 1, prompt 64, 16 new tokens; INT8 / INT4 (group 64) quality on 1024 tokens",
        "model": "smollm2",
        "device": "cpu",
        "dtype": "float32",
        "threads": 1,
        "variants": ["hf_generate", "eager", "eager_int8", "eager_int4"],
        "batch_sizes": [1],
        "prompt_len": 64,
        "new_tokens": 256,        # fast variants (compiled, fused_*): none on the CPU
        "slow_new_tokens": 16,    # hf_generate and the eager variants
        "repeats": 3,
        "slow_repeats": 3,       # hf_generate / eager: a spread, not one sample
        "group_size": 64,
        "tune": False,
        "profile": False,
        "ppl_tokens": 1024,
        "ppl_context": 256,
        "quick": {"prompt_len": 16, "slow_new_tokens": 4, "slow_repeats": 1, "group_size": 32,
                  "ppl_tokens": 96, "ppl_context": 48},
    },
    "h200": {
        "about": "Llama-3-8B shape with random bf16 weights on one GPU: every variant at batch 1, 8 "
                 "and 32, prompt 128, 256 new tokens (32 for hf_generate / eager), median of 3, "
                 "INT4 group 128, tuned Triton launch configurations, profile of one fused_bf16 step",
        "model": common.RANDOM_8B,
        "device": "cuda",
        "dtype": "bfloat16",
        "threads": 0,
        "variants": [v for v in ALL_VARIANTS if v not in ("eager_int8", "eager_int4")],
        "batch_sizes": [1, 8, 32],
        "prompt_len": 128,
        "new_tokens": 256,
        "slow_new_tokens": 32,
        "repeats": 3,
        "slow_repeats": 3,       # hf_generate / eager: a spread, not one sample
        "group_size": 128,
        "tune": True,
        "profile": True,
        "ppl_tokens": 0,          # random weights: speed only
        "ppl_context": 256,
        "quick": {"shape": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
                            "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32,
                            "vocab_size": 1000},
                  "batch_sizes": [1, 8], "prompt_len": 32, "new_tokens": 16, "slow_new_tokens": 4,
                  "repeats": 1, "slow_repeats": 1, "tune": False},
    },
}

EXAMPLES = common.ACCEL / "examples"
fd = common.load_script(EXAMPLES / "fast_decode.py")
dk = common.load_script(EXAMPLES / "decode_kernels.py")
da = common.load_script(EXAMPLES / "decode_attention.py")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The fused whole decode step: five kernels per layer, one CUDA graph
# ---------------------------------------------------------------------------------------------
def packed_linear(W, fmt: str, group: int):
    """W (N, K) as the kernels read it: fd's quantize_* pairs, dk's INT4 strips."""
    import torch

    if fmt == "bf16":
        return dk.Linear("bf16", W.to(torch.bfloat16).contiguous())
    if fmt == "int8":
        q, scale, _ = fd.quantize_int8(W)
        return dk.Linear("int8", q, scale)
    if fmt == "int4_tinygemm":
        return fd.Int4Linear(W, group)
    q, scale, zero = fd.quantize_int4(W, group)                                # (N, K), (N, K/G) x 2
    return dk.Linear("int4", dk.pack_int4(q, group), scale.t().contiguous(), zero.t().contiguous(), group)


def linear_bytes(lin) -> int:
    if isinstance(lin, dk.Linear):
        return lin.nbytes()
    return sum(t.numel() * t.element_size() for t in lin.buffers())


def tinygemm_linear(x, lin, out, rms=False, glu=False, residual=None, eps=0.0):
    """PyTorch's stock int4 kernel, then the same epilogue as small PyTorch ops (the baseline)."""
    import torch.nn.functional as F

    x2 = x.reshape(-1, x.shape[-1]).float()
    if rms:
        x2 = x2 * (x2.pow(2).mean(-1, keepdim=True) + eps).rsqrt()
    y = lin(x2.to(x.dtype)).float()                                            # (M, NW)
    if glu:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    out.view(-1, y.shape[-1]).copy_(y + residual.view(-1, y.shape[-1]).float() if residual is not None else y)
    return out


def linear(x, lin, out, **kw):
    if isinstance(lin, dk.Linear):
        return dk.fused_linear(x, lin, out=out, **kw)
    return tinygemm_linear(x, lin, out, **kw)


class FusedDecoder:
    """Decode-only fast path built from a fast_decode Transformer (it shares its caches and its
    prefill). Per layer: [RMSNorm + qkv GEMV] -> [RoPE + cache write + attention] -> [o GEMV +
    residual] -> [RMSNorm + gate/up GEMV + SiLU*up] -> [down GEMV + residual]. RMSNorm weights
    are folded into the next matrix (W' = W diag(g)); q/k/v and gate/up are concatenated, so each
    GEMV reads its weights once. `fmt`: bf16, int8, int4 or int4_tinygemm for all of them."""

    def __init__(self, model, fmt: str, group: int = 128):
        import torch

        c = model.config
        if c.head_dim < 32 or c.head_dim & (c.head_dim - 1):
            common.fail(f"the fused attention kernel needs a power-of-two head dim >= 32, not {c.head_dim}")
        self.model, self.fmt, self.layers = model, fmt, []
        with torch.no_grad():
            for layer in model.layers:
                a, f = layer.attention, layer.feed_forward
                g1, g2 = layer.attention_norm.weight.float(), layer.ffn_norm.weight.float()
                wqkv = torch.cat([a.wq.weight, a.wk.weight, a.wv.weight]).float() * g1  # (N_qkv, C)
                wgu = torch.cat([f.w_gate.weight, f.w_up.weight]).float() * g2           # (2F, C)
                self.layers.append({"qkv": packed_linear(wqkv, fmt, group),
                                    "o": packed_linear(a.wo.weight, fmt, group),
                                    "gate_up": packed_linear(wgu, fmt, group),
                                    "down": packed_linear(f.w_down.weight, fmt, group)})
                del wqkv, wgu
            head = model.output.weight.float() * model.norm.weight.float()
            self.head = packed_linear(head, fmt, group)
            del head
        self.embedding = model.tok_embeddings.weight.detach()                  # (V, C), shared
        self.graph = None

    def linears(self) -> list:
        return [lay[k] for lay in self.layers for k in ("qkv", "o", "gate_up", "down")] + [self.head]

    def weight_bytes(self) -> int:
        return sum(linear_bytes(m) for m in self.linears())

    def bind(self, batch: int) -> None:
        """Static buffers for one batch size: the step reads `tok`/`pos` and updates them in place."""
        import torch

        c, dev, dt = self.model.config, self.embedding.device, self.embedding.dtype
        n_qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)              # (B,)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)                  # (1,)
        self.h = torch.empty(batch, c.hidden_size, dtype=dt, device=dev)         # (B, C) residual stream
        self.qkv = torch.empty(batch, n_qkv, dtype=dt, device=dev)               # (B, (H + 2Hkv) D)
        self.attn = torch.empty(batch, c.num_attention_heads * c.head_dim, dtype=dt, device=dev)
        self.act = torch.empty(batch, c.intermediate_size, dtype=dt, device=dev)  # (B, F)
        self.logits = torch.empty(batch, c.vocab_size, dtype=torch.float32, device=dev)
        self.history = torch.zeros(batch, self.model.max_len, dtype=torch.long, device=dev)  # (B, S)
        self.graph = None

    # --8<-- [start:fused_step]
    def step(self) -> None:
        """One decode step on the static buffers: tok (B,) at pos -> tok for pos + 1;
        pos += 1."""
        import torch

        m, c = self.model, self.model.config
        eps, H, Hkv = c.rms_norm_eps, c.num_attention_heads, c.num_key_value_heads
        torch.index_select(self.embedding, 0, self.tok, out=self.h)     # (B, C)
        for lay, layer in zip(self.layers, m.layers):
            cache = layer.attention.kv_cache                            # shared with prefill
            linear(self.h, lay["qkv"], self.qkv, rms=True, eps=eps)     # norm folded into W
            da.decode_attention(self.qkv, m.rope_cos, m.rope_sin, self.pos, cache.k, cache.v,
                                self.attn, H, Hkv)
            linear(self.attn, lay["o"], self.h, residual=self.h)        # h += attn Wo^T
            linear(self.h, lay["gate_up"], self.act, rms=True, glu=True, eps=eps)  # (B, F)
            linear(self.act, lay["down"], self.h, residual=self.h)      # h += act Wd^T
        linear(self.h, self.head, self.logits, rms=True, eps=eps)       # (B, V) fp32
        torch.argmax(self.logits, dim=-1, out=self.tok)
        self.history.index_copy_(1, self.pos, self.tok.unsqueeze(1))    # token for pos + 1
        self.pos.add_(1)  # inside the graph: no host work between steps

    def capture(self):
        """Warm up (compiles the kernels) on a side stream, then record one step as a CUDA
        graph; replaying it launches all ~5 x layers kernels with one call and no Python in
        between."""
        import torch

        saved_tok, saved_pos = self.tok.clone(), self.pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.step()
        self.tok.copy_(saved_tok)
        self.pos.copy_(saved_pos)
        return self.graph
    # --8<-- [end:fused_step]


# Launch-configuration candidates (BLOCK_N, BLOCK_K or INT4 groups per iteration, warps, stages,
# split-K slices), timed on the real shapes by tune(); the lists hold the winners of a wider sweep
# on the H200. INT4 at batch 1: many rows per thread (64-128 rows, 1-4 warps) reuse each x value
# across rows, and split-K restores the programs that wide row blocks take away.
GEMV_CANDIDATES = {
    "bf16": [(4, 2048, 4, 3, 1), (8, 512, 4, 3, 1), (16, 512, 4, 3, 1), (4, 2048, 4, 3, 4)],
    "int8": [(4, 2048, 4, 3, 1), (8, 512, 4, 3, 1), (8, 1024, 4, 3, 1), (16, 512, 4, 3, 1)],
    "int4": [(32, 2, 1, 1, 8), (64, 1, 1, 1, 2), (128, 1, 2, 1, 2), (128, 1, 4, 1, 16), (128, 1, 4, 2, 16)],
}
GEMM_CANDIDATES = {"bf16": [(32, 128, 4, 3, 1), (64, 128, 4, 3, 1), (64, 64, 4, 4, 1), (128, 64, 8, 3, 1)],
                   "int4": [(64, 2, 4, 3, 4), (64, 1, 4, 3, 8), (64, 1, 4, 2, 4), (128, 1, 8, 3, 8)]}


def tune_linear(lin, M: int, rms: bool = False, glu: bool = False) -> dict:
    """Time the candidates on this layer's shape (do_bench flushes L2, so weights come from HBM),
    keep the fastest in lin.tuned; return the choice, its time and the weight GB/s it reached."""
    import torch
    import triton

    bm = 1 if M == 1 else (16 if M <= 16 else 32)  # BLOCK_M, as fused_linear picks it
    if isinstance(lin, dk.Linear):
        K, NW = lin.weight.shape[1] * (8 if lin.fmt == "int4" else 1), lin.weight.shape[0]
    else:
        K, NW = lin.in_features, lin.out_features
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(M, NW // 2 if glu else NW, device="cuda", dtype=torch.bfloat16)
    if not isinstance(lin, dk.Linear):  # tinygemm: nothing to tune, timed for the table
        cands = [None]
    else:
        cands = GEMV_CANDIDATES[lin.fmt] if bm == 1 else GEMM_CANDIDATES["int4" if lin.fmt == "int4" else "bf16"]
    best, best_ms, tried = None, float("inf"), {}
    for cand in cands:
        kw = dict(rms=rms, glu=glu, eps=1e-5)
        fn = (lambda: tinygemm_linear(x, lin, out, **kw)) if cand is None else \
            (lambda: dk.fused_linear(x, lin, out=out, config=(bm, *cand), **kw))
        try:
            ms = triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median")
        except Exception as error:  # a config the compiler rejects (resources) is skipped
            tried[str(cand)] = f"skipped: {type(error).__name__}"
            continue
        tried[str(cand)] = round(ms * 1000, 1)
        if ms < best_ms:
            best, best_ms = cand, ms
    if best is not None and isinstance(lin, dk.Linear):
        lin.tuned[bm] = best
    if best_ms == float("inf"):
        return {"config": None, "us": float("nan"), "weight_gbps": float("nan"), "tried_us": tried}
    return {"config": best, "us": best_ms * 1000, "weight_gbps": linear_bytes(lin) / best_ms / 1e6,
            "tried_us": tried}


def tune(fused: FusedDecoder, batch: int) -> dict[str, dict]:
    """Tune each distinct weight shape once (all layers share the shapes) and copy the choice."""
    chosen, first = {}, fused.layers[0]
    for key, rms, glu in (("qkv", True, False), ("o", False, False), ("gate_up", True, True),
                          ("down", False, False)):
        chosen[key] = tune_linear(first[key], batch, rms, glu)
        for lay in fused.layers[1:]:
            if isinstance(lay[key], dk.Linear):
                lay[key].tuned = dict(first[key].tuned)
    chosen["head"] = tune_linear(fused.head, batch, rms=True)
    return chosen


# ---------------------------------------------------------------------------------------------
# Timing of each variant
# ---------------------------------------------------------------------------------------------
def run_hf_generate(hf, prompt, n_new: int, repeats: int, device) -> dict:
    """transformers `generate`, greedy; decode time = t(n) - t(1) so the prompt is excluded."""
    import torch

    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    gen = lambda n: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kw)  # noqa: E731
    start = time.perf_counter()
    gen(2)
    common.sync(device)
    setup = time.perf_counter() - start
    t1 = statistics.median(common.time_ms(lambda: gen(1), device, warmup=0, repeats=repeats))
    tn = common.time_ms(lambda: gen(n_new), device, warmup=0, repeats=repeats)
    return {"step_ms": [max(t - t1, 1e-6) / (n_new - 1) for t in tn], "new_tokens": n_new - 1,
            "setup_s": setup, "tokens": gen(n_new)}


def run_loop(model, step: Callable, prompt, n_new: int, repeats: int, warmup_steps: int, device) -> dict:
    """Prefill, then n_new decode steps through step(token, input_pos); the warm-up (and any
    compilation) is timed separately as setup_s."""
    import torch

    B, T = prompt.shape
    model.setup_caches(B, T + n_new + 2)
    pos = torch.arange(T, device=device)
    start = time.perf_counter()
    fd.decode_n_tokens(step, fd.prefill(model, prompt, pos), T, warmup_steps)
    common.sync(device)
    setup, samples, tokens = time.perf_counter() - start, [], None
    for _ in range(repeats):
        first = fd.prefill(model, prompt, pos)
        common.sync(device)
        t0 = time.perf_counter()
        rest = fd.decode_n_tokens(step, first, T, n_new)
        common.sync(device)
        samples.append((time.perf_counter() - t0) * 1e3 / n_new)
        tokens = torch.cat([prompt, first, *rest], dim=1)
    return {"step_ms": samples, "new_tokens": n_new, "setup_s": setup, "tokens": tokens}


def run_fused(fused: FusedDecoder, prompt, n_new: int, repeats: int, tune_configs: bool, device) -> dict:
    """Prefill with the layer-by-layer model (it shares the caches), then replay the step graph."""
    import torch

    model, (B, T) = fused.model, prompt.shape
    model.setup_caches(B, T + n_new + 2)
    start = time.perf_counter()
    fused.bind(B)
    configs = tune(fused, B) if tune_configs else None
    pos = torch.arange(T, device=device)

    def begin():
        first = fd.prefill(model, prompt, pos)                   # (B, 1): the token for position T
        fused.tok.copy_(first[:, 0])
        fused.pos.fill_(T)
        return first

    begin()
    graph = fused.capture()
    common.sync(device)
    setup, samples = time.perf_counter() - start, []
    for _ in range(repeats):
        first = begin()
        common.sync(device)
        t0 = time.perf_counter()
        for _ in range(n_new):
            graph.replay()  # one launch per token; tok, pos and history advance on the GPU
        common.sync(device)
        samples.append((time.perf_counter() - t0) * 1e3 / n_new)
    tokens = torch.cat([prompt, first, fused.history[:, T:T + n_new]], dim=1)
    return {"step_ms": samples, "new_tokens": n_new, "setup_s": setup, "tokens": tokens,
            "launch_configs": configs}


def profile_fused(fused: FusedDecoder, start_pos: int, steps: int = 5) -> tuple[list[dict], float]:
    """torch.profiler over `steps` graph replays: GPU time per kernel per step, and the summed
    kernel time per step (against the step's wall time: the rest is gaps between kernels)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    def collect(fn) -> list:
        fused.pos.fill_(start_pos)  # the cache has room for `steps` more positions from here
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                fn()
            torch.cuda.synchronize()
        return [e for e in prof.key_averages() if e.self_device_time_total > 0]

    events, source = collect(fused.graph.replay), "graph replay"
    if not events:  # some profiler builds do not see kernels inside graphs: launch them directly
        with torch.no_grad():
            events, source = collect(fused.step), "direct launches"
    total = sum(e.self_device_time_total for e in events)
    rows = [{"kernel": e.key[:90], "calls_per_step": e.count / steps,
             "us_per_step": e.self_device_time_total / steps,
             "share": e.self_device_time_total / total, "source": source}
            for e in sorted(events, key=lambda e: -e.self_device_time_total)]
    return rows, total / steps


def fake_quantized(model, fmt: str, group: int):
    """A copy whose linear weights are replaced by dequantize(quantize(W)) (same numbers in float)."""
    import torch
    import torch.nn as nn

    m = copy.deepcopy(model)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.Linear):
                W = mod.weight
                W_hat = fd.dequantize_int8(*fd.quantize_int8(W)) if fmt == "int8" \
                    else fd.dequantize_int4(*fd.quantize_int4(W, group))
                mod.weight = nn.Parameter(W_hat.to(W.dtype), requires_grad=False)
    return m


def evaluate_quality(models: dict, tokens, context: int) -> list[dict]:
    """Perplexity (with its standard error) on non-overlapping windows; against the first
    (unquantized) model on the same tokens: mean KL divergence and top-1 agreement."""
    import torch
    import torch.nn.functional as F

    names = list(models)
    nll, kl, agree = ({n: [] for n in names} for _ in range(3))
    for start in range(0, tokens.numel() - 1, context):
        window = tokens[start:start + context + 1]
        if window.numel() < 2:
            break
        inp, target = window[:-1][None], window[1:]
        ref_logp = None
        for name in names:
            m = models[name]
            m.setup_caches(1, context)
            logp = F.log_softmax(m(inp, torch.arange(inp.shape[1], device=inp.device))[0].float(), -1)
            nll[name].append(-logp.gather(1, target[:, None])[:, 0])
            ref_logp = logp if ref_logp is None else ref_logp
            kl[name].append((ref_logp.exp() * (ref_logp - logp)).sum(-1))
            agree[name].append((logp.argmax(-1) == ref_logp.argmax(-1)).float())
    out = []
    for name in names:
        losses = torch.cat(nll[name]).double()
        mean, se = losses.mean().item(), (losses.std() / math.sqrt(losses.numel())).item()
        out.append({"variant": name, "tokens": losses.numel(), "ppl": math.exp(mean),
                    "ppl_se": math.exp(mean) * se, "kl_vs_unquantized": torch.cat(kl[name]).mean().item(),
                    "top1_agreement": torch.cat(agree[name]).mean().item()})
    return out


def matmul_tflops(device, dtype, n: int, repeats: int) -> float:
    """Rate of one large matrix product in the run's dtype: the ceiling for compute-bound prefill."""
    import torch

    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    ms = statistics.median(common.time_ms(lambda: a @ b, device, warmup=2, repeats=repeats))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def prefill_flops(c, batch: int, T: int) -> float:
    """2 x (weights touched per token) x tokens, plus causal attention (QK^T and PV)."""
    H, Hkv, D, C = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    per_layer = C * (H + 2 * Hkv) * D + H * D * C + 3 * C * c.intermediate_size
    linear = 2 * (c.num_hidden_layers * per_layer + C * c.vocab_size) * batch * T
    return linear + c.num_hidden_layers * 2 * 2 * batch * H * D * T * T / 2


def summarize(runs: list[dict]) -> list[dict]:
    """bf16, int8, int4: the fastest compiled variant of each precision at each batch size."""
    out = []
    for prec, names in (("bf16", ("compiled", "fused_bf16")), ("int8", ("fused_int8",)),
                        ("int4", ("fused_int4", "int4_tinygemm"))):
        for B in sorted({r["batch_size"] for r in runs}):
            cands = [r for r in runs if r["variant"] in names and r["batch_size"] == B]
            if cands:
                best = max(cands, key=lambda r: r["tokens_per_s"])
                out.append({"precision": prec, "batch_size": B, "variant": best["variant"],
                            "tokens_per_s": best["tokens_per_s"], "roofline_fraction": best["roofline_fraction"]})
    return out


# ---------------------------------------------------------------------------------------------
# Tables and plots, from the results dictionary
# ---------------------------------------------------------------------------------------------
NAMES = {"zh": {"variant": "变体", "batch": "批大小", "tps": "解码词元/秒(中位数,IQR)", "x": "× eager",
                "gb": "每步读取 (GB)", "gbps": "实际 GB/s", "frac": "屋顶线比例", "setup": "准备 (s)",
                "prefill": "预填充", "prompt": "提示词元", "ptps": "词元/秒", "tflops": "TFLOP/s",
                "pfrac": "占矩阵乘峰值", "quality": "质量", "tokens": "词元数", "ppl": "困惑度",
                "kl": "对未量化模型的 KL", "top1": "top-1 一致率",
                "gemv": "GEMV,批大小 1(调参时单独计时)"},
         "en": {"variant": "variant", "batch": "batch", "tps": "decode tokens/s (median, IQR)",
                "x": "× eager", "gb": "bytes/step (GB)", "gbps": "achieved GB/s",
                "frac": "fraction of roofline", "setup": "setup (s)", "prefill": "prefill",
                "prompt": "prompt tokens", "ptps": "tokens/s", "tflops": "TFLOP/s",
                "pfrac": "fraction of matmul peak", "quality": "quality", "tokens": "tokens",
                "ppl": "perplexity", "kl": "KL vs unquantized", "top1": "top-1 agreement",
                "gemv": "GEMV, batch 1 (tuning, each kernel alone)"}}


def caption(result: dict, lang: str) -> str:
    s = result["settings"]
    model = "Llama-3-8B 形状,随机 bf16 权重" if s["model"] == common.RANDOM_8B and lang == "zh" else \
        "Llama-3-8B shape, random bf16 weights" if s["model"] == common.RANDOM_8B else Path(s["model"]).name
    if lang == "zh":
        return (f"{model};{result['hardware']};复制带宽 {result['bandwidth_gbps']:.0f} GB/s(读 + 写);"
                f"提示 {s['prompt_len']} 词元;{result['dtype']};INT4 分组 {s['group_size']}。"
                f"命令:`{result['command']}`")
    return (f"{model} on {result['hardware']}; copy bandwidth {result['bandwidth_gbps']:.0f} GB/s "
            f"(read + write); prompt {s['prompt_len']} tokens; {result['dtype']}; INT4 group "
            f"{s['group_size']}. Command: `{result['command']}`")


def tables(result: dict) -> dict[str, str]:
    out = {}
    for lang, t in NAMES.items():
        eager = {r["batch_size"]: r["tokens_per_s"] for r in result["runs"] if r["variant"] == "eager"}
        rows = [[r["variant"], r["batch_size"],
                 f"{r['tokens_per_s']:.1f} ({r['tokens_per_s_q1']:.1f}–{r['tokens_per_s_q3']:.1f})",
                 f"{r['tokens_per_s'] / eager[r['batch_size']]:.2f}" if r["batch_size"] in eager else "–",
                 f"{r['bytes_per_step'] / 1e9:.3g}", f"{r['achieved_gbps']:.0f}" if r["achieved_gbps"] >= 10
                 else f"{r['achieved_gbps']:.2f}", f"{r['roofline_fraction']:.2f}", f"{r['setup_s']:.1f}"]
                for r in result["runs"]]
        text = caption(result, lang) + "\n\n" + common.markdown_table(
            [t["variant"], t["batch"], t["tps"], t["x"], t["gb"], t["gbps"], t["frac"], t["setup"]], rows)
        if result["best"]:
            text += "\n" + common.markdown_table(
                [t["variant"], t["batch"], t["tps"].split(" (")[0], t["frac"]],
                [[f"**{b['precision']}** ({b['variant']})", b["batch_size"], f"{b['tokens_per_s']:.1f}",
                  f"{b['roofline_fraction']:.2f}"] for b in result["best"]])
        if result["prefill"]:
            text += "\n" + common.markdown_table(
                [t["prefill"], t["batch"], t["prompt"], t["ptps"], t["tflops"], t["pfrac"]],
                [[p["model_variant"], p["batch_size"], p["prompt_len"], f"{p['tokens_per_s']:.0f}",
                  f"{p['tflops']:.2f}", f"{p['fraction_of_matmul']:.2f}"] for p in result["prefill"]])
        tuned = [r for r in result["runs"] if r["batch_size"] == 1 and r.get("launch_configs")]
        if tuned:
            cells = lambda c: f"{c['us'] * c['weight_gbps'] / 1e3:.0f} MB, {c['us']:.1f} µs, {c['weight_gbps']:.0f} GB/s"  # noqa: E731
            text += "\n" + common.markdown_table(
                [t["gemv"], *[r["variant"] for r in tuned]],
                [[key, *[cells(r["launch_configs"][key]) for r in tuned]] for key in tuned[0]["launch_configs"]])
        if result["quality"]:
            text += "\n" + common.markdown_table(
                [t["quality"], t["tokens"], t["ppl"], t["kl"], t["top1"]],
                [[q["variant"], q["tokens"], f"{q['ppl']:.2f} ± {q['ppl_se']:.2f}", f"{q['kl_vs_unquantized']:.4f}",
                  f"{q['top1_agreement']:.3f}"] for q in result["quality"]])
        out[lang] = text
    return out


def profile_tables(result: dict) -> dict[str, str]:
    p = result["profile"]
    wall, busy, B = p["wall_us_per_step"], p["kernel_us_per_step"], p["batch_size"]
    heads = {"zh": (f"fused_bf16 的一个解码步,批大小 {B}:墙钟 {wall:.0f} µs,内核时间 {busy:.0f} µs"
                    f"(忙碌 {busy / wall:.0%};其余是内核之间的空隙)。", ["内核", "每步调用", "每步 µs", "占内核时间"]),
             "en": (f"One decode step of fused_bf16, batch {B}: wall time {wall:.0f} µs, kernel time "
                    f"{busy:.0f} µs ({busy / wall:.0%} busy; the rest is gaps between kernels).",
                    ["kernel", "calls per step", "µs per step", "share of kernel time"])}
    rows = [[f"`{r['kernel']}`", f"{r['calls_per_step']:.0f}", f"{r['us_per_step']:.1f}", f"{r['share']:.1%}"]
            for r in p["kernels"][:12]]
    return {lang: head + "\n\n" + common.markdown_table(cols, rows, "lrrr") for lang, (head, cols) in heads.items()}


def plot_batch1(result: dict):
    def draw(path: Path) -> None:
        rows = [r for r in result["runs"] if r["batch_size"] == result["settings"]["batch_sizes"][0]]
        fig, ax = common.new_figure()
        x = range(len(rows))
        ax.bar(x, [r["tokens_per_s"] for r in rows], color="#4c72b0", label="measured")
        ax.scatter(x, [r["roofline_tokens_per_s"] for r in rows], marker="_", s=600, color="#c44e52",
                   zorder=3, label="roofline")
        for i, r in enumerate(rows):
            ax.text(i, r["tokens_per_s"], f"{r['roofline_fraction']:.2f}", ha="center", va="bottom", fontsize=10)
        ax.set_xticks(list(x), [r["variant"] for r in rows], rotation=35, ha="right")
        ax.set_ylabel("decode tokens/s")
        ax.set_yscale("log")
        ax.set_title(f"Batch {rows[0]['batch_size']}: measured vs roofline (labels: fraction)")
        ax.legend(fontsize=10)
        common.save_figure(fig, path)
    return draw


def plot_batches(result: dict):
    def draw(path: Path) -> None:
        fig, ax = common.new_figure()
        for variant in dict.fromkeys(r["variant"] for r in result["runs"]):
            pts = [r for r in result["runs"] if r["variant"] == variant]
            ax.plot([r["batch_size"] for r in pts], [r["roofline_fraction"] for r in pts], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("fraction of roofline")
        ax.set_title("Decode speed against the bandwidth roofline")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=10, ncol=2)
        common.save_figure(fig, path)
    return draw


def write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def load_models(settings: dict, device, dtype):
    """(hf, our model sharing its tensors, tokenizer or None)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if settings["model"] == common.RANDOM_8B:
        hf = common.random_model(common.llama3_8b_config(**settings.get("shape", {})), device, dtype)
        tokenizer = None
    else:
        try:
            hf = AutoModelForCausalLM.from_pretrained(settings["model"], dtype=dtype).to(device).eval()
            tokenizer = AutoTokenizer.from_pretrained(settings["model"])
        except (OSError, ValueError) as error:
            common.fail(f"cannot load {settings['model']} ({str(error).splitlines()[0]}): "
                        "pass --model with a local Llama folder")
    try:
        return hf, fd.model_from_hf(hf), tokenizer
    except fd.Refusal as why:
        common.fail(str(why))


def main(args) -> None:
    import torch

    settings, folder, device, dtype = common.start(PRESETS, args, common.ACCEL / "results")
    variants, batches = settings["variants"], settings["batch_sizes"]
    fused_variants = [v for v in variants if v.startswith("fused") or v == "int4_tinygemm"]
    if fused_variants and (device.type != "cuda" or dk.triton is None):
        common.fail(f"{', '.join(fused_variants)} need a CUDA GPU and triton: use --preset cpu")
    run_start = time.perf_counter()
    hf, model, tokenizer = load_models(settings, device, dtype)
    c, T, G = model.config, settings["prompt_len"], settings["group_size"]
    if any(v.endswith("int4") or v == "int4_tinygemm" for v in variants) and \
            (c.hidden_size % G or c.intermediate_size % G):
        common.fail(f"group size {G} does not divide {c.hidden_size} and {c.intermediate_size}")
    calibration, evaluation = common.pydoc_corpus()
    torch.manual_seed(0)
    if tokenizer is not None:
        ids = torch.tensor(tokenizer(calibration[:50_000])["input_ids"][:T])
    else:
        ids = torch.randint(0, c.vocab_size, (T,))
    ids = ids.to(device)
    cuda = device.type == "cuda"
    bandwidth = common.copy_bandwidth_gbs(device, 1.0 if cuda else 0.125, 20 if cuda else 5)
    tflops = matmul_tflops(device, dtype, 8192 if cuda else 512, 10 if cuda else 3)
    log(f"copy bandwidth {bandwidth:.0f} GB/s, matmul {tflops:.2f} TFLOP/s")
    elem = torch.finfo(dtype).bits // 8
    runs, errors, generated, profile = [], [], {}, None
    quantized: dict[str, Any] = {}

    def record(variant: str, B: int, res: dict, weight_bytes: int) -> dict:
        step = common.spread(res["step_ms"])
        kv_len = T + (res["new_tokens"] + 1) / 2  # mean cache length over the timed steps
        nbytes = fd.step_bytes(weight_bytes, c, B, kv_len, elem)
        tps = B * 1e3 / step["median"]
        roof = B * bandwidth * 1e9 / nbytes
        entry = {"variant": variant, "batch_size": B, "tokens_per_s": tps,
                 "tokens_per_s_q1": B * 1e3 / step["q3"], "tokens_per_s_q3": B * 1e3 / step["q1"],
                 "step_ms": step, "bytes_per_step": nbytes, "achieved_gbps": tps / B * nbytes / 1e9,
                 "roofline_tokens_per_s": roof, "roofline_fraction": tps / roof,
                 "new_tokens": res["new_tokens"], "setup_s": res["setup_s"]}
        if res.get("launch_configs"):
            entry["launch_configs"] = res["launch_configs"]
        ref = generated.get(B)
        if ref is not None and tokenizer is not None:  # greedy tokens equal to hf_generate's, in a row
            n = min(ref.shape[1], res["tokens"].shape[1])
            same = (ref[:, T:n].cpu() == res["tokens"][:, T:n].cpu()).all(0).long().cumprod(0).sum()
            entry["tokens_equal_to_hf"] = f"{int(same)}/{n - T}"
        if variant == "hf_generate":
            generated[B] = res["tokens"]
        runs.append(entry)
        log(f"{variant:>13} batch {B:>3}: {tps:9.1f} tokens/s, {entry['roofline_fraction']:.2f} of "
            f"roofline, setup {entry['setup_s']:.1f} s")
        return entry

    for variant in variants:
        fused = None
        if variant in fused_variants:
            fused = FusedDecoder(model, variant.removeprefix("fused_"), G)
        if variant == "compiled":
            compiled = torch.compile(fd.decode_one_token, mode="reduce-overhead", fullgraph=True)
        for B in batches:
            prompt = ids[None].expand(B, -1).contiguous()
            slow = (settings["slow_new_tokens"], settings["slow_repeats"])
            try:
                if variant == "hf_generate":
                    record(variant, B, run_hf_generate(hf, prompt, *slow, device), fd.weight_bytes(model))
                elif variant.startswith("eager"):
                    fmt = variant.removeprefix("eager").lstrip("_")
                    if fmt and fmt not in quantized:
                        quantized[fmt] = fd.quantize_model(copy.deepcopy(model), fmt, G)
                    m = quantized[fmt] if fmt else model
                    step = lambda tok, pos, m=m: fd.decode_one_token(m, tok, pos)  # noqa: E731
                    record(variant, B, run_loop(m, step, prompt, *slow, 2, device), fd.weight_bytes(m))
                elif variant == "compiled":
                    step = lambda tok, pos: compiled(model, tok, pos)  # noqa: E731
                    res = run_loop(model, step, prompt, settings["new_tokens"], settings["repeats"], 3, device)
                    record(variant, B, res, fd.weight_bytes(model))
                else:
                    res = run_fused(fused, prompt, settings["new_tokens"], settings["repeats"],
                                    settings["tune"], device)
                    entry = record(variant, B, res, fused.weight_bytes())
                    if settings["profile"] and variant == "fused_bf16" and B == batches[0]:
                        kernels, busy = profile_fused(fused, T + settings["new_tokens"] // 2)
                        profile = {"batch_size": B, "kernel_us_per_step": busy, "kernels": kernels,
                                   "wall_us_per_step": entry["step_ms"]["median"] * 1e3}
            except common.BenchError:
                raise
            except Exception as error:  # e.g. a kernel the compiler rejects: report it, run the others
                line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
                log(f"{variant} batch {B} failed: {line}")
                errors.append({"variant": variant, "batch_size": B, "error": line})
        del fused
        quantized.pop(variant.removeprefix("eager_"), None)
        if cuda:
            torch.cuda.empty_cache()
    hf = None

    prefill_rows = []
    for B in batches:  # prefill: compute-bound, against the measured matmul rate
        prompt = ids[None].expand(B, -1).contiguous()
        model.setup_caches(B, T + 2)
        pos = torch.arange(T, device=device)
        ms = statistics.median(common.time_ms(lambda: fd.prefill(model, prompt, pos), device, 1,
                                              settings["repeats"]))
        achieved = prefill_flops(c, B, T) / (ms * 1e-3) / 1e12
        prefill_rows.append({"model_variant": f"eager {settings['dtype']}", "batch_size": B, "prompt_len": T,
                             "tokens_per_s": B * T / (ms * 1e-3), "tflops": achieved,
                             "fraction_of_matmul": achieved / tflops})

    quality = None
    if settings["ppl_tokens"] > 0 and tokenizer is not None:
        eval_ids = torch.tensor(tokenizer(evaluation[:200_000])["input_ids"][:settings["ppl_tokens"] + 1],
                                device=device)
        models = {"unquantized": model, "int8": fake_quantized(model, "int8", G),
                  f"int4 (group {G})": fake_quantized(model, "int4", G)}
        quality = evaluate_quality(models, eval_ids, settings["ppl_context"])

    result = {**common.results_header(settings, args, device, ("triton",)), "dtype": settings["dtype"],
              "bandwidth_gbps": bandwidth, "matmul_tflops": tflops, "run_seconds": 0.0,
              "weight_bytes": fd.weight_bytes(model), "runs": runs, "best": summarize(runs),
              "prefill": prefill_rows, "quality": quality, "profile": profile, "errors": errors}
    result["run_seconds"] = time.perf_counter() - run_start
    stem = f"fast_decode-{args.preset}"
    plots = {"": plot_batch1(result)}
    if len(batches) > 1:
        plots["-batch"] = plot_batches(result)
    text = tables(result)
    common.write_results(folder, stem, result, text, plots)
    if profile:
        for lang, table in profile_tables(result).items():
            write_text_atomically(folder / f"{stem}-profile{'.en' if lang == 'en' else ''}.md", table)
    print(text["en"])
    print(f"wrote {stem} in {folder} ({result['run_seconds']:.0f} s)")


if __name__ == "__main__":
    common.run_main(main, common.bench_parser(__doc__, PRESETS))
