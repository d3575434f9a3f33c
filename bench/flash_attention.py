"""FlashAttention measured: time and memory of standard, tiled and fused attention against T.

Loads inference/inference-acceleration/examples/flash_attention.py (standard_attention,
tiled_attention, SDPA restricted to one backend) and adds the workloads, timing and results:

    check      the tiled loop and the written-out formula in float32 against float64 on odd shapes
               (T = 113, D = 59, Tq != Tk, one query), causal and not: largest errors
    accuracy   (GPU) every implementation in the preset's dtype against a float32 reference, beside
               the written-out formula's own error in that dtype (FlashAttention's test rule)
    benchmark  each implementation at each sequence length T: median and interquartile range of
               repeats, TFLOP/s (4 B H T^2 D flops, halved when causal), and memory: on a GPU the
               measured peak allocation beyond the inputs; on a CPU the size of the score matrix
               held at once, computed (T x T, or one tile; fused kernels are left out). A backend
               that runs out of memory is recorded as "OOM", one that cannot take the inputs as
               "unsupported".

Writes
    flash_attention-<preset>.{json,md,en.md}
    flash_attention-<preset>.png          time against T, one line per implementation
    flash_attention-<preset>-memory.png   memory against T

Run: python bench/flash_attention.py --preset cpu      (the GPU run: --preset h200)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import common  # bench/ is on sys.path: it is the folder of the script being run

STEM = "flash_attention"

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "about": "one CPU thread, float32, B=1, H=8, D=64, causal, T 128..2048, tile 128: SDPA "
                 "math and flash (CPU kernel), our standard and tiled attention; median of 3 after "
                 "1 warm-up",
        "device": "cpu",
        "dtype": "float32",
        "threads": 1,
        "batch": 1, "heads": 8, "head_dim": 64,
        "lengths": [128, 256, 512, 1024, 2048],
        "causal": True,
        "block": 128,
        "impls": ["sdpa-math", "sdpa-flash", "standard (ours)", "tiled (ours)"],
        "warmup": 1,
        "repeats": 3,
        "quick": {"lengths": [64, 128], "block": 32, "warmup": 0, "repeats": 2},
    },
    "h200": {
        "about": "one GPU, bf16, B=4, H=32, D=128, causal, T 512..16384, tile 128: SDPA flash, "
                 "cuDNN, efficient and math (OOM recorded), the flash-attn package if installed, "
                 "our tiled loop; median of 5 after 2 warm-ups, peak memory, TFLOP/s",
        "device": "cuda",
        "dtype": "bfloat16",
        "threads": 0,
        "batch": 4, "heads": 32, "head_dim": 128,
        "lengths": [512, 1024, 2048, 4096, 8192, 16384],
        "causal": True,
        "block": 128,
        "impls": ["sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flash-attn",
                  "tiled (ours)"],
        "warmup": 2,
        "repeats": 5,
        "quick": {"batch": 1, "heads": 2, "head_dim": 64, "lengths": [128, 256], "warmup": 0,
                  "repeats": 2},
    },
}

# (B, H, Tq, Tk, D) of the accuracy check: odd T and D, more keys than queries, one query.
CHECK_SHAPES = [(1, 1, 16, 16, 8), (2, 3, 113, 113, 59), (1, 4, 256, 256, 64), (2, 2, 77, 130, 32),
                (1, 2, 1, 300, 64)]

fa = common.load_script(common.ACCEL / "examples" / "flash_attention.py")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Implementations, accuracy, timing
# ---------------------------------------------------------------------------------------------
def flash_attn_package():
    """The `flash-attn` package's function (it wants (B, T, H, D)) and version, or (None, None)."""
    try:
        import flash_attn
        from flash_attn import flash_attn_func
    except ImportError:
        return None, None

    def run(q, k, v, causal):
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                               causal=causal).transpose(1, 2)  # back to (B, H, T, D)
    return run, flash_attn.__version__


def implementations(names: list[str], block: int) -> dict:
    found = {}
    for name in names:
        if name in fa.SDPA_BACKENDS:
            found[name] = fa.sdpa_with(fa.SDPA_BACKENDS[name])
        elif name == "standard (ours)":
            found[name] = fa.standard_attention
        elif name == "tiled (ours)":
            found[name] = lambda q, k, v, causal: fa.tiled_attention(q, k, v, causal, block, block)
        elif name == "flash-attn":
            run, _ = flash_attn_package()
            if run is not None:
                found[name] = run
    return found


def check_tiled(block: int) -> list[dict]:
    """Tiled and written-out attention in float32 against float64, causal and not."""
    import torch

    gen = torch.Generator().manual_seed(0)
    rows = []
    for B, H, Tq, Tk, D in CHECK_SHAPES:
        for causal in (False, True):
            q = torch.randn(B, H, Tq, D, generator=gen, dtype=torch.float64)
            k, v = (torch.randn(B, H, Tk, D, generator=gen, dtype=torch.float64) for _ in range(2))
            ref = fa.standard_attention(q, k, v, causal)
            q32, k32, v32 = q.float(), k.float(), v.float()
            tiled = fa.tiled_attention(q32, k32, v32, causal, block, block).double()
            plain = fa.standard_attention(q32, k32, v32, causal).double()
            rows.append({"shape": [B, H, Tq, Tk, D], "causal": causal,
                         "tiled_max_err": (tiled - ref).abs().max().item(),
                         "standard_fp32_max_err": (plain - ref).abs().max().item()})
    return rows


def check_accuracy(impls: dict, device, dtype) -> list[dict]:
    """Each implementation in `dtype` against a float32 reference, beside the formula's own error."""
    import torch

    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 4, 1000, 64, generator=gen).to(device) for _ in range(3))
    ref = fa.standard_attention(q, k, v, causal=True)
    qd, kd, vd = (x.to(dtype) for x in (q, k, v))
    rows = [{"impl": "standard, same dtype", "max_err": (fa.standard_attention(qd, kd, vd, True).float()
                                                         - ref).abs().max().item()}]
    for name, fn in impls.items():
        try:
            rows.append({"impl": name, "max_err": (fn(qd, kd, vd, True).float() - ref).abs().max().item()})
        except RuntimeError as error:
            rows.append({"impl": name, "error": str(error).strip().splitlines()[0][:160]})
    return rows


def attention_flops(B: int, H: int, T: int, D: int, causal: bool) -> float:
    """Two matmuls (Q K^T and P V) of 2 T^2 D flops per head; causal does half of them."""
    return 4.0 * B * H * T * T * D / (2 if causal else 1)


def measure(name: str, fn, q, k, v, settings: dict) -> dict:
    import torch

    device = q.device
    B, H, T, D = q.shape
    causal, block = settings["causal"], settings["block"]
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
        elif name in ("sdpa-math", "standard (ours)", "tiled (ours)"):
            side = min(block, T) if name == "tiled (ours)" else T  # float32 scores held at once
            row["score_matrix_gib_computed"] = B * H * side * side * 4 / 2**30
        samples = common.time_ms(lambda: fn(q, k, v, causal), device, settings["warmup"],
                                 settings["repeats"])
        ms = common.spread(samples)
        row.update(status="ok", ms=ms["median"], ms_spread=ms,
                   tflops=attention_flops(B, H, T, D, causal) / (ms["median"] * 1e-3) / 1e12)
    except torch.OutOfMemoryError:
        row.update(status="OOM")
    except RuntimeError as error:  # a backend that cannot take these inputs says so
        row.update(status="unsupported", reason=str(error).strip().splitlines()[0][:160])
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def benchmark(impls: dict, settings: dict, device, dtype) -> list[dict]:
    import torch

    B, H, D = settings["batch"], settings["heads"], settings["head_dim"]
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for T in settings["lengths"]:
        q, k, v = (torch.randn(B, H, T, D, generator=gen, dtype=dtype, device=device) for _ in range(3))
        for name, fn in impls.items():
            rows.append(measure(name, fn, q, k, v, settings))
            r = rows[-1]
            log(f"T={T:6d} {name:16s} {r['status']:11s} {r.get('ms', float('nan')):10.3f} ms")
        del q, k, v
    return rows


# ---------------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------------
def memory_of(row: dict) -> float | None:
    return row.get("peak_extra_gib", row.get("score_matrix_gib_computed"))


def cell(row: dict, gpu: bool) -> str:
    if row["status"] != "ok":
        return row["status"]
    text = f"{row['ms']:.2f} ms"
    if gpu:
        return text + f", {row['tflops']:.0f} TFLOP/s, {row['peak_extra_gib']:.2f} GiB"
    size = row.get("score_matrix_gib_computed")
    return text + (f", S {size * 1024:.3g} MiB" if size is not None else "")


def tables(result: dict) -> dict[str, str]:
    s, gpu = result["settings"], result["device"] == "cuda"
    impls = list(dict.fromkeys(r["impl"] for r in result["benchmark"]))
    rows = []
    for T in s["lengths"]:
        by = {r["impl"]: r for r in result["benchmark"] if r["T"] == T}
        rows.append([T, *[cell(by[name], gpu) if name in by else "–" for name in impls]])
    worst = max(r["tiled_max_err"] for r in result["check"])
    plain = max(r["standard_fp32_max_err"] for r in result["check"])
    shape = f"B={s['batch']}, H={s['heads']}, D={s['head_dim']}, {s['dtype']}, causal={s['causal']}"
    captions = {
        "zh": (f"{result['hardware']}，{shape}，我们的分块 {s['block']}×{s['block']}；中位数"
               f"（{s['warmup']} 次预热后 {s['repeats']} 次），"
               + ("TFLOP/s，超出输入的峰值显存。" if gpu else "S = 同时存在的分数矩阵大小（计算值）。")
               + f"命令：`{result['command']}`",
               f"分块注意力对 float64 参考，{len(result['check'])} 种情形（含 T=113、D=59），因果与非因果："
               f"最大误差 {worst:.1e}（同为 float32 的标准写法 {plain:.1e}）。"),
        "en": (f"{result['hardware']}, {shape}, our tile {s['block']}×{s['block']}; median of "
               f"{s['repeats']} after {s['warmup']} warm-up, "
               + ("TFLOP/s, peak memory beyond the inputs." if gpu
                  else "S = size of the score matrix held at once (computed).")
               + f" Command: `{result['command']}`",
               f"Tiled vs a float64 reference, {len(result['check'])} cases (T=113, D=59 among them), "
               f"causal and not: largest error {worst:.1e} (the written-out formula in float32: {plain:.1e})."),
    }
    if gpu and result["flash_attn"] is None:
        captions = {"zh": (captions["zh"][0], captions["zh"][1] + "这台机器没有装 flash-attn 包：只测了 SDPA 自带的内核。"),
                    "en": (captions["en"][0], captions["en"][1] + " The flash-attn package was not installed: "
                           "SDPA's own kernels only.")}
    out = {}
    for lang, (head, foot) in captions.items():
        out[lang] = (head + "\n\n" + common.markdown_table(["T", *impls], rows) + "\n" + foot + "\n")
    return out


def plot(result: dict, key: str):
    gpu = result["device"] == "cuda"

    def draw(path: Path) -> None:
        fig, ax = common.new_figure()
        for i, name in enumerate(dict.fromkeys(r["impl"] for r in result["benchmark"])):
            ok = [r for r in result["benchmark"] if r["impl"] == name and r["status"] == "ok"]
            ys = [r["ms"] if key == "ms" else memory_of(r) for r in ok]
            if ok and all(y is not None for y in ys):  # one colour and marker per implementation
                ax.plot([r["T"] for r in ok], ys, color=f"C{i}", marker="osD^vx"[i % 6],
                        linestyle="-" if i % 2 == 0 else "--", markersize=7 - i % 3, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("ms (median)" if key == "ms" else
                      "peak memory beyond inputs, GiB" if gpu else "score matrix held, GiB (computed)")
        s = result["settings"]
        ax.set_title(f"{'Time' if key == 'ms' else 'Memory'}: B={s['batch']}, H={s['heads']}, "
                     f"D={s['head_dim']}, {s['dtype']}", fontsize=11)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=10)
        common.save_figure(fig, path)
    return draw


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def main(args) -> None:
    settings, folder, device, dtype = common.start(PRESETS, args, common.ACCEL / "results")
    if args.model:
        log("--model is not used: attention needs only the shapes in the preset")
    start = time.perf_counter()
    impls = implementations(settings["impls"], settings["block"])
    _, fa_version = flash_attn_package()
    result: dict[str, Any] = {
        **common.results_header(settings, args, device, ("flash-attn",)),
        "device": device.type, "flash_attn": fa_version,
        "setup": {key: settings[key] for key in ("batch", "heads", "head_dim", "dtype", "causal",
                                                 "block", "lengths")},
        "check": check_tiled(min(settings["block"], 64)),
    }
    if device.type == "cuda":
        result["accuracy"] = check_accuracy(impls, device, dtype)
    result["benchmark"] = benchmark(impls, settings, device, dtype)
    result["run_seconds"] = time.perf_counter() - start
    written = common.write_results(folder, f"{STEM}-{args.preset}", result, tables(result),
                                   {"": plot(result, "ms"), "-memory": plot(result, "memory")})
    log(f"wrote {', '.join(p.name for p in written)} in {result['run_seconds']:.0f} s")


if __name__ == "__main__":
    common.run_main(main, common.bench_parser(__doc__.splitlines()[0], PRESETS))
