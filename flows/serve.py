"""Serve fusechat's flow deployments from one process: `python -m flows.serve [flow-name ...]`.

With a Prefect server running (PREFECT_API_URL set), this registers the deployments and polls for
runs, so `prefect deployment run 'sample-sources/local' --param recipe=/path/recipe.yaml` runs
there. Runs of a deployment that nothing serves sit "Late". Each flow module lists its own
deployments in `deployments()`.
"""

from __future__ import annotations

import importlib
import sys

FLOWS = {
    "sample-sources": "flows.sample_sources",
    "score-responses": "flows.score_responses",
    "build-datasets": "flows.build_datasets",
    "train-target": "flows.train_target",
    "fuse": "flows.fuse",
}


def main(names: list[str]) -> None:
    from prefect import serve

    unknown = set(names) - set(FLOWS)
    if unknown:
        raise SystemExit(f"unknown flow(s) {sorted(unknown)}; known: {', '.join(FLOWS)}")
    deployments = []
    for name in names or FLOWS:
        deployments += importlib.import_module(FLOWS[name]).deployments()
    serve(*deployments)


if __name__ == "__main__":
    main(sys.argv[1:])
