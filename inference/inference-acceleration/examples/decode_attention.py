"""Decode attention in Triton: one kernel for RoPE, the KV-cache write and attention, beside its
slow PyTorch reference.

A decode step's attention reads the whole KV cache for one new query per sequence: like the
GEMVs (decode_kernels.py), it is bound by the bytes it reads. One program per (sequence, KV head)
rotates q and the new k (RoPE), writes k and v into the cache at `pos`, and lets the group's query
heads (grouped-query attention) attend to slots 0..pos with an online softmax, so the scores never
leave the chip. bench/fast_decode.py calls it between the GEMVs of its fused step.

Run it
  python inference/inference-acceleration/examples/decode_attention.py --model HuggingFaceTB/SmolLM2-135M-Instruct

What it prints on SmolLM2-135M's shapes (9 query heads sharing 3 KV heads, head dim 64): per
cache length the MB read, the reference's µs and GB/s, and with CUDA the kernel's relative error
(about 3e-3: bf16), µs and GB/s; without CUDA or triton, the reference rows and one line saying
that the Triton kernel needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

try:  # optional: only the Triton kernel needs it (and a CUDA GPU)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None

# Shapes: B sequences, H / Hkv query / KV heads, G = H / Hkv, D head dim, S cache slots.
# Triton's interpreter (TRITON_INTERPRET=1: kernels on the CPU, for tests) needs fp32 tl.dot operands.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DOT_TYPE = None if tl is None else tl.float32 if INTERPRET else tl.bfloat16


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


# Slow reference: plain PyTorch, fp32
def reference_attention(qkv, cos, sin, pos: int, k_cache, v_cache, H: int, Hkv: int):
    """decode_attention in fp32: out (B, H D), and the caches (B, Hkv, S, D) with k, v at pos."""
    B, D = qkv.shape[0], k_cache.shape[-1]
    q, k, v = qkv.float().view(B, H + 2 * Hkv, 1, D).split([H, Hkv, Hkv], dim=1)  # (B, *, 1, D)
    c, s = cos[pos:pos + 1], sin[pos:pos + 1]                                        # (1, D)
    rot = lambda t: t * c + torch.cat((-t[..., D // 2:], t[..., :D // 2]), -1) * s  # noqa: E731
    k_all, v_all = k_cache.float().clone(), v_cache.float().clone()
    k_all[:, :, pos:pos + 1], v_all[:, :, pos:pos + 1] = rot(k), v
    out = F.scaled_dot_product_attention(rot(q), k_all[:, :, :pos + 1], v_all[:, :, :pos + 1],
                                         enable_gqa=True)                            # (B, H, 1, D)
    return out.reshape(B, H * D), k_all, v_all


# The Triton kernel (CUDA; the interpreter runs it on the CPU for tests)
if triton is not None:

    # --8<-- [start:attention]
    @triton.jit
    def _decode_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, o_ptr,
                                 stride_qkv, stride_cb, stride_ch, stride_cs, stride_o,
                                 sm_scale, H: tl.constexpr, HKV: tl.constexpr,
                                 D: tl.constexpr, G_PAD: tl.constexpr,
                                 BLOCK_S: tl.constexpr, DOT: tl.constexpr):
        """One program per (sequence, KV head): RoPE on q and the new k, k and v written into
        the cache at `pos`, then the group's G query heads attend to slots 0..pos (online
        softmax)."""
        b, hk = tl.program_id(0), tl.program_id(1)
        G: tl.constexpr = H // HKV
        HALF: tl.constexpr = D // 2
        pos, d = tl.load(pos_ptr), tl.arange(0, HALF)
        cos, sin = tl.load(cos_ptr + pos * D + d), tl.load(sin_ptr + pos * D + d)
        gi = tl.arange(0, G_PAD)
        gmask = gi < G  # G query heads share this KV head; padded to G_PAD >= 16 for tl.dot
        row = qkv_ptr + b * stride_qkv
        q_ptrs = row + (hk * G + gi)[:, None] * D + d[None, :]  # (G_PAD, D/2)
        q1 = tl.load(q_ptrs, mask=gmask[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_ptrs + HALF, mask=gmask[:, None], other=0.0).to(tl.float32)
        qscale = sm_scale * 1.4426950408889634  # fold log2(e): softmax with exp2
        q1r = ((q1 * cos - q2 * sin) * qscale).to(DOT)  # (G_PAD, D/2)
        q2r = ((q2 * cos + q1 * sin) * qscale).to(DOT)
        k1 = tl.load(row + (H + hk) * D + d).to(tl.float32)
        k2 = tl.load(row + (H + hk) * D + HALF + d).to(tl.float32)
        dd = tl.arange(0, D)
        v_new = tl.load(row + (H + HKV + hk) * D + dd)
        kc, vc = (k_ptr + b * stride_cb + hk * stride_ch,
                  v_ptr + b * stride_cb + hk * stride_ch)
        tl.store(kc + pos * stride_cs + d, (k1 * cos - k2 * sin).to(kc.dtype.element_ty))
        tl.store(kc + pos * stride_cs + HALF + d,
                 (k2 * cos + k1 * sin).to(kc.dtype.element_ty))
        tl.store(vc + pos * stride_cs + dd, v_new.to(vc.dtype.element_ty))
        # the block's own stores above are visible to all its threads below
        tl.debug_barrier()
        m_i, l_i = (tl.full((G_PAD,), float("-inf"), dtype=tl.float32),
                    tl.zeros((G_PAD,), dtype=tl.float32))
        acc = tl.zeros((G_PAD, D), dtype=tl.float32)
        for s0 in range(0, pos + 1, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            smask = s <= pos
            kt1 = tl.load(kc + s[:, None] * stride_cs + d[None, :],
                          mask=smask[:, None], other=0.0)
            kt2 = tl.load(kc + s[:, None] * stride_cs + HALF + d[None, :],
                          mask=smask[:, None], other=0.0)
            sc = tl.dot(q1r, tl.trans(kt1.to(DOT))) + tl.dot(q2r, tl.trans(kt2.to(DOT)))
            sc = tl.where(smask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            p = tl.exp2(sc - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(vc + s[:, None] * stride_cs + dd[None, :],
                         mask=smask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), vt.to(DOT))  # (G_PAD, D)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * stride_o + (hk * G + gi)[:, None] * D + dd[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=gmask[:, None])
    # --8<-- [end:attention]


def decode_attention(qkv, cos, sin, pos, k_cache, v_cache, out, H: int, Hkv: int) -> torch.Tensor:
    """qkv (B, (H + 2 Hkv) D) -> out (B, H D); k, v into the caches (B, Hkv, S, D) at pos (1,)."""
    B, D = qkv.shape[0], k_cache.shape[-1]
    _decode_attention_kernel[(B, Hkv)](
        qkv, cos, sin, pos, k_cache, v_cache, out, qkv.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), out.stride(0), 1.0 / math.sqrt(D), H=H, HKV=Hkv, D=D,
        G_PAD=max(16, triton.next_power_of_2(H // Hkv)), BLOCK_S=64, DOT=DOT_TYPE, num_warps=4)
    return out


# Validate, then GB/s, on the model's shapes (random values: speed does not depend on them)
def time_us(fn, device: torch.device) -> float:
    """Median µs (on a GPU do_bench flushes L2: the cache comes from HBM); the CPU: one warm call."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e3
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def rope_tables(S: int, D: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (S, D) for positions 0..S-1, the two halves of each row repeated (Llama's layout)."""
    freqs = torch.outer(torch.arange(S).float(), 1e4 ** (-torch.arange(0, D, 2).float() / D))  # (S, D/2)
    return tuple(f(torch.cat((freqs, freqs), -1)).to(device) for f in (torch.cos, torch.sin))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="hub id or local folder whose config gives the shapes (no weights read)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda if available, else cpu (reference only)")
    parser.add_argument("--batch", type=int, default=1, help="sequences B in a step")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 2048],
                        help="cache lengths S the new token attends to")
    return parser


@torch.no_grad()
def main(args: argparse.Namespace) -> list[dict]:
    if args.batch < 1 or min(args.seq_lens) < 1:
        build_parser().error("--batch and --seq-lens must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and triton is None:
        raise Refusal("the Triton kernel needs the triton package: pip install triton")
    from transformers import AutoConfig
    try:
        c = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise Refusal(f"cannot read the config of {args.model!r} ({str(error).strip()[:120]}): "
                      "pass a hub id or a local transformers folder") from None
    H, Hkv, B = c.num_attention_heads, c.num_key_value_heads, args.batch
    D = getattr(c, "head_dim", None) or c.hidden_size // H
    run = triton is not None and (device.type == "cuda" or INTERPRET)
    if run and (D < 32 or D & (D - 1)):
        raise Refusal(f"the kernel needs a power-of-two head dim of at least 32, not {D}")
    torch.manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=device).bfloat16()  # noqa: E731
    print(f"{args.model}: H {H}, Hkv {Hkv}, D {D}; batch {B}; {device}")
    print(f"{'cache':<12} {'MB':>6} {'ref µs':>8} {'ref GB/s':>8} {'rel. error':>10} {'µs':>7} {'GB/s':>6}")
    rows = []
    for S in args.seq_lens:
        k_cache, v_cache, qkv = rnd(B, Hkv, S, D), rnd(B, Hkv, S, D), rnd(B, (H + 2 * Hkv) * D)
        (cos, sin), out, pos = rope_tables(S, D, device), rnd(B, H * D), torch.tensor([S - 1], device=device)
        nbytes = 2 * B * Hkv * S * D * 2                                   # k and v, bf16
        reference = lambda: reference_attention(qkv, cos, sin, S - 1, k_cache, v_cache, H, Hkv)[0]  # noqa: E731
        row = {"seq_len": S, "bytes": nbytes, "ref_us": time_us(reference, device)}
        line = f"{'S ' + str(S):<12} {nbytes / 1e6:>6.2f} {row['ref_us']:>8.0f} {nbytes / row['ref_us'] / 1e3:>8.2f}"
        if run:  # validate first, then time
            kernel = lambda: decode_attention(qkv, cos, sin, pos, k_cache, v_cache, out, H, Hkv)  # noqa: E731
            ref = reference()
            row["error"] = ((kernel().double() - ref.double()).norm() / ref.double().norm()).item()
            row["us"] = time_us(kernel, device)
            line += f" {row['error']:>10.1e} {row['us']:>7.1f} {nbytes / row['us'] / 1e3:>6.0f}"
        rows.append(row)
        print(line)
    if not run:
        print("The Triton kernel needs a CUDA GPU and the triton package: shown is the slow PyTorch reference only.")
    return rows


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
