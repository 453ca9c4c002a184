"""Scoring after adding a source, against scoring from scratch, on the demo (one run, as a ratio).

    .venv/bin/python bench/bench_incremental.py [--from runs/demo]

The demo's prompts and responses come from `--from` (a run directory that `fusechat sample
recipes/demo.yaml` filled) or are sampled here first (the four demo sources on vLLM, minutes).
Then, in a scratch copy: `fusechat score` from nothing (the baseline); a fifth source, the math
source again under another name with one response per code prompt (about 2% of the responses),
sampled; and `fusechat score` again, which must compute only the new source's rows. Prints both
wall times, their ratio and the share of reward rows computed.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    from fusechat.recipe import Recipe, load_recipe
    from fusechat.sampling.stage import run_sample
    from fusechat.scoring.stage import run_score

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from", dest="source_run", type=Path, default=None,
                        help="a demo run directory with prompts/ and responses/ (default: sample here)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-incremental-"))
    try:
        demo = load_recipe(ROOT / "recipes" / "demo.yaml", run_dir=str(work / "run"))
        if args.source_run is not None:
            for stage in ("prompts", "responses"):
                shutil.copytree(args.source_run / stage, work / "run" / stage)
        else:
            run_sample(demo)

        t0 = time.perf_counter()
        scratch = run_score(demo)
        scratch_s = time.perf_counter() - t0

        data = demo.model_dump(mode="json") | {"base_dir": demo.base_dir}
        extra = dict(data["sources"][0], name=f"{data['sources'][0]['name']}-again", responses={"code": 1})
        data["sources"].append(extra)
        grown = Recipe.model_validate(data)
        sampled = run_sample(grown)
        t0 = time.perf_counter()
        again = run_score(grown)
        again_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(work, ignore_errors=True)

    added = sampled.extra["rows_computed"]
    rows = again.extra["reward"]["rows_computed"] + again.extra["reward"]["rows_reused"]
    print(f"\nscoring the demo from scratch: {scratch_s:.1f} s, {scratch.extra['reward']['rows_computed']} reward rows")
    print(f"one more source ({added} responses, {added / rows:.1%} of {rows}): sampled, then scored in "
          f"{again_s:.1f} s; reward rows computed {again.extra['reward']['rows_computed']} "
          f"({again.extra['reward']['rows_computed'] / rows:.1%}), check rows computed "
          f"{again.extra['checks']['rows_computed']}")
    print(f"ratio, scoring after adding the source / from scratch: {again_s / scratch_s:.3f}")


if __name__ == "__main__":
    main()
