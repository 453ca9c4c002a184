"""GPU check of reward scoring: ArmoRM-shaped models in bf16, against the loop and against the arithmetic.

On the device machine (one call; 3-5 minutes expected on an H100/H200 with start-up, not yet
measured; it starts no variant after 400 s, and no variant should take 30 s):

    run(command="PYTHONUNBUFFERED=1 python3 bench/gpu_score_check.py", timeout_s=540)

Elsewhere:

    .venv/bin/python bench/gpu_score_check.py --size tiny      # any CPU, in seconds (the suite runs it)
    python3 bench/gpu_score_check.py --size 1b                  # on a GPU: one size only

Self-contained and offline: each model is built in memory from a config with random weights in
ArmoRM-Llama3-8B-v0.1's layout (`fusechat.scoring.armorm.ArmoRM`: Llama backbone, regression
layer, gating MLP, transform matrix), at about 1B parameters (Llama-3.2-1B's shape) and at the
published 8B shape (Llama-3-8B), with the local Llama-3-style tokenizer of `fusechat.testing.tiny`.
Conversations are chat-shaped as in the recipe: 20 replies per prompt, replies of 100-1,500
tokens, prompts about 30% of the tokens. Per size, in bf16 and one process:

    loop        the ancestor scripts' pattern: tokenize one conversation, one forward pass, read
                the score (`bench_reward.loop_scores`); timed on a sample, per token
    unshared    `RewardScorer(share_prompts=False)`: packed batches, each conversation whole
    shared      `RewardScorer()`: each prompt's tokens computed once for its replies
    shared, ... the same at other token budgets and attention kernels

Figures: tokens/s counts conversation tokens (the work asked for, the same for every variant, so
"x loop" compares time per token); MFU = 2 x matrix parameters (the decoder layers' weights:
embeddings are a lookup, the heads read one row per reply) x tokens actually computed / time /
the bf16 matrix rate measured here with an 8192^3 product (attention's own arithmetic, a few
percent at these lengths, is left out, so MFU is slightly understated); peak memory; the largest
score difference against the same weights in fp32 (one pass per conversation) on the loop's
sample. Prints one table last; writes $OUT/gpu_score_check.json when OUT is set. Imports only
torch, transformers, tokenizers, safetensors and fusechat (no vLLM, TRL, datasets or pyarrow).
Exit status 1 if a variant failed; variants that would start after --budget-s are skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_reward import WORDS, loop_scores  # noqa: E402

REPLIES_PER_PROMPT = 20
# Llama-3.2-1B and Llama-3-8B (ArmoRM's backbone) shapes; vocabulary of ArmoRM (Llama-3 + [PAD]):
# the tokenizer here uses its first ~1,000 ids. prompts: how many; replies: tokens, uniform;
# prompt tokens are drawn so that prompts, with the template's ~70 tokens, are ~30% of a conversation.
SIZES = {
    "tiny": dict(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, gating=64, vocab=None,
                 prompts=3, replies=(10, 150), prompt=(5, 30), sample=12, budgets=(None, 1024)),
    "1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, gating=1024, vocab=128257,
               prompts=48, replies=(100, 1500), prompt=(90, 460), sample=40, budgets=(None, 16384, 65536)),
    "8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, gating=1024, vocab=128257,
               prompts=16, replies=(100, 1500), prompt=(90, 460), sample=24, budgets=(None, 16384, 65536)),
}


def build_model(size: dict, tok, device, seed: int = 0):
    """ArmoRM with random weights, in fp32 on `device` (ArmoRM's published config fields)."""
    import torch
    from transformers import LlamaConfig

    from fusechat.scoring.armorm import ArmoRM
    from fusechat.testing.tiny_armorm import NUM_OBJECTIVES

    config = LlamaConfig(
        vocab_size=size["vocab"] or len(tok), hidden_size=size["hidden"], intermediate_size=size["intermediate"],
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"], num_key_value_heads=size["kv_heads"],
        max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=tok.bos_token_id, eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"),
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    config.architectures = ["LlamaForRewardModelWithGating"]
    config.num_objectives, config.gating_temperature = NUM_OBJECTIVES, 10
    config.gating_hidden_dim, config.gating_n_hidden = size["gating"], 3
    torch.manual_seed(seed)
    with torch.device(device):
        model = ArmoRM(config)
    with torch.no_grad():
        h, n = size["hidden"], NUM_OBJECTIVES
        model.regression_layer.weight.normal_(0, h**-0.5)
        model.reward_transform_matrix.copy_(torch.eye(n) + 0.05 * torch.randn(n, n))
        for layer in model.gating.layers:
            layer.weight.normal_(0, layer.in_features**-0.5)
            layer.bias.normal_(0, 0.1)
        model.gating.logit_scale.fill_(1.7)
    return model.eval()


def matrix_parameters(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters() if p.dim() == 2)


def conversations(tok, size: dict, seed: int = 0) -> list[list[dict]]:
    """size["prompts"] prompts x 20 replies, lengths in tokens drawn uniformly from the size's ranges."""
    rng = random.Random(seed)
    sample = " ".join(rng.choice(WORDS) for _ in range(1000))
    per_word = len(tok(sample, add_special_tokens=False)["input_ids"]) / 1000

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, round(rng.randint(lo, hi) / per_word))))

    convs = []
    for _ in range(size["prompts"]):
        prompt = {"role": "user", "content": text(*size["prompt"])}
        convs += [[prompt, {"role": "assistant", "content": text(*size["replies"])}] for _ in range(REPLIES_PER_PROMPT)]
    return convs


def matmul_rate(device, dtype, n: int, reps: int = 20) -> float:
    """FLOP/s of an n x n x n product on random data, median of `reps` after warm-up."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for i in range(reps + 3):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float:
    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS


def run_size(name: str, a, device, peak: float, tokdir: Path, tok, started: float) -> tuple[dict, list[dict]]:
    import torch

    from fusechat.scoring.armorm import find_gating_position, to_dtype
    from fusechat.scoring.reward import RewardScorer

    size = SIZES[name]
    t0 = time.perf_counter()
    _peak_reset(device)
    model = build_model(size, tok, device)
    n_matrix = matrix_parameters(model)
    convs = conversations(tok, size)
    sample = convs[: size["sample"]]
    computed: list[int] = []  # tokens each backbone pass computes (input ids incl. any padding)
    model.model.register_forward_pre_hook(
        lambda m, args, kw: computed.append(kw["input_ids"].numel()), with_kwargs=True)

    reference = loop_scores(model, tok, sample, device)  # fp32, one pass per conversation
    model = to_dtype(model, getattr(torch, a.dtype))
    gc.collect()
    info = {"size": name, "params": sum(p.numel() for p in model.parameters()), "matrix_params": n_matrix,
            "layers": size["layers"], "hidden": size["hidden"], "build_s": round(time.perf_counter() - t0, 1),
            "conversations": len(convs), "sample": len(sample),
            "fp32_score_std": statistics.pstdev(reference)}

    probe = RewardScorer(str(tokdir), device=device, model=model)
    encoded = probe.encode_many(convs)
    lengths = [len(ids) for ids in encoded]
    cut = [find_gating_position(ids, probe.pattern) + len(probe.pattern) for ids in encoded]
    info.update(tokens=sum(lengths), prompt_share=round(sum(cut) / sum(lengths), 3),
                reply_tokens=(min(n - c for n, c in zip(lengths, cut)), max(n - c for n, c in zip(lengths, cut))),
                attention_auto=probe.attention)
    print(f"[{name}] {info['params'] / 1e9:.2f}B parameters ({n_matrix / 1e9:.2f}B in matrices), "
          f"{len(convs)} conversations, {info['tokens']} tokens, prompts {info['prompt_share']:.0%}, "
          f"replies {info['reply_tokens'][0]}-{info['reply_tokens'][1]} tokens, attention {probe.attention}, "
          f"built in {info['build_s']} s", flush=True)

    variants = [("loop", None, True, None)]
    variants += [("unshared", None, False, None), ("shared", None, True, None)]
    variants += [(f"shared, {b} tokens", b, True, None) for b in size["budgets"] if b]
    other = "sdpa" if probe.attention == "varlen" else "varlen"
    variants.append((f"shared, {other}", None, True, other))
    rows: list[dict] = []
    scores: dict[str, list[float]] = {}
    for variant, budget, share, attention in variants:
        if time.perf_counter() - started > a.budget_s:
            rows.append({"size": name, "variant": variant, "error": f"skipped: past the {a.budget_s:.0f} s budget"})
            continue
        try:
            if variant == "loop":
                work = sample

                def run():
                    return loop_scores(model, tok, sample, device)
            else:
                try:
                    scorer = RewardScorer(str(tokdir), device=device, model=model, batch_tokens=budget,
                                          share_prompts=share, attention=attention or "auto")
                except ValueError as e:  # a kernel this machine does not have
                    rows.append({"size": name, "variant": variant, "error": f"not available here: {e}"[:300]})
                    continue
                work = convs

                def run():
                    return [o.score for o in scorer.score(convs)]
            run_small = loop_scores(model, tok, sample[:2], device) if variant == "loop" else \
                scorer.score(convs[:REPLIES_PER_PROMPT])  # warm-up: allocator, kernels, handles
            del run_small
            _peak_reset(device)
            best = float("inf")
            # the three compared variants get every round; budget and kernel alternatives one
            for _ in range(a.rounds if variant in ("loop", "unshared", "shared") else 1):
                computed.clear()
                _sync(device)
                t = time.perf_counter()
                got = run()
                _sync(device)
                best = min(best, time.perf_counter() - t)
            tokens = sum(lengths[: len(work)])
            ran = sum(computed)
            scores[variant] = got
            row = {
                "size": name, "variant": variant,
                "batch_tokens": None if variant == "loop" else scorer.batch_tokens,
                "attention": "sdpa" if variant == "loop" else scorer.attention,
                "conversations": len(work), "tokens": tokens, "computed_tokens": ran, "seconds": round(best, 3),
                "tokens_per_s": round(tokens / best, 1),
                "mfu": round(2 * n_matrix * ran / best / peak, 4),
                "peak_gib": round(_peak_gib(device), 2),
                "max_diff_fp32": max(abs(x - y) for x, y in zip(got[: len(sample)], reference)),
            }
        except Exception as e:  # noqa: BLE001 - report every variant, whatever breaks
            traceback.print_exc()
            row = {"size": name, "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    loop = next((r for r in rows if r["variant"] == "loop" and "error" not in r), None)
    for r in rows:
        if loop and "error" not in r:
            r["x_loop"] = round(r["tokens_per_s"] / loop["tokens_per_s"], 2)
    if "shared" in scores and "unshared" in scores:
        info["max_diff_shared_unshared"] = max(abs(x - y) for x, y in zip(scores["shared"], scores["unshared"]))
    del model, probe
    gc.collect()
    _peak_reset(device)
    return info, rows


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default=None, help="comma-separated of tiny, 1b, 8b (default: 1b,8b on CUDA, tiny else)")
    ap.add_argument("--rounds", type=int, default=None, help="timed rounds per variant, best kept (default 2; tiny 1)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--budget-s", type=float, default=400, help="start no variant after this many seconds")
    a = ap.parse_args()
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    names = (a.size or ("1b,8b" if cuda else "tiny")).split(",")
    if not cuda and names != ["tiny"]:
        print("no CUDA device: use --size tiny on CPU", file=sys.stderr)
        return 2
    a.rounds = a.rounds or (1 if names == ["tiny"] else 2)
    if cuda:  # the fp32 reference in true fp32, not TF32
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    import transformers

    dtype = getattr(torch, a.dtype)
    peak = matmul_rate(device, dtype, 8192 if cuda else 512)
    env = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "dtype": a.dtype, "rounds": a.rounds,
           "matmul_tflops": round(peak / 1e12, 1), "date": time.strftime("%Y-%m-%d", time.gmtime())}
    print(f"gpu_score_check: {json.dumps(env)}", flush=True)

    from fusechat.testing.tiny import build_tokenizer

    infos, rows = [], []
    with tempfile.TemporaryDirectory(prefix="gpu-score-check-") as tmp:
        tok = build_tokenizer("llama3")
        tok.add_special_tokens({"pad_token": "[PAD]"})  # ArmoRM's vocabulary ends in one [PAD]
        tok.save_pretrained(tmp)
        for name in names:
            if time.perf_counter() - started > a.budget_s:
                rows.append({"size": name, "variant": "all", "error": f"skipped: past the {a.budget_s:.0f} s budget"})
                continue
            try:
                info, size_rows = run_size(name, a, device, peak, Path(tmp), tok, started)
                infos.append(info)
                rows += size_rows
            except Exception as e:  # noqa: BLE001 - a size that fails (memory) leaves the others
                traceback.print_exc()
                rows.append({"size": name, "variant": "all", "error": f"{type(e).__name__}: {e}"[:300]})
    env["seconds"] = round(time.perf_counter() - started, 1)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_score_check.json").write_text(json.dumps({"env": env, "sizes": infos, "results": rows}, indent=2))
        print(f"wrote {Path(out) / 'gpu_score_check.json'}")
    _print_table(env, infos, rows, cuda)
    return 1 if any("error" in r and not r["error"].startswith("not available here") for r in rows) else 0


def _print_table(env: dict, infos: list[dict], rows: list[dict], cuda: bool) -> None:
    mem = "peak GPU GiB" if cuda else "peak RSS GiB"
    cols = ("size", "variant", "batch tokens", "attention", "conv.", "tokens", "computed", "s", "tokens/s",
            "x loop", "MFU", mem, "max |d| vs fp32")
    lines = [f"## reward scoring check: {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
             f"{env['dtype']}, matrix rate {env['matmul_tflops']} TFLOP/s measured, {env['date']}, {env['seconds']} s"]
    for i in infos:
        lines.append(f"- {i['size']}: {i['params'] / 1e9:.2f}B params ({i['matrix_params'] / 1e9:.2f}B in matrices), "
                     f"{i['conversations']} conversations, {i['tokens']} tokens, prompts {i['prompt_share']:.0%}, "
                     f"fp32 score std {i['fp32_score_std']:.3g}, shared vs unshared max |d| "
                     f"{i.get('max_diff_shared_unshared', float('nan')):.2g}")
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            state = "not run" if r["error"].startswith(("not available", "skipped")) else "FAILED"
            lines.append(f"| {r['size']} | {r['variant']} | {state}: {r['error']} |")
            continue
        lines.append(
            f"| {r['size']} | {r['variant']} | {r['batch_tokens'] or '-'} | {r['attention']} | {r['conversations']} | "
            f"{r['tokens']} | {r['computed_tokens']} | {r['seconds']} | {r['tokens_per_s']:.0f} | "
            f"{r.get('x_loop', float('nan')):.2f} | {r['mfu']:.1%} | {r['peak_gib']} | {r['max_diff_fp32']:.2g} |")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
