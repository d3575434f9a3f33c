"""Speculative decoding measured: acceptance, tokens per verify step, cost ratios and speedup.

Loads inference/inference-acceleration/examples/speculative_decoding.py (the decoder with static
caches, the drafts, the draft-verify loop) and runs it on two named workloads:

    grounded   rewrite a passage of the offline corpus (pydoc topics): the answer repeats n-grams
               of the prompt, which prompt lookup copies
    free       open questions: nothing to copy

For each draft (prompt lookup, INT4 self-draft, early exit) and k in the preset: the acceptance
rate alpha (accepted drafts / drafted tokens), mean new tokens per verify step, tokens/s (spread
over the prompts) and the speedup over plain decode through the same loop, and how many greedy
tokens equal plain decode. Beside them the cost model: c(k), the time of one target forward over
k + 1 tokens over the time of one token, and r, the draft's cost per token over one target step;
Leviathan et al. (2023) give E = (1 - alpha^(k+1)) / (1 - alpha) tokens per step, so the predicted
speedup is E / (c(k) + k r). On a GPU every forward of up to 65 tokens replays a CUDA graph
(one per shape), and the h200 preset also measures c(k) for the Llama-3-8B shape with random bf16
weights (k up to 64) and predicts the 8B speedup of prompt lookup from the alphas measured here.

Writes speculative-<preset>.{json,md,en.md} and speculative-<preset>.png (speedup against k).

Run: python bench/speculative.py --preset cpu      (the GPU run: --preset h200)
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import common  # bench/ is on sys.path: it is the folder of the script being run

STEM = "speculative"
GROUNDED_TASK = "Rewrite the following passage in your own words.\n\n"
FREE_PROMPTS = ["Write a short story about a robot who learns to paint.",
                "Explain why the sky is blue to a ten-year-old."]
QUICK_8B = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2,
            "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 1000}

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "about": "SmolLM2-135M-Instruct bfloat16 on one CPU thread, greedy: prompt lookup, INT4 "
                 "self-draft, early exit at k = 2, 4, 8; 3 grounded + 2 free prompts, 32 new tokens",
        "model": "smollm2",
        "device": "cpu",
        "dtype": "bfloat16",
        "threads": 1,
        "drafts": ["prompt-lookup", "int4", "early-exit"],
        "ks": [2, 4, 8],
        "prompts_per_workload": 3,
        "new_tokens": 32,
        "graphs": False,
        "repeats": 7,
        "ks_8b": [],
        "quick": {"ks": [2], "prompts_per_workload": 1, "new_tokens": 6, "repeats": 1},
    },
    "h200": {
        "about": "SmolLM2-135M-Instruct bfloat16 on one GPU, CUDA graphs for draft and verify "
                 "steps, greedy, k = 2, 4, 8; 4 grounded + 2 free prompts, 128 new tokens; c(k) "
                 "of the Llama-3-8B shape (random bf16 weights) for k up to 64 and the predicted speedup; "
                 "vLLM plain and ngram (k = 4) on the grounded prompts",
        "model": "smollm2",
        "device": "cuda",
        "dtype": "bfloat16",
        "threads": 0,
        "drafts": ["prompt-lookup", "int4", "early-exit"],
        "ks": [2, 4, 8],
        "prompts_per_workload": 4,
        "new_tokens": 128,
        "graphs": True,
        "repeats": 20,
        "ks_8b": [0, 1, 2, 4, 8, 16, 32, 64],
        "context_8b": 512,
        "vllm": True,
        "quick": {"ks": [2], "prompts_per_workload": 1, "new_tokens": 6, "repeats": 2,
                  "ks_8b": [0, 2], "context_8b": 32, "shape_8b": QUICK_8B, "vllm": False},
    },
}

sd = common.load_script(common.ACCEL / "examples" / "speculative_decoding.py")
MAX_GRAPH_TOKENS = 65            # forwards of up to 65 tokens (k <= 64) replay a graph


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# CUDA graphs: one per input length, replayed for the draft and verify steps
# ---------------------------------------------------------------------------------------------
class GraphedForward:
    """Stands in for model.forward: a forward of T <= MAX_GRAPH_TOKENS tokens replays the graph
    recorded for (T, n_layers); longer ones (prefill) run eagerly. Capture writes the cache only
    at its last T slots, which no query sees before they are overwritten (as rejected drafts)."""

    def __init__(self, model):
        self.model, self.eager, self.graphs, self.failures = model, model.forward, {}, []

    def __call__(self, tokens, input_pos, n_layers=None):
        T = tokens.shape[1]
        key = (T, n_layers)
        if T > MAX_GRAPH_TOKENS or key in self.failures:
            return self.eager(tokens, input_pos, n_layers)
        if key not in self.graphs:
            self.graphs[key] = self.capture(T, n_layers)
            if self.graphs[key] is None:
                return self.eager(tokens, input_pos, n_layers)
        graph, tok, pos, out = self.graphs[key]
        tok.copy_(tokens)
        pos.copy_(input_pos)
        graph.replay()
        return out

    def capture(self, T: int, n_layers):
        import torch

        dev = self.model.tok_embeddings.weight.device
        tok = torch.zeros(1, T, dtype=torch.long, device=dev)
        pos = torch.arange(self.model.max_len - T, self.model.max_len, device=dev)
        try:
            graph, out = common.capture_graph(lambda: self.eager(tok, pos, n_layers))
        except RuntimeError as error:   # an op that cannot be captured: this shape runs eagerly
            log(f"CUDA graph capture failed for T={T}: {str(error).splitlines()[0][:200]}")
            self.failures.append((T, n_layers))
            return None
        return graph, tok, pos, out


def use_graphs(model) -> GraphedForward:
    model.forward = GraphedForward(model)
    return model.forward


# ---------------------------------------------------------------------------------------------
# Workloads and runs
# ---------------------------------------------------------------------------------------------
def workloads(tokenizer, n: int) -> dict[str, list[list[int]]]:
    """grounded: passages of 500-900 characters from the corpus's evaluation part; free: open asks."""
    _, evaluation = common.pydoc_corpus()
    passages = [p for p in evaluation.split("\n\n") if 500 < len(p) < 900 and not p.startswith(" ")]
    step = max(len(passages) // n, 1)
    grounded = [GROUNDED_TASK + passages[i * step] for i in range(n)]
    free = [FREE_PROMPTS[i % len(FREE_PROMPTS)] for i in range(min(n, len(FREE_PROMPTS)))]
    return {"grounded": [sd.encode(tokenizer, t) for t in grounded],
            "free": [sd.encode(tokenizer, t) for t in free]}


def timed_run(target, draft, prompt: list[int], new: int, k: int, device) -> tuple[list[int], dict, float]:
    common.sync(device)
    start = time.perf_counter()
    tokens, stats = sd.speculative_generate(target, draft, prompt, new, k)
    common.sync(device)
    return tokens, stats, time.perf_counter() - start


def paired_runs(target, draft, prompts: list[list[int]], new: int, k: int, device) -> dict:
    """Per prompt, plain decode and then the draft's run right after it, so that a slower spell
    of a shared machine hits both; the speedup is the ratio of the summed seconds."""
    out = {"tokens": [], "seconds": [], "plain_tokens": [], "plain_seconds": [],
           "verify_steps": 0, "drafted": 0, "accepted": 0}
    for prompt in prompts:
        tokens, _, seconds = timed_run(target, None, prompt, new, 0, device)
        out["plain_tokens"].append(tokens)
        out["plain_seconds"].append(seconds)
        tokens, stats, seconds = timed_run(target, draft, prompt, new, k, device)
        out["tokens"].append(tokens)
        out["seconds"].append(seconds)
        for key in ("verify_steps", "drafted", "accepted"):
            out[key] += stats[key]
    return out


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def step_ms(fn, device, repeats: int) -> float:
    return statistics.median(common.time_ms(fn, device, warmup=2, repeats=repeats))


def interleaved_ms(fns: dict[str, Any], device, repeats: int) -> dict[str, dict]:
    """Time each fn once per round, round after round (after one warm-up round): a slow spell of a
    shared machine then hits every candidate alike, and the ratios of medians stay honest."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            ms = common.time_ms(fn, device, warmup=0, repeats=1)[0]
            if round_:
                samples[name].append(ms)
    return {name: common.spread(v) for name, v in samples.items()}


def verify_cost(model, ks: list[int], context: int, device, repeats: int) -> list[dict]:
    """c(k) = time of one forward over k + 1 tokens at `context` cached tokens / time over 1."""
    import torch

    dev = model.tok_embeddings.weight.device
    ids = torch.randint(0, model.config.vocab_size, (1, context + max(ks) + 1),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    model(ids[:, :context], torch.arange(context, device=dev))                   # fill the cache
    pos = {k: torch.arange(context, context + k + 1, device=dev) for k in {0, *ks}}
    ms = interleaved_ms({k: (lambda k=k: model(ids[:, context:context + k + 1], pos[k]))
                         for k in sorted({0, *ks})}, device, repeats)
    return [{"k": k, "ms": ms[k], "c": ms[k]["median"] / ms[0]["median"]} for k in ks]


def draft_cost(target, drafts: list, prompt: list[int], device, repeats: int) -> dict[str, Any]:
    """r: one draft token's cost over one target step, both at the prompt's context length,
    timed in interleaved rounds."""
    import torch

    dev = target.tok_embeddings.weight.device
    ids, pos = torch.tensor([prompt], device=dev), torch.arange(len(prompt), device=dev)
    tok, one = ids[:, -1:], pos[-1:] + 1
    fns = {"target": lambda: target(tok, one)}
    target(ids, pos)
    for d in drafts:
        if isinstance(d, sd.PromptLookupDraft):
            fns[d.name] = lambda d=d: d.propose(prompt, 1, 0.0, None)
        else:
            d.model(ids, pos, d.n_layers)
            fns[d.name] = lambda d=d: d.model(tok, one, d.n_layers)
    ms = interleaved_ms(fns, device, repeats)
    step = ms["target"]["median"]
    return {"target_step_ms": step, "ratio": {d.name: ms[d.name]["median"] / step for d in drafts}}


def expected_tokens(alpha: float, k: int) -> float:
    """Leviathan et al. (2023), eq. 1: E = (1 - alpha^(k+1)) / (1 - alpha) tokens per verify step."""
    return k + 1.0 if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def measure_small(settings: dict, device, dtype) -> tuple[dict, Any]:
    import torch

    hf, tokenizer = sd.load(settings["model"], device, dtype)
    target = sd.model_from_hf(hf)
    drafts = sd.build_drafts(target, settings["drafts"], None)
    models = [target] + [d.model for d in drafts if isinstance(d, sd.ModelDraft) and not d.shares_cache]
    loads = workloads(tokenizer, settings["prompts_per_workload"])
    longest = max(len(p) for ps in loads.values() for p in ps)
    for m in models:  # + headroom: graphs are captured at the last slots
        m.setup_caches(longest + settings["new_tokens"] + max(settings["ks"]) + 2 + MAX_GRAPH_TOKENS)
        if settings["graphs"]:
            use_graphs(m)
    new = settings["new_tokens"]
    sd.speculative_generate(target, drafts[0], loads["grounded"][0], 4, 2)      # warm-up
    for prompt in (p for ps in loads.values() for p in ps):   # each prompt's prefill shape once:
        sd.speculative_generate(target, None, prompt, 2, 0)   # a GPU library plans it on first use
    cost = draft_cost(target, drafts, loads["grounded"][0], device, settings["repeats"])
    ck = {r["k"]: r["c"] for r in verify_cost(target, settings["ks"], longest, device, settings["repeats"])}
    result = {"model": Path(settings["model"]).name, "draft_cost": cost, "verify_cost": ck,
              "workloads": {}, "grounded_prompts": loads["grounded"]}
    for name, prompts in loads.items():
        rows, plain_tps = [], []
        for d in drafts:
            for k in settings["ks"]:
                run = paired_runs(target, d, prompts, new, k, device)
                tps = [len(t) / s for t, s in zip(run["tokens"], run["seconds"])]
                plain_tps += [len(t) / s for t, s in zip(run["plain_tokens"], run["plain_seconds"])]
                alpha = run["accepted"] / max(run["drafted"], 1)
                speedup = sum(run["plain_seconds"]) / sum(run["seconds"])   # same token counts
                rows.append({
                    "draft": d.name, "k": k, "alpha": alpha,
                    "tokens_per_step": (sum(map(len, run["tokens"])) - len(prompts)) / run["verify_steps"],
                    "expected_tokens_per_step": expected_tokens(alpha, k),
                    "tokens_per_s": common.spread(tps), "speedup": speedup,
                    "speedup_per_prompt": common.spread([p / s for p, s in
                                                         zip(run["plain_seconds"], run["seconds"])]),
                    "predicted_speedup": expected_tokens(alpha, k) / (ck[k] + k * cost["ratio"][d.name]),
                    "cost_model_speedup": ((sum(map(len, run["tokens"])) - len(prompts)) / run["verify_steps"])
                    / (ck[k] + k * cost["ratio"][d.name]),
                    "same_tokens_as_plain": sum(same_prefix(a, b) for a, b in
                                                zip(run["tokens"], run["plain_tokens"])),
                    "tokens": sum(map(len, run["tokens"]))})
                log(f"{name}: {d.name:<26} k={k}: alpha {alpha:.2f}, {rows[-1]['tokens_per_step']:.2f} "
                    f"tokens/step, {statistics.median(tps):.1f} tokens/s, {speedup:.2f}x")
        result["workloads"][name] = {
            "prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts], "new_tokens": new,
            "plain_tokens_per_s": common.spread(plain_tps), "rows": rows}
    if settings["graphs"]:
        result["graph_capture_failures"] = sum(len(m.forward.failures) for m in models)
    del hf, target, drafts, models
    gc.collect()                       # the graphs hold the models in a cycle
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result, tokenizer


def measure_8b(settings: dict, small: dict, device, dtype) -> dict:
    """c(k) for the Llama-3-8B shape (random weights, graphs) and the predicted prompt-lookup speedup."""
    import torch

    config = common.llama3_8b_config(**settings.get("shape_8b", {}))
    torch.manual_seed(0)
    with torch.device(device):
        model = sd.Transformer(config).to(dtype).eval()
    ks = settings["ks_8b"]
    model.setup_caches(settings["context_8b"] + max(ks) + 1 + MAX_GRAPH_TOKENS)
    use_graphs(model)
    with torch.no_grad():
        rows = verify_cost(model, ks, settings["context_8b"], device, settings["repeats"])
        step = next(r["ms"]["median"] for r in rows if r["k"] == 0)   # ks_8b starts at 0
        context = list(range(settings["context_8b"]))          # the host-side lookup, at this length
        lookup_ms = step_ms(lambda: sd.PromptLookupDraft().propose(context, 8, 0.0, None), device, 20)
    ck = {r["k"]: r["c"] for r in rows}
    grounded = [r for r in small["workloads"]["grounded"]["rows"] if r["draft"] == "prompt lookup"]
    r_lookup = lookup_ms / step
    predicted = [{"k": r["k"], "alpha": r["alpha"], "expected_tokens_per_step": expected_tokens(r["alpha"], r["k"]),
                  "tokens_per_step": r["tokens_per_step"], "c": ck[r["k"]],
                  "predicted_speedup": expected_tokens(r["alpha"], r["k"]) / (ck[r["k"]] + r["k"] * r_lookup),
                  "predicted_speedup_measured_tokens": r["tokens_per_step"] / (ck[r["k"]] + r["k"] * r_lookup)}
                 for r in grounded if r["k"] in ck]
    del model
    gc.collect()                       # the graphs hold the model in a cycle
    torch.cuda.empty_cache()
    return {"shape": "Llama-3-8B" if "shape_8b" not in settings else "quick shape",
            "context": settings["context_8b"], "step_ms": step, "verify_cost": rows,
            "lookup_ms": lookup_ms, "lookup_ratio": r_lookup, "predicted": predicted}


def measure_vllm(settings: dict, prompts: list[list[int]]) -> dict:
    """vLLM on the same grounded prompts, one request at a time (batch 1), greedy: plain, then
    speculative_config ngram with k = 4. Any failure is recorded, not raised: it is an extra."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except Exception as error:  # noqa: BLE001  (not installed, or built for another torch)
        return {"error": f"vllm cannot be imported: {type(error).__name__}: {str(error)[:200]}"}
    params = SamplingParams(max_tokens=settings["new_tokens"], temperature=0, ignore_eos=True)
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    out: dict[str, Any] = {"k": 4, "runs": {}}
    spec = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    for name, extra in (("plain", {}), ("ngram", {"speculative_config": spec})):
        try:
            llm = LLM(model=settings["model"], dtype=settings["dtype"], seed=0, max_model_len=2048,
                      gpu_memory_utilization=0.4, disable_log_stats=False,
                      enforce_eager=True, **extra)     # no compile / graph capture: a short start
            llm.generate(requests[:1], params)                                   # warm-up
            start, tokens = time.perf_counter(), []
            for r in requests:
                tokens.append(list(llm.generate([r], params, use_tqdm=False)[0].outputs[0].token_ids))
            seconds = time.perf_counter() - start
            counters = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}
            out["runs"][name] = {"seconds": seconds, "tokens_per_s": sum(map(len, tokens)) / seconds,
                                 "tokens": tokens,
                                 "drafted": counters.get("vllm:spec_decode_num_draft_tokens"),
                                 "accepted": counters.get("vllm:spec_decode_num_accepted_tokens")}
            del llm
            gc.collect()
        except Exception as error:  # noqa: BLE001  (an optional comparison; the error is recorded)
            out["runs"][name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    runs = out["runs"]
    if all("seconds" in r for r in runs.values()):
        out["speedup"] = runs["plain"]["seconds"] / runs["ngram"]["seconds"]
        out["same_tokens"] = sum(same_prefix(a, b) for a, b in zip(runs["plain"]["tokens"], runs["ngram"]["tokens"]))
        drafted, accepted = runs["ngram"]["drafted"], runs["ngram"]["accepted"]
        out["alpha"] = accepted / drafted if drafted and accepted is not None else None
    return out


# ---------------------------------------------------------------------------------------------
# Tables and plot
# ---------------------------------------------------------------------------------------------
WORDS = {
    "zh": {"grounded": "有依据的任务（改写语料中的一段文字）", "free": "自由生成（开放问题）",
           "head": ["草稿", "k", "接受率 α", "每步词元", "公式 E", "词元/秒（各次运行中位数，四分位）", "加速",
                    "预测：E / (c + k r)", "成本模型：每步词元 / (c + k r)", "与普通解码相同的词元"],
           "plain": "普通解码", "cost": ["草稿", "草稿每词元成本 / 目标一步 r"],
           "ck": ["k", "c(k)：k + 1 个词元的前向 / 1 个词元"],
           "ck8": ["k", "k + 1 个词元的前向 ms（四分位）", "c(k)"],
           "pred": ["k", "α（小模型实测）", "E", "c(k)（8B）", "预测加速（E）", "预测加速（实测每步词元）"],
           "note": "加速 = 普通解码（同一循环，k = 0，在每个提示上紧接其前运行）的秒数 / 投机解码生成同样多词元的秒数；"
                   "预测加速 = E / (c(k) + k r)，E = (1 − α^(k+1)) / (1 − α)（Leviathan 等，2023）；"
                   "成本模型用实测的每步词元代替 E。",
           "caption": "{model}（{dtype}，批大小 1，贪心），{hw}；每个工作负载 {n} 个提示，每个生成 {new} 个词元{graphs}。"
                      "目标一步 {step:.2f} ms。命令：`{cmd}`",
           "graphs": "；草稿与验证步骤以 CUDA graph 重放",
           "vllm": "vLLM（`enforce_eager=True`），同样的有依据提示词，逐个请求（批大小 1），贪心，"
                   "`speculative_config` 为 ngram：",
           "vllm_head": ["vLLM", "接受率 α", "词元/秒", "加速", "与普通解码相同的词元"],
           "c8": "Llama-3-8B 形状（随机 bf16 权重，CUDA graph），缓存中已有 {ctx} 个词元；一步 {step:.2f} ms；"
                 "提示查找在主机上每次提议 {lk:.3f} ms（r = {r:.3f}）。"},
    "en": {"grounded": "Input-grounded task (rewrite a passage of the corpus)", "free": "Free generation (open questions)",
           "head": ["draft", "k", "acceptance α", "tokens/step", "formula E", "tokens/s (median, IQR over runs)",
                    "speedup", "predicted: E / (c + k r)", "cost model: tokens/step / (c + k r)",
                    "tokens equal to plain decode"],
           "plain": "plain decode", "cost": ["draft", "draft cost per token / target step r"],
           "ck": ["k", "c(k): forward over k + 1 tokens / 1 token"],
           "ck8": ["k", "forward over k + 1 tokens, ms (IQR)", "c(k)"],
           "pred": ["k", "α (measured, small model)", "E", "c(k) (8B)", "predicted speedup (E)",
                    "predicted speedup (measured tokens/step)"],
           "note": "Speedup = seconds of plain decode (the same loop with k = 0, run just before on each prompt) "
                   "over seconds of speculative decoding for the same number of tokens; predicted "
                   "speedup = E / (c(k) + k r) with E = (1 − α^(k+1)) / (1 − α) (Leviathan et al., 2023); the cost "
                   "model puts the measured tokens per step in place of E.",
           "caption": "{model} ({dtype}, batch 1, greedy) on {hw}; {n} prompts per workload, {new} new tokens "
                      "each{graphs}. One target step {step:.2f} ms. Command: `{cmd}`",
           "graphs": "; draft and verify steps replay CUDA graphs",
           "vllm": "vLLM (`enforce_eager=True`) on the same grounded prompts, one request at a time "
                   "(batch 1), greedy, `speculative_config` ngram:",
           "vllm_head": ["vLLM", "acceptance α", "tokens/s", "speedup", "tokens equal to plain decode"],
           "c8": "Llama-3-8B shape (random bf16 weights, CUDA graphs), {ctx} tokens in the cache; one step "
                 "{step:.2f} ms; prompt lookup proposes in {lk:.3f} ms on the host (r = {r:.3f})."},
}


def draft_label(name: str, lang: str) -> str:
    """Draft names as the tables show them: the Chinese table translates them."""
    if lang == "en":
        return name
    zh = {"prompt lookup": "提示词查找", "int4 self-draft": "INT4 自草稿", "draft model": "草稿模型"}
    if name.startswith("early exit"):
        return f"提前退出（{name.split('(')[1].split()[0]} 层）"
    return zh.get(name, name)


def tps(spread: dict) -> str:
    return f"{spread['median']:.1f} ({spread['q1']:.1f}–{spread['q3']:.1f})"


def tables(result: dict) -> dict[str, str]:
    s, out = result["settings"], {}
    for lang, w in WORDS.items():
        n = max(v["prompts"] for v in result["workloads"].values())
        text = w["caption"].format(model=result["model"], dtype=s["dtype"], hw=result["hardware"], n=n,
                                   new=s["new_tokens"], graphs=w["graphs"] if s["graphs"] else "",
                                   step=result["draft_cost"]["target_step_ms"], cmd=result["command"]) + "\n\n"
        for name, wl in result["workloads"].items():
            text += f"**{w[name]}**\n\n"
            rows = [[w["plain"], 0, "–", "1.00", "–", tps(wl["plain_tokens_per_s"]), "1.00×", "–", "–", "–"]]
            total = wl["prompts"] * wl["new_tokens"]
            for r in wl["rows"]:
                rows.append([draft_label(r["draft"], lang), r["k"], f"{r['alpha']:.2f}", f"{r['tokens_per_step']:.2f}",
                             f"{r['expected_tokens_per_step']:.2f}",
                             tps(r["tokens_per_s"]),
                             f"{r['speedup']:.2f}×", f"{r['predicted_speedup']:.2f}×",
                             f"{r['cost_model_speedup']:.2f}×",
                             f"{r['same_tokens_as_plain']}/{total}"])
            text += common.markdown_table(w["head"], rows, "lrrrrrrrrr") + "\n"
        text += w["note"] + "\n\n"
        text += common.markdown_table(w["cost"], [[draft_label(d, lang), f"{v:.3f}"] for d, v in
                                                  result["draft_cost"]["ratio"].items()], "lr") + "\n"
        text += common.markdown_table(w["ck"], [[k, f"{c:.2f}"] for k, c in
                                                result["verify_cost"].items()], "rr")
        big = result.get("llama3_8b")
        if big:
            text += "\n" + w["c8"].format(ctx=big["context"], step=big["step_ms"], lk=big["lookup_ms"],
                                          r=big["lookup_ratio"]) + "\n\n"
            text += common.markdown_table(w["ck8"], [[r["k"], f"{r['ms']['median']:.2f} ({r['ms']['q1']:.2f}–"
                                                      f"{r['ms']['q3']:.2f})", f"{r['c']:.3f}"]
                                                     for r in big["verify_cost"]], "rrr") + "\n"
            text += common.markdown_table(w["pred"], [[r["k"], f"{r['alpha']:.2f}",
                                                       f"{r['expected_tokens_per_step']:.2f}", f"{r['c']:.3f}",
                                                       f"{r['predicted_speedup']:.2f}×",
                                                       f"{r['predicted_speedup_measured_tokens']:.2f}×"]
                                                      for r in big["predicted"]], "rrrrrr")
        engine = result.get("vllm")
        if engine and "speedup" in engine:
            runs, total = engine["runs"], sum(map(len, engine["runs"]["plain"]["tokens"]))
            text += "\n" + w["vllm"] + "\n\n" + common.markdown_table(w["vllm_head"], [
                ["plain", "–", f"{runs['plain']['tokens_per_s']:.1f}", "1.00×", "–"],
                ["ngram, k = 4", "–" if engine["alpha"] is None else f"{engine['alpha']:.2f}",
                 f"{runs['ngram']['tokens_per_s']:.1f}",
                 f"{engine['speedup']:.2f}×", f"{engine['same_tokens']}/{total}"]], "lrrrr")
        elif engine:
            text += "\n" + w["vllm"] + " " + "; ".join(f"{k}: {r.get('error', 'ran')}"
                                                        for k, r in engine.get("runs", {}).items())
            text += engine.get("error", "") + "\n"
        out[lang] = text
    return out


def plot(result: dict):
    def draw(path: Path) -> None:
        fig, ax = common.new_figure()
        rows = result["workloads"]["grounded"]["rows"]
        for name in dict.fromkeys(r["draft"] for r in rows):
            mine = [r for r in rows if r["draft"] == name]
            ax.plot([r["k"] for r in mine], [r["speedup"] for r in mine], "o-", label=f"{name}, measured")
            ax.plot([r["k"] for r in mine], [r["cost_model_speedup"] for r in mine], "x:", color="gray")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("k (tokens drafted per verify step)")
        ax.set_ylabel("tokens/s over plain decode")
        ax.set_title(f"Speculative decoding, grounded task, {result['model']} "
                     f"({'GPU' if result['settings']['device'] == 'cuda' else 'CPU'})", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=9, title="x: cost model, tokens/step / (c(k) + k r)", title_fontsize=9)
        common.save_figure(fig, path)
    return draw


def main(args) -> None:
    settings, folder, device, dtype = common.start(PRESETS, args, common.ACCEL / "results")
    started = time.perf_counter()
    try:
        small, _ = measure_small(settings, device, dtype)
        big = measure_8b(settings, small, device, dtype) if settings["ks_8b"] else None
        engine = measure_vllm(settings, small["grounded_prompts"]) if settings.get("vllm") else None
    except sd.Refusal as why:
        common.fail(str(why))
    result = {**common.results_header(settings, args, device), **small}
    if big:
        result["llama3_8b"] = big
    if engine:
        result["vllm"] = engine
    result["seconds"] = time.perf_counter() - started
    written = common.write_results(folder, f"{STEM}-{args.preset}", result, tables(result), {"": plot(result)})
    log(f"wrote {', '.join(p.name for p in written)} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    common.run_main(main, common.bench_parser(__doc__, PRESETS))
