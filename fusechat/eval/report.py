"""Metrics, the paper-style table and the gains plot.

Accuracy and win rate go through `evaluate` with the metric scripts kept in `fusechat/eval/metrics/`
(the hub's scripts cannot be fetched offline). The average is the plain mean of a model's columns,
as in the published table.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

METRICS = Path(__file__).parent / "metrics"
AVERAGE, WIN_RATE, ALL = "average", "win_rate", "all"


@lru_cache(maxsize=None)
def _metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS / f"{name}.py"))


def accuracy(verdicts: list[bool]) -> float:
    return _metric("accuracy").compute(predictions=[int(v) for v in verdicts], references=[1] * len(verdicts))["accuracy"]


def win_rate(model_scores: list[float], base_scores: list[float]) -> dict[str, Any]:
    """Wins of the model's response over the baseline's to the same prompts; ties count half."""
    if not model_scores:
        return {"win_rate": float("nan"), "wins": 0, "ties": 0, "losses": 0}
    return _metric("win_rate").compute(predictions=model_scores, references=base_scores)


def _reward(g: dict) -> float | None:
    """An empty response is not scored by the reward model but still answers the prompt: it loses
    to any scored response and ties with another empty one. Other unscored responses (too long for
    the reward model) leave the comparison."""
    return float("-inf") if not g["text"].strip() else g["reward"]


def metrics(generations: list[dict], columns: list[str], totals: dict[str, int], base: str | None) -> list[dict]:
    """results rows (model, domain, metric, value) from scored generations.

    `totals[column]` is the number of items in the column's set: a prompt a model did not answer
    (too long for its context, say) counts as wrong, so every model is measured on the whole set.
    Win rate: per column and over all prompts, against `base`'s response to the same prompt where
    both responses have a reward (an empty response counts as the lowest reward); the same text
    as the base's is a tie.
    """
    by_model: dict[str, list[dict]] = {}
    for g in generations:
        by_model.setdefault(g["model"], []).append(g)
    base_reward = {(g["set"], g["prompt_id"]): _reward(g) for g in by_model.get(base, []) if _reward(g) is not None}
    base_text = {(g["set"], g["prompt_id"]): g["text"] for g in by_model.get(base, [])}
    out = []
    for model, rows in by_model.items():
        accs = []
        for col in columns:
            verdicts = [bool(g["correct"]) for g in rows if g["column"] == col and g["correct"] is not None]
            missing = totals[col] - len(verdicts)
            acc = accuracy(verdicts + [False] * missing)
            accs.append(acc)
            out.append({"model": model, "domain": col, "metric": "accuracy", "value": acc})
        if accs:
            out.append({"model": model, "domain": AVERAGE, "metric": "accuracy", "value": sum(accs) / len(accs)})
        if not base_reward or model == base:  # no base responses (it failed to load): nothing to compare
            continue
        pairs: dict[str, list[tuple[float, float]]] = {ALL: []}
        for g in rows:
            key, reward = (g["set"], g["prompt_id"]), _reward(g)
            if reward is None or key not in base_reward:
                continue
            if g["text"] == base_text[key]:
                # the base's own reply is a tie, whatever rounding its batch gave the reward
                reward = base_reward[key]
            pairs[ALL].append((reward, base_reward[key]))
            pairs.setdefault(g["column"] or g["set"], []).append((reward, base_reward[key]))
        for domain, ps in pairs.items():
            wr = win_rate([p for p, _ in ps], [b for _, b in ps])
            out.append({"model": model, "domain": domain, "metric": WIN_RATE, "value": wr["win_rate"]})
            out.append({"model": model, "domain": domain, "metric": "win_rate_prompts", "value": float(len(ps))})
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.1f}"


def table_rows(results: list[dict], models: list[str], columns: list[str]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the paper-style table: one row per model, one column per set/domain."""
    value = {(r["model"], r["domain"], r["metric"]): r["value"] for r in results}
    header = ["model", *columns, AVERAGE, "win rate vs base"]
    rows = []
    for m in models:
        cells = [_fmt(value.get((m, c, "accuracy"))) for c in columns]
        cells.append(_fmt(value.get((m, AVERAGE, "accuracy"))))
        cells.append(_fmt(value.get((m, ALL, WIN_RATE))))
        rows.append([m, *cells])
    return header, rows


def markdown(header: list[str], rows: list[list[str]], title: str, notes: str = "") -> str:
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "Accuracy in percent per column (unanswered prompts count as wrong); average = plain mean of "
              "the columns; win rate = percent of prompts where the reward model scores the model's response "
              "above the base target's (ties count half)."]
    if notes:
        lines += ["", notes]
    return "\n".join(lines) + "\n"


def held_out_judgement(generations: list[dict]):
    """The reward model judged on the evaluated models' replies, per results column: where the
    set's check gives a verdict, replies of different models to one item compete (right vs wrong
    pairs, top-1 pick against chance), as in the build's audit (`fusechat.audit`)."""
    import pandas as pd

    from fusechat import audit

    rows = [g for g in generations if g["correct"] is not None and g["reward"] is not None]
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame({
        "domain": [g["column"] or g["set"] for g in rows],
        "prompt_id": [f"{g['set']}\0{g['prompt_id']}" for g in rows],
        "truth": [float(bool(g["correct"])) for g in rows],
        "reward": [float(g["reward"]) for g in rows],
    })
    return audit.judged_by(frame, ["domain"])


def audit_notes(datasets: Path, generations: list[dict]) -> tuple[str, list[str]]:
    """table.md's reward-model section and its warnings: the build's audit of the training data
    (`datasets/audit.json`, when the run built its data here) and the reward model on the held-out
    replies, which the win rates above rest on."""
    from fusechat import audit

    parts, warnings = [], []
    built = audit.load(datasets)
    if built is not None:
        warnings = list(built.get("warnings") or [])
        parts.append(audit.markdown(built, level=2, sources=False).replace(
            "## Reward-model audit", "## Reward-model audit of the training data (build)", 1))
    held = held_out_judgement(generations)
    if len(held):
        header = ["column", "items with a right reply", "competing items", "pairwise accuracy (right vs wrong)",
                  "top-1 right", "chance"]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in held.itertuples(index=False):
            lines.append(f"| {r.domain} | {r.prompts_right} of {r.prompts} | {r.competing} | "
                         f"{audit.cell(r.pairwise_accuracy, '2')} | {audit.cell(r.top1_right, 'pct')} | "
                         f"{audit.cell(r.chance, 'pct')} |")
        parts += ["## Reward model on the held-out replies",
                  "The evaluated models' replies to one item compete where the set's check gives a verdict.",
                  "\n".join(lines)]
    return "\n\n".join(parts), warnings


def rich_table(header: list[str], rows: list[list[str]], title: str):
    from rich.table import Table

    table = Table(title=title)
    # model names whole; narrow terminals wrap the headers instead
    table.add_column(header[0], no_wrap=True, min_width=max(len(r[0]) for r in rows) if rows else None)
    for h in header[1:]:
        table.add_column(h, justify="right", overflow="fold", min_width=5)
    for r in rows:
        table.add_row(*r)
    return table


def plot(results: list[dict], models: list[str], columns: list[str], path: Path) -> None:
    """Grouped bars: one group per column (plus the average), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    value = {(r["model"], r["domain"]): r["value"] for r in results if r["metric"] == "accuracy"}
    groups = [*columns, AVERAGE]
    width = 0.8 / max(len(models), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.2 * len(groups) * max(1, len(models) / 3) + 2), 4))
    for k, m in enumerate(models):
        ys = [value.get((m, g), float("nan")) for g in groups]
        ax.bar([i + (k - (len(models) - 1) / 2) * width for i in range(len(groups))], ys, width, label=m)
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
