"""Train the demo world's reward model: ArmoRM's exact architecture, learned on synthetic preferences.

    python -m fusechat.demo.train_reward --out data/demo/models/reward [--steps 300]

The demo needs a reward model that prefers correct, well-formed answers, in the same checkpoint
layout as the published ArmoRM so the scoring stage loads it through the same code. It starts from
`build_tiny_armorm` (random weights, the tiny Llama-3 tokenizer) and trains every parameter except
the fixed transform matrix with the Bradley-Terry loss -log sigmoid(score(chosen) - score(rejected))
on `world.preference_pairs`, then writes the checkpoint back with the same keys.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def _encode(tokenizer, pattern: list[int], prompt: str, reply: str) -> tuple[list[int], int]:
    from fusechat.scoring.armorm import find_gating_position

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], tokenize=True,
        return_dict=False,
    )
    return list(ids), find_gating_position(list(ids), pattern)


def _batch(items: list[tuple[list[int], int]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for i, (ids, _) in enumerate(items):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return input_ids, mask, torch.tensor([g for _, g in items])


def pair_accuracy(model, tokenizer, pattern, pairs, pad_id: int, batch: int = 64) -> float:
    """Share of pairs whose chosen reply scores above the rejected one."""
    import torch

    wins = 0
    with torch.no_grad():
        for i in range(0, len(pairs), batch):
            part = pairs[i : i + batch]
            c = model(*_batch([_encode(tokenizer, pattern, p["prompt"], p["chosen"]) for p in part], pad_id))[0]
            r = model(*_batch([_encode(tokenizer, pattern, p["prompt"], p["rejected"]) for p in part], pad_id))[0]
            wins += int((c > r).sum())
    return wins / max(1, len(pairs))


# A Bradley-Terry model's score scale is arbitrary; the published band (0.01 <= margin <= 0.1) is in
# ArmoRM's units. ArmoRM's learned `gating.logit_scale` multiplies every score, so rescaling it maps
# the demo's scores onto a spread where typical margins between one source's answers fall inside
# that band, with every ranking unchanged.
TARGET_STD = 0.05


def calibrate(model, tokenizer, pattern, pairs, pad_id: int, target_std: float = TARGET_STD) -> float:
    """Rescale `gating.logit_scale` so the scores of `pairs`' replies have standard deviation
    `target_std`; returns the factor applied."""
    import torch

    with torch.no_grad():
        scores = []
        for key in ("chosen", "rejected"):
            for i in range(0, len(pairs), 64):
                part = pairs[i : i + 64]
                scores.append(model(*_batch([_encode(tokenizer, pattern, p["prompt"], p[key]) for p in part], pad_id))[0])
        factor = target_std / float(torch.cat(scores).std())
        model.gating.logit_scale.mul_(factor)
    return factor


def train_reward(out: Path, *, steps: int = 300, batch: int = 32, lr: float = 1e-3, hidden_size: int = 128,
                 num_layers: int = 2, seed: int = 0, train_per_domain: int = 400) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from fusechat.demo import world
    from fusechat.run import atomic_dir
    from fusechat.scoring.armorm import gating_pattern_ids, load_armorm
    from fusechat.testing.tiny_armorm import build_tiny_armorm

    torch.manual_seed(seed)
    sizes = {**world.SIZES, "train": train_per_domain}  # prompts per domain in each split
    train = list(world.preference_pairs("train", seed, sizes))
    held_out = list(world.preference_pairs("eval", seed))
    with tempfile.TemporaryDirectory() as tmp:
        start = build_tiny_armorm(Path(tmp) / "init", hidden_size=hidden_size, num_layers=num_layers, seed=seed)
        tokenizer = AutoTokenizer.from_pretrained(start)
        model = load_armorm(start)
        pattern = gating_pattern_ids(tokenizer)
        pad = tokenizer.pad_token_id
        before = pair_accuracy(model.eval(), tokenizer, pattern, held_out, pad)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        rng = torch.Generator().manual_seed(seed)
        t0, losses = time.time(), []
        for step in range(steps):
            idx = torch.randint(len(train), (batch,), generator=rng).tolist()
            part = [train[i] for i in idx]
            chosen = model(*_batch([_encode(tokenizer, pattern, p["prompt"], p["chosen"]) for p in part], pad))[0]
            rejected = model(*_batch([_encode(tokenizer, pattern, p["prompt"], p["rejected"]) for p in part], pad))[0]
            loss = -torch.nn.functional.logsigmoid(chosen - rejected).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if step % 50 == 0 or step == steps - 1:
                print(f"reward step {step:4d}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}  {time.time() - t0:.0f} s", flush=True)
        model.eval()
        factor = calibrate(model, tokenizer, pattern, train, pad)
        after = pair_accuracy(model, tokenizer, pattern, held_out, pad)
        by_domain = {
            d: pair_accuracy(model, tokenizer, pattern, [p for p in held_out if p["domain"] == d], pad)
            for d in world.DOMAINS
        }
        report = {
            "steps": steps, "batch": batch, "lr": lr, "seed": seed, "train_pairs": len(train),
            "held_out_pairs": len(held_out), "held_out_accuracy_before": before,
            "held_out_accuracy_after": after, "held_out_accuracy_by_domain": by_domain,
            "train_seconds": round(time.time() - t0, 1), "score_scale_factor": factor,
            "score_std_target": TARGET_STD,
        }
        with atomic_dir(out) as stage:
            for f in start.iterdir():
                # not the weights, and not the builder's marker: this folder is no longer its random build
                if f.name not in ("model.safetensors", "tiny-armorm-build.json") and f.is_file():
                    shutil.copy2(f, stage / f.name)
            state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            save_file(state, str(stage / "model.safetensors"), metadata={"format": "pt"})
            (stage / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("data/demo/models/reward"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--train-per-domain", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    report = train_reward(a.out, steps=a.steps, batch=a.batch, seed=a.seed, train_per_domain=a.train_per_domain)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
