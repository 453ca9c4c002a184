"""Train the demo world's reward model: ArmoRM's exact architecture, learned on what the demo's
sources really answer.

    python -m fusechat.demo.train_reward --out data/demo/models/reward

The demo needs a reward model that tells right from wrong on the responses the recipe scores, in
the same checkpoint layout as the published ArmoRM so the scoring stage loads it through the same
code. A model trained from random weights on the world's reference answers against a shuffled or
truncated copy ranked a wrong instruction answer first more often than a random pick: the sources'
mistakes are other ones (an operand misread, a result off by one, a word doubled or misspelt, the
input echoed), and a few hundred steps from random weights learn neither arithmetic nor word order.
So:

1. the backbone starts from the demo target's (`data/demo/models/target-llama3`: same tokenizer,
   ArmoRM's vocabulary plus its [PAD]), as ArmoRM starts from Llama-3-8B-Instruct, a chat model of
   the Llama targets' family: the target learned every domain's rule before its habits, so its
   weights already predict results of sums and word orders, which random weights must first learn.
   Judged on one demo run's responses (top-1 pick right, instruction / math): from the math
   source's backbone, 1500 steps, 44% / 17%; from the target's, 2500 steps, 61% / 33%; 5000
   steps, 66% / 56%; 8000 steps on twice the sampled prompts (the defaults), 69% / 55%;
2. preferences come from the sources themselves: fresh prompts, disjoint from the demo's prompt
   files, are sampled by every source of `recipes/demo.yaml` with its own settings through the
   recipe's sample and score stages (`--work`, reused for the same prompt count and seed); each
   response is right or wrong by the world's checkers (`fusechat.audit`'s truth); pairs are a right
   response (or the world's reference) against a wrong one to the same prompt;
3. the rest of every batch is fresh near misses (`world.near_miss_response`, the kinds of mistakes
   read off those responses) against the reference answer, on fresh prompts;
4. Bradley-Terry loss -log sigmoid(score(chosen) - score(rejected)), every parameter except the
   fixed transform matrix; then the scores are put on ArmoRM's scale (`calibrate`).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "demo.yaml"
INIT = ROOT / "data" / "demo" / "models" / "target-llama3"
# the published band of the build (recipes/demo.yaml `build.band`): scores are scaled so that the
# pairs the build forms (one source's best against its worst, a right and a wrong answer) fall in it
BAND = (0.01, 0.1)
# domain mix of the near-miss part of a batch: math and instruction need the most examples
# (arithmetic facts, word order); Chinese only needs to stay sensible (one source, SFT only)
NEAR_MISS_MIX = {"math": 0.35, "code": 0.2, "instruction": 0.4, "chinese": 0.05}
PARAMS = ("x", "n", "a", "num", "value")


def _encode(tokenizer, pattern: list[int], prompt: str, reply: str) -> tuple[list[int], int]:
    from fusechat.scoring.armorm import find_gating_position

    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}], tokenize=True,
        return_dict=False,
    )
    return list(ids), find_gating_position(list(ids), pattern)


def _common_prefix(tokenizer) -> list[int]:
    """The token ids every conversation starts with (the chat template's system block)."""
    a, b = (tokenizer.apply_chat_template([{"role": "user", "content": u}, {"role": "assistant", "content": r}],
                                          tokenize=True, return_dict=False) for u, r in (("What", "x"), ("Zoe", "y")))
    n = 0
    while a[n] == b[n]:
        n += 1
    return list(a[:n])


def _scores(model, prefix: list[int], items: list[tuple[list[int], int]], pad_id: int):
    """Scores of conversations that all start with `prefix`, as `model(...)` gives them: the prefix
    (about two thirds of each conversation's tokens here) runs once and its keys and values are
    shared by every row. Written out because the scoring stage's packing shares a prompt between
    its replies, not one prefix between every prompt, and training time is the limit here."""
    import torch
    from transformers.cache_utils import DynamicCache

    p = len(prefix)
    if any(ids[:p] != prefix for ids, _ in items):
        raise ValueError("every conversation must start with the chat template's common prefix")
    n, width = len(items), max(len(ids) for ids, _ in items) - p
    suffix = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, p + width), dtype=torch.long)
    mask[:, :p] = 1
    for i, (ids, _) in enumerate(items):
        suffix[i, : len(ids) - p] = torch.tensor(ids[p:])
        mask[i, : len(ids)] = 1
    config = model.model.config
    kept = config._attn_implementation
    config._attn_implementation = "sdpa"  # transformers' own masks for a batch after a cache
    try:
        head = model.model(input_ids=torch.tensor([prefix]), use_cache=True).past_key_values
        cache = DynamicCache(config=config)
        for i, layer in enumerate(head.layers):
            cache.update(layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1), i)
        positions = torch.arange(p, p + width)[None].expand(n, -1)
        hidden = model.model(input_ids=suffix, attention_mask=mask, past_key_values=cache, position_ids=positions,
                             use_cache=True).last_hidden_state
    finally:
        config._attn_implementation = kept
    rows = torch.arange(n)
    gating = torch.tensor([g for _, g in items]) - p
    return model.heads(hidden[rows, mask.sum(dim=-1) - 1 - p], hidden[rows, gating])[0]


def score_texts(model, tokenizer, pattern, items: list[tuple[str, str]], pad_id: int, batch: int = 128) -> list[float]:
    """Scores of (prompt, reply) items, in order."""
    import torch

    prefix, out = _common_prefix(tokenizer), []
    with torch.no_grad():
        for i in range(0, len(items), batch):
            out += _scores(model, prefix, [_encode(tokenizer, pattern, p, r) for p, r in items[i:i + batch]], pad_id).tolist()
    return out


# -- preferences from the sources ---------------------------------------------------------------
def fresh_prompts(per_domain: int, seed: int) -> list[dict[str, Any]]:
    """World rows none of whose texts is in the demo's prompt files (train or evaluation)."""
    from fusechat.demo import world

    used = {r["instruction"] for split in world.SPLITS for r in world.make_prompts(split)}
    rows = []
    for domain in world.DOMAINS:
        rng = random.Random(f"reward-{seed}-{domain}")
        got, misses = 0, 0
        while got < per_domain and misses < 2000:
            row = world.draw(domain, rng)
            if row["instruction"] in used:
                misses += 1
                continue
            misses = 0
            used.add(row["instruction"])
            rows.append({"id": f"reward-{domain}-{got:04d}", **row})
            got += 1
    return rows


def sample_sources(work: Path, recipe_path: Path, per_domain: int, seed: int) -> Path:
    """Fresh prompts sampled by the recipe's sources and checked, through the sample and score
    stages; returns the run directory (reused when it is complete)."""
    import yaml

    from fusechat.demo import world
    from fusechat.recipe import load_recipe
    from fusechat.sampling.stage import run_sample
    from fusechat.scoring.stage import run_score

    work = work.resolve()  # the recipe written there resolves its paths against its own folder
    run, prompts = work / "run", work / "prompts"
    # reused only for the same prompts; otherwise the stages below sample and score what is new
    stamp, params = work / "params.json", {"prompts_per_domain": per_domain, "seed": seed}
    if (run / "scores" / "scores.parquet").exists() and stamp.exists() and json.loads(stamp.read_text()) == params:
        return run
    prompts.mkdir(parents=True, exist_ok=True)
    rows = fresh_prompts(per_domain, seed)
    for domain in world.DOMAINS:
        lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in rows if r["domain"] == domain]
        (prompts / f"{domain}.jsonl").write_text("\n".join(lines) + "\n")
    recipe_file = work / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump({
        "extends": str(recipe_path.resolve()), "name": "demo-reward-data", "run_dir": str(run), "seed": seed,
        "datasets": [{"name": f"reward-{d}", "path": str(prompts / f"{d}.jsonl"), "adapter": "demo", "domain": d}
                     for d in world.DOMAINS],
    }))
    recipe = load_recipe(recipe_file)
    run_sample(recipe)
    run_score(recipe)  # for its checks; the rewards of the model being replaced are not used
    stamp.write_text(json.dumps(params) + "\n")
    return run


def labeled_responses(run: Path) -> list[dict[str, Any]]:
    """One row per scored response with a known truth: domain, prompt_id, prompt (the user turn),
    text, source, right."""
    import numpy as np

    from fusechat import audit
    from fusechat.tables import PROMPTS, RESPONSES, SCORES, read

    prompts = read(PROMPTS, run / "prompts" / "prompts.parquet")
    responses = read(RESPONSES, run / "responses" / "responses.parquet")
    scores = read(SCORES, run / "scores" / "scores.parquet")
    frame = audit.response_frame(prompts.select(["prompt_id", "meta"]), scores, responses)
    user = {p["prompt_id"]: p["messages"][-1]["content"] for p in prompts.select(["prompt_id", "messages"]).to_pylist()}
    text = dict(zip(responses.column("response_id").to_pylist(), responses.column("text").to_pylist()))
    known = frame[~np.isnan(frame["truth"].to_numpy())]
    return [{"domain": r.domain, "prompt_id": r.prompt_id, "prompt": user[r.prompt_id], "text": text[r.response_id],
             "source": r.source, "right": bool(r.truth)} for r in known.itertuples(index=False)]


def sampled_pairs(rows: list[dict[str, Any]], world_rows: dict[str, dict], per_prompt: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): a right response or the world's reference against a wrong
    response of the same prompt, distinct texts, at most `per_prompt` per prompt."""
    from fusechat.demo import world

    rng = random.Random(f"sampled-pairs-{seed}")
    by_prompt: dict[str, dict[bool, dict[str, None]]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], {True: {}, False: {}})[r["right"]][r["text"]] = None
    out = []
    for prompt, texts in by_prompt.items():
        right = {**texts[True], world.good_response(world_rows[prompt]): None}
        combos = [(c, x) for c in right for x in texts[False]]
        rng.shuffle(combos)
        out += [(prompt, c, x) for c, x in combos[:per_prompt]]
    return out


# -- near misses on fresh prompts ----------------------------------------------------------------
def _code_passes(row: dict[str, Any], text: str) -> bool:
    """Whether a code answer this module wrote passes the row's tests. Run in this process, not in
    the sandbox: the texts are the world's own templates, and a sandbox run per pair would cost
    more than the training step."""
    code = text.strip().removeprefix("```python").removesuffix("```")
    env: dict[str, Any] = {}
    try:
        exec(compile(code, "<near-miss>", "exec"), env)  # noqa: S102 - the world's own template text
        for test in row["tests"]:
            exec(test, env)  # noqa: S102
    except Exception:
        return False
    return True


def _is_right(row: dict[str, Any], text: str) -> bool:
    from fusechat.demo import world

    if row["domain"] == "code":
        return _code_passes(row, text)
    return world.evaluate_response(row["domain"], row, text)


class NearMisses:
    """An endless, seeded stream of (world row, reference, near miss) on fresh prompts (none in
    the demo's prompt files). The reference sometimes renames the parameter (still right) and either
    side sometimes starts with a space (mistral-code's answers all do): neither decides."""

    def __init__(self, seed: int, exclude: set[str]):
        self.rng = random.Random(f"near-misses-{seed}")
        self.draws = {d: random.Random(f"near-misses-{seed}-{d}") for d in NEAR_MISS_MIX}
        self.exclude = exclude

    def __call__(self) -> tuple[dict[str, Any], str, str]:
        import re

        from fusechat.demo import world

        rng = self.rng
        domain = rng.choices(list(NEAR_MISS_MIX), weights=list(NEAR_MISS_MIX.values()))[0]
        row = world.draw(domain, self.draws[domain])
        while row["instruction"] in self.exclude:
            row = world.draw(domain, self.draws[domain])
        good = world.good_response(row)
        if domain == "code" and rng.random() < 0.3:
            m = json.loads(row["meta"])
            q = rng.choice([p for p in PARAMS if p != m["param"]])
            body = re.sub(rf"\b{m['param']}\b", q, m["expr"])
            good = f"```python\ndef {m['name']}({q}):\n    return {body}\n```"
        for _ in range(50):
            bad = world.near_miss_response(row, rng)
            if not _is_right(row, bad):
                break
        good, bad = ((" " + t if rng.random() < 0.15 else t) for t in (good, bad))
        return row, good, bad


# -- the score scale -----------------------------------------------------------------------------
def band_share(rows: list[dict[str, Any]], scores: list[float], factor: float) -> tuple[float, int]:
    """The share of (prompt, source) groups with a right and a wrong response whose best right
    against worst wrong margin, scaled by `factor`, falls in the band (the build's math and code
    pairs; instruction pairs are best against worst); and how many such groups there are."""
    groups: dict[tuple[str, str], dict[bool, list[float]]] = {}
    for r, s in zip(rows, scores):
        groups.setdefault((r["prompt_id"], r["source"]), {True: [], False: []})[r["right"]].append(s)
    margins = [max(g[True]) - min(g[False]) for g in groups.values() if g[True] and g[False]]
    inside = sum(BAND[0] <= factor * m <= BAND[1] for m in margins)
    return inside / max(1, len(margins)), len(margins)


def calibrate(rows: list[dict[str, Any]], scores: list[float]) -> float:
    """The factor for `gating.logit_scale` (every score scales with it, rankings unchanged) that puts
    the most right-against-wrong pairs of one source in the published band: a Bradley-Terry
    model's scale is arbitrary, the band is in ArmoRM's units."""
    import numpy as np

    candidates = np.geomspace(1e-4, 10.0, 400)
    shares = np.asarray([band_share(rows, scores, f)[0] for f in candidates])
    good = candidates[shares >= shares.max() - 1e-9]
    # among the best factors, the middle one: the margins sit in the band, not at one edge
    return float(np.sqrt(good[0] * good[-1]))


def init_backbone(start: Path, lm: Path) -> None:
    """Put the chat model `lm`'s backbone (embeddings, layers, norm; its tokenizer without ArmoRM's
    extra [PAD]) into the ArmoRM checkpoint folder `start`, its rotary settings into the config."""
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(start / "model.safetensors"))
    theirs = load_file(str(lm / "model.safetensors"))
    for key, value in theirs.items():
        if not key.startswith("model."):
            continue  # the LM head: ArmoRM has its own heads
        if key not in state:
            raise ValueError(f"{lm}: {key} has no place in the reward model (set its layers to the LM's)")
        if key == "model.embed_tokens.weight":
            merged = state[key].clone()
            merged[: value.shape[0]] = value
            state[key] = merged
        elif state[key].shape == value.shape:
            state[key] = value.to(torch.float32).contiguous()
        else:
            raise ValueError(f"{lm}: {key} is {tuple(value.shape)}, the reward model's {tuple(state[key].shape)}")
    save_file(state, str(start / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((start / "config.json").read_text())
    config["rope_parameters"] = json.loads((lm / "config.json").read_text())["rope_parameters"]
    (start / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def near_miss_accuracy(model, tokenizer, pattern, pad_id: int, seed: int, n: int = 800) -> dict[str, float]:
    """Pairwise accuracy per domain on near misses of the world's evaluation prompts."""
    from fusechat.demo import world

    rng = random.Random(f"held-out-{seed}")
    rows = world.make_prompts("eval", seed)
    pairs = []
    for row in (rng.choice(rows) for _ in range(n)):
        bad = world.near_miss_response(row, rng)
        if not _is_right(row, bad):
            pairs.append((row, world.good_response(row), bad))
    s = score_texts(model, tokenizer, pattern, [(r["instruction"], t) for r, g, b in pairs for t in (g, b)], pad_id)
    wins: dict[str, list[bool]] = {}
    for i, (row, _, _) in enumerate(pairs):
        wins.setdefault(row["domain"], []).append(s[2 * i] > s[2 * i + 1])
    return {d: round(sum(w) / len(w), 4) for d, w in sorted(wins.items())}


def train_reward(out: Path, *, work: Path, recipe_path: Path = RECIPE, init: Path = INIT, per_domain: int = 400,
                 steps: int = 8000, batch: int = 32, lr: float = 1e-3, sampled_share: float = 0.3, seed: int = 0,
                 pairs_per_prompt: int = 12) -> dict:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from fusechat.demo import world
    from fusechat.run import atomic_dir
    from fusechat.scoring.armorm import gating_pattern_ids, load_armorm
    from fusechat.testing.tiny_armorm import build_tiny_armorm

    torch.manual_seed(seed)
    t_data = time.time()
    run = sample_sources(work, recipe_path, per_domain, seed)
    rows = labeled_responses(run)
    world_rows = {r["instruction"]: r for r in fresh_prompts(per_domain, seed)}
    sampled = sampled_pairs(rows, world_rows, pairs_per_prompt, seed)
    near_misses = NearMisses(seed, {r["instruction"] for split in world.SPLITS for r in world.make_prompts(split)})
    data_seconds = time.time() - t_data
    layers = json.loads((init / "config.json").read_text())["num_hidden_layers"]
    with tempfile.TemporaryDirectory() as tmp:
        start = build_tiny_armorm(Path(tmp) / "init", num_layers=layers, seed=seed)
        init_backbone(start, init)
        tokenizer = AutoTokenizer.from_pretrained(start)
        model = load_armorm(start)
        pattern = gating_pattern_ids(tokenizer)
        pad = tokenizer.pad_token_id
        prefix = _common_prefix(tokenizer)
        cache: dict[tuple[str, str], tuple[list[int], int]] = {}

        def enc(prompt: str, reply: str) -> tuple[list[int], int]:
            if (prompt, reply) not in cache:
                cache[prompt, reply] = _encode(tokenizer, pattern, prompt, reply)
            return cache[prompt, reply]

        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
        # warm-up over 5% of the steps, but at least two: OneCycleLR divides by the phase's length
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2 / steps))
        rng = random.Random(f"batches-{seed}")
        n_sampled = round(batch * sampled_share)
        t0, losses = time.time(), []
        for step in range(steps):
            fresh = [near_misses() for _ in range(batch - n_sampled)]
            part = [(row["instruction"], c, r) for row, c, r in fresh] + [rng.choice(sampled) for _ in range(n_sampled)]
            s = _scores(model, prefix, [enc(p, c) for p, c, _ in part] + [enc(p, r) for p, _, r in part], pad)
            loss = -torch.nn.functional.logsigmoid(s[: len(part)] - s[len(part):]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % 100 == 0 or step == steps - 1:
                print(f"reward step {step:4d}  loss {sum(losses[-100:]) / len(losses[-100:]):.4f}  {time.time() - t0:.0f} s",
                      flush=True)
        train_seconds = time.time() - t0
        model.eval()
        raw = score_texts(model, tokenizer, pattern, [(r["prompt"], r["text"]) for r in rows], pad)
        factor = calibrate(rows, raw)
        share, groups = band_share(rows, raw, factor)
        with torch.no_grad():
            model.gating.logit_scale.mul_(factor)
        report = {
            "steps": steps, "batch": batch, "lr": lr, "seed": seed, "init": init.name, "num_layers": layers,
            "prompts_per_domain": per_domain, "responses_labeled": len(rows), "sampled_pairs": len(sampled),
            "sampled_share": sampled_share, "near_miss_mix": NEAR_MISS_MIX,
            "held_out_near_miss_accuracy": near_miss_accuracy(model, tokenizer, pattern, pad, seed),
            "right_vs_wrong_groups_in_band": round(share, 4), "right_vs_wrong_groups": groups,
            "score_scale_factor": factor, "band": list(BAND), "final_loss": sum(losses[-100:]) / len(losses[-100:]),
            "data_seconds": round(data_seconds, 1), "train_seconds": round(train_seconds, 1),
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
    ap.add_argument("--work", type=Path, default=Path("runs/demo-reward-data"),
                    help="folder for the sampled preference data (reused for the same prompt count and seed)")
    ap.add_argument("--recipe", type=Path, default=RECIPE, help="the recipe whose sources answer")
    ap.add_argument("--init", type=Path, default=INIT, help="chat model whose backbone the reward model starts from")
    ap.add_argument("--prompts-per-domain", type=int, default=400)
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    # one thread: on cores shared with other work, two OpenMP threads stall each other
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.steps < 4:
        ap.error(f"--steps {a.steps}: at least 4 (a warm-up and a decay phase)")
    import torch

    torch.set_num_threads(a.threads)
    report = train_reward(a.out, work=a.work, recipe_path=a.recipe, init=a.init, per_domain=a.prompts_per_domain,
                          steps=a.steps, batch=a.batch, seed=a.seed)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
