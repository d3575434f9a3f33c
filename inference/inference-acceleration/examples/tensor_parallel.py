"""Tensor parallelism: one Llama decoder split over N processes (one per GPU), Megatron style.

What it shows
-------------
A model too large or too slow for one GPU is cut so that every GPU holds 1/N of every layer and
all N work on every token (what vLLM's `tensor_parallel_size` and TensorRT-LLM's `tp_size` do):

1. The plan (`plan_shards`): each rank takes whole KV-head groups (a KV head plus the g = H / Hkv
   query heads that read it), an equal share of the MLP channels and of the vocabulary.
2. The shards (`load_shard`): q, k, v, gate and up are cut by output rows (column-parallel), o and
   down by input columns (row-parallel), the LM head by vocabulary rows (vocab-parallel); the
   embedding table and the norms are copied to every rank. Each rank reads only its part of an
   ordinary transformers checkpoint (safetensors slices) and keeps only its KV heads' cache.
3. The communication (`parallelize`): a row-parallel layer leaves a partial sum on every rank, so
   one all-reduce follows `wo` and one follows `w_down`: 2 per layer per step. The LM head's
   vocabulary slices are all-gathered into full logits, so every rank picks the same next token.
   The all-reduce is NCCL (gloo on CPUs), or PyTorch's symmetric-memory one-shot all-reduce.

The decoder itself is `fast_decode.py`'s `Transformer` from this folder (imported, not copied: the
script's folder is on `sys.path` when it runs). Tensor parallelism only changes the head and channel
counts each rank builds it with and adds the hooks of step 3; prefill and decode_one_token are
fast_decode's. On GPUs the decode step is captured in a CUDA graph by hand (all-reduces included).

Run it (torchrun starts the N processes: one per GPU with NCCL, or CPU processes with gloo)
------
    torchrun --standalone --nproc-per-node 2 inference/inference-acceleration/examples/tensor_parallel.py \\
        --model .cache/models/SmolLM2-135M-Instruct --new-tokens 16
    torchrun --standalone --nproc-per-node 2 inference/inference-acceleration/examples/tensor_parallel.py \\
        --random-weights llama-3-8b,llama-3-70b --tp-sizes 2,1 --allreduce nccl,symm_mem --batch-sizes 1,8 \\
        --new-tokens 256 --json inference/inference-acceleration/results/tensor_parallel-h200.json

On 2 CPU processes with SmolLM2-135M it prints the plan (rank 0: query heads 0-5 and KV heads 0-1,
rank 1: query heads 6-8 and KV head 2 -- 9 heads do not split evenly, see `plan_heads`), the bytes
of weights and KV cache each rank holds, a table of tokens/s, and the greedy text, whose tokens equal
the one-process decoder's and transformers' `generate` in float32 (tests/test_tensor_parallel.py
checks that). `--tp-sizes 2,1` also runs each model on rank 0 alone in the same launch, for the
speedup over one GPU. Bad input (heads that do not split, more processes than GPUs, no torchrun)
ends with one `error:` line from rank 0 and exit code 2 in every process.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from fast_decode import (ModelArgs, Transformer, UserError, decode_one_token, hardware, load_hf_state_dict,
                         measure_bandwidth, plain_weight_bytes, prefill, roofline_tokens_per_s, step_bytes,
                         versions)

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Published config.json values (meta-llama/Meta-Llama-3-8B and -70B), for random-weight speed runs.
RANDOM_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=128),
}
LLAMA3_COMMON = dict(rms_norm_eps=1e-5, max_position_embeddings=8192, tie_word_embeddings=False,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, hidden_act="silu")


# ---------------------------------------------------------------------------------------------
# Part 1: the plan -- which heads, rows and columns each rank holds (arithmetic only)
# ---------------------------------------------------------------------------------------------

def split_range(n: int, parts: int, index: int) -> range:
    """Contiguous share `index` of `n` items cut into `parts`; sizes differ by at most one."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `world` holds; the ranges index heads, MLP channels and vocabulary rows."""

    rank: int
    world: int
    q_heads: range   # query heads: their rows of W_q, their columns of W_o
    kv_heads: range  # the KV heads those query heads read: rows of W_k and W_v, and the KV cache
    ffn: range       # MLP channels: rows of W_gate and W_up, columns of W_down
    vocab: range     # rows of the LM head


def supported_tp_sizes(args: ModelArgs) -> list[int]:
    """Every N for which `plan_heads` has an answer."""
    H, Hkv = args.n_heads, args.n_kv_heads
    return [n for n in range(1, H + 1) if n <= Hkv or (n % Hkv == 0 and H % n == 0)]


# --8<-- [start:plan]
def plan_heads(args: ModelArgs, rank: int, world: int) -> tuple[range, range]:
    """Query heads and KV heads of one rank; a KV head and its g = H / Hkv query heads stay together.

    N <= Hkv: each rank takes whole KV groups, as evenly as the count allows. SmolLM2 (H = 9,
              Hkv = 3) on N = 2: rank 0 gets 2 groups (6 query heads), rank 1 gets 1 (3 heads).
              vLLM and TensorRT-LLM refuse this case (they need H divisible by N).
    N >  Hkv: every KV head is copied to N / Hkv ranks and each rank takes H / N of its query
              heads (N must be a multiple of Hkv that divides H), as vLLM does.
    """
    H, Hkv = args.n_heads, args.n_kv_heads
    g = H // Hkv
    if world <= Hkv:
        kv = split_range(Hkv, world, rank)
        return range(kv.start * g, kv.stop * g), kv
    if world % Hkv == 0 and H % world == 0:
        q = split_range(H, world, rank)                   # H / N heads, all inside one KV group
        return q, range(q.start // g, q.start // g + 1)
    raise UserError(f"{world} processes cannot split {H} query heads and {Hkv} KV heads: N must be at "
                    f"most {Hkv}, or a multiple of {Hkv} that divides {H}; use --nproc-per-node "
                    + " or ".join(map(str, supported_tp_sizes(args))))


def plan_shards(args: ModelArgs, rank: int, world: int) -> ShardPlan:
    q_heads, kv_heads = plan_heads(args, rank, world)
    return ShardPlan(rank, world, q_heads, kv_heads, ffn=split_range(args.ffn_dim, world, rank),
                     vocab=split_range(args.vocab_size, world, rank))
# --8<-- [end:plan]


# ---------------------------------------------------------------------------------------------
# Part 2: each rank reads only its shard of an ordinary transformers checkpoint
# ---------------------------------------------------------------------------------------------

# --8<-- [start:shard_rules]
# Which dimension of a checkpoint tensor (PyTorch layout: out_features x in_features) is cut, and
# by which range of the plan. Every other tensor (the embedding, the norms) is copied whole.
SPLITS: dict[str, tuple[int, str]] = {
    "self_attn.q_proj.weight": (0, "q_heads"),   # column-parallel: output rows of this rank's heads
    "self_attn.k_proj.weight": (0, "kv_heads"),  # column-parallel
    "self_attn.v_proj.weight": (0, "kv_heads"),  # column-parallel
    "self_attn.o_proj.weight": (1, "q_heads"),   # row-parallel: input columns -> a partial sum
    "mlp.gate_proj.weight": (0, "ffn"),          # column-parallel
    "mlp.up_proj.weight": (0, "ffn"),            # column-parallel
    "mlp.down_proj.weight": (1, "ffn"),          # row-parallel -> a partial sum
    "lm_head.weight": (0, "vocab"),              # vocab-parallel: logits of this rank's tokens
}


def shard_bounds(name: str, args: ModelArgs, plan: ShardPlan) -> tuple[int, int, int] | None:
    """(dim, start, stop) of the part of checkpoint tensor `name` this rank keeps; None: all of it."""
    for suffix, (dim, part) in SPLITS.items():
        if name.endswith(suffix):
            items = getattr(plan, part)
            unit = args.head_dim if part in ("q_heads", "kv_heads") else 1  # one head is D rows
            return dim, items.start * unit, items.stop * unit
    return None
# --8<-- [end:shard_rules]


def checkpoint_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Names and full shapes of a Llama checkpoint in transformers' naming."""
    C, D, H, Hkv, F = args.dim, args.head_dim, args.n_heads, args.n_kv_heads, args.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (args.vocab_size, C), "model.norm.weight": (C,)}
    if not args.tie_embeddings:
        shapes["lm_head.weight"] = (args.vocab_size, C)
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (C,), p + "post_attention_layernorm.weight": (C,),
            p + "self_attn.q_proj.weight": (H * D, C), p + "self_attn.k_proj.weight": (Hkv * D, C),
            p + "self_attn.v_proj.weight": (Hkv * D, C), p + "self_attn.o_proj.weight": (C, H * D),
            p + "mlp.gate_proj.weight": (F, C), p + "mlp.up_proj.weight": (F, C), p + "mlp.down_proj.weight": (C, F),
        })
    return shapes


def local_shape(full: tuple[int, ...], bounds: tuple[int, int, int] | None) -> tuple[int, ...]:
    if bounds is None:
        return full
    dim, start, stop = bounds
    return tuple(stop - start if d == dim else n for d, n in enumerate(full))


def shard_numel(args: ModelArgs, plan: ShardPlan) -> int:
    """Values one rank holds, from the shapes alone (before anything is allocated)."""
    total = 0
    for name, full in checkpoint_shapes(args).items():
        n = 1
        for d in local_shape(full, shard_bounds(name, args, plan)):
            n *= d
        total += n
    return total


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return sorted(folder.glob("*.safetensors"))


# --8<-- [start:load_shard]
def load_shard(folder: Path, args: ModelArgs, plan: ShardPlan, dtype: torch.dtype,
               device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's part of every tensor, read straight from the safetensors files.

    `get_slice` reads only the requested rows or columns from disk, so no rank ever holds the
    whole model. A tied LM head (SmolLM2) is the rank's rows of the embedding table: a view.
    """
    from safetensors import safe_open

    wanted = checkpoint_shapes(args)
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(folder):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name not in wanted:
                    continue  # e.g. rotary tables some checkpoints carry
                part, bounds = f.get_slice(name), shard_bounds(name, args, plan)
                if bounds is None:
                    tensor = part[:]                          # replicated
                elif bounds[0] == 0:
                    tensor = part[bounds[1]:bounds[2]]        # rows
                else:
                    tensor = part[:, bounds[1]:bounds[2]]     # columns
                state[name] = tensor.to(device=device, dtype=dtype, copy=True)  # not a view of the file
    if args.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"][plan.vocab.start:plan.vocab.stop]
    return state
# --8<-- [end:load_shard]


def random_shard(args: ModelArgs, plan: ShardPlan, dtype: torch.dtype, device: torch.device,
                 seed: int) -> dict[str, torch.Tensor]:
    """Random N(0, 0.02) weights of this rank's shard only, made on the device: a 70B model never
    exists whole anywhere. Speed does not depend on the values (but never time on zeros)."""
    generator = torch.Generator(device).manual_seed(seed + plan.rank)
    state = {}
    for name, full in checkpoint_shapes(args).items():
        tensor = torch.empty(local_shape(full, shard_bounds(name, args, plan)), dtype=dtype, device=device)
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        state[name] = tensor
    if args.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"][plan.vocab.start:plan.vocab.stop]
    return state


# ---------------------------------------------------------------------------------------------
# Part 3: the all-reduce (PyTorch's own runtime: NCCL, gloo, symmetric memory)
# ---------------------------------------------------------------------------------------------

# --8<-- [start:allreduce]
class CollectiveAllReduce:
    """Sum over the group with the process group's backend: NCCL on GPUs, gloo on CPUs."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group, self.name = group, dist.get_backend(group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)  # in place
        return x


class SymmMemAllReduce:
    """One-shot all-reduce through PyTorch symmetric memory (peer-to-peer loads over NVLink).

    Each rank copies its partial sum into a buffer every peer can address; one kernel per rank then
    meets the others at a barrier in that memory, reads the N buffers and adds them: one launch and
    no protocol, which is what small decode messages need. No NVLink multicast is involved (the
    `multimem_*` ops would use it). Two buffers are used in turn, so a fast rank never overwrites
    what a slower peer still reads: the barrier of call k+1 proves every peer finished call k-1.
    Messages larger than a buffer (the prefill's) go through NCCL.
    """

    def __init__(self, group: dist.ProcessGroup, max_numel: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.name, self.group_name = "symm_mem", group.group_name
        self.fallback = CollectiveAllReduce(group)
        self.buffers = [symm_mem.empty(max_numel, dtype=dtype, device=device) for _ in range(2)]
        for buffer in self.buffers:
            symm_mem.rendezvous(buffer, self.group_name)  # collective: exchanges the peers' addresses
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > self.buffers[0].numel():
            return self.fallback(x)
        buffer = self.buffers[self.calls % 2][: x.numel()]
        self.calls += 1
        buffer.copy_(x.reshape(-1))
        torch.ops.symm_mem.one_shot_all_reduce_out(buffer, "sum", self.group_name, x.view(-1))
        return x
# --8<-- [end:allreduce]


def init_distributed(device_kind: str) -> tuple[int, int, torch.device]:
    """Join the group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT): NCCL with one GPU
    per process, or gloo on CPUs."""
    local_rank = int(os.environ["LOCAL_RANK"])
    if device_kind == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


class VocabGather:
    """Full logits from the vocabulary slices: all-gather (padded to equal sizes), then cut and join."""

    def __init__(self, group: dist.ProcessGroup, sizes: list[int]) -> None:
        self.group, self.sizes, self.width = group, sizes, max(sizes)

    def __call__(self, local: torch.Tensor) -> torch.Tensor:      # (B, T, V / N)
        if local.shape[-1] < self.width:
            local = nn.functional.pad(local, (0, self.width - local.shape[-1]))
        parts = [torch.empty_like(local) for _ in self.sizes]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat([p[..., :n] for p, n in zip(parts, self.sizes)], dim=-1)  # (B, T, V)


# ---------------------------------------------------------------------------------------------
# Part 4: fast_decode's Transformer, built per rank and joined by hooks
# ---------------------------------------------------------------------------------------------

# --8<-- [start:tp_model]
def build_shard_model(args: ModelArgs, plan: ShardPlan, state: dict[str, torch.Tensor]) -> Transformer:
    """fast_decode's Transformer with this rank's head and channel counts and its weights.

    The embedding stays whole (a decode step reads one row per sequence); the LM head becomes a
    Linear with this rank's vocabulary rows only.
    """
    local = dataclasses.replace(args, n_heads=len(plan.q_heads), n_kv_heads=len(plan.kv_heads),
                                ffn_dim=len(plan.ffn), tie_embeddings=False)
    with torch.device("meta"):  # no memory: load_hf_state_dict(assign=True) puts the shards in
        model = Transformer(local)
        model.output = nn.Linear(args.dim, len(plan.vocab), bias=False)  # vocab-parallel LM head
    load_hf_state_dict(model, state, assign=True)
    return model.eval()


def parallelize(model: Transformer, all_reduce: Callable, gather: Callable) -> list:
    """One all-reduce after each row-parallel layer (wo, w_down) and a gather of the logits.

    A forward hook's return value replaces the module's output, so fast_decode's forward, prefill
    and decode_one_token run unchanged. Returns the hook handles (`.remove()` undoes it).
    """
    handles = []
    for layer in model.layers:
        for row_parallel in (layer.attention.wo, layer.feed_forward.w_down):
            handles.append(row_parallel.register_forward_hook(lambda mod, inp, out: all_reduce(out)))
    handles.append(model.output.register_forward_hook(lambda mod, inp, out: gather(out)))
    return handles
# --8<-- [end:tp_model]


# ---------------------------------------------------------------------------------------------
# Part 5: decode and measure
# ---------------------------------------------------------------------------------------------

# --8<-- [start:decode]
@torch.no_grad()
def decode(model: Transformer, prompt: torch.Tensor, new_tokens: int, cuda_graph: bool) -> tuple[float, torch.Tensor]:
    """Greedy: prefill, then new_tokens - 1 decode steps (timed). Returns (seconds, tokens (B, new)).

    With cuda_graph the step -- every kernel, the all-reduces and the gather included -- is
    captured once and replayed; it reads `tok` and `pos` and advances them on the GPU.
    """
    B, T = prompt.shape
    device = prompt.device
    model.setup_caches(B, T + new_tokens + 1)
    tok = prefill(model, prompt, torch.arange(T, device=device))         # (B, 1)
    pos = torch.tensor([T], device=device)

    def step() -> None:
        tok.copy_(decode_one_token(model, tok, pos))
        pos.add_(1)

    run = step
    if cuda_graph:
        first, stream = tok.clone(), torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):                  # warm up: allocations, library handles
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the NCCL watchdog thread may poll its events while this thread captures
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            step()
        tok.copy_(first)
        pos.fill_(T)
        run = graph.replay
    out = torch.empty(B, new_tokens, dtype=torch.long, device=device)
    out[:, :1] = tok
    sync(device)
    t0 = time.perf_counter()
    for i in range(1, new_tokens):
        run()
        out[:, i:i + 1] = tok
    sync(device)
    return time.perf_counter() - t0, out
# --8<-- [end:decode]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def time_all_reduce(all_reduce: Callable, numel: int, dtype: torch.dtype, device: torch.device,
                    calls: int = 64) -> float:
    """Microseconds per all-reduce of `numel` values, as the decode step issues them (in a CUDA
    graph on GPUs, eagerly on CPUs): `calls` in a row, median of 5 repeats. (The sums grow from
    call to call; the time does not depend on the values.)"""
    x = torch.randn(numel, dtype=dtype, device=device)

    def burst() -> None:
        for _ in range(calls):
            all_reduce(x)

    burst()
    run = burst
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            burst()
        run = graph.replay
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e6 * sorted(times)[2] / calls


@dataclasses.dataclass(frozen=True)
class Source:
    """One model to run: its shape, its checkpoint folder (None: random weights) and a label."""

    args: ModelArgs
    folder: Path | None
    label: str


def model_sources(args: argparse.Namespace) -> list[Source]:
    """The models of this launch, from config files only (no weights are read here)."""
    from transformers import AutoConfig, LlamaConfig

    if args.random_weights:
        names = [n.strip() for n in args.random_weights.split(",") if n.strip()]
        unknown = [n for n in names if n not in RANDOM_CONFIGS]
        if unknown or not names:
            raise UserError(f"--random-weights {args.random_weights!r}: choose from {', '.join(RANDOM_CONFIGS)}")
        return [Source(ModelArgs.from_hf_config(LlamaConfig(**RANDOM_CONFIGS[n], **LLAMA3_COMMON)), None,
                       f"{n} shape, random weights") for n in names]
    folder = Path(args.model)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(args.model, allow_patterns=["*.json", "*.safetensors", "*.model"]))
        except Exception as error:  # offline, unknown id, no access: one line, not a traceback
            raise UserError(f"cannot find model {args.model!r} ({type(error).__name__}); "
                            "pass a local folder or a hub id with --model") from None
    if not (folder / "config.json").exists() or not safetensors_files(folder):
        raise UserError(f"{folder} needs a config.json and safetensors weights (a transformers model folder)")
    return [Source(ModelArgs.from_hf_config(AutoConfig.from_pretrained(folder)), folder, Path(args.model).name)]


def parse_ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r} is not a comma list of integers") from None
    if not values or min(values) < 1:
        raise UserError(f"{flag} needs positive integers")
    return values


def check_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Every bad input is found here, on every rank alike, before any process group exists."""
    if "LOCAL_RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("start this script with torchrun, one process per GPU: torchrun --standalone "
                        f"--nproc-per-node 2 {Path(sys.argv[0]).name} [flags]")
    world = int(os.environ["WORLD_SIZE"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        gpus = torch.cuda.device_count()
        if local_world > gpus:
            raise UserError(f"--nproc-per-node {local_world} needs {local_world} CUDA GPUs (one per process) but "
                            f"{gpus} {'is' if gpus == 1 else 'are'} present; "
                            + (f"use --nproc-per-node {gpus}" if gpus else "run on CPUs with --device cpu"))
        device_kind = "cuda"
    else:
        device_kind = "cpu"
    dtype = {"auto": torch.bfloat16 if device_kind == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    tp_sizes = parse_ints(args.tp_sizes, "--tp-sizes") if args.tp_sizes else [world]
    if max(tp_sizes) > world:
        raise UserError(f"--tp-sizes {args.tp_sizes}: at most the {world} processes torchrun started")
    kinds = [k.strip() for k in args.allreduce.split(",") if k.strip()] or ["nccl"]
    for kind in kinds:
        if kind not in ("nccl", "symm_mem"):
            raise UserError(f"--allreduce {kind!r}: choose nccl or symm_mem (comma list for both)")
        if kind == "symm_mem" and device_kind != "cuda":
            raise UserError("--allreduce symm_mem needs CUDA GPUs (it reads peer GPU memory over NVLink)")
    if args.new_tokens < 2 or args.prompt_len < 1:
        raise UserError("--new-tokens must be >= 2 and --prompt-len >= 1")
    sources = model_sources(args)
    for source in sources:
        for n in tp_sizes:
            for rank in range(n):
                plan_shards(source.args, rank, n)  # raises UserError when the heads do not split
    return dict(device_kind=device_kind, dtype=dtype, tp_sizes=tp_sizes, kinds=kinds, sources=sources,
                batches=parse_ints(args.batch_sizes, "--batch-sizes"), world=world)


def fits_on_gpu(model_args: ModelArgs, plan: ShardPlan, batch: int, max_len: int, elem: int,
                device: torch.device) -> tuple[bool, str]:
    """Weights + KV cache of rank 0 (the largest share) against the GPU's memory, 4 GiB kept free."""
    weights = shard_numel(model_args, plan) * elem
    kv = 2 * model_args.n_layers * batch * len(plan.kv_heads) * max_len * model_args.head_dim * elem
    total = torch.cuda.get_device_properties(device).total_memory
    need = weights + kv + 4 * 2**30
    return need <= total, f"needs {need / 1e9:.1f} GB per GPU (weights {weights / 1e9:.1f}), has {total / 1e9:.1f}"


def describe(plan: ShardPlan, model: Transformer) -> dict[str, Any]:
    """What one rank holds. Weights are counted by storage, so a tied LM head (a view of the
    embedding table) is not counted twice."""
    storages = {p.untyped_storage().data_ptr(): (p.untyped_storage().nbytes(), p.element_size())
                for p in model.parameters()}
    kv = sum(b.numel() * b.element_size() for layer in model.layers for b in layer.attention.kv_cache.buffers())
    span = lambda r: f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start)  # noqa: E731
    return {"rank": plan.rank, "query_heads": span(plan.q_heads), "kv_heads": span(plan.kv_heads),
            "mlp_channels": span(plan.ffn), "vocab_rows": span(plan.vocab),
            "params": sum(n // e for n, e in storages.values()), "weight_bytes": sum(n for n, _ in storages.values()),
            "kv_cache_bytes": kv}


def prompt_tokens(args: argparse.Namespace, source: Source, device: torch.device) -> tuple[torch.Tensor, Any]:
    """(1, T) prompt: the tokenized --prompt for a real model, random ids of --prompt-len otherwise."""
    if source.folder is None:
        generator = torch.Generator().manual_seed(args.seed)
        return torch.randint(0, source.args.vocab_size, (1, args.prompt_len), generator=generator).to(device), None
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(source.folder)
    return tokenizer(args.prompt, return_tensors="pt").input_ids.to(device), tokenizer


def make_all_reduce(kind: str, group: dist.ProcessGroup, numel: int, dtype: torch.dtype, device: torch.device):
    if kind == "symm_mem":
        return SymmMemAllReduce(group, numel, dtype, device)
    return CollectiveAllReduce(group)


def run_config(source: Source, cfg: dict, args: argparse.Namespace, tp: int, rank: int, device: torch.device,
               bandwidth: float, say: Callable) -> tuple[list, list, list[str]]:
    """Every batch size and all-reduce kind of one model at one TP size, on ranks 0..tp-1.

    Returns (runs, what each rank holds, reasons for what was skipped)."""
    margs, dtype = source.args, cfg["dtype"]
    elem, cuda, batches = torch.finfo(dtype).bits // 8, device.type == "cuda", cfg["batches"]
    group = dist.group.WORLD if tp == cfg["world"] else dist.new_group(list(range(tp)))  # every rank calls it
    if rank >= tp:
        return [], [], []
    where = f"{source.label}, TP={tp}"
    prompt, tokenizer = prompt_tokens(args, source, device)
    max_len = prompt.shape[1] + args.new_tokens + 1
    plan = plan_shards(margs, rank, tp)
    if cuda:
        ok, why = fits_on_gpu(margs, plan_shards(margs, 0, tp), max(batches), max_len, elem, device)
        if not ok:
            return [], [], [f"{where}: does not fit ({why})"]
    t0 = time.perf_counter()
    try:
        state = (random_shard(margs, plan, dtype, device, args.seed) if source.folder is None
                 else load_shard(source.folder, margs, plan, dtype, device))
        model = build_shard_model(margs, plan, state)
        del state
        model.setup_caches(max(batches), max_len)
    except torch.OutOfMemoryError:  # only possible at tp = 1 here; the others were counted above
        return [], [], [f"{where}: out of GPU memory while loading"]
    info = [None] * tp
    dist.all_gather_object(info, describe(plan, model), group=group)
    say(f"{source.label}, TP={tp}: loaded in {time.perf_counter() - t0:.1f} s")
    for r in info:
        say(f"  rank {r['rank']}: query heads {r['query_heads']}, KV heads {r['kv_heads']}, MLP channels "
            f"{r['mlp_channels']}, vocab rows {r['vocab_rows']}: {r['params'] / 1e6:.1f} M params, "
            f"{r['weight_bytes'] / 1e6:.1f} MB of weights, {r['kv_cache_bytes'] / 1e6:.1f} MB of KV cache "
            f"(batch {max(batches)}, {max_len} positions)")
    weight_bytes = plain_weight_bytes(model)  # what one step reads on this rank (embedding rows aside)
    runs, skipped = [], []
    for kind in (["none"] if tp == 1 else cfg["kinds"]):
        handles = []
        try:
            if tp > 1:
                all_reduce = make_all_reduce(kind, group, max(batches) * margs.dim, dtype, device)
                sizes = [len(split_range(margs.vocab_size, tp, r)) for r in range(tp)]
                handles = parallelize(model, all_reduce, VocabGather(group, sizes))
            for B in batches:
                seconds, tokens = decode(model, prompt.expand(B, -1).contiguous(), args.new_tokens,
                                         cuda and args.cuda_graphs)
                steps = args.new_tokens - 1
                nbytes = step_bytes(weight_bytes, model.args, B, prompt.shape[1] + steps / 2, elem)
                roof = roofline_tokens_per_s(nbytes, bandwidth, B)
                run = {"model_shape": source.label, "n_gpus": tp if cuda else 0, "tp_size": tp, "batch_size": B,
                       "allreduce": kind if kind != "nccl" or cuda else "gloo", "prompt_len": prompt.shape[1],
                       "new_tokens": args.new_tokens,
                       "tokens_per_s": B * steps / seconds, "ms_per_step": 1e3 * seconds / steps,
                       "bytes_per_step_per_gpu": nbytes, "read_ms_per_step": 1e3 * nbytes / (bandwidth * 1e9),
                       "roofline_tokens_per_s": roof, "per_gpu_roofline_fraction": B * steps / seconds / roof,
                       "tokens": tokens.tolist() if source.folder is not None else tokens[0, :16].tolist()}
                if tp > 1:
                    run["allreduce_us"] = time_all_reduce(all_reduce, B * margs.dim, dtype, device, 64 if cuda else 16)
                    run["allreduce_ms_per_step"] = 2 * margs.n_layers * run["allreduce_us"] / 1e3
                if tokenizer is not None:
                    run["text"] = tokenizer.decode(tokens[0])
                runs.append(run)
                say(f"  TP={tp} {run['allreduce']:>8} batch {B:>3}: {run['tokens_per_s']:9.1f} tokens/s, "
                    f"{run['ms_per_step']:.2f} ms/step, {run['per_gpu_roofline_fraction']:.2f} of the per-GPU "
                    "roofline" + (f", all-reduce {run['allreduce_us']:.1f} us" if tp > 1 else ""))
        except Exception as error:  # on GPUs: record (symmetric memory refused, out of memory) and go on
            if not cuda:
                raise
            skipped.append(f"{where}, all-reduce {kind}: failed ({type(error).__name__}: {str(error).splitlines()[0][:160]})")
            say(f"  {skipped[-1]}")
        for handle in handles:
            handle.remove()
    del model
    if cuda:
        torch.cuda.empty_cache()
    return runs, info, skipped


def add_speedups(runs: list[dict]) -> None:
    """speedup_vs_1: tokens/s over the TP = 1 run of the same model and batch size (same launch)."""
    base = {(r["model_shape"], r["batch_size"]): r["tokens_per_s"] for r in runs if r["tp_size"] == 1}
    nccl = {(r["model_shape"], r["tp_size"], r["batch_size"]): r["tokens"] for r in runs if r["allreduce"] == "nccl"}
    for r in runs:
        b = base.get((r["model_shape"], r["batch_size"]))
        r["speedup_vs_1"] = r["tokens_per_s"] / b if b else None
        if r["allreduce"] == "symm_mem" and (r["model_shape"], r["tp_size"], r["batch_size"]) in nccl:
            r["same_tokens_as_nccl"] = r["tokens"] == nccl[(r["model_shape"], r["tp_size"], r["batch_size"])]


# ---------------------------------------------------------------------------------------------
# Results: JSON, Markdown table, plot (rank 0)
# ---------------------------------------------------------------------------------------------

def sorted_runs(runs: list[dict]) -> list[dict]:
    """Model by model, then batch size, then N, then the all-reduce: the order a reader compares in."""
    models = list(dict.fromkeys(r["model_shape"] for r in runs))
    return sorted(runs, key=lambda r: (models.index(r["model_shape"]), r["batch_size"], r["tp_size"], r["allreduce"]))


def results_markdown(result: dict[str, Any]) -> str:
    unit = "GPU" if result["device"] == "cuda" else "process"
    prompts = "/".join(sorted({str(r["prompt_len"]) for r in result["runs"]})) or "-"
    lines = [f"{result['hardware']}; {result['dtype']}; N = tensor-parallel size (one {unit} per rank); copy "
             f"bandwidth {result['bandwidth_gbps']:.0f} GB/s per {unit} (read + write); prompt {prompts} tokens, "
             f"{result['new_tokens']} new tokens; {'CUDA graphs' if result['cuda_graphs'] else 'eager'}; "
             f"torch {result['versions']['torch']}.", "",
             f"| model | N | batch | all-reduce | tokens/s | × N = 1 | fraction of the per-{unit} roofline | ms/step | "
             f"GB read per step per {unit} | its read time (ms) | one all-reduce (µs) | 2 × layers all-reduces (ms) |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted_runs(result["runs"]):
        speed = f"{r['speedup_vs_1']:.2f}" if r.get("speedup_vs_1") else "–"
        ar = f"{r['allreduce_us']:.1f}" if "allreduce_us" in r else "–"
        ar_step = f"{r['allreduce_ms_per_step']:.2f}" if "allreduce_ms_per_step" in r else "–"
        lines.append(f"| {r['model_shape']} | {r['tp_size']} | {r['batch_size']} | {r['allreduce']} | "
                     f"{r['tokens_per_s']:.1f} | {speed} | {r['per_gpu_roofline_fraction']:.2f} | "
                     f"{r['ms_per_step']:.2f} | {r['bytes_per_step_per_gpu'] / 1e9:.2f} | "
                     f"{r['read_ms_per_step']:.2f} | {ar} | {ar_step} |")
    if result.get("skipped"):
        lines += [""] + [f"- Not run: {reason}." for reason in result["skipped"]]
    return "\n".join(lines) + "\n"


def write_plot(result: dict[str, Any], path: Path) -> None:
    """Per model: tokens/s by batch size (labels: speedup over N = 1), and the time of one step
    beside its two predicted parts (bytes read at the copy bandwidth, 2 x layers all-reduces)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r["model_shape"] for r in result["runs"]))
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 4.2 * len(shapes)), squeeze=False)
    for (ax, ax_t), shape in zip(axes, shapes):
        rows = sorted_runs([r for r in result["runs"] if r["model_shape"] == shape])
        batches = sorted({r["batch_size"] for r in rows})
        configs = sorted({(r["tp_size"], r["allreduce"]) for r in rows})
        width = 0.8 / len(configs)
        for j, (tp, kind) in enumerate(configs):
            for i, B in enumerate(batches):
                r = next((r for r in rows if r["batch_size"] == B and (r["tp_size"], r["allreduce"]) == (tp, kind)), None)
                if r is None:
                    continue
                x = i + (j - (len(configs) - 1) / 2) * width
                ax.bar(x, r["tokens_per_s"], width, color=f"C{j}",
                       label=(f"N={tp}, {kind}" if tp > 1 else "N=1") if i == 0 else None)
                if r.get("speedup_vs_1"):
                    ax.text(x, r["tokens_per_s"], f"{r['speedup_vs_1']:.2f}×", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{shape}: tokens/s (labels: × N = 1)", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        names = [f"N={r['tp_size']} {r['allreduce'] if r['tp_size'] > 1 else ''}\nbatch {r['batch_size']}" for r in rows]
        xs = range(len(rows))
        ax_t.bar([x - 0.2 for x in xs], [r["ms_per_step"] for r in rows], 0.4, color="0.3", label="measured step")
        read = [r["read_ms_per_step"] for r in rows]
        ax_t.bar([x + 0.2 for x in xs], read, 0.4, color="C0", label="bytes read / copy bandwidth")
        ax_t.bar([x + 0.2 for x in xs], [r.get("allreduce_ms_per_step", 0) for r in rows], 0.4, bottom=read,
                 color="C3", label="2 × layers × one all-reduce")
        ax_t.set_xticks(list(xs), names, fontsize=7)
        ax_t.set_ylabel("ms per decode step")
        ax_t.set_title(f"{shape}: one step and its predicted parts", fontsize=10)
        ax_t.legend(fontsize=8, loc="upper left")
        ax_t.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Tensor-parallel decode, {result['hardware']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    path.with_suffix(".md").write_text(results_markdown(result))
    if result["runs"]:
        write_plot(result, path.with_suffix(".png"))


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Model")
    g.add_argument("--model", default=DEFAULT_MODEL, help="Llama checkpoint: hub id or local folder with "
                   "safetensors (default: %(default)s)")
    g.add_argument("--random-weights", metavar="SHAPES", default=None,
                   help="instead of --model: comma list of " + ", ".join(RANDOM_CONFIGS) + "; random N(0, 0.02) "
                        "weights in those published shapes, each rank building only its shard (speed only)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: one CUDA GPU per process with NCCL if GPUs are present, else CPU with gloo")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="weights and activations; auto: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--seed", type=int, default=0, help="seed for random weights and random prompts")
    t = p.add_argument_group("Parallelism")
    t.add_argument("--tp-sizes", default="", help="comma list of tensor-parallel sizes to run in this launch, "
                   "each on ranks 0..N-1 (e.g. 1,2 for the speedup over one GPU); default: all processes")
    t.add_argument("--allreduce", default="nccl", help="comma list of nccl (the process group's collective; "
                   "gloo on CPU) and symm_mem (PyTorch symmetric-memory one-shot, CUDA only)")
    t.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="capture the decode step in a CUDA graph (GPU only)")
    b = p.add_argument_group("Benchmark")
    b.add_argument("--batch-sizes", default="1", help="comma list of batch sizes (the prompt is repeated)")
    b.add_argument("--prompt", default="The capital of France is", help="prompt for a real model")
    b.add_argument("--prompt-len", type=int, default=128, help="prompt tokens with --random-weights")
    b.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated per sequence")
    o = p.add_argument_group("Output")
    o.add_argument("--json", metavar="PATH", help="rank 0 writes results JSON here, plus PATH.md and PATH.png")
    o.add_argument("--quiet", action="store_true", help="print only the results table")
    return p


def main(args: argparse.Namespace) -> dict[str, Any] | None:
    cfg = check_inputs(args)
    rank, world, device = init_distributed(cfg["device_kind"])
    say = (lambda msg: print(msg, flush=True)) if rank == 0 and not args.quiet else (lambda msg: None)
    cuda = device.type == "cuda"
    bandwidth = measure_bandwidth(device, 1.0 if cuda else 0.0625, 20 if cuda else 3)
    say(f"{world} processes ({dist.get_backend()}), {hardware(device)}, copy bandwidth {bandwidth:.0f} GB/s")
    result = {"script": "tensor_parallel.py", "hardware": f"{world} x {hardware(device)}" if cuda else hardware(device),
              "versions": versions(),
              "command": f"torchrun --standalone --nproc-per-node {world} {' '.join(sys.argv)}",
              "env": {k: os.environ[k] for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST") if k in os.environ},
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "device": device.type,
              "backend": dist.get_backend(), "world_size": world, "dtype": str(cfg["dtype"]).removeprefix("torch."),
              "bandwidth_gbps": bandwidth, "new_tokens": args.new_tokens, "cuda_graphs": cuda and args.cuda_graphs,
              "models": {}, "per_rank": {}, "runs": [], "skipped": []}
    if cuda:
        result["versions"]["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    for source in cfg["sources"]:
        result["models"][source.label] = dataclasses.asdict(source.args)
        for tp in cfg["tp_sizes"]:
            runs, info, skipped = run_config(source, cfg, args, tp, rank, device, bandwidth, say)
            dist.barrier()
            if rank == 0:  # written after every configuration: a later failure keeps what was measured
                result["runs"] += runs
                result["per_rank"][f"{source.label}, TP={tp}"] = info
                result["skipped"] += skipped
                add_speedups(result["runs"])
                if args.json:
                    write_results(result, Path(args.json))
    if rank == 0:
        print(results_markdown(result), flush=True)
        texts = [r for r in result["runs"] if "text" in r]
        if texts:
            say(f"text (TP={texts[-1]['tp_size']}): {texts[-1]['text']!r}")
    dist.barrier()
    if cuda:  # destroy_process_group() can hang after CUDA graphs with NCCL calls: leave directly
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    dist.destroy_process_group()
    return result if rank == 0 else None


if __name__ == "__main__":
    cli = build_parser().parse_args()
    try:
        main(cli)
    except UserError as error:
        if os.environ.get("RANK", "0") == "0":  # every rank finds the same bad input; one says it
            print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
