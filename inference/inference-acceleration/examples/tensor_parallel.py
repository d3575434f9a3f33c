"""Tensor parallelism from scratch: one Llama decoder split over N processes, Megatron style.

What it shows
-------------
Every rank holds 1/N of every layer and all N ranks work on every token. `make_plan` gives each
rank H / N query heads with the KV heads they read (split when N divides Hkv, copied when N is a
multiple of Hkv, as in vLLM; other N are refused), F / N MLP channels and V / N LM-head rows.
`load_shard` reads only those slices of the safetensors files: q, k, v, gate, up by output rows
(column-parallel), o and down by input columns (row-parallel). In `TPDecoder` each row-parallel
layer leaves a partial sum, so an all-reduce follows o_proj and down_proj (2 per layer per step)
and the logits' vocabulary slices are all-gathered. The library part cuts transformers' Llama the
same way with PyTorch's DTensor (`parallelize_module`, ColwiseParallel / RowwiseParallel); in
production one flag does it all: vLLM's `LLM(model, tensor_parallel_size=N)`.
SmolLM2-135M has 9 query heads and 3 KV heads, which do not split over 2 ranks (vLLM refuses
too), so the default is N = 3: 3 query heads and 1 KV head per rank.

Run it
------
    python inference/inference-acceleration/examples/tensor_parallel.py \\
        --model HuggingFaceTB/SmolLM2-135M-Instruct

Without a launcher it starts N processes itself (gloo, a free localhost port); under `torchrun
--nproc-per-node N` it uses the launcher's N ranks (with --device cuda: one GPU each, NCCL).
It prints three runs (our decoder on 3 processes, in one process, DTensor on 3) with one rank's
weight bytes (255 of 538 MB: the replicated 113 MB embedding does not shrink) and tokens/s of
one call (on 2 CPU cores 60 all-reduces per token make N = 3 slower than one process); all give
the same greedy tokens ("Paris"). tests/test_tensor_parallel.py checks them against
transformers' `generate`; bench/tensor_parallel.py measures batches, all-reduce time, bytes.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from tokenizers import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


# A Llama shape: C width, L layers, H and Hkv heads of D dims, F MLP channels, V vocabulary.
Config = collections.namedtuple("Config", "C L H Hkv D F V eps theta tied")


def read_config(folder: Path) -> Config:
    """Our Config from a transformers config.json; other architectures are refused."""
    c = json.loads((folder / "config.json").read_text())
    old = {"rope_theta": c.get("rope_theta"), **(c.get("rope_scaling") or {})}  # transformers 4
    rope, kind = c.get("rope_parameters") or old, c.get("model_type")
    if kind != "llama" or rope.get("rope_type", "default") != "default":
        raise Refusal(f"{kind} with RoPE {rope.get('rope_type')!r} is not supported: use a "
                      "Llama model with default RoPE (e.g. SmolLM2)")
    H, C = c["num_attention_heads"], c["hidden_size"]
    return Config(C, c["num_hidden_layers"], H, c["num_key_value_heads"], c.get("head_dim", C // H),
                  c["intermediate_size"], c["vocab_size"], c["rms_norm_eps"], rope["rope_theta"],
                  c.get("tie_word_embeddings", False))


# --- Part 1: the plan -- which heads, channels and vocabulary rows each rank holds -------------
# What rank `rank` of N holds, as ranges: q, query heads (rows of W_q, columns of W_o); kv, the KV
# heads they read (rows of W_k, W_v; the KV cache); ffn, MLP channels (rows of W_gate, W_up,
# columns of W_down); vocab, LM-head rows.
Plan = collections.namedtuple("Plan", "rank N q kv ffn vocab")


# --8<-- [start:plan]
def make_plan(cfg: Config, rank: int, N: int) -> Plan:
    """Rank `rank` of N takes H / N query heads and the KV heads they read.

    N <= Hkv: N must divide Hkv; each rank keeps Hkv / N KV heads with their g = H / Hkv
              query heads (Llama-3-8B at N = 2: 16 query heads, 4 KV heads per rank).
    N >  Hkv: N must be a multiple of Hkv; each KV head is copied to N / Hkv ranks and
              each rank keeps one KV head and H / N of its query heads (as vLLM does).
    """
    sizes = [n for n in range(1, cfg.H + 1) if cfg.H % n == cfg.F % n == cfg.V % n == 0
             and (cfg.Hkv % n == 0 if n <= cfg.Hkv else n % cfg.Hkv == 0)]
    if N not in sizes:
        raise Refusal(f"{N} ranks cannot split {cfg.H} query heads, {cfg.Hkv} KV heads, "
                      f"{cfg.F} MLP channels and {cfg.V} vocabulary rows evenly: use "
                      "--tp-size " + " or ".join(map(str, sizes)))
    h, f, v = cfg.H // N, cfg.F // N, cfg.V // N
    if N <= cfg.Hkv:
        kv = range(rank * cfg.Hkv // N, (rank + 1) * cfg.Hkv // N)
    else:
        copies = N // cfg.Hkv                      # ranks that share one KV head
        kv = range(rank // copies, rank // copies + 1)
    return Plan(rank, N, range(rank * h, (rank + 1) * h), kv,
                range(rank * f, (rank + 1) * f), range(rank * v, (rank + 1) * v))
# --8<-- [end:plan]


# --- Part 2: each rank reads only its shard of an ordinary transformers checkpoint ------------
# --8<-- [start:shard_rules]
# Which dimension of a checkpoint weight (N, K) = (out, in) is cut, by which plan range.
SPLITS = {
    "self_attn.q_proj.weight": (0, "q"),      # column-parallel: this rank's heads' rows
    "self_attn.k_proj.weight": (0, "kv"),     # column-parallel
    "self_attn.v_proj.weight": (0, "kv"),     # column-parallel
    "self_attn.o_proj.weight": (1, "q"),      # row-parallel: input columns -> partial sum
    "mlp.gate_proj.weight": (0, "ffn"),       # column-parallel
    "mlp.up_proj.weight": (0, "ffn"),         # column-parallel
    "mlp.down_proj.weight": (1, "ffn"),       # row-parallel -> a partial sum
    "lm_head.weight": (0, "vocab"),           # vocab-parallel: this rank's tokens' logits
}
# Everything else is copied whole to every rank: the norms and the embedding table. Our
# embedding is REPLICATED (a decode step reads only B of its rows). vLLM shards it by
# vocabulary instead (VocabParallelEmbedding: each rank looks up the ids that fall in its
# rows, zeros the others, and an all-reduce adds the N lookups): V x C / N per rank.


def shard_bounds(name: str, cfg: Config, plan: Plan) -> tuple[int, int, int] | None:
    """(dim, start, stop) of checkpoint tensor `name` this rank keeps; None: all of it."""
    for suffix, (dim, part) in SPLITS.items():
        if name.endswith(suffix):
            items = getattr(plan, part)
            unit = cfg.D if part in ("q", "kv") else 1         # one head is D rows
            return dim, items.start * unit, items.stop * unit
    return None
# --8<-- [end:shard_rules]


# --8<-- [start:load_shard]
def load_shard(folder: Path, cfg: Config, plan: Plan, dtype: torch.dtype,
               device: torch.device) -> dict[str, torch.Tensor]:
    """This rank's part of every tensor. `get_slice` reads only those rows or columns
    from disk, so no rank ever holds the whole model. A tied LM head (SmolLM2) is this
    rank's rows of the embedding table."""
    from safetensors import safe_open

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                part, bounds = f.get_slice(name), shard_bounds(name, cfg, plan)
                if bounds is None:
                    tensor = part[:]                          # replicated
                elif bounds[0] == 0:
                    tensor = part[bounds[1]:bounds[2]]        # output rows
                else:
                    tensor = part[:, bounds[1]:bounds[2]]     # input columns
                state[name] = tensor.to(device, dtype, copy=True)  # copy: not a file view
    if cfg.tied:
        embedding = state["model.embed_tokens.weight"]
        state["lm_head.weight"] = embedding[plan.vocab.start:plan.vocab.stop]
    return state
# --8<-- [end:load_shard]


# --- Part 3: the two collectives, and the decoder of one rank ---------------------------------
# --8<-- [start:allreduce]
class Comm:
    """Collectives of a tensor-parallel decoder over a torch.distributed group: gloo
    on CPUs, NCCL on GPUs. With group=None the decoder runs alone (N = 1): no messages."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.N = 1 if group is None else dist.get_world_size(group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the N partial sums of a row-parallel layer in place: every rank gets it."""
        if self.N > 1:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Join the N vocabulary slices of the logits: (B, T, V / N) -> (B, T, V)."""
        if self.N == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.N)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
# --8<-- [end:allreduce]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, D) by position, in transformers' half-split layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# --8<-- [start:tp_model]
class TPDecoder:
    """The Llama decoder of one rank: its heads, MLP channels, LM-head rows and KV cache.

    The math is the whole model's; a one-GPU decoder differs only in the all-reduce after
    o_proj and after down_proj, and the gather of the logits.
    """

    def __init__(self, cfg: Config, plan: Plan, w: dict[str, torch.Tensor], comm: Comm):
        self.cfg, self.plan, self.w, self.comm = cfg, plan, w, comm
        self.h, self.hkv = len(plan.q), len(plan.kv)            # local head counts
        D, device = cfg.D, w["model.norm.weight"].device
        self.inv_freq = 1.0 / cfg.theta ** (torch.arange(0, D, 2, device=device) / D)

    def setup_cache(self, B: int, T_max: int) -> None:
        """A static cache of this rank's KV heads: L x (B, Hkv / N, T_max, D), twice."""
        like, shape = self.w["model.norm.weight"], (B, self.hkv, T_max, self.cfg.D)
        self.k = [like.new_zeros(shape) for _ in range(self.cfg.L)]
        self.v = [like.new_zeros(shape) for _ in range(self.cfg.L)]

    def attention(self, i: int, x: torch.Tensor, pos: int, cos, sin) -> torch.Tensor:
        (B, T, _), D, w = x.shape, self.cfg.D, self.w
        x = rms_norm(x, w[f"model.layers.{i}.input_layernorm.weight"], self.cfg.eps)
        p = f"model.layers.{i}.self_attn."
        q = F.linear(x, w[p + "q_proj.weight"]).view(B, T, self.h, D).transpose(1, 2)
        k = F.linear(x, w[p + "k_proj.weight"]).view(B, T, self.hkv, D).transpose(1, 2)
        v = F.linear(x, w[p + "v_proj.weight"]).view(B, T, self.hkv, D).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)  # (B, h, T, D), (B, hkv, T, D)
        self.k[i][:, :, pos:pos + T], self.v[i][:, :, pos:pos + T] = k, v
        t = torch.arange(pos + T, device=x.device)
        mask = t <= t[pos:, None]                                # (T, pos+T) causal
        ks, vs = self.k[i][:, :, :pos + T], self.v[i][:, :, :pos + T]  # up to pos+T
        o = F.scaled_dot_product_attention(q, ks, vs, attn_mask=mask, enable_gqa=True)
        o = o.transpose(1, 2).reshape(B, T, self.h * D)          # (B, T, h * D)
        partial = F.linear(o, w[p + "o_proj.weight"])        # (B, T, C), part of the sum
        return self.comm.all_reduce(partial)                     # all-reduce 1

    def mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        p, w = f"model.layers.{i}.", self.w
        x = rms_norm(x, w[p + "post_attention_layernorm.weight"], self.cfg.eps)
        gate = F.linear(x, w[p + "mlp.gate_proj.weight"])        # (B, T, F / N)
        up = F.linear(x, w[p + "mlp.up_proj.weight"])
        partial = F.linear(F.silu(gate) * up, w[p + "mlp.down_proj.weight"])  # (B, T, C)
        return self.comm.all_reduce(partial)                     # all-reduce 2

    def __call__(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits (B, T, V) of tokens (B, T) from position pos on; fills the cache."""
        w = self.w
        x = F.embedding(tokens, w["model.embed_tokens.weight"])  # (B, T, C), replicated
        t = torch.arange(pos, pos + tokens.shape[1], device=x.device).float()
        angles = torch.cat([t[:, None] * self.inv_freq] * 2, dim=-1)     # (T, D)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for i in range(self.cfg.L):
            x = x + self.attention(i, x, pos, cos, sin)   # each adds an all-reduced sum
            x = x + self.mlp(i, x)
        x = rms_norm(x, w["model.norm.weight"], self.cfg.eps)
        return self.comm.all_gather(F.linear(x, w["lm_head.weight"]))   # (B, T, V)
# --8<-- [end:tp_model]


@torch.no_grad()
def generate(model: TPDecoder, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy decoding: the prompt (B, T) in one pass (prefill), then one token per step.
    Returns the new tokens (B, new_tokens), the same on every rank."""
    model.setup_cache(prompt.shape[0], prompt.shape[1] + new_tokens)
    tok, pos, out = prompt, 0, []
    for _ in range(new_tokens):
        logits = model(tok, pos)                                 # (B, T or 1, V)
        pos, tok = pos + tok.shape[1], logits[:, -1:].argmax(-1)  # (B, 1)
        out.append(tok)
    return torch.cat(out, dim=1)


# --- Part 4: the library -- DTensor's parallelize_module on transformers' Llama ---------------
# --8<-- [start:dtensor]
def dtensor_model(folder: Path, dtype: torch.dtype, device: torch.device):
    """transformers' LlamaForCausalLM cut by the same plan: ColwiseParallel leaves its
    output sharded, RowwiseParallel takes sharded input and all-reduces its output, and
    attention views its projections as (B, T, -1, D), so each rank sees H / N heads. The
    embedding and LM head stay replicated. Every rank reads the whole checkpoint and keeps
    its chunk (src_data_rank=None: no scatter); `tp_plan="auto"` loads only the shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import parallel
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    Col, Row = parallel.ColwiseParallel, parallel.RowwiseParallel
    for layer in model.model.layers:
        parallel.parallelize_module(layer, mesh, src_data_rank=None, parallelize_plan={
            "self_attn.q_proj": Col(), "self_attn.k_proj": Col(),
            "self_attn.v_proj": Col(), "self_attn.o_proj": Row(),         # all-reduce 1
            "mlp.gate_proj": Col(), "mlp.up_proj": Col(),
            "mlp.down_proj": Row()})                     # all-reduce 2
    return model
# --8<-- [end:dtensor]


# --- Part 5: one rank's run, and the comparison table (rank 0) --------------------------------
def init_rank(rank: int, N: int, port: int | None, device_type: str) -> torch.device:
    """Join the group: a spawned rank by a localhost port, a torchrun one by its environment."""
    device = torch.device("cpu")
    kwargs = dict(init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=N) if port else {}
    if device_type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **kwargs)
    else:
        torch.set_num_threads(1)                                 # N processes share the cores
        dist.init_process_group("gloo", **kwargs)
    return device


def timed(model, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """(new tokens (B, new_tokens), tokens/s) of one greedy call, prefill included."""
    start = time.perf_counter()
    if isinstance(model, TPDecoder):
        tokens = generate(model, prompt, new_tokens)
    else:                                    # transformers: greedy, no stop at end-of-text
        with torch.no_grad():
            tokens = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                                    eos_token_id=None)[:, prompt.shape[1]:]
    tokens = tokens.cpu()                                        # waits for the GPU
    return tokens, tokens.numel() / (time.perf_counter() - start)


def weight_bytes(tensors, n: int) -> int:
    """Weight bytes of the largest of n ranks (all n call it). A tensor sharing storage with
    another (a tied LM head is a view of the embedding) counts once; DTensors by their shard."""
    from torch.distributed.tensor import DTensor

    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in local}
    values = [sum(storages.values())] * n
    if n > 1:
        dist.all_gather_object(values, values[0])
    return max(values)


def run_rank(rank: int, N: int, port: int | None, args: argparse.Namespace, folder: str,
             device_type: str) -> None:
    """One rank: our decoder over N ranks, then alone (rank 0 only), then DTensor's."""
    device, dtype, folder = init_rank(rank, N, port, device_type), DTYPES[args.dtype], Path(folder)
    cfg, tokenizer = read_config(folder), Tokenizer.from_file(str(folder / "tokenizer.json"))
    prompt = torch.tensor([tokenizer.encode(args.prompt).ids], device=device)  # (1, T)
    rows = []  # (run, ranks, weight bytes of the largest rank, tokens/s, tokens)

    for n in sorted({N, 1}, reverse=True):  # on N ranks, then in one process: the reference
        if n == N or rank == 0:
            plan, comm = make_plan(cfg, rank, n), Comm(dist.group.WORLD if n > 1 else None)
            model = TPDecoder(cfg, plan, load_shard(folder, cfg, plan, dtype, device), comm)
            tokens, speed = timed(model, prompt, args.new_tokens)
            rows.append(("from scratch", n, weight_bytes(model.w.values(), n), speed, tokens))
    dist.barrier()
    skip = None if cfg.Hkv % N == 0 else (f"ColwiseParallel cuts k_proj into {N} even parts "
                                          f"and cannot copy {cfg.Hkv} KV heads to {N} ranks")
    if skip is None:
        model = dtensor_model(folder, dtype, device)
        tokens, speed = timed(model, prompt, args.new_tokens)
        nbytes = weight_bytes(model.parameters(), N)
        rows.append(("DTensor parallelize_module", N, nbytes, speed, tokens))
    if rank == 0:
        print_table(rows, make_plan(cfg, 0, N), device, args, tokenizer, skip)
    dist.barrier()
    dist.destroy_process_group()


def print_table(rows: list, plan: Plan, device: torch.device, args, tokenizer, skip) -> None:
    span = lambda r: f"{r.start}-{r.stop - 1}" if len(r) > 1 else str(r.start)  # noqa: E731
    print(f"{plan.N} ranks ({'NCCL' if device.type == 'cuda' else 'gloo'}, {args.dtype}); rank 0 "
          f"holds query heads {span(plan.q)}, KV heads {span(plan.kv)}, MLP channels "
          f"{span(plan.ffn)}, vocabulary rows {span(plan.vocab)}\n")
    one = next(row[4] for row in rows if row[1] == 1)
    print("| run | ranks | weights per rank (MB) | tokens/s (one call) | same tokens as one "
          "process |\n| --- | ---: | ---: | ---: | --- |")
    for name, n, nbytes, speed, tokens in rows:
        same = "yes" if torch.equal(tokens, one) else "NO"
        print(f"| {name} | {n} | {nbytes / 1e6:.1f} | {speed:.1f} | {same} |")
    print(f"\nDTensor not run: {skip}." if skip else "")
    for name, n, _, _, tokens in rows:
        print(f"tokens ({name}, N={n}): {tokens[0].tolist()}")
    print(f"text: {args.prompt + tokenizer.decode(rows[0][4][0].tolist())!r}")


def resolve_model(name: str) -> Path:
    """A local transformers folder, or a hub id downloaded to the cache."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(name) if Path(name).is_dir() else Path(snapshot_download(
            name, allow_patterns=["*.json", "*.safetensors", "*.jinja"]))
    except Exception as error:  # offline, unknown id, no access: one line, not a traceback
        raise Refusal(f"cannot find model {name!r} ({type(error).__name__}): pass a local "
                      "transformers folder or a hub id with --model") from None
    names = {path.name for path in folder.iterdir()}
    if {"config.json", "tokenizer.json"} - names or not any(folder.glob("*.safetensors")):
        raise Refusal(f"{folder} lacks config.json, tokenizer.json or safetensors weights: pass a "
                      "transformers model folder with --model")
    return folder


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="Llama checkpoint: hub id or local folder (default: %(default)s)")
    p.add_argument("--tp-size", type=int, default=3,
                   help="ranks N; must split the heads evenly (SmolLM2: 1 or 3); under torchrun "
                        "N is its --nproc-per-node instead (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="cpu: N processes with gloo; cuda: one GPU per rank with NCCL; auto: cuda "
                        "when N GPUs are visible, else cpu (default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="weights and activations (default: %(default)s)")
    p.add_argument("--prompt", default="The capital of France is", help="the prompt (batch 1)")
    p.add_argument("--new-tokens", type=int, default=4, help="tokens to generate (default: 4)")
    return p


def main(args: argparse.Namespace) -> None:
    if args.tp_size < 1 or args.new_tokens < 1:
        build_parser().error("--tp-size and --new-tokens must be at least 1")
    if not args.prompt.strip():
        raise Refusal("the prompt is empty: pass some text with --prompt")
    N, gpus = int(os.environ.get("WORLD_SIZE", args.tp_size)), torch.cuda.device_count()
    if args.device == "cuda" and gpus < N:
        raise Refusal(f"--device cuda needs {N} CUDA GPUs (one per rank) and {gpus} are "
                      "visible: use --device cpu, or a smaller --tp-size")
    auto_cuda = args.device == "auto" and gpus >= N
    device_type = "cuda" if args.device == "cuda" or auto_cuda else "cpu"
    folder = resolve_model(args.model)
    make_plan(read_config(folder), 0, N)                    # refuses N that do not split
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:           # started by torchrun
        run_rank(int(os.environ["RANK"]), N, None, args, str(folder), device_type)
    else:                                                             # start our own N processes
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))                                  # a free port for the group
            port = s.getsockname()[1]
        mp.spawn(run_rank, args=(N, port, args, str(folder), device_type), nprocs=N)


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank refuses; one says it
            print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
