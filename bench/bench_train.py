"""Benchmark the training stages on a small local model: what packing and precomputed reference
log-probabilities buy.

    .venv/bin/python bench/bench_train.py [--steps 8] [--repeats 2] [--hidden 256] [--layers 4] [--max-length 512]

SFT: the same conversations (answers of 10-300 words) trained for `--steps` optimizer steps with
TRL's packing (best-fit decreasing, padding-free) and with padded batches; tokens per second count
only real (non-pad) tokens, so the ratio is the useful-work speedup of packing.
DPO: one epoch on the same preference pairs with the reference model run in every step and with
its log-probabilities computed once before training (`precompute_ref_log_probs`), timed end to
end (the precompute pass included) and for the training loop alone.
Both comparisons run in this one process on the same machine, variants alternating, best of
`--repeats` runs each.

On CPU, packing loses: TRL flattens a packed batch into one row and the CPU kernel (SDPA; see
`fusechat/train/attention.py`) runs attention over the whole row under a block-diagonal mask
(quadratic in the batch's total length). On CUDA the stages pick flash or flex attention, whose
cost is per real token; `bench/gpu_train_check.py` measures that.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusechat.recipe import load_recipe  # noqa: E402
from fusechat.testing.tiny import build_tiny_lm  # noqa: E402
from fusechat.testing.train_data import dpo_rows, sft_rows, write_recipe, write_split  # noqa: E402


def sft_throughput(recipe, out: Path, steps: int, packing: bool) -> dict:
    from fusechat.train.sft import build_trainer

    trainer, _, _ = build_trainer(recipe, out, packing=packing, max_steps=steps, save_strategy="no",
                                  output_dir=str(out / ("packed" if packing else "padded")))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    tokens = trainer._total_train_tokens  # TRL counts real tokens: attention mask / packed lengths
    return {"tokens": tokens, "seconds": wall, "tok_s": tokens / wall}


def dpo_time(recipe, out: Path, precompute: bool) -> dict:
    from fusechat.train.dpo import build_trainer

    t0 = time.perf_counter()
    trainer, _, _ = build_trainer(recipe, out, precompute_ref_log_probs=precompute, save_strategy="no",
                                  eval_strategy="no", output_dir=str(out / f"dpo-{precompute}"))
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.train()
    loop = time.perf_counter() - t1
    return {"pairs": len(trainer.train_dataset), "setup": setup, "loop": loop, "total": setup + loop}


def main() -> None:
    import torch
    from rich.console import Console
    from rich.table import Table

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="SFT optimizer steps per variant")
    ap.add_argument("--pairs", type=int, default=96, help="DPO training pairs (one epoch)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4, help="per-device batch size (no accumulation)")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant; the best counts")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        model = build_tiny_lm("llama3", tmp / "model", hidden_size=a.hidden, num_layers=a.layers,
                              num_heads=a.hidden // 64, num_kv_heads=max(1, a.hidden // 128))
        run = tmp / "run"
        train = {"global_batch_size": a.batch, "per_device_batch_size": a.batch, "max_length": a.max_length,
                 "learning_rate": 1e-4, "lr_scheduler": "constant", "warmup_ratio": 0.0}
        recipe = load_recipe(write_recipe(tmp / "recipe.yaml", model, "llama3", run, sft=train, dpo=train))
        write_split(sft_rows(a.steps * a.batch * 4, multi_turn_every=0, answer_words=(10, 300)), run / "datasets" / "sft" / "train.parquet")
        write_split(dpo_rows(a.pairs, seed=1), run / "datasets" / "dpo" / "train.parquet")
        shutil.copytree(model, run / "models" / recipe.name / "sft")  # DPO starts from "the SFT model"

        console = Console(stderr=True)
        from fusechat.train.attention import choose

        console.print(f"model: llama3-shaped, hidden {a.hidden}, {a.layers} layers, torch threads "
                      f"{torch.get_num_threads()}, device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
                      f"attention {choose()}")
        dpo_recipe = recipe.model_copy(update={"dpo": recipe.dpo.model_copy(update={"keep_best_of_last": 1})})
        runs: dict[str, list[dict]] = {"padded": [], "packed": [], "live": [], "pre": []}
        # variants alternate within each repeat and the best repeat counts: other load on a shared
        # machine slows single runs, never speeds them up
        for rep in range(a.repeats):
            out = tmp / f"out-{rep}"  # fresh data caches: the precomputed log-probs are cached too
            runs["padded"].append(sft_throughput(recipe, out, a.steps, packing=False))
            runs["packed"].append(sft_throughput(recipe, out, a.steps, packing=True))
            runs["live"].append(dpo_time(dpo_recipe, out, precompute=False))
            runs["pre"].append(dpo_time(dpo_recipe, out, precompute=True))
        padded, packed = (max(runs[k], key=lambda r: r["tok_s"]) for k in ("padded", "packed"))
        live, pre = (min(runs[k], key=lambda r: r["total"]) for k in ("live", "pre"))

    t = Table(title=f"SFT, {a.steps} steps x {a.batch} sequences, max_length {a.max_length}")
    for col in ("variant", "real tokens", "seconds", "tokens/s"):
        t.add_column(col, justify="right")
    for name, r in (("padded batches", padded), ("packing (bfd)", packed)):
        t.add_row(name, str(r["tokens"]), f"{r['seconds']:.1f}", f"{r['tok_s']:.0f}")
    t.add_row("ratio packed/padded", "", "", f"{packed['tok_s'] / padded['tok_s']:.2f}x")
    console.print(t)

    t = Table(title=f"DPO, one epoch of {live['pairs']} pairs, batch {a.batch}")
    for col in ("variant", "setup s (incl. precompute)", "train loop s", "total s"):
        t.add_column(col, justify="right")
    for name, r in (("reference model in every step", live), ("precomputed reference log-probs", pre)):
        t.add_row(name, f"{r['setup']:.1f}", f"{r['loop']:.1f}", f"{r['total']:.1f}")
    t.add_row("ratio live/precomputed", "", f"{live['loop'] / pre['loop']:.2f}x", f"{live['total'] / pre['total']:.2f}x")
    console.print(t)


if __name__ == "__main__":
    main()
