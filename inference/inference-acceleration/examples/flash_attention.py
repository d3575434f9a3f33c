"""FlashAttention's idea in plain PyTorch: tiled attention with the online softmax.

What it shows
-------------
1. `standard_attention`: softmax(Q K^T / sqrt(D)) V written out. It materialises the T x T score
   matrix S, so its memory grows with T^2.
2. `tiled_attention`: the same result computed block by block. For each block of queries it walks
   over blocks of keys and keeps, per query row, a running maximum m, a running sum l of
   exponentials and a rescaled accumulator of P V. Only one tile of S exists at a time, so memory
   grows with T. This is FlashAttention's algorithm; the real kernels run the same loop inside
   one GPU kernel, with the tiles in on-chip SRAM.
3. The library: PyTorch's scaled_dot_product_attention (SDPA) restricted to one backend at a
   time (flash, cuDNN, memory-efficient, math); the CPU has flash and math.
4. One comparison table on random Q, K, V with the attention shape of `--model` (its H and D,
   read from the config; no weights are loaded): each implementation's largest error against a
   float64 reference beside the error of the written-out formula in the same dtype
   (FlashAttention's test rule: at most about twice that), the score elements it holds at once,
   and the time of one call.

Run it
------
    python inference/inference-acceleration/examples/flash_attention.py \\
        --model HuggingFaceTB/SmolLM2-135M-Instruct --seq-len 1024

What it prints on SmolLM2-135M-Instruct's shape (H = 9, D = 64; CPU, float32; a few seconds):
every implementation within about 1e-6 of float64, like the written-out formula; the standard
attention holding 9 x 1024 x 1024 scores at once, the tiled loop 9 x 128 x 128; and the tiled
Python loop slower than SDPA's fused CPU kernel, which runs the same idea in C++.
Timing over many lengths, peak GPU memory, TFLOP/s, plots: bench/flash_attention.py.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Shape letters: B batch, H heads, T tokens (Tq queries, Tk keys), D head dim.


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


# ---------------------------------------------------------------------------------------------
# From scratch: standard and tiled attention
# ---------------------------------------------------------------------------------------------

# --8<-- [start:standard]
def standard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       causal: bool) -> torch.Tensor:
    """O = softmax(S) V with S = Q K^T / sqrt(D); causal masks key j > query i (top-left).

    q: (B, H, Tq, D), k and v: (B, H, Tk, D). Materialises S: (B, H, Tq, Tk).
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    S = (q @ k.transpose(-2, -1)) * scale  # (B, H, Tq, Tk)
    if causal:
        i = torch.arange(q.shape[-2], device=q.device)[:, None]
        j = torch.arange(k.shape[-2], device=q.device)[None, :]
        S = S.masked_fill(j > i, float("-inf"))
    P = torch.softmax(S, dim=-1)  # (B, H, Tq, Tk)
    return P @ v  # (B, H, Tq, D)
# --8<-- [end:standard]


# --8<-- [start:tiled]
def tiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                    block_q: int = 64, block_k: int = 64) -> torch.Tensor:
    """Attention by tiles with the online softmax (FlashAttention's forward pass).

    For one block of queries Q_i and the key/value blocks K_j, V_j in order, with
    per-row state m (running max), l (running sum of exponentials) and acc
    (unnormalised output):

        S_ij  = Q_i K_j^T / sqrt(D)       (masked where key > query if causal)
        m_new = max(m, rowmax(S_ij))
        P_ij  = exp(S_ij - m_new)
        alpha = exp(m - m_new)            (rescales what was summed under the old max)
        l     = alpha * l + rowsum(P_ij)
        acc   = alpha * acc + P_ij V_j
        m     = m_new
    and at the end O_i = acc / l. This equals softmax(S) V exactly (up to rounding),
    because every term exp(s - m_old) in l and acc becomes exp(s - m_new) once
    multiplied by alpha.

    q: (B, H, Tq, D), k and v: (B, H, Tk, D); the state is float32 whatever the dtype.
    """
    B, H, Tq, D = q.shape
    Tk = k.shape[-2]
    scale = 1.0 / math.sqrt(D)
    out = torch.empty_like(q)
    for i0 in range(0, Tq, block_q):
        i1 = min(i0 + block_q, Tq)
        Q_i = q[:, :, i0:i1].float()  # (B, H, bq, D)
        m = torch.full((B, H, i1 - i0), float("-inf"), device=q.device)  # (B, H, bq)
        l = torch.zeros(B, H, i1 - i0, device=q.device)  # (B, H, bq)
        acc = torch.zeros(B, H, i1 - i0, D, device=q.device)  # (B, H, bq, D)
        k_end = min(Tk, i1) if causal else Tk  # causal: skip blocks right of the diagonal
        for j0 in range(0, k_end, block_k):
            j1 = min(j0 + block_k, k_end)
            K_j, V_j = k[:, :, j0:j1].float(), v[:, :, j0:j1].float()  # (B, H, bk, D)
            S_ij = (Q_i @ K_j.transpose(-2, -1)) * scale  # (B, H, bq, bk)
            if causal and j1 - 1 > i0:  # the tile crosses the diagonal: mask key > query
                rows = torch.arange(i0, i1, device=q.device)[:, None]
                cols = torch.arange(j0, j1, device=q.device)[None, :]
                S_ij = S_ij.masked_fill(cols > rows, float("-inf"))
            m_new = torch.maximum(m, S_ij.amax(dim=-1))  # (B, H, bq); key 0 is visible
            P_ij = torch.exp(S_ij - m_new[..., None])  # (B, H, bq, bk)
            alpha = torch.exp(m - m_new)  # (B, H, bq); exp(-inf) = 0 on the first tile
            l = alpha * l + P_ij.sum(dim=-1)
            acc = alpha[..., None] * acc + P_ij @ V_j  # (B, H, bq, D)
            m = m_new
        out[:, :, i0:i1] = (acc / l[..., None]).to(q.dtype)
    return out
# --8<-- [end:tiled]


# ---------------------------------------------------------------------------------------------
# Library: PyTorch's SDPA, one backend at a time
# ---------------------------------------------------------------------------------------------

# --8<-- [start:sdpa_backends]
SDPA_BACKENDS: dict[str, SDPBackend] = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,  # FlashAttention-2 kernels inside PyTorch
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,  # NVIDIA's cuDNN fused attention
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,  # xFormers' memory-efficient kernel
    "sdpa-math": SDPBackend.MATH,  # the written-out formula: materialises S (B, H, T, T)
}


def sdpa_with(backend: SDPBackend) -> Callable[..., torch.Tensor]:
    """SDPA restricted to one backend; it raises if the backend cannot take the inputs."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            causal: bool) -> torch.Tensor:
        with sdpa_kernel(backend):  # (B, H, T, D) in and out
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run
# --8<-- [end:sdpa_backends]


def attention_shape(model_name: str) -> tuple[int, int]:
    """(H, D) of a model's attention, from its config alone (no weights are loaded)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_name)
    except (OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise Refusal(f"cannot read the config of {model_name!r} ({first}): pass a hub id or a "
                      "local model folder with --model") from None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    H = config.num_attention_heads
    return H, getattr(config, "head_dim", None) or config.hidden_size // H


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------

def implementations(block: int, device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    """Everything compared, by name: ours, then every SDPA backend this device can have."""
    impls: dict[str, Callable[..., torch.Tensor]] = {
        "standard (ours)": standard_attention,
        "tiled (ours)": lambda q, k, v, causal: tiled_attention(q, k, v, causal, block, block),
    }
    for name, backend in SDPA_BACKENDS.items():
        if device.type == "cuda" or backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            impls[name] = sdpa_with(backend)
    return impls


def scores_held(name: str, H: int, T: int, block: int) -> str:
    """Score elements one call holds at once (per batch element): T x T, a tile, or on chip."""
    if name in ("standard (ours)", "sdpa-math"):
        return f"{H} x {T} x {T}"
    if name == "tiled (ours)":
        return f"{H} x {min(block, T)} x {min(block, T)}"
    return "tiles (fused kernel)"


def compare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            block: int) -> list[dict]:
    """Each implementation against float64, and one timed call; the plain formula first."""
    H, T = q.shape[1], q.shape[2]
    ref = standard_attention(q.double(), k.double(), v.double(), causal)  # (B, H, T, D)
    rows = []
    for name, fn in implementations(block, q.device).items():
        row = {"impl": name, "held": scores_held(name, H, T, block)}
        try:
            fn(q, k, v, causal)  # first call: allocations, kernel choice
            if q.device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(q, k, v, causal)
            if q.device.type == "cuda":
                torch.cuda.synchronize()
            row["ms"] = (time.perf_counter() - t0) * 1e3
        except RuntimeError as error:  # a backend that cannot take these inputs says so
            row["error"] = str(error).strip().splitlines()[0][:60]
            rows.append(row)
            continue
        row["max_err"] = (out.double() - ref).abs().max().item()
        rows.append(row)
    return rows


def print_table(rows: list[dict], shape: str) -> None:
    plain = rows[0]["max_err"]  # the written-out formula in the same dtype: the yardstick
    print(f"{shape}\n")
    print(f"{'implementation':<16} {'max |out - fp64|':>16} {'<= 2x plain':>11} "
          f"{'scores held at once':>20} {'ms (1 call)':>11}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:<16} {'unsupported here: ' + r['error']}")
            continue
        ok = r["max_err"] <= 2 * plain + 1e-6
        print(f"{r['impl']:<16} {r['max_err']:>16.2e} {str(ok):>11} {r['held']:>20} "
              f"{r['ms']:>11.2f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                        help="hub id or local folder whose attention shape (H, D) is used; "
                             "only its config is read")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto = cuda if available, else cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="dtype of Q, K, V (the tiled loop keeps its state in float32)")
    parser.add_argument("--seq-len", type=int, default=1024, help="sequence length T")
    parser.add_argument("--block", type=int, default=128,
                        help="tile size (queries and keys) of the tiled loop")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True,
                        help="causal mask (a decoder's prefill)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random Q, K, V")
    return parser


def main(args: argparse.Namespace) -> list[dict]:
    if args.seq_len < 1 or args.block < 1:
        build_parser().error("--seq-len and --block must be at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda was asked for but no CUDA GPU is visible: use --device cpu")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = getattr(torch, args.dtype)
    H, D = attention_shape(args.model)
    gen = torch.Generator().manual_seed(args.seed)
    q, k, v = (torch.randn(1, H, args.seq_len, D, generator=gen).to(device, dtype)
               for _ in range(3))  # (B, H, T, D), entries ~ N(0, 1)
    rows = compare(q, k, v, args.causal, args.block)
    print_table(rows, f"{args.model}: B=1, H={H}, T={args.seq_len}, D={D}, {args.dtype}, "
                      f"causal={args.causal}, tile {args.block}, on {device.type}")
    return rows


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
