"""Every CPU-side step at a fraction of the FuseChat-3.0 recipe's volume: wall time and peak memory.

    .venv/bin/python bench/bench_scale.py --fraction 0.1 0.3 1.0 [--workdir /tmp/fusechat-scale] [--keep]

A synthetic run per fraction, written as the stages write it: the prompts table with the recipe's
prompt counts per data set (`limit`s of recipes/fusechat-3.0-data.yaml, times the fraction), one
response shard per sampling shard of every source (the recipe's `responses` per prompt per domain,
shard ids from the sampling stage's own plan), and the score stage's reward and check shards under
the names the score stage gives them. Response lengths are log-normal (median 1.5 KB, capped at
16 KB, the cap marks the response truncated); the Chinese domain and a share of the others are
Chinese text (3 bytes a character in UTF-8). Texts are cut from a fixed pool of words, batch by
batch, so that writing 2.5 million responses takes seconds and little memory.

Then each step runs in a fresh process (so that peaks do not mix), through the stage's own code:
the responses merge (`fusechat.sampling.stage.merge`), the score table merge (`run_score` with
every shard present: no model runs), build, publish (dry run) and the training data preparation
(`fusechat.train.common.load_split` with the row checks; tokenization aside). Printed per step and
fraction: wall seconds, peak resident memory (the process's VmHWM), rows in and out; last, how
time and memory grow per unit of fraction from the smallest to the largest fraction (1.0 =
linear). Timings on a shared machine are noisy: the load average is printed with each step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "fusechat-3.0-data.yaml"
STEPS = ("responses_merge", "score_merge", "build", "publish", "train_data")
MEDIAN_BYTES, SIGMA, MAX_BYTES = 1500, 0.9, 16384
CHINESE_SHARE = 0.05  # of the responses outside the Chinese domain
BATCH_ROWS = 8192


def bench_recipe(run: Path):
    """The recipe with its run folder under `run`, pinned model revisions (no hub look-ups) and a
    local reward model folder (never loaded: every score shard is present)."""
    from fusechat.recipe import load_recipe

    recipe = load_recipe(RECIPE, run_dir=str(run), check_paths=False)
    for s in recipe.sources:
        s.revision = f"bench-{s.name}"
    reward = run / "reward-model"
    reward.mkdir(parents=True, exist_ok=True)
    recipe.scoring.reward_model.model = str(reward)
    recipe.scoring.reward_model.revision = "bench"
    return recipe


# -- the synthetic run -------------------------------------------------------------------------
def _pool(rng, language: str, size: int, unique: int = 1 << 20):
    """`size` bytes of text (words, spaces, newlines; `unique` bytes repeated) as a numpy byte
    array, and where each character starts (a text is cut on character boundaries only)."""
    import numpy as np

    if language == "zh":
        chars = np.array(list("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严"))
        text = "".join(rng.choice(chars, unique // 3)) + "。\n"
    else:
        words = ("the of and to a in is that for it as with be on by this are or an from which can "
                 "function return value each step first then we need so the answer is let us compute "
                 "response model data prompt code test python def print result number equation sum "
                 "list string example therefore because however note that here is how").split()
        picked = rng.choice(np.array(words, dtype=object), unique // 5)
        text = " ".join(picked)
        text = text.replace(" so ", ".\n\nSo ").replace(" def ", "\n```python\ndef ")
    base = np.frombuffer(text.encode(), dtype=np.uint8)
    data = np.tile(base, size // len(base) + 1)[:size]
    starts = (data & 0xC0) != 0x80
    # where the next character starts, from each byte: cuts move forward to it
    nxt = np.where(starts, np.arange(len(data), dtype=np.int32), np.int32(len(data)))
    return data, np.minimum.accumulate(nxt[::-1])[::-1]


def _texts(rng, pools, n: int, chinese: bool):
    """`n` texts as an Arrow string array (built from offsets into a pool slice, no Python
    strings), their byte lengths, and which were cut at the cap."""
    import numpy as np
    import pyarrow as pa

    data, nxt = pools["zh" if chinese else "en"]
    want = np.minimum(rng.lognormal(np.log(MEDIAN_BYTES), SIGMA, n).astype(np.int64) + 1, MAX_BYTES)
    total = int(want.sum())
    begin = int(nxt[int(rng.integers(0, len(data) - total - 4))])
    ends = nxt[np.minimum(begin + np.cumsum(want), len(data) - 1)]
    offsets = np.concatenate(([begin], ends)).astype(np.int64) - begin
    buf = pa.py_buffer(data[begin:ends[-1]].tobytes())
    arr = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), buf).cast(pa.string())
    lengths = np.diff(offsets)
    return arr, lengths, want >= MAX_BYTES


def make_prompts(recipe, fraction: float, rng):
    """The prompts table: the recipe's data sets, `limit * fraction` prompts each."""
    import pyarrow as pa

    from fusechat.run import stable_hash, stage_dir, write_table
    from fusechat.tables import PROMPTS

    rows = {k: [] for k in PROMPTS.names}
    for d in recipe.datasets:
        n = max(1, round(d.limit * fraction))
        for i in range(n):
            rows["prompt_id"].append(stable_hash(d.name, i))
            rows["dataset"].append(d.name)
            rows["domain"].append(d.domain)
            words = " ".join(rng.choice(["explain", "write", "compute", "the", "a", "function", "sum", "of",
                                         "list", "why", "how", "number"], int(rng.integers(8, 80))))
            rows["messages"].append([{"role": "user", "content": f"{d.name} {i}: {words}?"}])
            rows["gold_answer"].append(str(i % 97) if d.domain == "math" else None)
            rows["tests"].append([f"assert f({i}) == {i}"] if d.domain == "code" else None)
            rows["meta"].append(json.dumps({"row": i}))
    table = pa.table({k: rows[k] for k in PROMPTS.names}, schema=PROMPTS.schema())
    write_table(table, stage_dir(recipe, "prompts") / "prompts.parquet", PROMPTS)
    return table


def write_response_shards(recipe, prompts, rng) -> int:
    """One shard file per sampling shard, as `fusechat.sampling.shards.write_shard` writes it
    (schema, metadata), batch by batch."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fusechat.sampling.shards import META_KEY, plan_source, shard_path
    from fusechat.tables import RESPONSE_SHARD

    pools = {"en": _pool(rng, "en", 48 << 20), "zh": _pool(rng, "zh", 24 << 20)}
    counter = 0
    for source in recipe.sources:
        for shard in plan_source(recipe, source, prompts, source.revision):
            n = len(shard.prompt_ids) * shard.n
            chinese = shard.domain == "chinese" or rng.random() < CHINESE_SHARE
            text, lengths, cut = _texts(rng, pools, n, chinese)
            ids = (np.arange(counter, counter + n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
            counter += n
            tokens = (lengths // (2 if chinese else 4)).astype(np.int32)
            received = [list(range(1, 40))] + [None] * (shard.n - 1)
            table = pa.table({
                "response_id": pa.array([f"{x:016x}" for x in ids.tolist()]),
                "prompt_id": pa.array(np.repeat(np.array(shard.prompt_ids, dtype=object), shard.n)),
                "source": pa.array([source.name] * n),
                "model_revision": pa.array([source.revision] * n),
                "sample_index": pa.array(np.tile(np.arange(shard.n, dtype=np.int32), len(shard.prompt_ids))),
                "text": text,
                "finish_reason": pa.array(np.where(cut, "length", "stop").astype(object)),
                "prompt_tokens": pa.array(np.full(n, 39, dtype=np.int32)),
                "completion_tokens": pa.array(tokens),
                "truncated": pa.array(cut),
                "received_ids": pa.array(received * len(shard.prompt_ids), pa.list_(pa.int32())),
            })
            meta = {"shard_id": shard.shard_id, "source": source.name, "domain": shard.domain, "n": shard.n,
                    "requests": len(shard.prompt_ids), "prompt_ids": list(shard.prompt_ids), "dropped": {},
                    "engine": source.engine}
            table = RESPONSE_SHARD.conform(table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}))
            path = shard_path(recipe, shard)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, path)
    return counter


def write_score_shards(recipe, rng) -> int:
    """Reward and check shards under the names the score stage gives them (its own shard plan)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fusechat.run import Manifest, stage_dir
    from fusechat.scoring import stage as score
    from fusechat.tables import CHECK_SHARD, REWARD_SHARD

    folder = stage_dir(recipe, "scores") / "shards"
    inputs = score.load_inputs(recipe, Manifest.start(recipe, "scores"))
    work = score.plan(recipe, inputs, "bench", folder)
    work.reward_dir.mkdir(parents=True, exist_ok=True)
    work.check_dir.mkdir(parents=True, exist_ok=True)
    # a fresh run: both plans cut the same rows (every kept row, by prompt) into the same shards
    plan = ((inputs.column("response_id", rows), inputs.column("domain", rows), inputs.column("source", rows),
             rkeys, rp, ckeys, cp) for (rows, rkeys, rp), (_, ckeys, cp) in zip(work.reward_todo, work.check_todo))
    order = {s.name: i for i, s in enumerate(recipe.sources)}
    count = 0
    for rid, domain, source, rkeys, rp, ckeys, cp in plan:
        rid = pa.array(rid, pa.string())
        domain = np.asarray(domain, dtype=object)
        n = len(rid)
        count += n
        base = 0.1 + 0.01 * np.array([order[s] for s in source]) + rng.normal(0, 0.04, n)
        reward = base.astype(np.float32).astype(np.float64)
        null = rng.random(n) < 0.002
        objectives = pa.ListArray.from_arrays(pa.array(np.arange(0, 19 * n + 1, 19, dtype=np.int32)),
                                              pa.array(rng.random(19 * n).astype(np.float32).astype(np.float64)))
        pq.write_table(REWARD_SHARD.conform(pa.table({
            "key": pa.array(rkeys, pa.string()), "response_id": rid, "reward": pa.array(reward, mask=null),
            "objective_rewards": pa.array(objectives.to_pylist(), mask=null, type=pa.list_(pa.float64())),
            "reward_truncated": pa.array(np.zeros(n, dtype=bool)),
            "reward_detail": pa.array(np.where(null, "overlong: input over max_length", "").astype(object)),
        })), rp)
        u = rng.random(n)
        check = np.where(domain == "math", "math", np.where(domain == "code", "code", "none")).astype(object)
        status = np.select([domain == "math", domain == "code"],
                           [np.where(u < 0.6, "correct", np.where(u < 0.95, "incorrect", "unparseable")),
                            np.where(u < 0.5, "pass", np.where(u < 0.95, "fail", "timeout"))], "none").astype(object)
        detail = np.where(check == "none", "", "checked").astype(object)
        pq.write_table(CHECK_SHARD.conform(pa.table({
            "key": pa.array(ckeys, pa.string()), "response_id": rid, "check": pa.array(check),
            "check_status": pa.array(status), "check_detail": pa.array(detail)})), cp)
    return count


def generate(run: Path, fraction: float, seed: int = 0) -> dict:
    import numpy as np

    recipe = bench_recipe(run)
    rng = np.random.default_rng(seed)
    prompts = make_prompts(recipe, fraction, rng)
    responses = write_response_shards(recipe, prompts, rng)
    return {"prompts": prompts.num_rows, "responses": responses}


def generate_scores(run: Path, seed: int = 1) -> int:
    import numpy as np

    return write_score_shards(bench_recipe(run), np.random.default_rng(seed))


# -- the steps ---------------------------------------------------------------------------------
def step(name: str, run: Path) -> dict:
    """Run one step on the run at `run`; rows in and out, as the step's manifest counts them."""
    recipe = bench_recipe(run)
    if name == "generate":
        raise ValueError("generate runs apart")
    if name == "responses_merge":
        from fusechat.sampling.stage import merge, plan

        revisions, shards = plan(recipe)
        man = merge(recipe, revisions, shards)
        return {"rows_in": man.rows_in, "rows_out": man.rows_out, "dropped": sum(man.dropped.values())}
    if name == "score_merge":
        from fusechat.scoring.stage import run_score

        man = run_score(recipe)
        computed = man.extra["reward"]["rows_computed"] + man.extra["checks"]["rows_computed"]
        if computed:
            raise AssertionError(f"{computed} score rows were computed, not merged")
        return {"rows_in": man.rows_in, "rows_out": man.rows_out, "dropped": sum(man.dropped.values())}
    if name == "build":
        from fusechat.build import run_build

        man = run_build(recipe)
        return {"rows_in": man.rows_in, "rows_out": man.rows_out, "dropped": sum(man.dropped.values())}
    if name == "publish":
        from fusechat.publish import run_publish

        man = run_publish(recipe, dry_run=True)
        return {"rows_in": man.rows_in, "rows_out": man.rows_out, "dropped": sum(man.dropped.values())}
    if name == "train_data":
        from fusechat.train.common import check_dpo_row, check_sft_row, load_split

        data = recipe.run_path() / "datasets"
        cache = run / "hf-cache"
        sft = load_split(data / "sft" / "train.parquet", ("messages",), check_sft_row, cache)
        dpo = load_split(data / "dpo" / "train.parquet", ("prompt", "chosen", "rejected"), check_dpo_row, cache)
        import pyarrow.parquet as pq

        want = sum(pq.read_metadata(data / k / "train.parquet").num_rows for k in ("sft", "dpo"))
        return {"rows_in": want, "rows_out": len(sft) + len(dpo), "dropped": 0}
    raise ValueError(f"unknown step {name!r}")


OUTPUTS = ("responses/responses.parquet", "scores/scores.parquet", "datasets/decisions.parquet",
           "datasets/sft/train.parquet", "datasets/sft/test.parquet", "datasets/dpo/train.parquet",
           "datasets/dpo/test.parquet", "datasets/report.md", "datasets/audit.json",
           "datasets/hub/sft/README.md", "datasets/hub/dpo/README.md")


def output_digests(run: Path) -> dict[str, str]:
    """sha256 of each output's content: a table's rows (not its Parquet bytes: row groups may
    differ), a text file with the run's folder and recipe hash blanked (both name the machine)."""
    import hashlib

    import pyarrow.parquet as pq

    recipe = bench_recipe(run)
    out = {}
    for rel in OUTPUTS:
        path = recipe.run_path() / rel
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            blob = json.dumps([table.schema.to_string(show_schema_metadata=False), table.to_pydict()],
                              sort_keys=True, default=str)
        else:
            blob = path.read_text().replace(str(run.resolve()), "RUN").replace(recipe.content_hash(), "HASH")
        out[rel] = hashlib.sha256(blob.encode()).hexdigest()
    return out


def _peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def child(name: str, run: Path, fraction: float) -> None:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    if name == "generate":
        out = generate(run, fraction)
    elif name == "generate_scores":
        out = {"responses": generate_scores(run)}
    else:
        out = step(name, run)
    out["wall_s"] = time.perf_counter() - t0
    out["peak_mb"] = _peak_kb() / 1024
    print("RESULT " + json.dumps(out), flush=True)


def measure(name: str, run: Path, fraction: float) -> dict:
    load = Path("/proc/loadavg").read_text().split()[0]
    proc = subprocess.run([sys.executable, __file__, "--child", name, "--run", str(run), "--fraction", str(fraction)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"step {name} at fraction {fraction} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines()[::-1] if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    out["load"] = float(load)
    return out


def run_fraction(fraction: float, workdir: Path, steps=STEPS, keep: bool = False,
                 digests: bool = False) -> dict[str, dict]:
    run = workdir / f"f{fraction:g}"
    shutil.rmtree(run, ignore_errors=True)
    results = {}
    for name in ("generate", "responses_merge", "generate_scores", *[s for s in steps if s != "responses_merge"]):
        if name not in ("generate", "generate_scores") and name not in steps:
            continue
        res = measure(name, run, fraction)
        results[name] = res
        du = sum(p.stat().st_size for p in run.rglob("*") if p.is_file()) / 1e9
        print(f"  {fraction:>5g} {name:<16} {res['wall_s']:8.1f} s {res['peak_mb']:8.0f} MB  "
              f"rows in {res.get('rows_in', '-')} out {res.get('rows_out', res.get('responses', '-'))} "
              f"dropped {res.get('dropped', '-')}  load {res['load']:.1f}  disk {du:.1f} GB", flush=True)
    if digests:
        results["digests"] = output_digests(run)
    if not keep:
        shutil.rmtree(run, ignore_errors=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fraction", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fusechat-scale"))
    ap.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    ap.add_argument("--keep", action="store_true", help="keep the synthetic runs")
    ap.add_argument("--json", type=Path, help="also write the results here (with --digests, the outputs' digests)")
    ap.add_argument("--digests", action="store_true", help="digest every output (bench/bench_scale.py output_digests)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--run", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.run, args.fraction[0])
        return
    print(f"bench_scale: {os.cpu_count()} cores, load {Path('/proc/loadavg').read_text().strip()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    fractions = sorted(args.fraction)
    all_results = {f: run_fraction(f, args.workdir, args.steps, args.keep, args.digests) for f in fractions}
    lo, hi = fractions[0], fractions[-1]
    print(f"\nper step: wall s and peak MB at each fraction; growth = (value at {hi:g} / value at {lo:g}) "
          f"/ ({hi:g} / {lo:g}), 1.0 = linear")
    head = " ".join(f"{'s@' + format(f, 'g'):>9} {'MB@' + format(f, 'g'):>9}" for f in fractions)
    print(f"{'step':<16} {head} {'time growth':>11} {'mem growth':>10}")
    for name in ("generate", "responses_merge", "generate_scores", *[s for s in args.steps if s != "responses_merge"]):
        vals = [all_results[f][name] for f in fractions]
        cells = " ".join(f"{v['wall_s']:9.1f} {v['peak_mb']:9.0f}" for v in vals)
        scale = hi / lo if hi != lo else 1.0
        tg = vals[-1]["wall_s"] / max(vals[0]["wall_s"], 1e-9) / scale
        mg = vals[-1]["peak_mb"] / max(vals[0]["peak_mb"], 1e-9) / scale
        print(f"{name:<16} {cells} {tg:11.2f} {mg:10.2f}")
    if args.json:
        args.json.write_text(json.dumps({str(f): r for f, r in all_results.items()}, indent=2))


if __name__ == "__main__":
    main()
