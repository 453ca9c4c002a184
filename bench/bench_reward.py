"""Benchmark reward scoring: the batched scorer against a one-response-at-a-time loop.

    .venv/bin/python bench/bench_reward.py [--responses 512] [--hidden 256] [--layers 4] [--device cpu]

Both score the same conversations with the same tiny ArmoRM (built here in ArmoRM's layout, larger
than the test one). The loop is the pattern of the scripts this project descends from: render and
tokenize one conversation, one forward pass per response, read the score. The batched scorer
sorts by length and packs batches under a token budget. Scores must agree within --atol.
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


def conversations(n: int, max_words: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [[{"role": "user", "content": text(3, 30)}, {"role": "assistant", "content": text(5, max_words)}]
            for _ in range(n)]


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
    ap.add_argument("--responses", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=16384)
    ap.add_argument("--max-words", type=int, default=60, help="longest reply, in words")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "auto"])
    ap.add_argument("--atol", type=float, default=1e-4)
    args = ap.parse_args()

    from fusechat.scoring.reward import RewardScorer
    from fusechat.testing.tiny_armorm import build_tiny_armorm

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_armorm(Path(tmp) / "armorm", hidden_size=args.hidden, num_layers=args.layers,
                                 gating_hidden_dim=args.hidden)
        scorer = RewardScorer(str(path), dtype=args.dtype, device=args.device, batch_tokens=args.batch_tokens)
        convs = conversations(args.responses, args.max_words)
        tokens = sum(map(len, scorer.encode_many(convs)))
        scorer.score(convs[:8])  # warm-up both paths (allocator, kernels)
        loop_scores(scorer.model, scorer.tokenizer, convs[:8], scorer.device)

        t0 = time.perf_counter()
        batched = [o.score for o in scorer.score(convs)]
        t_batched = time.perf_counter() - t0
        t0 = time.perf_counter()
        looped = loop_scores(scorer.model, scorer.tokenizer, convs, scorer.device)
        t_loop = time.perf_counter() - t0

    worst = max(abs(a - b) for a, b in zip(batched, looped))
    print(f"model: tiny ArmoRM hidden {args.hidden}, {args.layers} layers, {args.device} {scorer.dtype}")
    print(f"inputs: {len(convs)} conversations, {tokens} tokens ({tokens / len(convs):.0f} per conversation)")
    print(f"one at a time: {len(convs) / t_loop:8.1f} responses/s ({t_loop:.2f} s)")
    print(f"batched:       {len(convs) / t_batched:8.1f} responses/s ({t_batched:.2f} s), "
          f"batch_tokens {args.batch_tokens}")
    print(f"speed-up: {t_loop / t_batched:.2f}x; largest score difference {worst:.2e}")
    if worst > args.atol:
        raise SystemExit(f"scores differ by {worst:.2e} > atol {args.atol}")


if __name__ == "__main__":
    main()
