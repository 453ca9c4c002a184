"""GPU check of the training stages: SFT and DPO steps in bf16, as real tokens/s and MFU.

    python bench/gpu_train_check.py                    # CUDA: 0.47B, then 1.5B Qwen2-shaped, 2048 tokens
    python bench/gpu_train_check.py --size tiny        # any machine (CPU too): a 0.4M model, in seconds

On the lent H200 (Python 3.12, torch 2.11, transformers 5.17, peft; no TRL, datasets or pydantic),
from the repository root here:

    bash bench/gpu_wheels.sh          # once: the small wheels into .whl/ (ignored), ~5 MB

then one `run` call with carry [".whl"], timeout_s 560, and the command

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; nvidia-smi -L; python3 -m pip show torch transformers peft accelerate pyarrow fsspec | grep -E '^(Name|Version)'; PYTHONUNBUFFERED=1 python3 bench/gpu_train_check.py 2>&1 | tee $OUT/log.txt

The whole run, start-up included, is sized for about 7 minutes there (`--budget-s` stops starting
variants after 360 s; the 1.5B model is built only with 150 s left).

Self-contained and offline: the model is built from a config with random weights and the local
byte-level Qwen2-style tokenizer (`fusechat.testing.tiny`), the data from
`fusechat.testing.train_data`. It runs the same `build_trainer` functions `fusechat sft` and
`fusechat dpo` use, with the device settings and attention kernel they pick (bf16, gradient
checkpointing, `fusechat.train.attention.choose()`), for `--steps` optimizer steps per variant:

    sft packed              packing (bfd, padding-free), assistant-only loss, the chosen kernel
    sft packed sdpa         the same with SDPA (dense block-diagonal mask): what the kernel buys
    sft padded              the same data in padded batches
    sft packed lora         LoRA r=16 on all linear layers, packed
    dpo                     reference model run in every step
    dpo precomputed ref     reference log-probabilities computed once before training

Timing: the first `--warmup` steps (kernel compilation, allocator growth) are left out; tokens/s
and MFU are over the remaining steps, each ended by a device synchronisation. Real tokens are
TRL's count (packed lengths, attention-mask sums), never padding.

MFU = model FLOPs per second / the matrix rate this run measures itself (an 8192^3 bf16 matmul on
CUDA; float32 1024^3 on CPU, where the figure only checks the arithmetic). Model FLOPs per real
token count the linear layers (embeddings are lookups): forward 2 x N, backward 2 x N for the
activation gradients plus 2 x N_trainable for the weight gradients (6 x N for full training,
about 4 x N with LoRA), plus 2 x N for the reference forward of DPO without precomputed
log-probabilities. Attention's own FLOPs and gradient-checkpointing recomputation are not counted
(the usual convention), so MFU understates the work the GPU does.

Prints one table last; the results also go to `$OUT/gpu_train_check.json` when `OUT` is set. A
variant that fails is reported and the others still run (exit status 1).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fusechat.recipe import load_recipe  # noqa: E402
from fusechat.testing.tiny import build_tiny_lm  # noqa: E402
from fusechat.testing.train_data import sft_rows, write_recipe, write_split  # noqa: E402

# Qwen2-shaped (build_tiny_lm: MLP width 2 x hidden); the tiny tokenizer's 1,000-token vocabulary
# leaves nearly all parameters in the transformer blocks: 0.5b: 24 x (attention 5.1M + MLP 14.2M)
# = 0.46B; 1.5b: 28 x (attention 15.7M + MLP 39.3M) = 1.54B.
SIZES = {
    "0.5b": {"hidden_size": 1536, "num_layers": 24, "num_heads": 24, "num_kv_heads": 2, "max_length": 2048},
    "1.5b": {"hidden_size": 2560, "num_layers": 28, "num_heads": 20, "num_kv_heads": 4, "max_length": 2048},
    "tiny": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "max_length": 256},
}
# stage, SFT packing, DPO precompute, LoRA, forced kernel (None: the stage's own choice)
VARIANTS = {
    "sft packed": ("sft", True, None, False, None),
    "sft packed sdpa": ("sft", True, None, False, "sdpa"),
    "sft padded": ("sft", False, None, False, None),
    "sft packed lora": ("sft", True, None, True, None),
    "dpo": ("dpo", None, False, False, None),
    "dpo precomputed ref": ("dpo", None, True, False, None),
    "dpo precomputed ref sdpa": ("dpo", None, True, False, "sdpa"),
}
# most telling first: a budget cut drops the least needed
DEFAULT_VARIANTS = {
    "0.5b": ["sft packed", "sft padded", "dpo precomputed ref", "dpo", "sft packed sdpa", "sft packed lora"],
    "1.5b": ["sft packed", "dpo precomputed ref"],
    "tiny": ["sft packed", "sft padded", "sft packed lora", "dpo", "dpo precomputed ref"],
}
LARGE_START_S = 150  # a 1.5B variant starts only with this much of the budget left


def matmul_rate(cuda: bool) -> dict:
    """The dense matrix rate of this device, measured now: FLOP/s of a large matmul on random data."""
    import torch

    n, dtype, reps = (8192, torch.bfloat16, 10) if cuda else (1024, torch.float32, 5)
    dev = "cuda" if cuda else "cpu"
    a, b = (torch.randn(n, n, device=dev, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        seconds = time.perf_counter() - t0
    del a, b
    return {"matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch."), "flops": 2 * n**3 * reps / seconds}


def linear_params(model) -> tuple[int, int]:
    """(all, trainable) weights of the model's linear layers, LoRA adapters included."""
    import torch

    total = trainable = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel()
            trainable += m.weight.numel() if m.weight.requires_grad else 0
    return total, trainable


def _timer(trainer, cuda: bool):
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Time and TRL's real-token count at the end of every optimizer step."""

        marks: list[tuple[float, int]] = []

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.marks.append((time.perf_counter(), int(trainer._total_train_tokens)))

    cb = StepTimer()
    cb.marks = []
    trainer.add_callback(cb)
    return cb


def _peak_memory_gib(cuda: bool) -> float:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB -> GiB)


def run_variant(name: str, recipes: dict, out: Path, steps: int, warmup: int, cuda: bool, peak: float) -> dict:
    import torch

    stage, packing, precompute, lora, kernel = VARIANTS[name]
    recipe = recipes["lora" if lora else "full"]
    if stage == "sft":
        from fusechat.train.sft import build_trainer

        overrides = {"packing": packing}
    else:
        from fusechat.train.dpo import build_trainer

        overrides = {"precompute_ref_log_probs": precompute, "eval_strategy": "no"}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer, _, _ = build_trainer(
        recipe, out, attn_implementation=kernel, max_steps=steps, save_strategy="no",
        output_dir=str(out / name.replace(" ", "-")), disable_tqdm=True, **overrides,
    )
    setup = time.perf_counter() - t0
    timer = _timer(trainer, cuda)
    model = trainer.accelerator.unwrap_model(trainer.model)
    n_all, n_train = linear_params(model)
    per_token = 4 * n_all + 2 * n_train  # forward + activation gradients + weight gradients
    if stage == "dpo" and not precompute:
        per_token += 2 * n_all  # the reference model's forward (same linear layers, no adapters)
    t1 = time.perf_counter()
    result = trainer.train()
    wall = time.perf_counter() - t1
    marks = timer.marks
    if len(marks) <= warmup:
        raise RuntimeError(f"only {len(marks)} steps ran; need more than --warmup {warmup}")
    (ta, ka), (tb, kb) = marks[warmup - 1] if warmup else (t1, 0), marks[-1]
    tokens, seconds = kb - ka, tb - ta
    tflops = per_token * tokens / seconds / 1e12
    row = {
        "variant": name, "attn_implementation": model.config._attn_implementation,
        "steps": trainer.state.global_step, "timed_steps": len(marks) - warmup, "tokens": tokens,
        "all_tokens": int(trainer._total_train_tokens), "setup_s": round(setup, 2), "train_s": round(wall, 2),
        "warmup_s": round(ta - t1, 2), "timed_s": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
        "linear_params": n_all, "trainable_linear_params": n_train, "flops_per_token": per_token,
        "model_tflops": float(f"{tflops:.4g}"), "mfu": round(tflops * 1e12 / peak, 4),
        "peak_mem_gib": round(_peak_memory_gib(cuda), 2), "train_loss": round(result.training_loss, 4),
        "bf16": trainer.args.bf16, "gradient_checkpointing": trainer.args.gradient_checkpointing,
    }
    del trainer, model
    gc.collect()
    return row


def _dpo_rows(n: int, words: tuple[int, int]) -> list[dict]:
    """Preference pairs as long as the SFT answers (the shipped tiny pairs are a few tokens)."""
    rows = sft_rows(2 * n, seed=7, multi_turn_every=0, answer_words=words)
    pairs = []
    for i in range(n):
        a, b = rows[2 * i]["messages"], rows[2 * i + 1]["messages"]
        pairs.append({
            "prompt": [a[0]], "chosen": [a[1]], "rejected": [b[1]], "prompt_id": f"p{i}", "dataset": "bench",
            "domain": "instruction", "source_model": "bench", "chosen_score": 0.9, "rejected_score": 0.1,
            "margin": 0.8,
        })
    return pairs


def prepare(size_name: str, tmp: Path, steps: int, batch: int) -> tuple[dict, dict]:
    from transformers import AutoConfig

    size = SIZES[size_name]
    t0 = time.perf_counter()
    shape = {k: v for k, v in size.items() if k != "max_length"}
    model = build_tiny_lm("qwen2", tmp / f"model-{size_name}", **shape)
    cfg = AutoConfig.from_pretrained(model)
    info = {"size": size_name, "model_type": cfg.model_type, "max_length": size["max_length"],
            "build_s": round(time.perf_counter() - t0, 1), **shape}
    run = tmp / f"run-{size_name}"
    train = {
        "learning_rate": 1e-5, "global_batch_size": batch, "per_device_batch_size": batch,
        "max_length": size["max_length"], "lr_scheduler": "cosine", "warmup_ratio": 0.1,
    }
    dpo = {**train, "keep_best_of_last": 1}
    recipes = {
        "full": load_recipe(write_recipe(tmp / f"recipe-{size_name}.yaml", model, "qwen2", run, sft=train, dpo=dpo)),
        "lora": load_recipe(write_recipe(
            tmp / f"recipe-{size_name}-lora.yaml", model, "qwen2", run, sft={**train, "lora": {"r": 16, "alpha": 32}},
            dpo={**dpo, "lora": {"r": 16, "alpha": 32}},
        )),
    }
    # answers of 1/40 to 1/2 of max_length (~3.7 tokens a word with this tokenizer), enough rows
    # for `steps` steps of packed sequences (several answers each) and of pairs
    words = (size["max_length"] // 150, size["max_length"] // 8)
    write_split(sft_rows(steps * batch * 8, multi_turn_every=0, answer_words=words),
                run / "datasets" / "sft" / "train.parquet")
    write_split(_dpo_rows(steps * batch * 2, (words[0], words[1] // 2)), run / "datasets" / "dpo" / "train.parquet")
    (run / "models" / recipes["full"].name).mkdir(parents=True)
    (run / "models" / recipes["full"].name / "sft").symlink_to(model)  # DPO starts from "the SFT model"
    return recipes, info


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="0.5b,1.5b", help=f"comma-separated, of {', '.join(SIZES)}")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (CUDA 14, tiny 4)")
    ap.add_argument("--warmup", type=int, default=None, help="first steps left out of the timing (CUDA 3, tiny 1)")
    ap.add_argument("--batch", type=int, default=None, help="sequences (SFT) or pairs (DPO) per step (CUDA 8, tiny 4)")
    ap.add_argument("--budget-s", type=float, default=360, help="start no variant after this many seconds")
    ap.add_argument("--variants", default=None, help="comma-separated, for every size; default: per size")
    a = ap.parse_args()
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    sizes = [s.strip() for s in a.size.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES] + [
        v for v in (a.variants or "").split(",") if v.strip() and v.strip() not in VARIANTS]
    if unknown:
        print(f"unknown size or variant: {', '.join(unknown)}; sizes {', '.join(SIZES)}; variants "
              f"{', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    if not cuda and sizes != ["tiny"]:
        print("no CUDA device: use --size tiny on CPU", file=sys.stderr)
        return 2
    small = sizes == ["tiny"]
    steps = a.steps or (4 if small else 14)
    warmup = a.warmup if a.warmup is not None else (1 if small else 3)
    batch = a.batch or (4 if small else 8)

    import transformers

    from fusechat.train import attention

    env = {
        "device": torch.cuda.get_device_name(0) if cuda else f"cpu ({os.cpu_count()} cores)",
        "date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "sizes": sizes, "steps": steps, "warmup": warmup,
        "batch": batch, "attention_choice": attention.choose(cuda),
    }
    for mod in ("trl", "peft", "datasets"):
        env[mod] = __import__(mod).__version__
    env.update(matmul_rate(cuda))
    print(f"gpu_train_check: {json.dumps(env)}", flush=True)

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu-train-check-") as tmp:
        tmp = Path(tmp)
        for size in sizes:
            names = [v.strip() for v in a.variants.split(",") if v.strip()] if a.variants else DEFAULT_VARIANTS[size]
            left = a.budget_s - (time.perf_counter() - started)
            if size == "1.5b" and left < LARGE_START_S:
                rows += [{"size": size, "variant": n, "error": f"skipped: {left:.0f} s of the budget left"} for n in names]
                continue
            try:
                recipes, info = prepare(size, tmp, steps, batch)
            except Exception as e:  # noqa: BLE001 - report every size, whatever breaks
                traceback.print_exc()
                rows += [{"size": size, "variant": n, "error": f"{type(e).__name__}: {e}"[:300]} for n in names]
                continue
            env.setdefault("models", []).append(info)
            print(f"model {size}: {json.dumps(info)}", flush=True)
            for name in names:
                if time.perf_counter() - started > a.budget_s:
                    rows.append({"size": size, "variant": name, "error": f"skipped: past the {a.budget_s:.0f} s budget"})
                    continue
                print(f"--- {size} {name}", flush=True)
                try:
                    row = run_variant(name, recipes, tmp / f"out-{size}", steps, warmup, cuda, env["flops"])
                    rows.append({"size": size, **row})
                except Exception as e:  # noqa: BLE001 - report every variant, whatever breaks
                    traceback.print_exc()
                    rows.append({"size": size, "variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
                print(json.dumps(rows[-1]), flush=True)

    env["wall_s"] = round(time.perf_counter() - started, 1)
    summary = goals(rows)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_train_check.json").write_text(
            json.dumps({"env": env, "results": rows, "goals": summary}, indent=2))
        print(f"wrote {Path(out) / 'gpu_train_check.json'}")
    _print_table(env, rows, summary, cuda)
    return 1 if any("error" in r and not r["error"].startswith("skipped") for r in rows) else 0


def goals(rows: list[dict]) -> list[dict]:
    """The targets for one Hopper GPU at 2048 tokens, for each size that has the figures."""
    out = []
    for size in dict.fromkeys(r["size"] for r in rows):
        got = {r["variant"]: r for r in rows if r["size"] == size and "error" not in r}
        checks = [
            ("packed / padded real tokens/s", "sft packed", "sft padded", 1.5),
            ("SFT packed MFU", "sft packed", None, 0.35),
            ("DPO precomputed ref MFU", "dpo precomputed ref", None, 0.30),
        ]
        for label, a, b, target in checks:
            if a not in got or (b and b not in got):
                continue
            value = got[a]["tokens_per_s"] / got[b]["tokens_per_s"] if b else got[a]["mfu"]
            out.append({"size": size, "goal": label, "value": round(value, 3), "target": target, "met": value >= target})
    return out


def _print_table(env: dict, rows: list[dict], summary: list[dict], cuda: bool) -> None:
    mem = "peak GPU GiB" if cuda else "peak RSS GiB"
    cols = ("size", "variant", "kernel", "timed steps", "real tokens", "s", "tokens/s", "TFLOP/s", "MFU", mem, "loss")
    lines = [
        f"## training check: {env['device']}, {env['date']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, trl {env['trl']}; batch {env['batch']}, {env['steps']} steps "
        f"({env['warmup']} warm-up untimed); matmul {env['matmul_n']}^3 {env['matmul_dtype']}: "
        f"{env['flops'] / 1e12:.3g} TFLOP/s; wall {env['wall_s']} s",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['size']} | {r['variant']} | FAILED: {r['error']} |")
        else:
            lines.append(
                f"| {r['size']} | {r['variant']} | {r['attn_implementation']} | {r['timed_steps']} | {r['tokens']} | "
                f"{r['timed_s']} | {r['tokens_per_s']:.0f} | {r['model_tflops']:.3g} | {100 * r['mfu']:.1f}% | "
                f"{r['peak_mem_gib']} | {r['train_loss']} |"
            )
    for g in summary:
        value = f"{g['value']:.2f}x" if "tokens/s" in g["goal"] else f"{100 * g['value']:.1f}%"
        target = f"{g['target']}x" if "tokens/s" in g["goal"] else f"{100 * g['target']:.0f}%"
        lines.append(f"goal {g['size']}: {g['goal']} {value} (target >= {target}): {'met' if g['met'] else 'NOT met'}")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
