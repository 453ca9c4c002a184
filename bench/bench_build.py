"""Benchmark the build stage on 1,000,000 synthetic scored responses, against a per-row Python loop.

    .venv/bin/python bench/bench_build.py [--prompts 50000] [--sources 4] [--samples 5] [--loop-prompts N]

Synthetic run: every prompt gets `samples` responses from each of `sources` sources (all four
domains; instruction 50%, math 25%, code 15%, chinese 10%), rewards around 0.1 like ArmoRM's,
0.5% null rewards, 1% truncated. The stage runs end to end (read, select, write, report); then
a straightforward loop over rows makes the same selection, on the first `--loop-prompts` prompts
(default: all), and both selections must agree on every prompt they share.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusechat.build import BAND_EPS, NO_GOOD_REASON, SFT_ONLY, load_inputs, select, unit_hash  # noqa: E402
from fusechat.recipe import Recipe  # noqa: E402
from fusechat.run import write_table  # noqa: E402
from fusechat.tables import RIGHT, WRONG  # noqa: E402

DOMAIN_SHARE = {"instruction": 0.5, "math": 0.25, "code": 0.15, "chinese": 0.1}
STATUS_SHARE = {
    "math": {"correct": 0.6, "incorrect": 0.3, "unparseable": 0.05, "timeout": 0.05},
    "code": {"pass": 0.5, "fail": 0.4, "timeout": 0.05, "error": 0.05},
}


def make_run(run: Path, n_prompts: int, n_sources: int, n_samples: int, seed: int = 0,
             decimals: int | None = None) -> None:
    """Write prompts, responses and scores tables for a synthetic run (`decimals`: round the
    rewards, which makes ties common)."""
    rng = np.random.default_rng(seed)
    domains = rng.choice(list(DOMAIN_SHARE), size=n_prompts, p=list(DOMAIN_SHARE.values()))
    pids = np.array([f"p{i:07d}" for i in range(n_prompts)], dtype=object)
    write_table(pa.table({
        "prompt_id": pids, "dataset": np.array([f"{d}-set" for d in domains], dtype=object), "domain": domains,
        "messages": [[{"role": "user", "content": f"prompt {i}"}] for i in range(n_prompts)],
        "meta": ["{}"] * n_prompts,  # the audit reads it for exact answers (none here)
    }), run / "prompts" / "prompts.parquet")

    per_prompt = n_sources * n_samples
    n = n_prompts * per_prompt
    p = np.repeat(np.arange(n_prompts), per_prompt)
    src = np.tile(np.repeat(np.arange(n_sources), n_samples), n_prompts)
    sample = np.tile(np.arange(n_samples), n_prompts * n_sources)
    sources = np.array([f"src{s}" for s in range(n_sources)], dtype=object)[src]
    rid = np.array([f"r{i:08d}" for i in rng.permutation(n)], dtype=object)
    reward = 0.1 + 0.01 * src + rng.normal(0, 0.04, n)
    reward = (reward if decimals is None else reward.round(decimals)).astype(np.float32)
    reward_arr = pa.array(reward, mask=rng.random(n) < 0.005)
    truncated = rng.random(n) < 0.01
    status = np.full(n, "none", dtype=object)
    rdom = domains[p]
    for dom, share in STATUS_SHARE.items():
        where = np.flatnonzero(rdom == dom)
        status[where] = rng.choice(list(share), size=len(where), p=list(share.values()))
    write_table(pa.table({
        "response_id": rid, "prompt_id": pids[p], "source": sources, "model_revision": ["r1"] * n,
        "sample_index": sample, "text": [f"t{i}" for i in range(n)], "truncated": truncated,
        "completion_tokens": (np.arange(n) % 200 + 1).astype(np.int32),  # the audit's length figures
    }), run / "responses" / "responses.parquet")
    write_table(pa.table({
        "response_id": rid, "prompt_id": pids[p], "source": sources, "domain": rdom, "reward": reward_arr,
        "check_status": status, "truncated": truncated,
    }), run / "scores" / "scores.parquet")


def loop_select(run: Path, build, source_order: list[str], limit: int | None) -> tuple[dict[str, tuple], float]:
    """The same rules, one row at a time: prompt_id -> (assigned, reason, chosen id, rejected id),
    and the seconds spent reading.

    Split hashes come from fusechat.build.unit_hash (vectorised) so that both sides split alike;
    band_before_split is not implemented here.
    """
    assert not build.band_before_split
    t0 = time.perf_counter()
    prompts = pq.read_table(run / "prompts" / "prompts.parquet", columns=["prompt_id", "domain"]).to_pylist()
    if limit is not None:
        prompts = prompts[:limit]
    keep = {r["prompt_id"] for r in prompts}
    responses = pq.read_table(run / "responses" / "responses.parquet", columns=["response_id", "sample_index"])
    sample_of = dict(zip(responses["response_id"].to_pylist(), responses["sample_index"].to_pylist()))
    order = {s: i for i, s in enumerate(source_order)}
    by_prompt = defaultdict(list)
    for row in pq.read_table(run / "scores" / "scores.parquet").to_pylist():
        if row["prompt_id"] in keep:
            row["sample_index"] = sample_of[row["response_id"]]
            row["srank"] = order.get(row["source"], len(order))
            by_prompt[row["prompt_id"]].append(row)
    u_split = unit_hash([r["prompt_id"] for r in prompts], build.seed, "split")
    t_read = time.perf_counter() - t0
    low, high = build.band.low - BAND_EPS, build.band.high + BAND_EPS

    out = {}
    for k, pr in enumerate(prompts):
        pid, dom = pr["prompt_id"], pr["domain"]
        rows = by_prompt[pid]
        elig = [r for r in rows if r["reward"] is not None and not (build.drop_truncated and r["truncated"])]
        good = [r for r in elig if dom not in RIGHT or r["check_status"] in RIGHT[dom]]
        best = min(good, key=lambda r: (-r["reward"], r["srank"], r["sample_index"], r["response_id"]), default=None)
        pairs = []
        if dom not in SFT_ONLY:
            per_source = defaultdict(list)
            for r in elig:
                per_source[r["srank"]].append(r)
            for srank, group in per_source.items():
                cands = [r for r in group if dom not in RIGHT or r["check_status"] in RIGHT[dom]]
                if not cands:
                    continue
                c = min(cands, key=lambda r: (-r["reward"], r["sample_index"], r["response_id"]))
                pool = [r for r in group if r is not c and (dom == "instruction" or r["check_status"] in WRONG[dom])]
                if not pool:
                    continue
                w = min(pool, key=lambda r: (r["reward"], r["sample_index"], r["response_id"]))
                margin = c["reward"] - w["reward"]
                if low <= margin <= high:
                    key = {"largest_margin": -margin, "smallest_margin": margin, "best_chosen": -c["reward"],
                           "source_order": 0.0}[build.pair_policy]
                    pairs.append(((key, srank), c, w))
        pair = min(pairs, key=lambda t: t[0]) if pairs else None
        frac = build.sft_fraction.get(dom)
        if not rows:
            out[pid] = ("dropped", "no_responses", None, None)
        elif not elig:
            out[pid] = ("dropped", "no_eligible_response", None, None)
        elif dom in SFT_ONLY:
            out[pid] = ("sft", "sft_only", best["response_id"], None) if best else ("dropped", "?", None, None)
        elif frac is not None and u_split[k] >= frac:
            if pair:
                out[pid] = ("dpo", "split_dpo", pair[1]["response_id"], pair[2]["response_id"])
            else:
                out[pid] = ("dropped", NO_GOOD_REASON[dom] if dom in NO_GOOD_REASON and not best
                            else "no_pair_in_band", None, None)
        elif frac is not None:
            out[pid] = ("sft", "split_sft", best["response_id"], None) if best else (
                "dropped", NO_GOOD_REASON.get(dom, "?"), None, None)
        elif pair:
            out[pid] = ("dpo", "pair_in_band", pair[1]["response_id"], pair[2]["response_id"])
        elif best:
            out[pid] = ("sft", "sft_fallback_no_pair", best["response_id"], None)
        else:
            out[pid] = ("dropped", NO_GOOD_REASON.get(dom, "?"), None, None)
    return out, t_read


def vector_decisions(run: Path, build, source_order: list[str]) -> tuple[dict[str, tuple], float]:
    """fusechat.build's selection in the same shape as loop_select's, and the seconds spent reading."""
    t0 = time.perf_counter()
    _, _, prompts, resp = load_inputs(run)
    t_read = time.perf_counter() - t0
    sel = select(prompts, resp, build, source_order)
    ids = resp["response_id"].to_numpy(dtype=object)
    d = sel.decisions
    c, r = d["chosen_row"].to_numpy(), d["rejected_row"].to_numpy()
    return {pid: (a, why, ids[ci] if ci >= 0 else None, ids[ri] if ri >= 0 else None)
            for pid, a, why, ci, ri in zip(d["prompt_id"], d["assigned"], d["reason"], c, r)}, t_read


def bench_recipe(run: Path, n_sources: int, **build) -> Recipe:
    return Recipe.model_validate({
        "name": "bench-build", "run_dir": str(run), "base_dir": str(run),
        "sources": [{"name": f"src{s}", "model": f"org/src{s}", "family": "llama3"} for s in range(n_sources)],
        "datasets": [{"name": "x", "path": "org/x", "adapter": "x", "domain": "instruction"}],
        "scoring": {"reward_model": {"model": "org/rm"}},
        "build": build, "target": {"model": "org/t", "family": "llama3"},
        "sft": {"learning_rate": 1e-5}, "dpo": {"learning_rate": 1e-6, "beta": 0.1},
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=50_000)
    ap.add_argument("--sources", type=int, default=4)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--loop-prompts", type=int, default=None, help="loop on the first N prompts (default all)")
    args = ap.parse_args()

    from fusechat.build import run_build

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        t = time.perf_counter()
        make_run(run, args.prompts, args.sources, args.samples)
        n = args.prompts * args.sources * args.samples
        print(f"synthetic run: {args.prompts:,} prompts x {args.sources} sources x {args.samples} samples "
              f"= {n:,} scored responses (written in {time.perf_counter() - t:.1f} s)")
        recipe = bench_recipe(run, args.sources, sft_fraction={"instruction": 0.4}, test_fraction=0.02)
        order = [s.name for s in recipe.sources]

        t, cpu = time.perf_counter(), time.process_time()
        m = run_build(recipe)
        t_stage, cpu_stage = time.perf_counter() - t, time.process_time() - cpu
        t = time.perf_counter()
        vec, vec_read = vector_decisions(run, recipe.build, order)
        vec_sel = time.perf_counter() - t - vec_read
        t = time.perf_counter()
        loop, loop_read = loop_select(run, recipe.build, order, args.loop_prompts)
        loop_sel = time.perf_counter() - t - loop_read

        common = loop.keys() & vec.keys()
        diff = [p for p in common if loop[p] != vec[p]]
        scale = len(vec) / len(loop)
        print(f"run_build end to end (read, check, select, write tables, report, plots): {t_stage:.2f} s wall, "
              f"{cpu_stage:.2f} s CPU; {m.extra['sft_rows']:,} SFT rows, {m.extra['dpo_rows']:,} DPO pairs, "
              f"{sum(m.dropped.values()):,} prompts dropped {m.dropped}")
        print(f"vectorised, all {len(vec):,} prompts: read + check {vec_read:.2f} s, select {vec_sel:.2f} s")
        label = "all" if scale == 1 else f"first {len(loop):,}"
        extra = "" if scale == 1 else f" (x{scale:.1f} extrapolated to all: {loop_sel * scale:.2f} s)"
        print(f"per-row loop, {label} prompts: read into Python rows {loop_read:.2f} s, select {loop_sel:.2f} s{extra}")
        print(f"speed-up, selection only: {loop_sel * scale / vec_sel:.1f}x; read + select: "
              f"{(loop_read + loop_sel) * scale / (vec_read + vec_sel):.1f}x")
        print(f"identical selections on the {len(common):,} common prompts: {not diff}"
              + (f" ({len(diff)} differ, e.g. {diff[0]}: loop {loop[diff[0]]} vs {vec[diff[0]]})" if diff else ""))
        if diff:
            sys.exit(1)


if __name__ == "__main__":
    main()
