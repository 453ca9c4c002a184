"""Small SFT and DPO tables in the build stage's layout, and a training recipe around a tiny model.

Tests, benchmarks and the GPU check train on these instead of downloaded data. The preference set
is learnable on purpose: every chosen answer follows one fixed pattern and every rejected answer
another, so held-out reward accuracy must rise well above chance when DPO works.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

WORDS = (
    "apple river stone cloud garden window paper light music forest silver number table bridge "
    "market winter summer planet engine letter"
).split()


def _prompt(rng: random.Random) -> str:
    return f"Tell me about the {rng.choice(WORDS)} and the {rng.choice(WORDS)}."


def sft_rows(
    n: int, seed: int = 0, multi_turn_every: int = 3, long_every: int = 0,
    answer_words: tuple[int, int] | None = None,
) -> list[dict[str, Any]]:
    """Conversations; every `multi_turn_every`-th has two user/assistant rounds, every
    `long_every`-th (when > 0) a very long answer, to exercise the length policy.
    `answer_words=(lo, hi)` gives first answers of random length instead (realistic padding for
    throughput measurements)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.choice(WORDS), rng.choice(WORDS)
        messages = [
            {"role": "user", "content": _prompt(rng)},
            {"role": "assistant", "content": f"The {a} is next to the {b}. It is {rng.randint(2, 99)} steps away."},
        ]
        if multi_turn_every and i % multi_turn_every == 0:
            messages += [
                {"role": "user", "content": f"And the {b}?"},
                {"role": "assistant", "content": f"The {b} is {rng.choice(WORDS)}."},
            ]
        if long_every and i % long_every == long_every - 1:
            messages[1]["content"] = " ".join(rng.choice(WORDS) for _ in range(400))
        if answer_words:
            messages[1]["content"] = " ".join(rng.choice(WORDS) for _ in range(rng.randint(*answer_words)))
        rows.append({
            "messages": messages, "prompt_id": f"p{seed}-{i}", "dataset": "tiny", "domain": "instruction",
            "source_model": "tiny", "score": rng.random(),
        })
    return rows


def dpo_rows(n: int, seed: int = 0, long_every: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = rng.randint(3, 6)
        chosen = " ".join(["blue"] * k) + "."
        rejected = " ".join(["red"] * k) + "."
        if long_every and i % long_every == long_every - 1:
            rejected = " ".join(rng.choice(WORDS) for _ in range(400))
        rows.append({
            "prompt": [{"role": "user", "content": _prompt(rng)}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}],
            "prompt_id": f"q{seed}-{i}", "dataset": "tiny", "domain": "instruction", "source_model": "tiny",
            "chosen_score": 0.9, "rejected_score": 0.85, "margin": 0.05,
        })
    return rows


def write_split(rows: list[dict[str, Any]], path: Path) -> Path:
    import pyarrow as pa

    from fusechat.run import write_table

    write_table(pa.Table.from_pylist(rows), path)
    return path


def write_datasets(
    run_dir: Path, *, sft: tuple[int, int] = (48, 8), dpo: tuple[int, int] = (64, 16), long_every: int = 0
) -> None:
    """`datasets/{sft,dpo}/{train,test}.parquet` with (train, test) rows each."""
    for kind, make, (n_train, n_test) in (("sft", sft_rows, sft), ("dpo", dpo_rows, dpo)):
        write_split(make(n_train, seed=1, long_every=long_every), run_dir / "datasets" / kind / "train.parquet")
        if n_test:
            write_split(make(n_test, seed=2), run_dir / "datasets" / kind / "test.parquet")


def write_recipe(path: Path, model: Path, family: str, run_dir: Path, sft: dict | None = None,
                 dpo: dict | None = None) -> Path:
    """A complete recipe whose data stages point at the tiny model, with small-scale training
    settings that `sft`/`dpo` override key by key."""
    import yaml

    sft_cfg = {
        "learning_rate": 1e-3, "epochs": 1, "global_batch_size": 4, "per_device_batch_size": 2,
        "max_length": 128, "lr_scheduler": "constant", "warmup_ratio": 0.0, "save_steps": 4,
        "packing": True, "assistant_only_loss": True, **(sft or {}),
    }
    dpo_cfg = {
        "learning_rate": 5e-4, "beta": 0.1, "loss_type": "sigmoid", "epochs": 1, "global_batch_size": 4,
        "per_device_batch_size": 2, "max_length": 128, "lr_scheduler": "constant", "warmup_ratio": 0.0,
        "save_steps": 4, "keep_best_of_last": 2, **(dpo or {}),
    }
    recipe = {
        "name": f"tiny-{family}",
        "run_dir": str(run_dir),
        "sources": [{"name": "tiny", "model": str(model), "family": family, "responses": {"instruction": 1}}],
        "datasets": [{"name": "tiny", "path": str(model), "adapter": "none", "domain": "instruction"}],
        "scoring": {"reward_model": {"model": str(model), "kind": "sequence_classification"}},
        "target": {"model": str(model), "family": family},
        "sft": sft_cfg,
        "dpo": dpo_cfg,
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
