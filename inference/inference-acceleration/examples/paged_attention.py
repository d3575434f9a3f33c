"""PagedAttention, continuous batching and chunked prefill from scratch, driving a real model.

A miniature vLLM in nano-vllm's decomposition: `Sequence`, `BlockManager` (free list, reference
counts, prefix caching), `Scheduler` (vLLM V1's token budget, or prefill first), `paged_attention`
(all decodes in one call), `CUDAGraphDecoder`, `LLMEngine` on transformers Llama, Qwen2, Qwen3.

Run it
    python inference/inference-acceleration/examples/paged_attention.py --model HuggingFaceTB/SmolLM2-135M-Instruct

On SmolLM2 (CPU) it prints the same greedy tokens from all four methods, prefix-cache hits
only with caching on, and the steps each took (with chunked prefill, chunks ride with decodes)."""

from __future__ import annotations

import argparse
import math
import random
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

SYSTEM = "You are a helpful assistant. Answer in one short sentence, plainly and politely.\n"
PROMPTS = ["The capital of France is", "def fibonacci(n):", "To make a cup of tea, first"]


class Refusal(Exception):
    """A run-time refusal: one line that names the problem and the fix (exit code 2)."""


# --8<-- [start:sequence]
@dataclass
class Sequence:
    """One request: its tokens, its scheduler state and its blocks in the KV cache."""
    token_ids: list[int]             # prompt followed by the tokens generated so far
    num_prompt_tokens: int
    max_new_tokens: int
    eos_token_id: int | None = None  # None: generate exactly max_new_tokens (benchmarks)
    status: str = "waiting"          # -> "running" -> "finished" (or back to "waiting")
    block_table: list[int] = field(default_factory=list)  # logical i -> physical block
    num_computed_tokens: int = 0     # leading tokens whose K/V are in the cache

    num_tokens = property(lambda self: len(self.token_ids))
    output_ids = property(lambda self: self.token_ids[self.num_prompt_tokens:])
# --8<-- [end:sequence]


# --8<-- [start:block_manager]
class BlockManager:
    """A free list, reference counts, and full computed blocks indexed for prefix caching
    by hash((prev hash, tokens)); a freed block keeps its hash until handed out (LRU)."""

    def __init__(self, num_blocks: int, block_size: int,
                 prefix_caching: bool = True) -> None:
        self.block_size, self.prefix_caching = block_size, prefix_caching
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.num_prefix_hit_tokens = 0

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached leading full blocks until the first miss; not the last token's block."""
        blocks, h, BS = [], None, self.block_size
        for i in range((seq.num_tokens - 1) // BS if self.prefix_caching else 0):
            h = hash((h, tuple(seq.token_ids[i * BS:(i + 1) * BS])))
            if (block := self.hash_to_block.get(h)) is None:
                break
            blocks.append(block)
        return blocks

    def can_reserve(self, seq: Sequence, num_tokens: int) -> bool:  # hits count as new
        needed = math.ceil(num_tokens / self.block_size) - len(seq.block_table)
        return len(self.free_block_ids) >= needed

    def allocate(self, seq: Sequence, hits: list[int]) -> None:  # start on cached blocks
        for block in hits:
            if self.ref_counts[block] == 0:
                self.free_block_ids.remove(block)
            self.ref_counts[block] += 1
        seq.block_table, seq.num_computed_tokens = list(hits), len(hits) * self.block_size
        self.num_prefix_hit_tokens += seq.num_computed_tokens

    def reserve(self, seq: Sequence, num_tokens: int) -> None:  # slots for num_tokens
        while len(seq.block_table) * self.block_size < num_tokens:
            block = self.free_block_ids.popleft()
            if self.hash_to_block.get(self.block_hash[block]) == block:
                del self.hash_to_block[self.block_hash[block]]  # evict its old prefix
            self.block_hash[block], self.ref_counts[block] = None, 1
            seq.block_table.append(block)

    def cache_blocks(self, seq: Sequence, num_computed: int) -> None:
        """Index newly full blocks; after the forward, so no hit reads unwritten K/V."""
        BS, table, end = self.block_size, seq.block_table, num_computed // self.block_size
        for i in range(seq.num_computed_tokens // BS, end if self.prefix_caching else 0):
            prev = self.block_hash[table[i - 1]] if i else None
            h = hash((prev, tuple(seq.token_ids[i * BS:(i + 1) * BS])))
            self.block_hash[table[i]], self.hash_to_block[h] = h, table[i]

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):   # tail first: it is the least reusable
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_block_ids.append(block)
        seq.block_table, seq.num_computed_tokens = [], 0
# --8<-- [end:block_manager]


# --8<-- [start:scheduler]
class Scheduler:
    """A step: (sequence, new tokens) pairs. Chunked prefill (vLLM V1): the running first,
    then the waiting, within the budget; prefill first: whole prompts, else decodes."""

    def __init__(self, block_manager: BlockManager, max_num_seqs: int,
                 max_num_batched_tokens: int, chunked_prefill: bool = True) -> None:
        self.bm, self.max_num_seqs = block_manager, max_num_seqs
        self.token_budget, self.chunked_prefill = max_num_batched_tokens, chunked_prefill
        self.waiting: deque[Sequence] = deque()  # arrival order; preempted ones in front
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def schedule(self) -> list[tuple[Sequence, int]]:
        budget, preempted = self.token_budget, self.num_preemptions
        if not self.chunked_prefill:
            return self._admit(budget) or self._continue_running(math.inf)
        batch = self._continue_running(budget)
        if self.num_preemptions > preempted:
            return batch                   # blocks are short: admit nobody this step
        return batch + self._admit(budget - sum(n for _, n in batch))

    def _continue_running(self, budget: float) -> list[tuple[Sequence, int]]:
        batch = []
        for seq in list(self.running):
            if budget <= 0 or seq.status != "running":
                continue                   # budget spent, or preempted below as a victim
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.bm.can_reserve(seq, seq.num_computed_tokens + n):
                victim = self.running.pop()        # the newest: recompute it later
                self.bm.free(victim)
                victim.status = "waiting"
                self.waiting.appendleft(victim)
                self.num_preemptions += 1
                if victim is seq:
                    break
            if seq.status == "running":
                self.bm.reserve(seq, seq.num_computed_tokens + n)
                batch, budget = batch + [(seq, n)], budget - n
        return batch

    def _admit(self, budget: int) -> list[tuple[Sequence, int]]:
        batch = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq, BS = self.waiting[0], self.bm.block_size
            hits = self.bm.cached_prefix(seq)
            n = seq.num_tokens - len(hits) * BS          # a cached prefix is not computed
            if self.chunked_prefill:
                n = min(n, budget)
            elif batch and n > budget:
                break                      # this step's token budget is spent
            if not self.bm.can_reserve(seq, len(hits) * BS + n):
                break                      # wait until finished sequences free blocks
            self.bm.allocate(seq, hits)
            self.bm.reserve(seq, seq.num_computed_tokens + n)
            seq.status, budget = "running", budget - n
            self.running.append(self.waiting.popleft())
            batch.append((seq, n))
        return batch

    def postprocess(self, batch: list[tuple[Sequence, int]],
                    token_ids: list[int]) -> list[Sequence]:
        finished = []
        for (seq, n), token in zip(batch, token_ids):
            self.bm.cache_blocks(seq, seq.num_computed_tokens + n)
            seq.num_computed_tokens += n
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # a prompt chunk: no token until the prompt is done
            seq.token_ids.append(token)
            if token == seq.eos_token_id or len(seq.output_ids) >= seq.max_new_tokens:
                seq.status = "finished"
                self.bm.free(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished
# --8<-- [end:scheduler]


# --8<-- [start:paged_attention]
@dataclass
class StepMeta:
    """Where one step's K/V live, for every layer; decodes (one new token) come first."""
    slot_mapping: torch.Tensor      # (T,) cache slot of each new token
    block_tables: torch.Tensor      # (B, MB) physical blocks per sequence, padded with 0
    context_lens: torch.Tensor      # (B,) tokens of each sequence cached after this step
    query_lens: list[int]           # new tokens of each sequence (1 for a decode)
    host_context_lens: list[int]    # context_lens on the host, for the prompt-chunk loop


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + mask) v, each K/V head serving G = H / Hkv query heads:
    q (B, Tq, H, D); k, v (B, Hkv, Tk, D); mask (B, Tq, Tk) True where visible."""
    B, Tq, H, D = q.shape
    Hkv, Tk, G = k.shape[1], k.shape[2], H // k.shape[1]
    q = q.view(B, Tq, Hkv, G, D).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * Tq, D)
    scores = (q @ k.transpose(-1, -2)).float() * D ** -0.5      # (B, Hkv, G*Tq, Tk)
    scores = scores.view(B, Hkv, G, Tq, Tk).masked_fill(~mask[:, None, None], -math.inf)
    p = scores.softmax(dim=-1).to(v.dtype).view(B, Hkv, G * Tq, Tk)
    out = p @ v                                                 # (B, Hkv, G*Tq, D)
    return out.view(B, Hkv, G, Tq, D).permute(0, 3, 1, 2, 4).reshape(B, Tq, H, D)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    meta: StepMeta) -> torch.Tensor:
    """Attention of the step's new tokens over each sequence's K/V, read via block tables:
    q (T, H, D) packed tokens of all sequences; k_cache, v_cache (NB, BS, Hkv, D)."""
    BS, out = k_cache.shape[1], []
    d = next((i for i, n in enumerate(meta.query_lens) if n > 1), len(meta.query_lens))
    if d:  # decodes in one fused call; slots past a length get weight 0 (they are finite)
        k, v = (c.index_select(0, meta.block_tables[:d].flatten())
                .view(d, -1, *c.shape[2:]).transpose(1, 2)
                for c in (k_cache, v_cache))                    # (d, Hkv, L = MB BS, D)
        valid = (torch.arange(k.shape[2], device=q.device)
                 < meta.context_lens[:d, None, None])           # (d, 1, L)
        out.append(F.scaled_dot_product_attention(  # G query heads of a KV head as G rows
            q[:d].unflatten(1, (k.shape[1], -1)), k, v, valid[:, None]).flatten(1, 2))
    for i, Tq in enumerate(meta.query_lens[d:], d):  # prompt chunks, a sequence at a time
        ctx, start = meta.host_context_lens[i], sum(meta.query_lens[:i])
        blocks = meta.block_tables[i, :math.ceil(ctx / BS)]
        k = k_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)         # (Hkv, ctx, D)
        v = v_cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1)         # (Hkv, ctx, D)
        causal = torch.arange(ctx - Tq, ctx)[:, None] >= torch.arange(ctx)[None]
        out.append(attention(q[None, start:start + Tq], k[None], v[None],
                             causal[None].to(q.device))[0])             # (Tq, H, D)
    return torch.cat(out)                                               # (T, H, D)
# --8<-- [end:paged_attention]


# --8<-- [start:kv_cache]
def allocate_kv_cache(config, num_blocks: int, block_size: int, dtype: torch.dtype,
                      device: torch.device) -> torch.Tensor:
    """K and V of every layer in blocks, (2, L, NB + 1, BS, Hkv, D), allocated once.
    Block NB is scratch: the padded rows of a CUDA-graph batch write their K/V there."""
    c = config
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    shape = (2, c.num_hidden_layers, num_blocks + 1, block_size, c.num_key_value_heads, D)
    return torch.zeros(shape, dtype=dtype, device=device)
# --8<-- [end:kv_cache]


# --8<-- [start:forward]
def decoder_forward(model, input_ids: torch.Tensor, positions: torch.Tensor,
                    cache: torch.Tensor, meta: StepMeta) -> torch.Tensor:
    """Llama, Qwen2, Qwen3 on packed tokens (T,) -> each sequence's last logits (B, V)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # all three
    inner, T = model.model, len(input_ids)
    x = inner.embed_tokens(input_ids)                      # (T, C)
    cos, sin = inner.rotary_emb(x, positions[None])        # (1, T, D) each
    for i, layer in enumerate(inner.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(T, -1, attn.head_dim)      # (T, H, D), Qwen2: + bias
        k = attn.k_proj(h).view(T, -1, attn.head_dim)      # (T, Hkv, D)
        v = attn.v_proj(h).view(T, -1, attn.head_dim)      # (T, Hkv, D)
        if hasattr(attn, "q_norm"):                        # Qwen3: RMSNorm per head
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary_pos_emb(q, k, cos[0], sin[0], unsqueeze_dim=1)
        cache[:, i].flatten(1, 2).index_copy_(1, meta.slot_mapping, torch.stack((k, v)))
        x = x + attn.o_proj(paged_attention(q, cache[0, i], cache[1, i], meta).flatten(1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    if T > len(meta.query_lens):                           # keep each last token
        x = x[torch.tensor(meta.query_lens, device=x.device).cumsum(0) - 1]
    return model.lm_head(inner.norm(x))                    # (B, V)
# --8<-- [end:forward]


# --8<-- [start:cuda_graphs]
class CUDAGraphDecoder:
    """Decode steps replayed from CUDA graphs (one per batch-size bucket): thousands of
    kernel launches at once; static input buffers; padded rows write K/V to scratch."""

    @torch.inference_mode()
    def __init__(self, model, cache: torch.Tensor, max_num_seqs: int,
                 max_blocks: int) -> None:
        dev, B = model.device, max_num_seqs
        self.buckets = [b for b in (1, 2, 4, 8) if b < B] + list(range(16, B, 16)) + [B]
        # widths 4, 6, 8, 12, ... blocks: attention reads < 1.5x the longest context
        self.widths = sorted({min(f * 2**p, max_blocks)
                              for f in (2, 3) for p in range(1, 12)})
        self.scratch = (cache.shape[2] - 1) * cache.shape[3]      # first slot of block NB
        self.ids, self.pos, self.ctx = torch.zeros(3, B, dtype=torch.long, device=dev)
        self.slots = torch.full((B,), self.scratch, dtype=torch.long, device=dev)
        self.tables = torch.zeros(B, max_blocks, dtype=torch.long, device=dev)
        self.graphs, self.logits, pool = {}, {}, None
        for b, w in [(b, w) for b in self.buckets[::-1] for w in self.widths[::-1]]:
            meta = StepMeta(self.slots[:b], self.tables[:b, :w], self.ctx[:b],
                            [1] * b, [1] * b)
            decoder_forward(model, self.ids[:b], self.pos[:b], cache, meta)   # warm-up
            graph = self.graphs[b, w] = torch.cuda.CUDAGraph()  # largest first: the
            with torch.cuda.graph(graph, pool):                 # others reuse its pool
                self.logits[b, w] = decoder_forward(model, self.ids[:b], self.pos[:b],
                                                    cache, meta)
            pool = graph.pool()

    def __call__(self, ids: list[int], pos: list[int], slots: list[int],
                 tables: list[list[int]], ctx: list[int]) -> torch.Tensor:
        n, b = len(ids), next(b for b in self.buckets if b >= len(ids))
        w = next(w for w in self.widths if w >= max(map(len, tables)))
        self.slots.fill_(self.scratch)
        self.ctx.fill_(1)
        rows = [t + [0] * (w - len(t)) for t in tables]
        for buffer, values in ((self.ids, ids), (self.pos, pos), (self.slots, slots),
                               (self.ctx, ctx), (self.tables[:, :w], rows)):
            buffer[:n].copy_(torch.tensor(values))
        self.graphs[b, w].replay()
        return self.logits[b, w][:n]
# --8<-- [end:cuda_graphs]


# --8<-- [start:engine]
class LLMEngine:
    """Scheduler + block manager + paged KV cache + model: add_request(), then step()."""

    def __init__(self, model, num_blocks: int, block_size: int = 16,
                 max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 prefix_caching: bool = True, chunked_prefill: bool = True,
                 cuda_graphs: bool = True, max_model_len: int = 4096) -> None:
        self.model, self.device, self.block_size = model, model.device, block_size
        self.block_manager = BlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_num_seqs,
                                   max_num_batched_tokens, chunked_prefill)
        self.cache = allocate_kv_cache(model.config, num_blocks, block_size, model.dtype,
                                       model.device)
        self.num_steps, self.max_model_len, self.graphs = 0, max_model_len, None
        if cuda_graphs and self.device.type == "cuda":        # the CPU runs eager
            self.graphs = CUDAGraphDecoder(model, self.cache, max_num_seqs,
                                           math.ceil(max_model_len / block_size))

    def add_request(self, prompt_ids: list[int], max_new_tokens: int,
                    eos_token_id: int | None = None) -> Sequence:
        if len(prompt_ids) + max_new_tokens > self.max_model_len:
            raise Refusal(f"request exceeds max_model_len={self.max_model_len}: raise it")
        seq = Sequence(list(prompt_ids), len(prompt_ids), max_new_tokens, eos_token_id)
        self.scheduler.waiting.append(seq)
        return seq

    @torch.inference_mode()
    def step(self) -> list[Sequence]:
        """One forward pass over the scheduled sequences; returns those that finished."""
        batch = self.scheduler.schedule()
        if not batch:
            raise Refusal("the KV pool cannot hold one sequence: raise --num-blocks")
        batch.sort(key=lambda item: item[1] > 1)      # decodes first (a stable sort)
        BS, ctx = self.block_size, [seq.num_computed_tokens + n for seq, n in batch]
        new = [(seq, p) for (seq, n), c in zip(batch, ctx) for p in range(c - n, c)]
        ids, pos = [seq.token_ids[p] for seq, p in new], [p for _, p in new]
        slots = [seq.block_table[p // BS] * BS + p % BS for seq, p in new]
        tables = [seq.block_table for seq, _ in batch]
        if self.graphs and len(new) == len(batch):  # decodes only: replay a graph
            logits = self.graphs(ids, pos, slots, tables, ctx)
        else:
            MB = max(map(len, tables))
            padded = [table + [0] * (MB - len(table)) for table in tables]
            t = lambda values: torch.tensor(values, device=self.device)   # noqa: E731
            meta = StepMeta(t(slots), t(padded), t(ctx), [n for _, n in batch], ctx)
            logits = decoder_forward(self.model, t(ids), t(pos), self.cache, meta)
        self.num_steps += 1
        return self.scheduler.postprocess(batch, logits.argmax(-1).tolist())   # greedy

    def generate(self, prompts: list[list[int]], max_new_tokens: list[int],
                 eos_token_id: int | None = None) -> list[list[int]]:
        seqs = [self.add_request(p, n, eos_token_id)
                for p, n in zip(prompts, max_new_tokens)]
        while self.scheduler.waiting or self.scheduler.running:
            self.step()
        return [seq.output_ids for seq in seqs]
# --8<-- [end:engine]


def load_model(name: str, device: torch.device, dtype: torch.dtype):
    """A transformers Llama / Qwen2 / Qwen3 model and its tokenizer (hub id or local folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as error:
        raise Refusal(f"cannot load model {name!r} ({type(error).__name__}): pass a local "
                      "transformers folder or a hub id with --model") from None
    if model.config.model_type not in ("llama", "qwen2", "qwen3"):     # one forward serves all
        raise Refusal(f"{name!r} is a {model.config.model_type} model: this engine runs llama, "
                      "qwen2 and qwen3 models (e.g. SmolLM2, Qwen3)")
    return model.to(device).eval(), tokenizer


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="Llama, Qwen2 or Qwen3 model: hub id or local folder")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run (auto: cuda if visible; CUDA graphs on cuda)")
    p.add_argument("--num-requests", type=int, default=6, help="requests to serve")
    p.add_argument("--block-size", type=int, default=16, help="token slots per block (BS)")
    p.add_argument("--num-blocks", type=int, default=64, help="KV pool blocks (few: preemption)")
    p.add_argument("--max-num-seqs", type=int, default=4, help="most sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=32, help="token budget of a step")
    return p


def main(args: argparse.Namespace) -> None:
    for flag in ("num_requests", "block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens"):
        if getattr(args, flag) < 1:
            build_parser().error(f"--{flag.replace('_', '-')} must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal("--device cuda but no CUDA GPU is visible: use --device cpu")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(args.model, device, torch.float32)
    eos, rng = tokenizer.eos_token_id, random.Random(0)
    prompts = [tokenizer(SYSTEM + PROMPTS[i % 3])["input_ids"] for i in range(args.num_requests)]
    new_tokens = [rng.randint(8, 24) for _ in prompts]
    rows = []            # (method, outputs, steps, seconds, prefix-hit tokens)
    for name, options in (("engine, chunked prefill", {}),
                          ("engine, prefill first", {"chunked_prefill": False}),
                          ("engine, prefix caching off", {"prefix_caching": False})):
        engine, start = LLMEngine(model, args.num_blocks, args.block_size, args.max_num_seqs,
                                  args.max_num_batched_tokens, **options), time.perf_counter()
        rows.append((name, engine.generate(prompts, new_tokens, eos), engine.num_steps,
                     time.perf_counter() - start, engine.block_manager.num_prefix_hit_tokens))
    start = time.perf_counter()      # transformers: a contiguous cache, one request at a time
    out = [model.generate(torch.tensor([p], device=device), max_new_tokens=n, do_sample=False,
                          eos_token_id=eos, pad_token_id=eos)[0, len(p):].tolist()
           for p, n in zip(prompts, new_tokens)]
    rows.append(("transformers generate, one request at a time", out, sum(new_tokens),
                 time.perf_counter() - start, 0))
    print(f"{args.num_requests} requests sharing a system prompt, {args.num_blocks} blocks of "
          f"{args.block_size}, {args.max_num_batched_tokens} tokens a step\n\n"
          "| method | output tokens | steps | tokens/s | prefix-hit tokens | same tokens |\n"
          "| --- | ---: | ---: | ---: | ---: | --- |")
    for name, out, steps, seconds, hits in rows:
        n, same = sum(map(len, out)), "yes" if out == rows[0][1] else "NO"
        print(f"| {name} | {n} | {steps} | {n / seconds:.1f} | {hits} | {same} |")


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except Refusal as why:
        print(f"error: {why}", file=sys.stderr)
        sys.exit(2)
