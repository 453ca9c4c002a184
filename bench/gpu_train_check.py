"""GPU check of the training stages: a few SFT and DPO steps in bf16 on a ~0.5B-parameter model.

    python bench/gpu_train_check.py                    # CUDA: ~0.47B Qwen2-shaped model, 2048 tokens
    python bench/gpu_train_check.py --size tiny        # any machine (CPU too): a 0.4M model, in seconds

Self-contained and offline: the model is built from a config with random weights and the local
byte-level Qwen2-style tokenizer (`fusechat.testing.tiny`), the data from
`fusechat.testing.train_data`. It runs the same `build_trainer` functions `fusechat sft` and
`fusechat dpo` use, with the device settings they pick (bf16 and gradient checkpointing on CUDA),
for `--steps` optimizer steps per variant:

    sft packed              packing (bfd, padding-free), assistant-only loss
    sft padded              the same data in padded batches
    dpo                     reference model run in every step
    dpo precomputed ref     reference log-probabilities computed once before training

and prints one table: real (non-pad) tokens per second, seconds, peak GPU memory. Results also go
to `$OUT/gpu_train_check.json` when `OUT` is set. A variant that fails is reported and the others
still run (exit status 1); variants that would start after `--budget-s` are skipped.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
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
from fusechat.testing.train_data import dpo_rows, sft_rows, write_recipe, write_split  # noqa: E402

# Qwen2-shaped; the tiny tokenizer's 1,000-token vocabulary leaves nearly all parameters in the
# transformer blocks: 24 x (attention 5.1M + MLP 14.2M) = 0.46B.
SIZES = {
    "0.5b": {"hidden_size": 1536, "num_layers": 24, "num_heads": 24, "num_kv_heads": 2, "max_length": 2048},
    "tiny": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "max_length": 256},
}


def _peak_memory_gib(cuda: bool) -> float:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS (KiB -> GiB)


def run_variant(name: str, recipe, out: Path, steps: int, cuda: bool) -> dict:
    import torch

    stage, overrides = {
        "sft packed": ("sft", {"packing": True}),
        "sft padded": ("sft", {"packing": False}),
        "dpo": ("dpo", {"precompute_ref_log_probs": False, "eval_strategy": "no"}),
        "dpo precomputed ref": ("dpo", {"precompute_ref_log_probs": True, "eval_strategy": "no"}),
    }[name]
    if stage == "sft":
        from fusechat.train.sft import build_trainer
    else:
        from fusechat.train.dpo import build_trainer
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    trainer, _, _ = build_trainer(
        recipe, out, max_steps=steps, save_strategy="no", output_dir=str(out / name.replace(" ", "-")),
        disable_tqdm=True, **overrides,
    )
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = trainer.train()
    loop = time.perf_counter() - t1
    tokens = trainer._total_train_tokens  # TRL's count of real (non-pad) tokens
    row = {
        "variant": name, "steps": trainer.state.global_step, "tokens": int(tokens),
        "setup_s": round(setup, 2), "train_s": round(loop, 2), "tokens_per_s": round(tokens / loop, 1),
        "peak_mem_gib": round(_peak_memory_gib(cuda), 2), "train_loss": round(result.training_loss, 4),
        "bf16": trainer.args.bf16, "gradient_checkpointing": trainer.args.gradient_checkpointing,
        "attn_implementation": trainer.model.config._attn_implementation,
    }
    del trainer
    gc.collect()
    return row


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="sequences (SFT) or pairs (DPO) per step")
    ap.add_argument("--budget-s", type=float, default=480, help="start no variant after this many seconds")
    ap.add_argument("--variants", default="sft packed,sft padded,dpo,dpo precomputed ref")
    a = ap.parse_args()
    started = time.perf_counter()
    cuda = torch.cuda.is_available()
    size = SIZES[a.size]
    env = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "size": a.size, "steps": a.steps, "batch": a.batch,
        "max_length": size["max_length"],
    }
    print(f"gpu_train_check: {json.dumps(env)}", flush=True)
    if not cuda and a.size != "tiny":
        print("no CUDA device: use --size tiny on CPU", file=sys.stderr)
        return 2

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="gpu-train-check-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        shape = {k: v for k, v in size.items() if k != "max_length"}
        model = build_tiny_lm("qwen2", tmp / "model", **shape)
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
        n_params = _count_params(model)
        env.update(params=n_params, build_s=round(time.perf_counter() - t0, 1), model_type=cfg.model_type)
        print(f"model: {cfg.model_type}, {n_params / 1e9:.3f}B parameters, built in {env['build_s']} s", flush=True)

        run = tmp / "run"
        train = {
            "learning_rate": 1e-5, "global_batch_size": a.batch, "per_device_batch_size": a.batch,
            "max_length": size["max_length"], "lr_scheduler": "cosine", "warmup_ratio": 0.1,
        }
        recipe = load_recipe(write_recipe(
            tmp / "recipe.yaml", model, "qwen2", run, sft=train, dpo={**train, "keep_best_of_last": 1},
        ))
        # answers of 1/40 to 1/2 of max_length (~3.7 tokens a word with this tokenizer), enough
        # rows for --steps steps of packed sequences
        words = (size["max_length"] // 150, size["max_length"] // 8)
        write_split(sft_rows(a.steps * a.batch * 8, multi_turn_every=0, answer_words=words),
                    run / "datasets" / "sft" / "train.parquet")
        write_split(dpo_rows(a.steps * a.batch * 2), run / "datasets" / "dpo" / "train.parquet")
        (run / "models" / recipe.name).mkdir(parents=True)
        (run / "models" / recipe.name / "sft").symlink_to(model)  # DPO starts from "the SFT model"

        for name in [v.strip() for v in a.variants.split(",") if v.strip()]:
            if time.perf_counter() - started > a.budget_s:
                rows.append({"variant": name, "error": f"skipped: past the {a.budget_s:.0f} s budget"})
                continue
            print(f"--- {name}", flush=True)
            try:
                rows.append(run_variant(name, recipe, tmp / "out", a.steps, cuda))
            except Exception as e:  # noqa: BLE001 - report every variant, whatever breaks
                traceback.print_exc()
                rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
            print(json.dumps(rows[-1]), flush=True)

    _print_table(env, rows, cuda)
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "gpu_train_check.json").write_text(json.dumps({"env": env, "results": rows}, indent=2))
        print(f"wrote {Path(out) / 'gpu_train_check.json'}")
    return 1 if any("error" in r for r in rows) else 0


def _count_params(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += _prod(st.get_slice(k).get_shape())
    return total


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _print_table(env: dict, rows: list[dict], cuda: bool) -> None:
    mem = "peak GPU mem GiB" if cuda else "peak RSS GiB"
    cols = ("variant", "steps", "real tokens", "train s", "tokens/s", mem, "loss")
    lines = [
        f"## training check: {env['device']}, {env.get('params', 0) / 1e9:.3f}B params, "
        f"batch {env['batch']}, max_length {env['max_length']}",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | FAILED: {r['error']} |")
        else:
            lines.append(
                f"| {r['variant']} | {r['steps']} | {r['tokens']} | {r['train_s']} | {r['tokens_per_s']} | "
                f"{r['peak_mem_gib']} | {r['train_loss']} |"
            )
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
