"""Train the demo's source models and its target from scratch on CPU.

    python -m fusechat.demo.train_sources --out data/demo/models [--scale small|test]

Four sources, one per family (`fusechat.testing.tiny` builds the configs and tokenizers with the
real chat templates), each trained on chat-formatted (prompt, answer) pairs of the demo world with
the loss on assistant tokens only. Every source sees all four domains, but in its weak domains a
share of the answers is wrong: mostly the domain's habit (`world.habit_response`, an echo of the
input), otherwise a plausible slip (`world.bad_response`). Greedy decoding then answers a weak
domain with the habit, while sampling at the recipe's temperatures yields both right and wrong
answers there: the material the recipe's selection rules work on. The target is a llama3 model of
the sources' size trained in two phases, the way a real target is a pretrained model before it is
tuned to chat: first on right answers in every domain (it learns every rule about as well as each
specialist learns its own), then briefly on mostly habit answers (`ModelSpec.then`), so that it
answers greedily with its habits everywhere and the recipe's SFT and DPO have something to teach
it. A one-phase target with 30-45% right answers, or a two-layer one, never learns the math and
instruction rules at all (docs/demo.md has the measurements).

The trained folders are small enough to ship in the repository, so the demo never retrains them.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fusechat.demo import world


@dataclass(frozen=True)
class ModelSpec:
    family: str
    # share of wrong answers per domain (absent = `weak_error`); 0 marks a strong domain
    errors: dict[str, float]
    weak_error: float = 0.7
    # share of the wrong answers that are the domain's habit (`world.habit_response`), the rest
    # random slips: above the correct share, so greedy decoding answers with the habit
    habit: float = 0.6
    domains: tuple[str, ...] = world.DOMAINS
    # how much more often a strong domain's prompts are drawn than a weak one's
    focus: float = 3.0
    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    steps: int = 1000
    batch_size: int = 16
    learning_rate: float = 3e-3
    seed: int = 0
    # a second phase trained from this one's weights, on its own answer mix, steps and rate (its
    # architecture fields are not used)
    then: ModelSpec | None = None

    def error(self, domain: str) -> float:
        return self.errors.get(domain, self.weak_error)


SOURCES: dict[str, ModelSpec] = {
    "llama3-math": ModelSpec("llama3", {"math": 0.0}),
    "qwen2-chinese": ModelSpec("qwen2", {"chinese": 0.0, "math": 0.3}),
    "gemma2-instruct": ModelSpec("gemma2", {"instruction": 0.0}, steps=700),
    # code is the quickest domain to learn
    "mistral-code": ModelSpec("mistral", {"code": 0.0}, steps=500),
}
TARGET: dict[str, ModelSpec] = {
    # every rule first, then habits: 3000 steps of right answers, then 150 steps at a lower rate
    # with 80% wrong answers, 80% of them the habit (64% habit against 20% right)
    "target-llama3": ModelSpec(
        "llama3", {}, weak_error=0.0, steps=3000,
        then=ModelSpec("llama3", {}, weak_error=0.8, habit=0.8, steps=150, learning_rate=5e-4, seed=1),
    ),
}
# --scale test: one model, few steps, for the build check in the test suite
# (code: its answers are the quickest for a tiny model to learn)
TEST_SPEC = ModelSpec("llama3", {}, weak_error=0.0, domains=("code",), num_layers=2, steps=120)


def _examples(spec: ModelSpec, tok, n: int, exclude: set[str], rng: random.Random) -> list[dict[str, list[int]]]:
    """`n` tokenized training conversations on fresh prompts of all domains (none in `exclude`),
    answers wrong at the spec's rates. Fresh prompts, not the fixed train files: a model that sees
    each prompt once learns the rule (add, reverse, copy a name) instead of memorising answers."""
    weights = [spec.focus if spec.error(d) == 0.0 else 1.0 for d in spec.domains]
    out = []
    while len(out) < n:
        row = world.draw(rng.choices(spec.domains, weights)[0], rng)
        if row["instruction"] in exclude:
            continue
        wrong = rng.random() < spec.error(row["domain"])
        if not wrong:
            answer = world.good_response(row)
        elif rng.random() < spec.habit:
            answer = world.habit_response(row)
        else:
            answer = world.bad_response(row, rng)
        messages = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": answer}]
        enc = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        ids = list(enc["input_ids"])
        out.append({
            "input_ids": ids,
            "attention_mask": [1] * len(ids),
            "labels": [t if m else -100 for t, m in zip(ids, enc["assistant_masks"])],
        })
    return out


def train_model(name: str, spec: ModelSpec, out_dir: Path, exclude: set[str]) -> dict[str, Any]:
    """Build, train and save one model under `out_dir`; returns its training summary."""
    import torch
    from transformers import (
        AutoConfig, AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments,
    )

    from fusechat.testing.tiny import build_tiny_lm

    start = time.time()
    with tempfile.TemporaryDirectory(prefix=f"demo-{name}-") as tmp:
        base = build_tiny_lm(
            spec.family, Path(tmp) / "base", hidden_size=spec.hidden_size, num_layers=spec.num_layers,
            num_heads=spec.num_heads, num_kv_heads=spec.num_kv_heads, seed=spec.seed,
        )
        tok = AutoTokenizer.from_pretrained(base)
        config = AutoConfig.from_pretrained(base)
        # The factory's wide initialisation suits engine comparisons, not training from scratch.
        config.initializer_range = 0.02
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config = model.generation_config.from_pretrained(base)

        collator = DataCollatorForSeq2Seq(_padding(tok), padding=True, label_pad_token_id=-100)
        losses, phase = [], spec
        while phase is not None:  # the spec, then its `then` phases, on the same weights
            rng = random.Random(f"{name}-{phase.seed}")
            data = _examples(phase, tok, phase.steps * phase.batch_size, exclude, rng)
            args = TrainingArguments(
                output_dir=str(Path(tmp) / "trainer"), max_steps=phase.steps,
                per_device_train_batch_size=phase.batch_size, learning_rate=phase.learning_rate,
                lr_scheduler_type="cosine", warmup_steps=max(1, phase.steps // 20), weight_decay=0.01,
                seed=phase.seed, data_seed=phase.seed, use_cpu=True, bf16=False,
                logging_steps=max(1, phase.steps // 10), save_strategy="no", report_to=[], dataloader_num_workers=0,
            )
            trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
            result = trainer.train()
            losses += [h["loss"] for h in trainer.state.log_history if "loss" in h]
            phase = phase.then

        final = out_dir / name
        staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir))
        try:
            model.save_pretrained(staging)
            tok.save_pretrained(staging)
            summary = {
                "name": name, "spec": asdict(spec), "parameters": sum(p.numel() for p in model.parameters()),
                "train_seconds": round(time.time() - start, 1), "losses": losses,
                "train_loss": result.training_loss,
            }
            (staging / "demo-build.json").write_text(json.dumps(summary, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return summary


def _padding(tok):
    """The tokenizer for batching: Llama-3 and Mistral ship no pad token, so a copy pads with EOS
    (padding is masked out; the saved tokenizer keeps the family's real special tokens)."""
    if tok.pad_token_id is not None:
        return tok
    import copy

    padded = copy.deepcopy(tok)
    padded.pad_token = padded.eos_token
    return padded


def sample_answers(model_dir: Path, prompts: list[str], *, temperature: float = 0.7, top_p: float = 0.95,
                   max_new_tokens: int = 64, batch_size: int = 64, seed: int = 0) -> list[str]:
    """One sampled answer per prompt with transformers' generate (left-padded batches)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = [
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                    return_dict=True)["input_ids"]
            for p in prompts[i:i + batch_size]
        ]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id] * (width - len(b)) + list(b) for b in batch])
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        with torch.no_grad():
            gen = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                max_new_tokens=max_new_tokens, pad_token_id=pad_id,
            )
        out += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def accuracy(model_dir: Path, rows: list[dict[str, Any]], sandbox, seed: int = 0) -> dict[str, float]:
    """Per-domain share of sampled answers (T=0.7) that the world's exact rules accept."""
    answers = sample_answers(model_dir, [r["instruction"] for r in rows], seed=seed)
    hits: dict[str, list[bool]] = {}
    for row, text in zip(rows, answers):
        hits.setdefault(row["domain"], []).append(world.evaluate_response(row["domain"], row, text, sandbox=sandbox))
    return {d: sum(h) / len(h) for d, h in hits.items()}


def _table(results: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="demo models: exact-rule accuracy on held-out prompts (one sample each, T=0.7)")
    for col in ("model", "family", "params", "train s", *world.DOMAINS):
        table.add_column(col, justify="left" if col in ("model", "family") else "right")
    for name, r in results.items():
        table.add_row(
            name, r["spec"]["family"], f"{r['parameters'] / 1e6:.2f}M", f"{r['train_seconds']:.0f}",
            *(f"{r.get('accuracy', {}).get(d, float('nan')):.2f}" for d in world.DOMAINS),
        )
    Console(width=120).print(table)


def main(argv: list[str] | None = None) -> None:
    import argparse

    import torch

    parser = argparse.ArgumentParser(description="Train the demo's source and target models from scratch on CPU.")
    parser.add_argument("--out", default="data/demo/models", help="folder that receives one folder per model")
    parser.add_argument("--scale", choices=("small", "test"), default="small",
                        help="small: the four sources and the target; test: one model, few steps")
    parser.add_argument("--only", nargs="*", help="train only these models (names as in the table)")
    # one thread: on cores shared with other work, two OpenMP threads stall each other; while tests
    # ran beside it, a one-thread build stepped several times faster than a two-thread one
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    specs = {"test-llama3": TEST_SPEC} if args.scale == "test" else {**SOURCES, **TARGET}
    eval_rows = world.make_prompts("eval")
    exclude = {r["instruction"] for r in eval_rows}
    if args.scale == "test":
        eval_rows = [r for r in eval_rows if r["domain"] in TEST_SPEC.domains][:40]
    unknown = set(args.only or ()) - set(specs)
    if unknown:
        parser.error(f"unknown model(s) {', '.join(sorted(unknown))}; known: {', '.join(specs)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from fusechat.scoring.sandbox import Sandbox

    with Sandbox(workers=1, timeout_s=5.0, memory_mb=512) as box:
        for name, spec in specs.items():
            if args.only and name not in args.only:
                continue
            summary = train_model(name, spec, out, exclude)
            summary["accuracy"] = accuracy(out / name, eval_rows, box, seed=spec.seed)
            (out / name / "demo-build.json").write_text(json.dumps(summary, indent=2) + "\n")
    # models built by earlier runs (--only) too, so the table always covers the whole set
    built = [name for name in specs if (out / name / "demo-build.json").is_file()]
    _table({name: json.loads((out / name / "demo-build.json").read_text()) for name in built})


if __name__ == "__main__":
    main()
