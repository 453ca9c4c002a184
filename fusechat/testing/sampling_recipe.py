"""A small, complete recipe for the sampling stage: local prompt files in the published data sets'
layouts (so the real prompt stage reads them) and tiny source models.

Shared by the sampling tests, the flow tests and the sampling benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

INSTRUCTION = [
    "Write a short poem about the ocean at night.",
    "Summarize the plot of a story about a lost dog that finds its way home.",
    "Give three tips for sleeping well.",
    "Describe the weather in London in spring.",
    "Translate good morning into Spanish, French and German.",
    "Explain why the sky looks blue to a child.",
    "Write a thank-you note to a teacher.",
    "List some ideas for a birthday party in the park.",
]
MATH = [
    ("Solve for x: 2x + 3 = 11.", "4"),
    ("Compute 1/2 + 1/3.", "\\frac{5}{6}"),
    ("What is the area of a circle with radius 3?", "9\\pi"),
    ("If a + b = 10 and a - b = 2, what is ab?", "24"),
]
CODE = [
    ("Write a Python function add(a, b) that returns the sum of a and b.",
     "```python\ndef add(a, b):\n    return a + b\n```\n\n```python\nassert add(2, 3) == 5\n```"),
    ("Write a Python function square(x) that returns x squared.",
     "```python\ndef square(x):\n    return x * x\n```\n\n```python\nassert square(3) == 9\n```"),
    ("Write a Python function is_even(n) that tells whether n is even.",
     "```python\ndef is_even(n):\n    return n % 2 == 0\n```\n\n```python\nassert is_even(4)\n```"),
]
CHINESE = ["请写一首关于春天的诗。", "中国的首都是哪里？", "请介绍一下你自己。"]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path.name


def write_sampling_recipe(
    folder: Path | str,
    sources: list[dict[str, Any]],
    *,
    instruction: int = len(INSTRUCTION),
    long_prompt_words: int = 0,
    seed: int = 7,
    name: str = "sampling-test",
) -> Path:
    """Write prompt files and `recipe.yaml` into `folder`; returns the recipe path.

    `sources` are recipe source mappings (name, model, family, engine, ...). `long_prompt_words`
    adds one instruction prompt of that many words, to exceed a small `max_model_len`.
    """
    import yaml

    folder = Path(folder)
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    prompts = [{"instruction": p, "source": "test"} for p in INSTRUCTION[:instruction]]
    if long_prompt_words:
        prompts.append({"instruction": "Please read this. " + "lorem ipsum " * (long_prompt_words // 2)})
    datasets = [
        {"name": "uf", "path": "data/" + _jsonl(data / "uf.jsonl", prompts),
         "adapter": "ultrafeedback", "domain": "instruction"},
        {"name": "omi", "path": "data/" + _jsonl(
            data / "omi.jsonl", [{"problem": p, "expected_answer": a} for p, a in MATH]),
         "adapter": "openmathinstruct2", "domain": "math"},
        {"name": "oss", "path": "data/" + _jsonl(
            data / "oss.jsonl", [{"instruction": p, "response": r} for p, r in CODE]),
         "adapter": "self_oss_instruct", "domain": "code"},
        {"name": "zh", "path": "data/" + _jsonl(
            data / "zh.jsonl", [{"instruction": p, "input": ""} for p in CHINESE]),
         "adapter": "alpaca_gpt4_zh", "domain": "chinese"},
    ]
    recipe = {
        "name": name,
        "run_dir": "run",
        "seed": seed,
        "sources": sources,
        "datasets": datasets,
        "filters": {"near_dedup_threshold": None},
        "scoring": {"reward_model": {"model": "RLHFlow/ArmoRM-Llama3-8B-v0.1"}},
        "target": {"model": "meta-llama/Llama-3.2-1B-Instruct", "family": "llama3"},
        "sft": {"learning_rate": 1e-5},
        "dpo": {"learning_rate": 1e-6, "beta": 0.1},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    return path
