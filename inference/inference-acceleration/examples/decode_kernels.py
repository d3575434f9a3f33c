"""Decode GEMVs in Triton, each beside its slow PyTorch reference: validate, then GB/s.

A batch-1 decode step reads every weight once per token, so each matrix-vector product (GEMV) is
bound by the bytes it reads. As in llm.c's dev/cuda, each kernel has a plain PyTorch reference;
the script runs both on a model's shapes with random codes and prints the kernel's error, time
and GB/s. fused_linear: y = x W^T for bf16, INT8 (per channel) or INT4 (groups, packed in strips)
weights, with fused RMSNorm, SiLU(gate) * up and residual add, and split-K (several programs
share one row block's K, an atomic counter picks the one that finishes) so that 4,096-row
matrices still fill every SM. The attention kernel is decode_attention.py; bench/fast_decode.py
chains both into one fused step in one CUDA graph.

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

# Shapes: B batch (M rows), N out, K in, G group, W = G/8 words, H / Hkv heads, D head dim.
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
    tuned: dict = field(default_factory=dict)    # BLOCK_M -> launch config (bench/ fills it)
    scratch: dict = field(default_factory=dict)  # (M, tiles) -> split-K workspace and counters

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


# --8<-- [start:repack]
def unpack_sequential(words: torch.Tensor, n: int) -> torch.Tensor:
    """(R, n/8) int32 -> (R, n) in [0, 15]: element k at bits 4 (k mod 8) of word k / 8."""
    shifts = 4 * torch.arange(8, device=words.device)
    return ((words.to(torch.int64)[..., None] >> shifts) & 15).reshape(words.shape[0], n)


def from_compressed_tensors(tensors: dict[str, torch.Tensor], group: int) -> Linear:
    """An INT4 layer as llm-compressor saves it (compressed-tensors "pack-quantized", the format
    of its GPTQ, AWQ and W4A16 recipes), repacked into the kernel's strips. There, signed codes
    c in [-8, 7] are stored as c + 8, eight to an int32 word in order (weight_packed (N, K/8));
    W = (c - zp) s with weight_scale (N, K/G) and weight_zero_point packed along N the same way
    (absent when symmetric: zp = 0). Here W = (q - z) s with q = c + 8 and z = zp + 8."""
    N, K = (int(v) for v in tensors["weight_shape"])
    q = unpack_sequential(tensors["weight_packed"], K)                     # (N, K) = c + 8
    scale = tensors["weight_scale"].to(torch.bfloat16)                      # (N, K/G)
    if "weight_zero_point" in tensors:                                      # (N/8, K/G) packed
        zero = unpack_sequential(tensors["weight_zero_point"].t().contiguous(), N).t()
    else:
        zero = torch.full_like(scale, 8)
    return Linear("int4", pack_int4(q.to(torch.uint8), group), scale.t().contiguous(),
                  zero.t().to(torch.bfloat16).contiguous(), group)
# --8<-- [end:repack]


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


# Triton kernels (CUDA; the interpreter runs them on the CPU for tests)
if triton is not None:

    @triton.jit
    def _load_act(x_ptr, rows, cols, rmask, stride_x, K):  # tile (BM, BK) fp32, 0 outside
        return tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :],
                       mask=rmask[:, None] & (cols[None, :] < K), other=0.0).to(tl.float32)

    @triton.jit
    def _u8_to_f32(v, OFFSET: tl.constexpr):  # exact v - OFFSET: 0x4B000000 | v is float 2^23 + v
        return (v.to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + OFFSET)

    # --8<-- [start:splitk]
    @triton.jit
    def _finish(acc, acc_up, x_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr, rows, cols, rmask, nmask,
                N, K, NW, stride_x, stride_r, stride_y, eps, RMS: tl.constexpr,
                GLU: tl.constexpr, RES: tl.constexpr, SPLIT_K: tl.constexpr):
        """Split-K (grid axis 1 cuts K in S slices): add the partial sums into an fp32
        workspace; a counter per tile names the last of its S programs, which takes the
        totals, leaves zeros for the next call and finishes: 1/rms of x (norm folded into
        W), silu(gate) * up, + residual."""
        mask = rmask[:, None] & nmask[None, :]
        last = True
        if SPLIT_K:
            ws = ws_ptr + rows[:, None] * NW + cols[None, :]
            tl.atomic_add(ws, acc, mask=mask)
            if GLU:
                tl.atomic_add(ws + N, acc_up, mask=mask)
            tl.debug_barrier()  # every thread's adds are issued before the counter moves
            tile = cnt_ptr + tl.program_id(2) * tl.num_programs(0) + tl.program_id(0)
            last = tl.atomic_add(tile, 1, sem="acq_rel") == tl.num_programs(1) - 1
            if last:  # the totals, read where the atomics landed (L2); zeros for next call
                acc = tl.atomic_add(ws, 0.0, mask=mask)
                tl.store(ws, 0.0, mask=mask)
                if GLU:
                    acc_up = tl.atomic_add(ws + N, 0.0, mask=mask)
                    tl.store(ws + N, 0.0, mask=mask)
                tl.store(tile, 0)
        if last:
            if RMS:  # sum x^2 over all of K: x is a few KB, read again from L2
                ss = tl.zeros((rows.shape[0],), dtype=tl.float32)
                for k0 in range(0, K, 512):
                    xk = _load_act(x_ptr, rows, k0 + tl.arange(0, 512), rmask, stride_x, K)
                    ss += tl.sum(xk * xk, axis=1)
                rstd = tl.rsqrt(ss / K + eps)[:, None]
                acc, acc_up = acc * rstd, acc_up * rstd
            if GLU:
                acc = acc * tl.sigmoid(acc) * acc_up
            out = rows[:, None] * stride_y + cols[None, :]
            if RES:
                res = r_ptr + rows[:, None] * stride_r + cols[None, :]
                acc += tl.load(res, mask=mask, other=0.0).to(tl.float32)
            tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=mask)
    # --8<-- [end:splitk]

    # --8<-- [start:gemv]
    @triton.jit
    def _dense_tile(w_ptr, rows_w, nmask, k, k_end, K,
                    INT8: tl.constexpr):  # weight tile (BN, BK) fp32
        w = tl.load(w_ptr + rows_w[:, None] * K + k[None, :],
                    mask=nmask[:, None] & (k[None, :] < k_end), other=0)
        if INT8:
            return _u8_to_f32(w.to(tl.uint8, bitcast=True) ^ 0x80, 128.0)
        return w.to(tl.float32)

    @triton.jit
    def _mac(acc, w, x, BLOCK_M: tl.constexpr, DOT: tl.constexpr):
        """One row: acc (BN, BK) += w x, an FMA per weight, summed once after the loop
        (no cross-thread reduction per step). A batch: acc (BM, BN) += x w^T on the
        tensor cores."""
        if BLOCK_M == 1:
            acc += w * x
        else:
            acc += tl.dot(x.to(DOT), tl.trans(w.to(DOT)))
        return acc

    @triton.jit
    def _linear_kernel(x_ptr, w_ptr, s_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, K, NW,
                       K_SPLIT, stride_x, stride_r, stride_y, eps, INT8: tl.constexpr,
                       RMS: tl.constexpr, GLU: tl.constexpr, RES: tl.constexpr,
                       DOT: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """y (M, N) = x (M, K) @ W^T for bf16 or INT8 W. Program (n, s, m) owns BLOCK_N output
        columns, BLOCK_M rows and the s-th slice of K (K_SPLIT long). GLU: W is
        [gate; up] (2N rows): rows n and N + n give silu(gate) * up."""
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, nmask = rows < M, cols < N
        k_lo, kk = tl.program_id(1) * K_SPLIT, tl.arange(0, BLOCK_K)
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        acc = tl.zeros((BLOCK_N, BLOCK_K) if BLOCK_M == 1 else (BLOCK_M, BLOCK_N),
                       dtype=tl.float32)
        acc_up = tl.zeros_like(acc)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            x = _load_act(x_ptr, rows, k0 + kk, rmask, stride_x, k_hi)  # (BM, BK)
            acc = _mac(acc, _dense_tile(w_ptr, cols, nmask, k0 + kk, k_hi, K, INT8), x,
                       BLOCK_M, DOT)
            if GLU:
                acc_up = _mac(acc_up, _dense_tile(w_ptr, cols + N, nmask, k0 + kk, k_hi,
                                                  K, INT8), x, BLOCK_M, DOT)
        if BLOCK_M == 1:
            # (1, BN)
            acc, acc_up = tl.sum(acc, axis=1)[None, :], tl.sum(acc_up, axis=1)[None, :]
        if INT8:  # per-row scale once: sum_k (q s) x = s sum_k q x (distributes over split-K)
            acc *= tl.load(s_ptr + cols, mask=nmask, other=0.0)[None, :]
            if GLU:
                acc_up *= tl.load(s_ptr + N + cols, mask=nmask, other=0.0)[None, :]
        _finish(acc, acc_up, x_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr, rows, cols, rmask, nmask,
                N, K, NW, stride_x, stride_r, stride_y, eps, RMS, GLU, RES, SPLIT_K)

    @triton.jit
    def _int4_strip_unit(words, i: tl.constexpr):
        """Strip i as floats f = 1 + q/16: the field moved to mantissa bits 19-22 of 1.0
        (0x3F800000); a shift and one and-or per weight, no int->float conversion."""
        bits = words << (19 - 4 * i) if 4 * i <= 19 else words >> (4 * i - 19)
        return ((bits & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)

    @triton.jit
    def _int4_group(w_ptr, s_ptr, z_ptr, x_ptr, rows, cols, rmask, nmask, g, j, stride_w,
                    stride_x, NW, K, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                    DOT: tl.constexpr):
        """One group of G = 8W weights for BLOCK_N rows: sum_{k in g} (q - z) x s, (BM, BN).
        One row of x: f = 1 + q/16 turns it into s (16 sum f x - (16 + z) X_g),
        X_g = sum_{k in g} x, so the inner loop is a shift, an and-or and an FMA per weight;
        returned per (row, word column), (BN, W), to be summed once at the end. A batch:
        tl.dot on q - z, (BM, BN)."""
        W: tl.constexpr = GROUP // 8
        words = tl.load(w_ptr + cols[:, None] * stride_w + g * W + j[None, :],
                        mask=nmask[:, None], other=0)
        s = tl.load(s_ptr + g * NW + cols, mask=nmask, other=0.0).to(tl.float32)  # (BN,)
        z = tl.load(z_ptr + g * NW + cols, mask=nmask, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            part, xsum = (tl.zeros((cols.shape[0], W), dtype=tl.float32),
                          tl.zeros((1, W), dtype=tl.float32))
            for i in tl.static_range(8):   # strip i meets x[gG + iW : gG + (i+1)W]
                # (1, W): M = 1
                x = tl.load(x_ptr + g * GROUP + i * W + j[None, :]).to(tl.float32)
                xsum += x
                part += _int4_strip_unit(words, i) * x
            part = (16.0 * s)[:, None] * part - (s * (16.0 + z))[:, None] * xsum  # (BN, W)
        else:
            part = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
            for i in tl.static_range(8):
                # (BM, W)
                x = _load_act(x_ptr, rows, g * GROUP + i * W + j, rmask, stride_x, K)
                q = _u8_to_f32((words >> (4 * i)) & 15, 0.0) - z[:, None]  # (BN, W)
                part += tl.dot(x.to(DOT), tl.trans(q.to(DOT)))
            part *= s[None, :]
        return part

    @triton.jit
    def _int4_linear_kernel(x_ptr, w_ptr, s_ptr, z_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr, M, N,
                            K, NW, GROUPS_SPLIT, stride_x, stride_w, stride_r, stride_y, eps,
                            GROUP: tl.constexpr, RMS: tl.constexpr, GLU: tl.constexpr,
                            RES: tl.constexpr, DOT: tl.constexpr, SPLIT_K: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            GROUPS: tl.constexpr):
        """W4A16: y = x W^T, W (NW, K/8) int32 strips, s and z (K/G, NW). Program (n, s, m)
        owns BLOCK_N rows of W and GROUPS_SPLIT groups of K (split-K: enough programs to fill
        every SM even where N is 4,096); GROUPS groups per iteration, unrolled, keep loads in
        flight."""
        rows = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask, nmask = rows < M, cols < N
        j = tl.arange(0, GROUP // 8)
        acc = tl.zeros((BLOCK_N, GROUP // 8) if BLOCK_M == 1 else (BLOCK_M, BLOCK_N),
                       dtype=tl.float32)
        acc_up = tl.zeros_like(acc)  # batch 1: per (row, word column), summed at the end
        g_lo = tl.program_id(1) * GROUPS_SPLIT
        for g0 in range(g_lo, g_lo + GROUPS_SPLIT, GROUPS):
            for gi in tl.static_range(GROUPS):
                acc += _int4_group(w_ptr, s_ptr, z_ptr, x_ptr, rows, cols, rmask, nmask,
                                   g0 + gi, j, stride_w, stride_x, NW, K, GROUP, BLOCK_M, DOT)
                if GLU:  # rows N + n: the up projection, same x
                    acc_up += _int4_group(w_ptr, s_ptr, z_ptr, x_ptr, rows, cols + N, rmask,
                                          nmask, g0 + gi, j, stride_w, stride_x, NW, K,
                                          GROUP, BLOCK_M, DOT)
        if BLOCK_M == 1:
            # (1, BN)
            acc, acc_up = tl.sum(acc, axis=1)[None, :], tl.sum(acc_up, axis=1)[None, :]
        _finish(acc, acc_up, x_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr, rows, cols, rmask, nmask,
                N, K, NW, stride_x, stride_r, stride_y, eps, RMS, GLU, RES, SPLIT_K)
    # --8<-- [end:gemv]


# (BLOCK_N, BLOCK_K or INT4 groups per iteration, warps, stages, split-K) by BLOCK_M; bench/ tunes
# Linear.tuned. Split-K: N = 4,096 rows in tiles of 16 are 256 programs, too few to keep the 132
# SMs' memory pipes full; 8 slices of K make 2,048.
DEFAULT_CONFIG = {1: {"bf16": (8, 512, 4, 3, 1), "int8": (8, 512, 4, 3, 1), "int4": (128, 1, 4, 1, 8)},
                  16: {"bf16": (64, 128, 4, 3, 1), "int8": (64, 128, 4, 3, 1), "int4": (64, 1, 4, 3, 4)}}


def _split_k(lin: Linear, M: int, tiles: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 partial sums (M, NW) and the per-tile counters split-K adds into: zeros, and the
    kernel leaves them zero, so a CUDA graph can replay it (allocated on the first call)."""
    key = (M, tiles)
    if split > 1 and key not in lin.scratch:
        dev = lin.weight.device
        lin.scratch[key] = (torch.zeros(M, lin.weight.shape[0], device=dev),
                            torch.zeros(tiles, dtype=torch.int32, device=dev))
    return lin.scratch.get(key, (lin.weight, lin.weight))  # unused when split == 1


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
    BM, BN, BK, warps, stages, split = config or (BM, *lin.tuned.get(BM, DEFAULT_CONFIG[min(BM, 16)][lin.fmt]))
    chunks = K // lin.group if lin.fmt == "int4" else triton.cdiv(K, BK)   # split-K cuts between these
    split = max(s for s in range(1, min(split, chunks) + 1) if chunks % s == 0)
    grid = (triton.cdiv(N, BN), split, triton.cdiv(M, BM))
    ws, cnt = _split_k(lin, M, grid[0] * grid[2], split)
    common = dict(RMS=rms, GLU=glu, RES=residual is not None, DOT=DOT_TYPE, SPLIT_K=split > 1, BLOCK_M=BM,
                  BLOCK_N=BN, num_warps=warps, num_stages=stages)
    if lin.fmt == "int4":
        per_split = chunks // split                                        # groups per program
        _int4_linear_kernel[grid](x2, lin.weight, lin.scale, lin.zero, r2, y2, ws, cnt, M, N, K, NW,
                                  per_split, x2.stride(0), lin.weight.stride(0), r2.stride(0), y2.stride(0),
                                  eps, GROUP=lin.group, GROUPS=math.gcd(BK, per_split), **common)
    else:
        s = lin.scale if lin.fmt == "int8" else lin.weight
        _linear_kernel[grid](x2, lin.weight, s, r2, y2, ws, cnt, M, N, K, NW, chunks // split * BK,
                             x2.stride(0), r2.stride(0), y2.stride(0), eps, INT8=lin.fmt == "int8",
                             BLOCK_K=BK, **common)
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
    return parser


@torch.no_grad()
def main(args: argparse.Namespace) -> list[dict]:
    if args.batch < 1:
        build_parser().error("--batch must be at least 1")
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
    D, G, B = getattr(c, "head_dim", None) or C // H, args.group_size, args.batch
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
