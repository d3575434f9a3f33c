"""paged_attention.py: the paged engine computes what a contiguous cache computes, and leaks nothing.

Invariances, each compared inside the test:
* paged attention through a SHUFFLED block table equals plain attention over contiguous K/V
  (torch's scaled_dot_product_attention), with 1e30 in every unused cache slot, odd shapes,
  decodes and prompt chunks (a query of Tq tokens after ctx - Tq cached ones) in one step;
* the engine's greedy tokens equal transformers' greedy `generate` for each request, with
  chunked prefill on and off, prefix caching on and off, requests of different lengths, a
  shared prefix (prefix-cache hits) and a KV pool so small that sequences are preempted;
  the same for Qwen2 (q/k/v bias) and Qwen3 (QK-norm) models built from small configs;
* the scheduler's block accounting under random arrivals, preemption and prefix sharing:
  reference counts equal the block tables that hold a block, the free list holds exactly the
  unreferenced blocks, every scheduled token has a slot, and everything returns at the end;
* on a GPU: decode through CUDA graphs gives the eager engine's tokens.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import ACCEL_EXAMPLES, assert_refusal, assert_results_header, import_example, run_bench, run_script
from tolerances import PAGED_FP32_ATOL

SCRIPT = ACCEL_EXAMPLES / "paged_attention.py"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# Unused cache slots hold this: the gather reads them (with weight exactly 0 after the mask,
# as real engines would never read them at all), so a slot that leaks shows up as ~1e30.
# Not NaN: 0 x NaN is NaN, and stale slots in a running engine always hold finite K/V.
GARBAGE = 1e30


@pytest.fixture(scope="module")
def pa():
    return import_example(SCRIPT)


@pytest.mark.parametrize("is_prefill", [False, True])
def test_paged_equals_contiguous_under_shuffled_blocks_with_garbage(pa, is_prefill: bool) -> None:
    torch.manual_seed(0)
    H, Hkv, D, BS = 6, 2, 59, 5                 # odd head dim and block size
    context = [13, 1, 7, 20]                    # tokens of each sequence after this step
    query = [1, 1, 7, 3] if is_prefill else [1] * len(context)   # decodes first, then chunks
    NB = sum(math.ceil(c / BS) for c in context) + 3
    order = list(range(NB))
    random.Random(0).shuffle(order)             # physical blocks in random order
    k_cache = torch.full((NB, BS, Hkv, D), GARBAGE)   # in every slot not written below
    v_cache = torch.full((NB, BS, Hkv, D), GARBAGE)
    tables, ks, vs, used = [], [], [], 0
    for c in context:
        n = math.ceil(c / BS)
        tables.append(order[used:used + n])
        used += n
        k, v = torch.randn(c, Hkv, D), torch.randn(c, Hkv, D)
        slots = torch.tensor([tables[-1][p // BS] * BS + p % BS for p in range(c)])
        k_cache.view(-1, Hkv, D)[slots], v_cache.view(-1, Hkv, D)[slots] = k, v
        ks.append(k)
        vs.append(v)
    mb = max(map(len, tables))
    meta = pa.StepMeta(torch.empty(0, dtype=torch.long),
                       torch.tensor([t + [0] * (mb - len(t)) for t in tables]), torch.tensor(context),
                       query, context)
    q = torch.randn(sum(query), H, D)
    out = pa.paged_attention(q, k_cache, v_cache, meta)
    refs, start = [], 0
    for c, t, k, v in zip(context, query, ks, vs):   # contiguous K/V, the library's attention
        mask = torch.arange(c - t, c)[:, None] >= torch.arange(c)[None]
        refs.append(F.scaled_dot_product_attention(
            q[start:start + t].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=mask, enable_gqa=True).transpose(0, 1))
        start += t
    ref = torch.cat(refs)
    diff = (out - ref).abs()
    print(f"max diff {diff.max():.2e}, mean {diff.mean():.2e}")
    assert out.abs().max() < 100, "an unused slot leaked into the output"
    assert diff.max().item() <= PAGED_FP32_ATOL


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy generate for one request, exactly n tokens (no end token)."""
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[0, len(prompt):].tolist()


def preempting_workload(rng: random.Random, BS: int) -> tuple[list, list, int]:
    """Requests of different lengths, two sharing a prefix of two full blocks, and a pool that
    holds any one request but not all of them as they grow (preemption)."""
    shared = [rng.randrange(3, 500) for _ in range(2 * BS + 1)]
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (3, 11, 6, 17)]
    prompts += [shared + [rng.randrange(3, 500) for _ in range(n)] for n in (2, 5)]
    new_tokens = [9, 4, 12, 7, 10, 6]
    num_blocks = max(math.ceil((len(p) + n) / BS) for p, n in zip(prompts, new_tokens)) + 2
    return prompts, new_tokens, num_blocks


@pytest.fixture(scope="module")
def tiny(tiny_model: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("chunked_prefill", [True, False])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_engine_equals_transformers_generate(pa, tiny, chunked_prefill: bool,
                                             prefix_caching: bool) -> None:
    prompts, new_tokens, num_blocks = preempting_workload(random.Random(0), BS := 4)
    engine = pa.LLMEngine(tiny, num_blocks, BS, max_num_seqs=4, max_num_batched_tokens=7,
                          prefix_caching=prefix_caching, chunked_prefill=chunked_prefill)
    engine.cache.fill_(GARBAGE)                 # a slot read before it is written shows up
    ours = engine.generate(prompts, new_tokens)
    expected = [hf_greedy(tiny, p, n) for p, n in zip(prompts, new_tokens)]
    bm = engine.block_manager
    print(f"steps {engine.num_steps}, preemptions {engine.scheduler.num_preemptions}, "
          f"prefix hit tokens {bm.num_prefix_hit_tokens}")
    assert engine.scheduler.num_preemptions > 0, "the small pool should have forced preemption"
    assert (bm.num_prefix_hit_tokens > 0) == prefix_caching, "hits exactly when caching is on"
    for i, (a, b) in enumerate(zip(ours, expected)):
        assert a == b, (i, a, b)
    assert sorted(bm.free_block_ids) == list(range(num_blocks)), "blocks leaked"


def test_chunked_prefill_mixes_decodes_and_chunks(pa, tiny) -> None:
    """With a budget of 8 tokens, a 30-token prompt arriving while another request decodes is
    cut in chunks of at most 8 - 1 tokens that share steps with that request's decodes."""
    engine = pa.LLMEngine(tiny, 32, 4, max_num_seqs=4, max_num_batched_tokens=8)
    first = engine.add_request([5, 6, 7], 20)
    engine.step()                                # prefill of the short request
    long = engine.add_request(list(range(10, 40)), 3)
    steps = []
    while engine.scheduler.running or engine.scheduler.waiting:
        batch = engine.scheduler.schedule()
        steps.append({id(seq): n for seq, n in batch})
        engine.scheduler.postprocess(batch, [1] * len(batch))   # tokens do not matter here
    mixed = [s for s in steps if s.get(id(first)) == 1 and s.get(id(long), 1) > 1]
    assert len(mixed) >= 3, steps
    assert all(sum(s.values()) <= 8 for s in steps), "the token budget was exceeded"
    assert sum(s.get(id(long), 0) for s in steps if id(long) in s) >= 30


def hf_from_config(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_qwen_families_equal_transformers_generate(pa, family: str) -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model(family, vocab_size=512, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  head_dim=16, max_position_embeddings=256)
    model = hf_from_config(config)
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None, "Qwen2 has q/k/v bias"
    else:
        assert hasattr(model.model.layers[0].self_attn, "q_norm"), "Qwen3 has QK-norm"
    prompts, new_tokens, num_blocks = preempting_workload(random.Random(1), BS := 4)
    ours = pa.LLMEngine(model, num_blocks, BS, 4, 7).generate(prompts, new_tokens)
    assert ours == [hf_greedy(model, p, n) for p, n in zip(prompts, new_tokens)]


def check_invariants(bm, live: list, num_blocks: int) -> None:
    owners = [0] * num_blocks
    for seq in live:
        for block in seq.block_table:
            owners[block] += 1
    free = list(bm.free_block_ids)
    assert len(free) == len(set(free)), "a block is twice in the free list"
    assert bm.ref_counts == owners, "reference counts differ from the block tables holding them"
    assert set(free) == {b for b in range(num_blocks) if owners[b] == 0}, "leaked or double-used block"


@pytest.mark.parametrize("chunked_prefill", [True, False])
def test_scheduler_block_accounting_under_random_arrivals(pa, chunked_prefill: bool) -> None:
    rng = random.Random(2)
    BS, NB = 4, 10                                  # holds the longest request (34 tokens) alone
    bm = pa.BlockManager(NB, BS, prefix_caching=True)
    scheduler = pa.Scheduler(bm, max_num_seqs=5, max_num_batched_tokens=10,
                             chunked_prefill=chunked_prefill)
    shared_seen, submitted = False, []
    for step in range(600):
        if step < 300 and rng.random() < 0.3:           # random arrivals; few values: prefix hits
            prompt = [rng.randrange(2) for _ in range(rng.randint(1, 14))]
            submitted.append(pa.Sequence(prompt, len(prompt), rng.randint(1, 20)))
            scheduler.waiting.append(submitted[-1])
        batch = scheduler.schedule()
        for seq, n in batch:                            # every new token has a slot
            assert seq.status == "running" and len(seq.block_table) * BS >= seq.num_computed_tokens + n
        assert sum(n for _, n in batch) <= 10 or not chunked_prefill
        shared_seen |= any(count > 1 for count in bm.ref_counts)
        scheduler.postprocess(batch, [rng.randrange(2) for _ in batch])
        check_invariants(bm, list(scheduler.running), NB)
    assert not scheduler.running and not scheduler.waiting, "every request should finish"
    assert all(len(seq.output_ids) == seq.max_new_tokens for seq in submitted)
    check_invariants(bm, [], NB)
    assert scheduler.num_preemptions > 0, "the small pool should have forced preemption"
    assert bm.num_prefix_hit_tokens > 0 and shared_seen, "prefix-cache hits should share blocks"


def test_script_runs_on_the_tiny_model(tiny_model: Path) -> None:
    proc = run_script(SCRIPT, "--model", tiny_model, "--num-requests", "3", "--num-blocks", "16",
                      env=ONE_THREAD)
    assert "| engine, chunked prefill |" in proc.stdout, proc.stdout
    assert proc.stdout.count("| yes |") == 4, proc.stdout


def test_refusals(tmp_path: Path, tiny_model: Path) -> None:
    assert_refusal(run_script(SCRIPT, "--model", tmp_path / "missing", check=False), "--model")
    if not torch.cuda.is_available():
        assert_refusal(run_script(SCRIPT, "--model", tiny_model, "--device", "cuda", check=False), "cuda")
    from transformers import GPT2Config

    gpt2 = tmp_path / "gpt2"                    # an architecture the engine does not run
    hf_from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (gpt2 / name).write_bytes((tiny_model / name).read_bytes())
    assert_refusal(run_script(SCRIPT, "--model", gpt2, check=False), "gpt2", "llama")
    for flag in ("--num-blocks", "--block-size", "--num-requests", "--max-num-seqs",
                 "--max-num-batched-tokens"):
        proc = run_script(SCRIPT, flag, "0", check=False)
        assert proc.returncode == 2 and "must be positive" in proc.stderr, (flag, proc.stderr)


def test_bench_serving_cpu_preset(tiny_model: Path, tmp_path: Path) -> None:
    result = run_bench("serving", "cpu", tmp_path, model=tiny_model)
    assert_results_header(result)
    rows = {row["method"]: row for row in result["rows"]}
    print({name: round(row["tokens_per_s"], 1) for name, row in rows.items()})
    assert set(rows) == {"paged engine, chunked prefill", "paged engine, prefill first",
                         "transformers generate, padded batches", "transformers continuous batching"}
    for row in rows.values():
        assert row["output_tokens"] == result["workload"]["output_tokens"]
        assert row["tokens_per_s"] > 0 and row["seconds"] > 0
    for name in ("paged engine, chunked prefill", "paged engine, prefill first"):
        assert rows[name]["requests"] == result["workload"]["requests"]
        assert 0 < rows[name]["ttft_s"]["p50"] <= rows[name]["ttft_s"]["p99"]
    series, BS = result["memory"]["series"], result["settings"]["block_size"]
    for running, stored, reserved in zip(series["running"], series["tokens_stored"], series["slots_reserved"]):
        assert reserved <= stored + running * BS, "paged waste is under one block per sequence"
    latency = json.loads((tmp_path / "serving-cpu-latency.json").read_text())
    assert {(r["rate"], r["policy"]) for r in latency["online"]} == {
        (rate, policy) for rate in result["settings"]["rates"] for policy in ("chunked prefill", "prefill first")}
    on, off = latency["prefix"]
    assert on["prefix_caching"] and on["hit_rate"] > 0 and off["hit_rate"] == 0
    for suffix in (".json", ".md", ".en.md", ".png", "-memory.png", "-latency.md", "-latency.en.md",
                   "-latency.png"):
        assert (tmp_path / f"serving-cpu{suffix}").exists(), suffix


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager(pa, tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts, new_tokens, num_blocks = preempting_workload(random.Random(0), BS := 4)
    prompts += [[7] * n for n in range(1, 12)]                  # batch sizes across buckets
    new_tokens += [5] * 11
    cpu = pa.LLMEngine(model, 4 * num_blocks, BS, 16, 7).generate(prompts, new_tokens)
    model = model.cuda()
    eager = pa.LLMEngine(model, 4 * num_blocks, BS, 16, 7, cuda_graphs=False)
    graphs = pa.LLMEngine(model, 4 * num_blocks, BS, 16, 7, max_model_len=64)
    assert eager.graphs is None and graphs.graphs is not None
    assert graphs.generate(prompts, new_tokens) == eager.generate(prompts, new_tokens) == cpu
