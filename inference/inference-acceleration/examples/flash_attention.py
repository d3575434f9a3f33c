"""FlashAttention's idea in plain PyTorch: tiled attention with the online softmax.

What it shows
-------------
1. `standard_attention`: softmax(Q K^T / sqrt(D)) V written out. It materialises the T x T score
   matrix S, so its memory grows with T^2.
2. `tiled_attention`: the same result computed block by block. For each block of queries it walks
   over blocks of keys and keeps, per query row, a running maximum m, a running sum l of
   exponentials and a rescaled accumulator of P V. Only one tile of S exists at a time, so memory
   grows with T. This is the algorithm of FlashAttention; the real kernels do the same loop inside
   one GPU kernel, with the tiles in on-chip SRAM.
3. A check that both equal a float64 reference within the float32 tolerance, on odd shapes
   (T = 113, D = 59), causal and not.
4. A benchmark. On a GPU: PyTorch's scaled_dot_product_attention (SDPA) backends (flash, cuDNN,
   memory-efficient, math), the `flash-attn` package when it is installed, and our tiled loop:
   time, TFLOP/s and peak extra memory against sequence length, causal, bf16 (math runs out of
   memory at long lengths: recorded as "OOM"). On a CPU: a small timing of SDPA's math backend,
   SDPA's default CPU kernel, the written-out attention and the tiled loop.

Run it
------
    python inference/inference-acceleration/examples/flash_attention.py --device cpu
    python inference/inference-acceleration/examples/flash_attention.py --device cuda --json out.json

On 2 CPU cores the check prints a largest difference below 1e-6 (float32, tolerance 1e-5) and a
table where the tiled loop holds one tile of S instead of T x T, and loses in speed to SDPA's fused
CPU kernel (it is a Python loop of small matmuls). On an H100 the fused kernels (cuDNN, flash) run
at hundreds of TFLOP/s with memory linear in T, the math backend runs out of memory at T = 16384.

`--json PATH` writes the results, and beside it PATH's stem with `.md` (table) and `.png` (plot).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def fail(message: str) -> NoReturn:
    """Bad input ends with one line on stderr and exit code 2, never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------------
# From scratch: standard and tiled attention
# ---------------------------------------------------------------------------------------------

# --8<-- [start:standard]
def standard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """O = softmax(S) V with S = Q K^T / sqrt(D); causal masks key j > query i (top-left aligned).

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

    For one block of queries Q_i and the key/value blocks K_j, V_j in order, with per-row state
    m (running max), l (running sum of exponentials) and acc (unnormalised output):

        S_ij  = Q_i K_j^T / sqrt(D)                   (masked where key > query if causal)
        m_new = max(m, rowmax(S_ij))
        P_ij  = exp(S_ij - m_new)
        alpha = exp(m - m_new)                        (rescales what was summed under the old max)
        l     = alpha * l + rowsum(P_ij)
        acc   = alpha * acc + P_ij V_j
        m     = m_new
    and at the end O_i = acc / l. This equals softmax(S) V exactly (up to rounding), because every
    term exp(s - m_old) in l and acc becomes exp(s - m_new) once multiplied by alpha.

    q: (B, H, Tq, D), k and v: (B, H, Tk, D); state is kept in float32 whatever the input dtype.
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
        k_end = min(Tk, i1) if causal else Tk  # causal: key blocks right of the diagonal are skipped
        for j0 in range(0, k_end, block_k):
            j1 = min(j0 + block_k, k_end)
            K_j, V_j = k[:, :, j0:j1].float(), v[:, :, j0:j1].float()  # (B, H, bk, D)
            S_ij = (Q_i @ K_j.transpose(-2, -1)) * scale  # (B, H, bq, bk)
            if causal and j1 - 1 > i0:  # the tile crosses the diagonal: mask key > query
                rows = torch.arange(i0, i1, device=q.device)[:, None]
                cols = torch.arange(j0, j1, device=q.device)[None, :]
                S_ij = S_ij.masked_fill(cols > rows, float("-inf"))
            m_new = torch.maximum(m, S_ij.amax(dim=-1))  # (B, H, bq); finite: key 0 is always visible
            P_ij = torch.exp(S_ij - m_new[..., None])  # (B, H, bq, bk)
            alpha = torch.exp(m - m_new)  # (B, H, bq); exp(-inf) = 0 on the first tile
            l = alpha * l + P_ij.sum(dim=-1)
            acc = alpha[..., None] * acc + P_ij @ V_j  # (B, H, bq, D)
            m = m_new
        out[:, :, i0:i1] = (acc / l[..., None]).to(q.dtype)
    return out
# --8<-- [end:tiled]


# Max absolute difference allowed against a float64 reference, per input dtype (inputs ~ N(0, 1)).
TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}

CHECK_SHAPES: list[tuple[int, int, int, int, int]] = [  # (B, H, Tq, Tk, D)
    (1, 1, 16, 16, 8), (2, 3, 113, 113, 59), (1, 4, 256, 256, 64), (2, 2, 77, 130, 32), (1, 2, 1, 300, 64),
]


def check_tiled(device: torch.device, seed: int, block: int) -> list[dict[str, Any]]:
    """Tiled and written-out attention in float32 against a float64 reference, causal and not."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for B, H, Tq, Tk, D in CHECK_SHAPES:
        for causal in (False, True):
            if causal and Tq > Tk:
                continue
            q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=torch.float64) for T in (Tq, Tk, Tk))
            ref = standard_attention(q, k, v, causal)
            q32, k32, v32 = (x.float().to(device) for x in (q, k, v))
            tiled = tiled_attention(q32, k32, v32, causal, block, block).double().cpu()
            sdpa = F.scaled_dot_product_attention(q32, k32, v32, is_causal=causal).double().cpu()
            diff = (tiled - ref).abs()
            rows.append({"shape": [B, H, Tq, Tk, D], "causal": causal, "max_diff": diff.max().item(),
                         "mean_diff": diff.mean().item(), "sdpa_max_diff": (sdpa - ref).abs().max().item(),
                         "tiled_vs_sdpa_max_diff": (tiled - sdpa).abs().max().item(),
                         "tolerance": TOLERANCE[torch.float32]})
            rows[-1]["ok"] = rows[-1]["max_diff"] <= rows[-1]["tolerance"]
    return rows


# ---------------------------------------------------------------------------------------------
# Library: PyTorch SDPA backends and the flash-attn package
# ---------------------------------------------------------------------------------------------

# --8<-- [start:sdpa_backends]
SDPA_BACKENDS: dict[str, SDPBackend] = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,  # FlashAttention-2 kernels shipped inside PyTorch
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,  # NVIDIA's cuDNN fused attention (Hopper: FA3-like)
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,  # xFormers' memory-efficient kernel
    "sdpa-math": SDPBackend.MATH,  # the written-out formula: materialises S (B, H, T, T)
}


def sdpa_with(backend: SDPBackend) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool], torch.Tensor]:
    """SDPA restricted to one backend; it raises if that backend cannot take these inputs."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, T, D)
    return run
# --8<-- [end:sdpa_backends]


def flash_attn_package() -> tuple[Callable | None, str | None]:
    """The `flash-attn` package's function (it wants (B, T, H, D)) and version, or (None, None)."""
    try:
        import flash_attn
        from flash_attn import flash_attn_func
    except ImportError:
        return None, None

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)  # back to (B, H, T, D)
    return run, flash_attn.__version__


def candidates(device: torch.device, block: int) -> dict[str, Callable]:
    """Every implementation to time on this device, by name."""
    tiled = lambda q, k, v, causal: tiled_attention(q, k, v, causal, block, block)  # noqa: E731
    if device.type == "cuda":
        found = dict((name, sdpa_with(b)) for name, b in SDPA_BACKENDS.items())
        fa, _ = flash_attn_package()
        if fa is not None:
            found["flash-attn"] = fa
        found["tiled (ours)"] = tiled
        return found
    return {"sdpa-math": sdpa_with(SDPBackend.MATH),
            "sdpa-default": lambda q, k, v, causal: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
            "standard (ours)": standard_attention, "tiled (ours)": tiled}


# ---------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------

def time_ms(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median time in ms: CUDA events on a GPU, a host clock on a CPU; warm-up not counted."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def attention_flops(B: int, H: int, T: int, D: int, causal: bool) -> float:
    """Two matmuls (Q K^T and P V) of 2*T*T*D flops per head; causal does half of them."""
    return 4.0 * B * H * T * T * D / (2 if causal else 1)


def measure(name: str, fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
            warmup: int, repeats: int) -> dict[str, Any]:
    """Time one implementation; on CUDA also its peak memory beyond the inputs (output included)."""
    device = q.device
    B, H, T, D = q.shape
    row: dict[str, Any] = {"impl": name, "T": T}
    try:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn(q, k, v, causal)
            torch.cuda.synchronize()
            row["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
        ms = time_ms(lambda: fn(q, k, v, causal), device, warmup, repeats)
        row.update(status="ok", ms=ms, tflops=attention_flops(B, H, T, D, causal) / (ms * 1e-3) / 1e12)
    except torch.OutOfMemoryError:
        row.update(status="OOM")
    except RuntimeError as error:  # a backend that cannot take these inputs says so
        row.update(status="unsupported", reason=str(error).strip().splitlines()[0][:160])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def check_backends(device: torch.device, impls: dict[str, Callable], dtype: torch.dtype, seed: int) -> list[dict]:
    """Each implementation in `dtype` against a float32 reference, beside the math backend's own error."""
    gen = torch.Generator().manual_seed(seed)
    B, H, T, D = 2, 4, 1000, 64
    q, k, v = (torch.randn(B, H, T, D, generator=gen).to(device) for _ in range(3))
    ref = standard_attention(q, k, v, causal=True)
    qd, kd, vd = (x.to(dtype) for x in (q, k, v))
    # The yardstick: the written-out formula computed in the same low precision.
    baseline = (standard_attention(qd, kd, vd, causal=True).float() - ref).abs().max().item()
    rows = [{"impl": f"standard ({str(dtype).removeprefix('torch.')})", "max_diff": baseline, "baseline": True}]
    for name, fn in impls.items():
        try:
            err = (fn(qd, kd, vd, True).float() - ref).abs()
            rows.append({"impl": name, "max_diff": err.max().item(), "mean_diff": err.mean().item()})
        except RuntimeError as error:
            rows.append({"impl": name, "error": str(error).strip().splitlines()[0][:160]})
    return rows


def benchmark(device: torch.device, dtype: torch.dtype, B: int, H: int, D: int, lengths: list[int],
              causal: bool, block: int, warmup: int, repeats: int, seed: int, quiet: bool) -> list[dict]:
    from tqdm import tqdm

    impls = candidates(device, block)
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = []
    for T in tqdm(lengths, desc="lengths", disable=quiet or not sys.stderr.isatty()):
        q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=dtype, device=device) for _ in range(3))
        for name, fn in impls.items():
            row = measure(name, fn, q, k, v, causal, warmup, repeats)
            if device.type != "cuda":  # no allocator statistics on CPU: the size of S, computed
                tile = block * block if "tiled" in name else T * T
                row["score_matrix_gib"] = B * H * tile * 4 / 2**30 if "default" not in name else None
            rows.append(row)
            if not quiet:
                print(f"T={T:6d} {name:16s} {row['status']:11s} {row.get('ms', float('nan')):10.3f} ms", flush=True)
        del q, k, v
    return rows


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

def hardware_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {threads} thread{'s' if threads != 1 else ''}"


def cell(row: dict[str, Any], gpu: bool) -> str:
    if row["status"] != "ok":
        return row["status"]
    if gpu:
        return f"{row['ms']:.2f} ms, {row['tflops']:.0f} TFLOP/s, {row['peak_extra_gib']:.2f} GiB"
    size = row.get("score_matrix_gib")
    return f"{row['ms']:.2f} ms" + (f", S {size * 1024:.1f} MiB" if size is not None else "")


def results_markdown(result: dict[str, Any]) -> str:
    gpu = result["device"] == "cuda"
    s = result["setup"]
    impls = list(dict.fromkeys(r["impl"] for r in result["benchmark"]))
    lengths = list(dict.fromkeys(r["T"] for r in result["benchmark"]))
    what = ("time (median), TFLOP/s, peak memory beyond the inputs" if gpu
            else "time (median); S = size of the score matrix held at once (computed)")
    worst = max(r["max_diff"] for r in result["check"])
    check_line = (f"Tiled vs float64 reference, {len(result['check'])} shapes (T=113, D=59 among them), "
                  f"causal and not: largest max |diff| {worst:.1e} (tolerance {TOLERANCE[torch.float32]:.0e}, "
                  "float32).")
    if not result["benchmark"]:
        return check_line + "\n"
    lines = [f"{result['hardware']}, {s['dtype']}, B={s['batch']}, H={s['heads']}, D={s['head_dim']}, "
             f"causal={s['causal']}, tile {s['block']}x{s['block']} for ours; {what}.", "",
             "| T | " + " | ".join(impls) + " |", "|---|" + "---|" * len(impls)]
    for T in lengths:
        by = {r["impl"]: r for r in result["benchmark"] if r["T"] == T}
        lines.append(f"| {T} | " + " | ".join(cell(by[name], gpu) if name in by else "-" for name in impls) + " |")
    lines += ["", check_line]
    if result.get("flash_attn") is None and gpu:
        lines.append("The flash-attn package was not installed on this machine: SDPA's own kernels only.")
    return "\n".join(lines) + "\n"


def write_plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpu = result["device"] == "cuda"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    impls = list(dict.fromkeys(r["impl"] for r in result["benchmark"]))
    for name in impls:
        ok = [r for r in result["benchmark"] if r["impl"] == name and r["status"] == "ok"]
        if not ok:
            continue
        xs = [r["T"] for r in ok]
        axes[0].plot(xs, [r["ms"] for r in ok], "o-", label=name)
        mem = [r.get("peak_extra_gib") if gpu else r.get("score_matrix_gib") for r in ok]
        if all(m is not None for m in mem):
            axes[1].plot(xs, mem, "o-", label=name)
    axes[0].set_ylabel("ms (median)")
    axes[1].set_ylabel("peak extra memory, GiB" if gpu else "score matrix held at once, GiB (computed)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    s = result["setup"]
    fig.suptitle(f"{result['hardware']}: B={s['batch']}, H={s['heads']}, D={s['head_dim']}, {s['dtype']}, "
                 f"causal={s['causal']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(result: dict[str, Any], json_path: Path) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    json_path.with_suffix(".md").write_text(results_markdown(result))
    if result["benchmark"]:
        write_plot(result, json_path.with_suffix(".png"))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

# `--size auto` picks "large" on CUDA and "small" on a CPU.
SIZES: dict[str, dict[str, Any]] = {
    "small": {"batch": 1, "heads": 8, "head_dim": 64, "lengths": [128, 256, 512, 1024], "dtype": "float32"},
    "large": {"batch": 4, "heads": 32, "head_dim": 128, "lengths": [512, 1024, 2048, 4096, 8192, 16384],
              "dtype": "bfloat16"},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not lengths or any(n < 1 for n in lengths):
        raise argparse.ArgumentTypeError("lengths must be positive integers")
    return lengths


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("Model (attention shapes; there are no weights here)")
    model.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                       help="not loaded: attention needs only shapes (kept for the common interface)")
    model.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = cuda if available")
    model.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="benchmark dtype; auto = the size preset's (float32 small, bfloat16 large)")
    bench = parser.add_argument_group("Benchmark")
    bench.add_argument("--size", choices=["auto", *SIZES], default="auto",
                       help="shape preset: small = B1 H8 D64 T128..1024 fp32, large = B4 H32 D128 T512..16384 "
                            "bf16; auto = large on CUDA, small on CPU")
    bench.add_argument("--lengths", type=parse_lengths, default=None, help="comma-separated T (overrides --size)")
    bench.add_argument("--batch", type=int, default=None, help="batch B (overrides --size)")
    bench.add_argument("--heads", type=int, default=None, help="heads H (overrides --size)")
    bench.add_argument("--head-dim", type=int, default=None, help="head dim D (overrides --size)")
    bench.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True, help="causal mask")
    bench.add_argument("--block", type=int, default=128, help="tile size (queries and keys) of our tiled loop")
    bench.add_argument("--warmup", type=int, default=2, help="untimed calls before each measurement")
    bench.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    bench.add_argument("--check-only", action="store_true", help="only the tiled-vs-reference check")
    out = parser.add_argument_group("Output")
    out.add_argument("--threads", type=int, default=0,
                     help="CPU threads for torch (0 = torch's default); 1 is steadier on a busy shared machine")
    out.add_argument("--seed", type=int, default=0, help="seed for the random Q, K, V")
    out.add_argument("--json", type=Path, default=None, help="write results JSON here (+ .md, .png beside it)")
    out.add_argument("--quiet", action="store_true", help="no progress bars, shorter printout")
    return parser


def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA GPU is visible; use --device cpu")
    if min(args.block, args.repeats) < 1 or args.warmup < 0:
        fail("--block and --repeats must be >= 1, --warmup >= 0")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    preset = SIZES[args.size if args.size != "auto" else ("large" if device.type == "cuda" else "small")]
    dtype = DTYPES[args.dtype if args.dtype != "auto" else preset["dtype"]]
    B, H, D = (args.batch or preset["batch"], args.heads or preset["heads"], args.head_dim or preset["head_dim"])
    lengths = args.lengths or preset["lengths"]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    check = check_tiled(device, args.seed, min(args.block, 64))
    worst = max(check, key=lambda r: r["max_diff"])
    print(f"tiled vs float64 reference ({len(check)} cases): max |diff| {worst['max_diff']:.2e}, "
          f"mean {statistics.mean(r['mean_diff'] for r in check):.2e}, tolerance {TOLERANCE[torch.float32]:.0e}: "
          f"{'ok' if all(r['ok'] for r in check) else 'FAILED'}")
    _, fa_version = flash_attn_package()
    if device.type == "cuda" and fa_version is None:
        print("flash-attn is not installed: timing PyTorch's SDPA backends only (they include flash and cuDNN kernels)")
    result: dict[str, Any] = {
        "hardware": hardware_name(device),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     **({"flash_attn": fa_version} if fa_version else {}),
                     **({"cuda": torch.version.cuda} if device.type == "cuda" else {})},
        "command": "python " + shlex.join(sys.argv), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device.type, "flash_attn": fa_version, "check": check, "check_ok": all(r["ok"] for r in check),
        "setup": {"batch": B, "heads": H, "head_dim": D, "dtype": str(dtype).removeprefix("torch."),
                  "causal": args.causal, "block": args.block, "lengths": lengths,
                  "warmup": args.warmup, "repeats": args.repeats},
        "benchmark": [],
    }
    if not args.check_only:
        if device.type == "cuda":
            result["backend_check"] = check_backends(device, candidates(device, args.block), dtype, args.seed)
        result["benchmark"] = benchmark(device, dtype, B, H, D, lengths, args.causal, args.block,
                                        args.warmup, args.repeats, args.seed, args.quiet)
        print(results_markdown(result))
    if args.json:
        write_results(result, args.json)
    if not result["check_ok"]:
        fail("tiled attention differs from the reference beyond the tolerance")
    return result


if __name__ == "__main__":
    main(build_parser().parse_args())
