"""Tensor-parallel decode: tokens/s per TP size and batch, all-reduce time, bytes per rank.

Loads inference/inference-acceleration/examples/tensor_parallel.py and runs its from-scratch
`TPDecoder` on N processes (gloo on CPUs, NCCL with one GPU per rank), once per TP size N, each
rank loading only its shard. For every batch size it times the decode steps after one prefill
(warm-up excluded, median and interquartile range of the repeats), then the all-reduces of one
step on their own (2 x layers calls of B x C values, what a step sends), and records each rank's
weight and KV-cache bytes. Writes

    tensor_parallel-<preset>.{json,md,en.md}   one row per (N, batch)
    tensor_parallel-<preset>.png               tokens/s per batch size and N
    tensor_parallel-<preset>-split.png         one decode step: all-reduces against the rest

Run: python bench/tensor_parallel.py --preset cpu
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import common  # bench/ is on sys.path: it is the folder of the script being run


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "about": "SmolLM2-135M float32 on CPU processes with gloo (1 thread each): N = 1 and 3 "
                 "(its 9 query heads and 3 KV heads do not split in 2), batch 1 and 8, 32 new tokens",
        "model": "smollm2",
        "device": "cpu",
        "dtype": "float32",
        "tp_sizes": [1, 3],
        "batch_sizes": [1, 8],
        "prompt": "The capital of France is",
        "new_tokens": 32,
        "repeats": 3,
        "quick": {"tp_sizes": [1, 2], "batch_sizes": [1, 2], "new_tokens": 4, "repeats": 1},
    },
    "h200x2": {
        "about": "NEEDS 2 GPUs (refused with fewer): Llama-3-8B shape with random bf16 weights, NCCL "
                 "on 2 H200s, N = 1 and 2, batch 1 and 8, prompt 128, 256 new tokens, eager",
        "model": common.RANDOM_8B,
        "device": "cuda",
        "dtype": "bfloat16",
        "tp_sizes": [1, 2],
        "batch_sizes": [1, 8],
        "prompt_len": 128,                       # random prompt ids for the random shape
        "prompt": "The capital of France is",    # when --model names a checkpoint folder
        "new_tokens": 256,
        "repeats": 5,
        "env": {"NCCL_NVLS_ENABLE": "0"},  # NVLink multicast stays off on shared machines
        "quick": {"batch_sizes": [1], "prompt_len": 16, "new_tokens": 8, "repeats": 1},
    },
}

SCRIPT = common.ACCEL / "examples" / "tensor_parallel.py"
TP = common.load_script(SCRIPT)  # at import: spawned ranks re-import this file and need it too


# ---------------------------------------------------------------------------------------------
# Weights: a checkpoint folder, or Llama-3-8B's shape at random (each rank makes only its shard)
# ---------------------------------------------------------------------------------------------
def random_config() -> "TP.Config":
    c = common.LLAMA3_8B
    H, C = c["num_attention_heads"], c["hidden_size"]
    return TP.Config(C, c["num_hidden_layers"], H, c["num_key_value_heads"], C // H, c["intermediate_size"],
                     c["vocab_size"], c["rms_norm_eps"], c["rope_theta"], c["tie_word_embeddings"])


def checkpoint_shapes(cfg: "TP.Config") -> dict[str, tuple[int, ...]]:
    """Names and full shapes (N, K) of a Llama checkpoint in transformers' naming."""
    shapes = {"model.embed_tokens.weight": (cfg.V, cfg.C), "model.norm.weight": (cfg.C,),
              "lm_head.weight": (cfg.V, cfg.C)}
    for i in range(cfg.L):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (cfg.C,), p + "post_attention_layernorm.weight": (cfg.C,),
            p + "self_attn.q_proj.weight": (cfg.H * cfg.D, cfg.C),
            p + "self_attn.k_proj.weight": (cfg.Hkv * cfg.D, cfg.C),
            p + "self_attn.v_proj.weight": (cfg.Hkv * cfg.D, cfg.C),
            p + "self_attn.o_proj.weight": (cfg.C, cfg.H * cfg.D),
            p + "mlp.gate_proj.weight": (cfg.F, cfg.C), p + "mlp.up_proj.weight": (cfg.F, cfg.C),
            p + "mlp.down_proj.weight": (cfg.C, cfg.F)})
    return shapes


def random_shard(cfg: "TP.Config", plan: "TP.Plan", dtype, device) -> dict[str, Any]:
    """This rank's shard with N(0, 0.02) values (norms 1), cut by the script's own rules and
    made on the device: the whole model never exists anywhere. Speed does not depend on values."""
    import torch

    generator = torch.Generator(device).manual_seed(plan.rank)
    state = {}
    for name, full in checkpoint_shapes(cfg).items():
        bounds = TP.shard_bounds(name, cfg, plan)
        shape = list(full)
        if bounds is not None:
            shape[bounds[0]] = bounds[2] - bounds[1]
        tensor = torch.empty(shape, dtype=dtype, device=device)
        state[name] = tensor.fill_(1.0) if name.endswith("norm.weight") else tensor.normal_(0, 0.02, generator=generator)
    return state


# ---------------------------------------------------------------------------------------------
# One rank of one TP size
# ---------------------------------------------------------------------------------------------
def rank_worker(rank: int, N: int, port: int, settings: dict[str, Any], queue) -> None:
    """Every batch size at TP size N on this rank; rank 0 puts its rows on the queue."""
    import torch
    import torch.distributed as dist

    device = TP.init_rank(rank, N, port, settings["device"])
    dtype = common.dtype_of(settings["dtype"])
    if settings["model"] == common.RANDOM_8B:
        cfg = random_config()
        plan = TP.make_plan(cfg, rank, N)
        weights = random_shard(cfg, plan, dtype, device)
        prompt = torch.randint(0, cfg.V, (1, settings["prompt_len"]), generator=torch.Generator().manual_seed(0))
    else:
        from tokenizers import Tokenizer

        folder = Path(settings["model"])
        cfg = TP.read_config(folder)
        plan = TP.make_plan(cfg, rank, N)
        weights = TP.load_shard(folder, cfg, plan, dtype, device)
        ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(settings["prompt"]).ids
        prompt = torch.tensor([ids])
    comm = TP.Comm(dist.group.WORLD if N > 1 else None)
    model = TP.TPDecoder(cfg, plan, weights, comm)
    weight_bytes = TP.weight_bytes(weights.values(), N)
    steps = settings["new_tokens"]
    elem = torch.finfo(dtype).bits // 8
    # What one decode step reads on this rank: every weight but the embedding table (B rows of
    # it), a tied LM head's rows included; plus the KV cache, counted at the middle of the decode.
    read_weights = sum(t.nbytes for name, t in weights.items() if name != "model.embed_tokens.weight")
    bandwidth = common.copy_bandwidth_gbs(device, 1.0 if device.type == "cuda" else 0.125, repeats=5)
    rows = []
    for B in settings["batch_sizes"]:
        tokens = prompt.expand(B, -1).contiguous().to(device)                      # (B, T)
        T = tokens.shape[1]
        with torch.no_grad():
            model.setup_cache(B, T + steps + 1)
            first = model(tokens, 0)[:, -1:].argmax(-1)                             # prefill, (B, 1)

            generated = [first]

            def decode() -> None:
                """`steps` greedy steps from the same start: each call redoes the same work."""
                generated[1:] = []
                for s in range(steps):
                    generated.append(model(generated[-1], T + s)[:, -1:].argmax(-1))    # (B, 1)

            step_ms = [ms / steps for ms in common.time_ms(decode, device, 1, settings["repeats"])]
            x = torch.randn(B, 1, cfg.C, dtype=dtype, device=device)                # one step's message

            def all_reduces() -> None:
                for _ in range(2 * cfg.L):
                    comm.all_reduce(x)
                    x.mul_(1.0 / N)  # keeps the values bounded; the time does not depend on them

            allreduce_ms = common.time_ms(all_reduces, device, 1, settings["repeats"]) if N > 1 else None
        kv_bytes = sum(t.nbytes for t in model.k + model.v)
        kv_read = 2 * cfg.L * B * len(plan.kv) * (T + steps / 2) * cfg.D * elem
        read_ms = (read_weights + kv_read) / (bandwidth * 1e9) * 1e3
        rows.append({
            "tp_size": N, "batch_size": B, "prompt_len": T, "new_tokens": steps,
            "ms_per_step": common.spread(step_ms),
            "tokens_per_s": B * 1e3 / common.spread(step_ms)["median"],
            "allreduce_ms_per_step": common.spread(allreduce_ms) if N > 1 else None,
            "allreduces_per_step": 2 * cfg.L if N > 1 else 0,
            "allreduce_bytes": B * cfg.C * elem if N > 1 else 0,
            "weight_bytes_per_rank": weight_bytes, "kv_cache_bytes_per_rank": kv_bytes,
            "bytes_read_per_step_per_rank": read_weights + kv_read, "copy_bandwidth_gbs": bandwidth,
            "read_ms_per_step": read_ms, "roofline_fraction": read_ms / common.spread(step_ms)["median"],
            "rank0_plan": {"query_heads": [plan.q.start, plan.q.stop], "kv_heads": [plan.kv.start, plan.kv.stop],
                           "mlp_channels": [plan.ffn.start, plan.ffn.stop]},
            # row 0's tokens, to compare across N (random weights: each rank draws its own shard)
            "tokens": torch.cat(generated, dim=1)[0, :16].tolist() if settings["model"] != common.RANDOM_8B else None,
        })
    if rank == 0:
        queue.put({"config": cfg._asdict(), "rows": rows})
    dist.barrier()
    dist.destroy_process_group()


def run_tp_size(N: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Start N ranks (spawned processes on a free localhost port) and return rank 0's rows."""
    import torch.multiprocessing as mp

    queue = mp.get_context("spawn").SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(rank_worker, args=(N, port, settings, queue), nprocs=N)
    return queue.get()


# ---------------------------------------------------------------------------------------------
# Tables and plots
# ---------------------------------------------------------------------------------------------
def tables(result: dict[str, Any]) -> dict[str, str]:
    s = result["settings"]
    name = "Llama-3-8B shape, random weights" if s["model"] == common.RANDOM_8B else Path(s["model"]).name
    unit = {"zh": "GPU" if s["device"] == "cuda" else "进程", "en": "GPU" if s["device"] == "cuda" else "process"}
    backend = "NCCL" if s["device"] == "cuda" else "gloo"
    caption = {
        "zh": f"{result['hardware']}; {name}, {s['dtype']}; N = 张量并行规模(每个 rank 一个{unit['zh']},"
              f"{backend}); 提示 {result['runs'][0]['prompt_len']} 个词元, 计时 {s['new_tokens']} 个解码步"
              f"(中位数, 重复 {s['repeats']} 次); all-reduce:一步中 2 × 层数 次 all-reduce 单独计时;"
              "读取:每个 rank 一步读取的字节(权重与 KV 缓存)按实测拷贝带宽所需的时间。",
        "en": f"{result['hardware']}; {name}, {s['dtype']}; N = tensor-parallel size (one {unit['en']} "
              f"per rank, {backend}); prompt {result['runs'][0]['prompt_len']} tokens, {s['new_tokens']} "
              f"decode steps timed (median of {s['repeats']}); all-reduce: one step's 2 × layers "
              "all-reduces timed on their own; read: the bytes one step reads per rank (weights and KV "
              "cache) at the measured copy bandwidth.",
    }
    header = {
        "zh": ["N", "批大小", "词元/秒", "相对 N = 1", "毫秒/步", "all-reduce (毫秒)",
               "读取 (毫秒)", f"每{unit['zh']}权重 (MB)"],
        "en": ["N", "batch", "tokens/s", "× N = 1", "ms/step", "all-reduce (ms)", "read (ms)",
               f"weights per {unit['en']} (MB)"],
    }
    rows = []
    for r in result["runs"]:
        ar = f"{r['allreduce_ms_per_step']['median']:.2f}" if r["tp_size"] > 1 else "–"
        speedup = f"{r['speedup_vs_tp1']:.2f}" if r.get("speedup_vs_tp1") else "–"
        rows.append([r["tp_size"], r["batch_size"], f"{r['tokens_per_s']:.1f}", speedup,
                     f"{r['ms_per_step']['median']:.1f}", ar, f"{r['read_ms_per_step']:.2f}",
                     f"{r['weight_bytes_per_rank'] / 1e6:.3g}"])
    return {lang: caption[lang] + "\n\n" + common.markdown_table(header[lang], rows, "r" * 8)
            for lang in ("zh", "en")}


def plot_speed(result: dict[str, Any]):
    def draw(path: Path) -> None:
        fig, ax = common.new_figure()
        batches = sorted({r["batch_size"] for r in result["runs"]})
        sizes = sorted({r["tp_size"] for r in result["runs"]})
        width = 0.8 / len(sizes)
        for j, N in enumerate(sizes):
            runs = {r["batch_size"]: r for r in result["runs"] if r["tp_size"] == N}
            xs = [i + (j - (len(sizes) - 1) / 2) * width for i in range(len(batches))]
            ys = [runs[b]["tokens_per_s"] for b in batches]
            errs = [[runs[b]["batch_size"] * 1e3 * (1 / runs[b]["ms_per_step"]["median"] - 1 / runs[b]["ms_per_step"]["q3"])
                     for b in batches],
                    [runs[b]["batch_size"] * 1e3 * (1 / runs[b]["ms_per_step"]["q1"] - 1 / runs[b]["ms_per_step"]["median"])
                     for b in batches]]
            ax.bar(xs, ys, width, yerr=errs, capsize=3, label=f"N = {N}", color=f"C{j}")
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel("decode tokens/s (median, IQR)")
        ax.set_title(f"Tensor-parallel decode, {result['settings']['dtype']}")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        common.save_figure(fig, path)
    return draw


def plot_split(result: dict[str, Any]):
    def draw(path: Path) -> None:
        fig, ax = common.new_figure()
        runs = result["runs"]
        names = [f"N={r['tp_size']}\nbatch {r['batch_size']}" for r in runs]
        step = [r["ms_per_step"]["median"] for r in runs]
        ar = [min(r["allreduce_ms_per_step"]["median"], s) if r["allreduce_ms_per_step"] else 0.0
              for r, s in zip(runs, step)]
        ax.bar(names, ar, color="C3", label="2 × layers all-reduces (timed alone)")
        ax.bar(names, [s - a for s, a in zip(step, ar)], bottom=ar, color="C0", label="the rest of the step")
        ax.scatter(names, [r["read_ms_per_step"] for r in runs], marker="_", s=900, color="black", zorder=3,
                   label="bytes read at copy bandwidth")
        ax.set_ylabel("ms per decode step (median)")
        ax.set_title("One decode step: communication against compute")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        common.save_figure(fig, path)
    return draw


def main(args) -> None:
    import torch

    settings = common.resolve_preset(PRESETS, args)
    if settings["device"] == "cuda":
        need, have = max(settings["tp_sizes"]), torch.cuda.device_count()
        if have < need:
            common.fail(f"preset {args.preset} needs {need} CUDA GPUs on one host and {have} "
                        f"{'is' if have == 1 else 'are'} visible: run it on a {need}-GPU machine, or use --preset cpu")
    folder = common.results_dir(args, common.ACCEL / "results")
    if settings["model"] != common.RANDOM_8B:
        try:
            TP.resolve_model(settings["model"])
            for N in settings["tp_sizes"]:
                TP.make_plan(TP.read_config(Path(settings["model"])), 0, N)
        except TP.Refusal as why:
            common.fail(str(why))
    for key, value in settings.get("env", {}).items():
        os.environ.setdefault(key, value)   # inherited by the spawned ranks
    runs, config = [], None
    for N in settings["tp_sizes"]:
        print(f"TP size {N}: {len(settings['batch_sizes'])} batch sizes ...", flush=True)
        out = run_tp_size(N, settings)
        runs += out["rows"]
        config = out["config"]
    base = {r["batch_size"]: r["tokens_per_s"] for r in runs if r["tp_size"] == 1}
    for r in runs:
        r["speedup_vs_tp1"] = r["tokens_per_s"] / base[r["batch_size"]] if r["batch_size"] in base else None
    device = torch.device(settings["device"])
    result = {**common.results_header(settings, args, device, ("safetensors", "tokenizers")),
              "backend": "nccl" if device.type == "cuda" else "gloo", "model_config": config, "runs": runs}
    result["hardware"] = (f"{max(settings['tp_sizes'])} x {result['hardware']}" if device.type == "cuda"
                          else f"{common.cpu_name()}, 1 thread per process")
    text = tables(result)
    common.write_results(folder, f"tensor_parallel-{args.preset}", result, text,
                         {"": plot_speed(result), "-split": plot_split(result)})
    print(text["en"])
    print(f"wrote tensor_parallel-{args.preset} in {folder}")


if __name__ == "__main__":
    common.run_main(main, common.bench_parser(__doc__, PRESETS))
