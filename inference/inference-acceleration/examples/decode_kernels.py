"""Decode kernels in Triton, each beside its slow PyTorch reference: validate, then GB/s.

A batch-1 decode step is GEMVs and attention over the KV cache, each bound by the bytes it reads.
As in llm.c's dev/cuda, each kernel has a plain PyTorch reference; the script runs both on a
model's shapes with random codes and prints the kernel's error, time and GB/s. fused_linear:
y = x W^T for bf16, INT8 (per channel) or INT4 (groups, packed in strips) weights, with fused
RMSNorm, SiLU(gate) * up and residual add; decode_attention: RoPE, the cache write and attention
over slots 0..pos. bench/fast_decode.py chains them into one fused step in one CUDA graph.

Run it
  python inference/inference-acceleration/examples/decode_kernels.py --model HuggingFaceTB/SmolLM2-135M-Instruct

What it prints on SmolLM2-135M's shapes: per kernel the MB read, the reference's µs and GB/s,
and with CUDA the kernel's relative error (about 3e-3: bf16), µs and GB/s; without CUDA or
triton, the reference rows and one line saying that the Triton kernels need a CUDA GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

try:  # optional: only the Triton kernels need it (and a CUDA GPU)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = tl = None

# Shapes: B batch (M rows), N out, K in, G group, W = G/8 words, H / Hkv heads, D head dim, S slots.
# Triton's interpreter (TRITON_INTERPRET=1: kernels on the CPU, for tests) needs fp32 tl.dot operands.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DOT_TYPE = None if tl is None else tl.float32 if INTERPRET else tl.bfloat16


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


@dataclass
class Linear:
    """A weight as the kernels read it. bf16: (N, K). int8: (N, K) codes + scale (N,) fp32. int4:
    pack_int4(q) (N, K/8) + scale, zero (K/G, N) bf16 (transposed: rows' values are contiguous)."""
    fmt: str
    weight: torch.Tensor
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group: int = 0
    tuned: dict = field(default_factory=dict)  # BLOCK_M -> launch config (bench/ fills it)

    def nbytes(self) -> int:  # what a GEMV reads: codes, scales and zeros
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scale, self.zero) if t is not None)


# --8<-- [start:packing]
# INT4 layout ("strips"): a group of G = 8W weights of one row lives in W int32 words,
#
#   weights of the group  q[0 .. W-1] | q[W .. 2W-1] | ... | q[7W .. 8W-1]
#   word j (j < W)        bits 0-3 = q[j], bits 4-7 = q[W + j], ..., bits 28-31 = q[7W + j]
#   packed (N, K/8)       row n: the W words of group 0, then of group 1, ...
#
# A program loads a (BLOCK_N, W) tile of words (16 bytes per thread); strip i, (words >> 4i) & 15,
# meets the contiguous run x[gG + iW : gG + (i+1)W], loaded once and reused by all BLOCK_N rows.
def pack_int4(q: torch.Tensor, group: int) -> torch.Tensor:
    """q (N, K) uint8 in [0, 15] -> (N, K/8) int32 in strips."""
    (N, K), W = q.shape, group // 8
    qg = q.to(torch.int64).reshape(N, K // group, 8, W)                  # (N, K/G, 8, W)
    words = (qg << (4 * torch.arange(8, device=q.device)).view(1, 1, 8, 1)).sum(dim=2)  # (N, K/G, W)
    words = torch.where(words >= 2**31, words - 2**32, words)              # as signed int32 bits
    return words.to(torch.int32).reshape(N, K // 8)
# --8<-- [end:packing]


# Slow references: plain PyTorch, fp32
def dequantize(lin: Linear) -> torch.Tensor:
    """The weight (N, K) in fp32: W = q s (int8), W = (q - z) s per group (int4)."""
    if lin.fmt != "int4":
        return lin.weight.float() * (lin.scale[:, None] if lin.fmt == "int8" else 1)
    N, W = lin.weight.shape[0], lin.group // 8                             # unpack the strips:
    words = lin.weight.to(torch.int64).reshape(N, -1, 1, W)                # (N, K/G, 1, W)
    q = ((words >> (4 * torch.arange(8, device=words.device)).view(1, 1, 8, 1)) & 15).reshape(N, -1)
    z, s = (t.t().float().repeat_interleave(lin.group, dim=1) for t in (lin.zero, lin.scale))
    return (q - z) * s


def reference_linear(x: torch.Tensor, lin: Linear, rms: bool = False, glu: bool = False,
                     residual: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """What fused_linear computes, in fp32 on the dequantized weight: x (M, K) -> (M, N)."""
    x = x.float()
    y = x @ dequantize(lin).t()                                            # (M, N or 2N)
    if rms:
        y = y * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    if glu:
        y = F.silu(y[:, :y.shape[1] // 2]) * y[:, y.shape[1] // 2:]     # silu(gate) * up
    return y + residual.float() if residual is not None else y


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


# Triton kernels (CUDA; the interpreter runs them on the CPU for tests)
if triton is not None:

    @triton.jit
    def _load_act(x_ptr, rows, cols, rmask, stride_x, K):  # tile (BM, BK) fp32, 0 outside
        return tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :],
                       mask=rmask[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)

    @triton.jit
    def _u8_to_f32(v, OFFSET: tl.constexpr):  # exact v - OFFSET: 0x4B000000 | v is float 2^23 + v
        return (v.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)

    @triton.jit
    def _store_out(acc, acc_up, rows, cols, rmask, nmask, r_ptr, y_ptr, stride_r, stride_y,
                   GLU: tl.constexpr, RES: tl.constexpr):  # epilogue: silu(gate) * up, + residual
        if GLU:
            acc = acc * tl.sigmoid(acc) * acc_up
        mask = rmask[:, None] & nmask[None, :]
        if RES:
            acc += tl.load(r_ptr + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)

    # --8<-- [start:gemv]
    @triton.jit
    def _dense_tile(w_ptr, rows_w, nmask, k, K, INT8: tl.constexpr):  # weight tile (BN, BK) fp32
        w = tl.load(w_ptr + rows_w[:, None] * K + k[None, :], mask=nmask[:, None] & (k[None, :] < K), other=0)
        if INT8:
            return _u8_to_f32(w.to(tl.uint8, bitcast=True) ^ 0x80, 128.0)
        return w.to(tl.float32)

    @triton.jit
    def _mac(acc, w, x, BLOCK_M: tl.constexpr, DOT: tl.constexpr):  # acc (BM, BN) += x w^T
        if BLOCK_M == 1:
            return acc + tl.sum(w * x, axis=1)[None, :]
        return acc + tl.dot(x.to(DOT), tl.trans(w.to(DOT)))

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, s_ptr, r_ptr, y_ptr, M, N, K, stride_x, stride_r, stride_y, eps,
                       INT8: tl.constexpr, RMS: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr,
                       DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y (M, N) = x (M, K) @ W^T for bf16 or INT8 W; one program per BLOCK_N output columns.
        RMS: x is RMS-normalized (norm weight folded into W): sum(x^2) in the same loop, 1/rms
        scales the output. GLU: W is [gate; up] (2N rows); rows n and N + n -> silu(gate) * up."""
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, nmask = rows < M, cols < N
        kk, ss = tl.arange(0, BLOCK_K), tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc, acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = _load_act(x_ptr, rows, k0 + kk, rmask, stride_x, K)                           # (BM, BK)
            acc = _mac(acc, _dense_tile(w_ptr, cols, nmask, k0 + kk, K, INT8), x, BLOCK_M, DOT)
            if GLU:
                acc_up = _mac(acc_up, _dense_tile(w_ptr, cols + N, nmask, k0 + kk, K, INT8), x, BLOCK_M, DOT)
            if RMS:
                ss += tl.sum(x * x, axis=1)
        if INT8:  # per-row scale once at the end: sum_k (q s) x = s sum_k q x
            acc *= tl.load(s_ptr + cols, mask=nmask, other=0.0)[None, :]
            if GLU:
                acc_up *= tl.load(s_ptr + N + cols, mask=nmask, other=0.0)[None, :]
        if RMS:
            rstd = tl.rsqrt(ss / K + eps)[:, None]
            acc *= rstd
            acc_up *= rstd
        _store_out(acc, acc_up, rows, cols, rmask, nmask, r_ptr, y_ptr, stride_r, stride_y, GLU, RES)

    @triton.jit
    def _int4_strip_unit(words, i: tl.constexpr):
        """Strip i as floats f = 1 + q/16: the field moved to mantissa bits 19-22 of 1.0
        (0x3F800000); a shift and one and-or per weight, no int->float conversion."""
        bits = words << (19 - 4 * i) if 4 * i <= 19 else words >> (4 * i - 19)
        return ((bits & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _int4_mac(part, words, i: tl.constexpr, z, x, BLOCK_M: tl.constexpr, DOT: tl.constexpr):
        """One row: part (BN, W) += (1 + q/16) x, an FMA per weight. A batch: x . (q - z)."""
        if BLOCK_M == 1:
            part += _int4_strip_unit(words, i) * x                                       # x (1, W)
        else:
            w = _u8_to_f32((words >> (4 * i)) & 15, 0.0) - z                             # (BN, W) q - z
            part += tl.dot(x.to(DOT), tl.trans(w.to(DOT)))           # x (BM, W)
        return part

    @triton.jit
    def _int4_linear_kernel(x_ptr, w_ptr, s_ptr, z_ptr, r_ptr, y_ptr, M, N, K, NW,
                            stride_x, stride_w, stride_r, stride_y, eps,
                            GROUP: tl.constexpr, RMS: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr,
                            DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr):
        """W4A16: y = x W^T, W (NW, K/8) int32 strips, s and z (K/G, NW): y_n = sum_g s_ng sum_{k in g}
        (q_nk - z_ng) x_k. One row: with f = 1 + q/16, X_g = sum_{k in g} x_k the inner sum is
        16 sum f x - (16 + z) X_g (a shift, an and-or, an FMA per weight). A program owns BLOCK_N rows
        and all of K (fused epilogue); GROUPS groups per iteration keep loads in flight. Batch: tl.dot."""
        rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, nmask = rows < M, cols < N
        W: tl.constexpr = GROUP // 8
        j = tl.arange(0, W)
        if BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N, W), dtype=tl.float32)     # per (row, word column), summed at the end
            x_row = x_ptr + j[None, :]                         # row 0 always exists: no mask on x
            xsum = tl.zeros((1, W), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up, ss = tl.zeros_like(acc), tl.zeros((BLOCK_M,), dtype=tl.float32)  # ss: sum x^2 for RMS
        for g0 in range(0, K // GROUP, GROUPS):
            for gi in tl.static_range(GROUPS):
                g = g0 + gi
                words = tl.load(w_ptr + cols[:, None] * stride_w + g * W + j[None, :],
                                mask=nmask[:, None], other=0)                            # (BN, W) int32
                s = tl.load(s_ptr + g * NW + cols, mask=nmask, other=0.0).to(tl.float32)   # (BN,)
                z = tl.load(z_ptr + g * NW + cols, mask=nmask, other=0.0).to(tl.float32)
                part = tl.zeros_like(acc)
                if GLU:  # rows N + n: the up projection, same x
                    words_up = tl.load(w_ptr + (cols + N)[:, None] * stride_w + g * W + j[None, :],
                                       mask=nmask[:, None], other=0)
                    s_up = tl.load(s_ptr + g * NW + N + cols, mask=nmask, other=0.0).to(tl.float32)
                    z_up = tl.load(z_ptr + g * NW + N + cols, mask=nmask, other=0.0).to(tl.float32)
                    part_up = tl.zeros_like(acc)
                if BLOCK_M == 1:
                    xsum = tl.zeros((1, W), dtype=tl.float32)  # X_g per word column
                for i in tl.static_range(8):
                    if BLOCK_M == 1:
                        x = tl.load(x_row + g * GROUP + i * W).to(tl.float32)                   # (1, W)
                        xsum += x
                    else:
                        x = _load_act(x_ptr, rows, g * GROUP + i * W + j, rmask, stride_x, K)  # (BM, W)
                    if RMS:
                        ss += tl.sum(x * x, axis=1)
                    part = _int4_mac(part, words, i, z[:, None], x, BLOCK_M, DOT)
                    if GLU:
                        part_up = _int4_mac(part_up, words_up, i, z_up[:, None], x, BLOCK_M, DOT)
                if BLOCK_M == 1:  # s (16 sum f x - (16 + z) X_g), once per group and (row, word column)
                    acc += (16.0 * s)[:, None] * part - (s * (16.0 + z))[:, None] * xsum
                    if GLU:
                        acc_up += (16.0 * s_up)[:, None] * part_up - (s_up * (16.0 + z_up))[:, None] * xsum
                else:
                    acc += part * s[None, :]
                    if GLU:
                        acc_up += part_up * s_up[None, :]
        if BLOCK_M == 1:
            acc = tl.sum(acc, axis=1)[None, :]                                           # (1, BN)
            acc_up = tl.sum(acc_up, axis=1)[None, :]
        if RMS:
            rstd = tl.rsqrt(ss / K + eps)[:, None]
            acc *= rstd
            acc_up *= rstd
        _store_out(acc, acc_up, rows, cols, rmask, nmask, r_ptr, y_ptr, stride_r, stride_y, GLU, RES)
    # --8<-- [end:gemv]

    # --8<-- [start:attention]
    @triton.jit
    def _decode_attention_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, o_ptr,
                                 stride_qkv, stride_cb, stride_ch, stride_cs, stride_o, sm_scale,
                                 H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr,
                                 BLOCK_S: tl.constexpr, DOT: tl.constexpr):
        """One program per (sequence, KV head): RoPE on q and the new k, k and v written into the
        cache at `pos`, then the group's G query heads attend to slots 0..pos (online softmax)."""
        b, hk = tl.program_id(0), tl.program_id(1)
        G: tl.constexpr = H // HKV
        HALF: tl.constexpr = D // 2
        pos, d = tl.load(pos_ptr), tl.arange(0, HALF)
        cos, sin = tl.load(cos_ptr + pos * D + d), tl.load(sin_ptr + pos * D + d)
        gi = tl.arange(0, G_PAD)
        gmask = gi < G  # G query heads share this KV head; padded to G_PAD >= 16 for tl.dot
        row = qkv_ptr + b * stride_qkv
        q_ptrs = row + (hk * G + gi)[:, None] * D + d[None, :]                         # (G_PAD, D/2)
        q1 = tl.load(q_ptrs, mask=gmask[:, None], other=0.0).to(tl.float32)
        q2 = tl.load(q_ptrs + HALF, mask=gmask[:, None], other=0.0).to(tl.float32)
        qscale = sm_scale * 1.4426950408889634  # fold log2(e): softmax with exp2
        q1r = ((q1 * cos - q2 * sin) * qscale).to(DOT)                        # (G_PAD, D/2)
        q2r = ((q2 * cos + q1 * sin) * qscale).to(DOT)
        k1 = tl.load(row + (H + hk) * D + d).to(tl.float32)
        k2 = tl.load(row + (H + hk) * D + HALF + d).to(tl.float32)
        dd = tl.arange(0, D)
        v_new = tl.load(row + (H + HKV + hk) * D + dd)
        kc, vc = k_ptr + b * stride_cb + hk * stride_ch, v_ptr + b * stride_cb + hk * stride_ch
        tl.store(kc + pos * stride_cs + d, (k1 * cos - k2 * sin).to(kc.dtype.element_ty))
        tl.store(kc + pos * stride_cs + HALF + d, (k2 * cos + k1 * sin).to(kc.dtype.element_ty))
        tl.store(vc + pos * stride_cs + dd, v_new.to(vc.dtype.element_ty))
        tl.debug_barrier()  # the block's own stores above are visible to all its threads below
        m_i, l_i = tl.full((G_PAD,), float("-inf"), dtype=tl.float32), tl.zeros((G_PAD,), dtype=tl.float32)
        acc = tl.zeros((G_PAD, D), dtype=tl.float32)
        for s0 in range(0, pos + 1, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            smask = s <= pos
            kt1 = tl.load(kc + s[:, None] * stride_cs + d[None, :], mask=smask[:, None], other=0.0)
            kt2 = tl.load(kc + s[:, None] * stride_cs + HALF + d[None, :], mask=smask[:, None], other=0.0)
            sc = tl.dot(q1r, tl.trans(kt1.to(DOT))) + tl.dot(q2r, tl.trans(kt2.to(DOT)))
            sc = tl.where(smask[None, :], sc, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            p = tl.exp2(sc - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            vt = tl.load(vc + s[:, None] * stride_cs + dd[None, :], mask=smask[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT), vt.to(DOT))  # (G_PAD, D)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(o_ptr + b * stride_o + (hk * G + gi)[:, None] * D + dd[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=gmask[:, None])
    # --8<-- [end:attention]


# (BLOCK_N, BLOCK_K or INT4 groups per iteration, warps, stages) by BLOCK_M; bench/ tunes Linear.tuned.
DEFAULT_CONFIG = {1: {"bf16": (8, 512, 4, 3), "int8": (8, 1024, 4, 3), "int4": (64, 8, 4, 1)},
                  16: {"bf16": (64, 128, 4, 3), "int8": (64, 128, 4, 3), "int4": (64, 1, 4, 3)}}


def fused_linear(x: torch.Tensor, lin: Linear, out=None, rms: bool = False, glu: bool = False,
                 residual=None, eps: float = 0.0, config: tuple | None = None) -> torch.Tensor:
    """y = x W^T by the Triton kernels, x (..., K) -> out (..., N). rms: x RMS-normalized (norm
    weight folded into W); glu: W = [gate; up], y = silu(x Wg^T) * (x Wu^T); residual: y += it."""
    K, NW, N = x.shape[-1], lin.weight.shape[0], lin.weight.shape[0] // (2 if glu else 1)
    x2 = x.reshape(-1, K)                                                  # (M, K)
    out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device) if out is None else out
    y2, M = out.view(-1, N), x2.shape[0]
    r2 = residual.view(-1, N) if residual is not None else y2
    BM = 1 if M == 1 else (16 if M <= 16 else 32)
    BM, BN, BK, warps, stages = config or (BM, *lin.tuned.get(BM, DEFAULT_CONFIG[min(BM, 16)][lin.fmt]))
    grid = (triton.cdiv(N, BN), triton.cdiv(M, BM))
    common = dict(RMS=rms, GLU=glu, RES=residual is not None, DOT=DOT_TYPE, BLOCK_M=BM,
                  BLOCK_N=BN, num_warps=warps, num_stages=stages)
    if lin.fmt == "int4":
        _int4_linear_kernel[grid](x2, lin.weight, lin.scale, lin.zero, r2, y2, M, N, K, NW,
                                  x2.stride(0), lin.weight.stride(0), r2.stride(0), y2.stride(0), eps,
                                  GROUP=lin.group, GROUPS=math.gcd(BK, K // lin.group), **common)
    else:
        s = lin.scale if lin.fmt == "int8" else lin.weight
        _linear_kernel[grid](x2, lin.weight, s, r2, y2, M, N, K, x2.stride(0), r2.stride(0),
                             y2.stride(0), eps, INT8=lin.fmt == "int8", BLOCK_K=BK, **common)
    return out


def decode_attention(qkv, cos, sin, pos, k_cache, v_cache, out, H: int, Hkv: int) -> torch.Tensor:
    """qkv (B, (H + 2 Hkv) D) -> out (B, H D); k, v into the caches (B, Hkv, S, D) at pos (1,)."""
    B, D = qkv.shape[0], k_cache.shape[-1]
    _decode_attention_kernel[(B, Hkv)](
        qkv, cos, sin, pos, k_cache, v_cache, out, qkv.stride(0), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), out.stride(0), 1.0 / math.sqrt(D), H=H, HKV=Hkv, D=D,
        G_PAD=max(16, triton.next_power_of_2(H // Hkv)), BLOCK_S=64, DOT=DOT_TYPE, num_warps=4)
    return out


# Validate, then GB/s, on the model's shapes (random codes: speed does not depend on values)
def random_linear(fmt: str, N: int, K: int, G: int, device: torch.device) -> Linear:
    q = torch.randint(0, 16, (N, K), device=device)  # int4 codes; int8 / bf16 from them, centred
    if fmt != "int4":
        return Linear("int8", (q - 8).to(torch.int8), torch.rand(N, device=device) * 2e-3) \
            if fmt == "int8" else Linear("bf16", ((q - 8) * 2e-3).bfloat16())
    s = (torch.rand(K // G, N, device=device) * 4e-3).bfloat16()
    return Linear("int4", pack_int4(q, G), s, torch.randint(0, 16, s.shape, device=device).bfloat16(), G)


def time_us(fn, device: torch.device) -> float:
    """Median µs (on a GPU do_bench flushes L2: weights come from HBM); the CPU: one warm call."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e3
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="hub id or local folder whose config gives the shapes (no weights read)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: cuda if available, else cpu (references only)")
    parser.add_argument("--batch", type=int, default=1, help="rows M of x (sequences in a step)")
    parser.add_argument("--group-size", type=int, default=64, choices=[32, 64, 128, 256],
                        help="INT4 group size G (INT8 is per channel); --batch > 1 needs G >= 128")
    parser.add_argument("--seq-len", type=int, default=512, help="cache length attention reads")
    return parser


@torch.no_grad()
def main(args: argparse.Namespace) -> list[dict]:
    if args.batch < 1 or args.seq_len < 1:
        build_parser().error("--batch and --seq-len must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and triton is None:
        raise Refusal("the Triton kernels need the triton package: pip install triton")
    from transformers import AutoConfig
    try:
        c = AutoConfig.from_pretrained(args.model)
    except (OSError, ValueError) as error:
        raise Refusal(f"cannot read the config of {args.model!r} ({str(error).strip()[:120]}): "
                      "pass a hub id or a local transformers folder") from None
    C, Fm, H, Hkv = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads
    D, G, B, S = getattr(c, "head_dim", None) or C // H, args.group_size, args.batch, args.seq_len
    if C % G or Fm % G or (B > 1 and G < 128):
        raise Refusal(f"--group-size {G} must divide {C} and {Fm} (and be >= 128 for --batch > 1)")
    torch.manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device=device).bfloat16()  # noqa: E731
    cases = []  # (name, bytes read, reference, kernel)
    for fmt in ("bf16", "int8", "int4"):
        for name, N, K, kw in (("qkv", (H + 2 * Hkv) * D, C, dict(rms=True)), ("o", C, H * D, dict(residual=rnd(B, C))),
                               ("gate_up", 2 * Fm, C, dict(rms=True, glu=True)), ("down", C, Fm, dict(residual=rnd(B, C)))):
            lin, x = random_linear(fmt, N, K, G, device), rnd(B, K)
            cases.append((f"{fmt} {name} {N}x{K}", lin.nbytes(), lambda lin=lin, x=x, kw=kw: reference_linear(x, lin, **kw),
                          lambda lin=lin, x=x, kw=kw: fused_linear(x, lin, eps=1e-5, **kw)))
    k_cache, v_cache, qkv = rnd(B, Hkv, S, D), rnd(B, Hkv, S, D), rnd(B, (H + 2 * Hkv) * D)
    freqs = torch.outer(torch.arange(S).float(), 1e4 ** (-torch.arange(0, D, 2).float() / D))  # (S, D/2)
    cos, sin = (f(torch.cat((freqs, freqs), -1)).to(device) for f in (torch.cos, torch.sin))    # (S, D)
    out, pos = rnd(B, H * D), torch.tensor([S - 1], device=device)
    cases.append((f"attention B{B} H{H}/{Hkv} D{D} S{S}", 2 * B * Hkv * S * D * 2,
                  lambda: reference_attention(qkv, cos, sin, S - 1, k_cache, v_cache, H, Hkv)[0],
                  lambda: decode_attention(qkv, cos, sin, pos, k_cache, v_cache, out, H, Hkv)))
    run = triton is not None and (device.type == "cuda" or INTERPRET)
    print(f"{args.model}: C {C}, F {Fm}, H {H}, Hkv {Hkv}, D {D}; batch {B}, INT4 group {G}; {device}")
    print(f"{'kernel':<32} {'MB':>6} {'ref µs':>8} {'ref GB/s':>8} {'rel. error':>10} {'µs':>7} {'GB/s':>6}")
    rows = []
    for name, nbytes, reference, kernel in cases:
        row = {"kernel": name, "bytes": nbytes, "ref_us": time_us(reference, device)}
        line = f"{name:<32} {nbytes / 1e6:>6.2f} {row['ref_us']:>8.0f} {nbytes / row['ref_us'] / 1e3:>8.2f}"
        if run:  # validate first, then time
            ref = reference()
            row["error"] = ((kernel().double() - ref.double()).norm() / ref.double().norm()).item()
            row["us"] = time_us(kernel, device)
            line += f" {row['error']:>10.1e} {row['us']:>7.1f} {nbytes / row['us'] / 1e3:>6.0f}"
        rows.append(row)
        print(line)
    if not run:
        print("The Triton kernels need a CUDA GPU and the triton package: shown are the slow PyTorch references only.")
    return rows


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
