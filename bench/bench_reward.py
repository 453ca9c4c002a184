"""Benchmark reward scoring: the batched scorer against a one-response-at-a-time loop.

    .venv/bin/python bench/bench_reward.py [--responses 260] [--per-prompt 20] [--rounds 3] [--hidden 256] [--layers 4] [--device cpu]
    .venv/bin/python bench/bench_reward.py --run runs/demo --model data/demo/models/reward  # a run's own responses

All score the same conversations with the same tiny ArmoRM (built here in ArmoRM's layout, larger
than the test one). The loop is the pattern of the scripts this project descends from: render and
tokenize one conversation, one forward pass per response, read the score (bench/gpu_score_check.py
times it on a GPU too). The batched scorer packs conversations into batches under a token budget,
without padding, once with each prompt's tokens computed once for all its replies (the default)
and once without; both run identical conversations once, which the loop does not. --per-prompt replies follow each prompt, as the recipe's 20 candidates
per instruction prompt do; the default reply length makes prompts about 30% of the tokens (with
the template), our estimate for the recipe's chat data, and the default replies never repeat. --run reads
a run folder's prompts and responses instead (the first --responses in prompt order, as the scoring
stage orders them) and --model scores them with that ArmoRM. Scores must agree within --atol.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ("the model answers each question with care and a short example of how it works in practice "
         "because clear steps help readers follow along while numbers like 42 and 3.14 appear too").split()


def conversations(n: int, max_words: int, per_prompt: int = 1, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    convs: list[list[dict]] = []
    while len(convs) < n:
        prompt = {"role": "user", "content": text(3, 30)}
        convs += [[prompt, {"role": "assistant", "content": text(5, max_words)}] for _ in range(per_prompt)]
    return convs[:n]


def run_conversations(run: Path, n: int) -> list[list[dict]]:
    """The first n responses of a run folder, ordered by prompt as the scoring stage orders them."""
    import pyarrow.parquet as pq

    prompts = {p["prompt_id"]: p["messages"] for p in
               pq.read_table(run / "prompts" / "prompts.parquet", columns=["prompt_id", "messages"]).to_pylist()}
    rows = pq.read_table(run / "responses" / "responses.parquet", columns=["prompt_id", "text"]).to_pylist()
    rows = sorted((r for r in rows if r["text"].strip()), key=lambda r: r["prompt_id"])[:n]
    return [prompts[r["prompt_id"]] + [{"role": "assistant", "content": r["text"]}] for r in rows]


def loop_scores(model, tok, convs, device) -> list[float]:
    import torch

    from fusechat.scoring.armorm import find_gating_position, gating_pattern_ids

    from torch.nn.attention import SDPBackend, sdpa_kernel

    pattern = gating_pattern_ids(tok)
    out = []
    # the scorer's attention backends, so that the comparison measures batching alone
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with torch.inference_mode(), sdpa_kernel(backends):
        for conv in convs:
            ids = tok(tok.apply_chat_template(conv, tokenize=False), add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids], device=device)
            g = torch.tensor([find_gating_position(ids, pattern)], device=device)
            score, _ = model(x, torch.ones_like(x), g)
            out.append(score.float().item())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--responses", type=int, default=260)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds; the best of each is kept")
    ap.add_argument("--per-prompt", type=int, default=20, help="replies per prompt")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=None, help="default: the scorer's for the device")
    ap.add_argument("--max-words", type=int, default=240, help="longest reply, in words")
    ap.add_argument("--run", type=Path, help="a run folder: score its responses")
    ap.add_argument("--model", type=Path, help="an ArmoRM folder (default: a tiny one built here)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()

    from fusechat.scoring.armorm import find_gating_position
    from fusechat.scoring.reward import RewardScorer
    from fusechat.testing.tiny_armorm import build_tiny_armorm

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_tiny_armorm(Path(tmp) / "armorm", hidden_size=args.hidden,
                                               num_layers=args.layers, gating_hidden_dim=args.hidden)
        kwargs = dict(dtype=args.dtype, device=args.device, batch_tokens=args.batch_tokens)
        scorer = RewardScorer(str(path), **kwargs)
        unshared = RewardScorer(str(path), share_prompts=False, **kwargs)
        convs = run_conversations(args.run, args.responses) if args.run else \
            conversations(args.responses, args.max_words, args.per_prompt)
        encoded = scorer.encode_many(convs)
        tokens = sum(map(len, encoded))
        prompt_tokens = sum(find_gating_position(ids, scorer.pattern) + len(scorer.pattern) for ids in encoded)
        per_prompt = len(convs) / len({tuple(c[:-1][-1].items()) for c in convs})
        for s in (scorer, unshared):  # warm-up every path (allocator, kernels)
            s.score(convs[:40])
        loop_scores(scorer.model, scorer.tokenizer, convs[:8], scorer.device)

        # rounds alternate the three and keep each one's best time: a busy machine slows all alike
        timings, results = {}, {}
        for _ in range(args.rounds):
            for name, run in (("batched", lambda: [o.score for o in scorer.score(convs)]),
                              ("unshared", lambda: [o.score for o in unshared.score(convs)]),
                              ("loop", lambda: loop_scores(scorer.model, scorer.tokenizer, convs, scorer.device))):
                t0 = time.perf_counter()
                results[name] = run()
                timings[name] = min(timings.get(name, float("inf")), time.perf_counter() - t0)

    worst = max(abs(a - b) for name in ("batched", "unshared") for a, b in zip(results[name], results["loop"]))
    t_loop = timings["loop"]
    model = args.model or f"tiny ArmoRM hidden {args.hidden}, {args.layers} layers"
    print(f"model: {model}, {args.device} {scorer.dtype}")
    distinct = len({tuple(ids) for ids in encoded})
    print(f"inputs: {len(convs)} conversations ({distinct} distinct), {per_prompt:.1f} per prompt, {tokens} tokens "
          f"({tokens / len(convs):.0f} per conversation, prompts {prompt_tokens / tokens:.0%} of them)")
    print(f"one at a time:       {len(convs) / t_loop:8.1f} responses/s ({t_loop:.2f} s)")
    print(f"batched, unshared:   {len(convs) / timings['unshared']:8.1f} responses/s ({timings['unshared']:.2f} s), "
          f"{t_loop / timings['unshared']:.2f}x, batch_tokens {scorer.batch_tokens}")
    print(f"batched, shared prompts: {len(convs) / timings['batched']:4.1f} responses/s ({timings['batched']:.2f} s), "
          f"{t_loop / timings['batched']:.2f}x")
    print(f"speed-up: {t_loop / timings['batched']:.2f}x; largest score difference {worst:.2e}")
    if worst > args.atol:
        raise SystemExit(f"scores differ by {worst:.2e} > atol {args.atol}")


if __name__ == "__main__":
    main()
