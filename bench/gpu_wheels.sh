#!/usr/bin/env bash
# The small wheels bench/gpu_train_check.py needs on a GPU machine whose Python 3.12 image has torch,
# transformers, accelerate and peft but not TRL, datasets or pydantic: downloaded here (any machine
# with pip and PyPI) into .whl/, which git ignores, to travel with the script. Versions are those of
# requirements/cpu.lock, the tested set. ~5 MB.
#
#   bash bench/gpu_wheels.sh [DEST]     # DEST defaults to .whl
#
# There, before the script:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
LOCK=requirements/cpu.lock
# TRL and its missing needs; datasets and its missing needs; pydantic (fusechat.recipe) and its needs
NAMES=(trl datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection typing-extensions)

mkdir -p "$DEST"
if ! git check-ignore -q "$DEST/probe.whl"; then  # .gitignore covers the default .whl/
  echo "gpu_wheels: $DEST is not ignored by git; add it to .git/info/exclude so it does not travel as work" >&2
fi
pins=()
for name in "${NAMES[@]}"; do
  pin=$(grep -iE "^${name//-/[-_]}==" "$LOCK" || true)
  [[ -n "$pin" ]] || { echo "gpu_wheels: $name is not in $LOCK" >&2; exit 2; }
  pins+=("$pin")
done
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$DEST" "${pins[@]}"
ls -la "$DEST"
du -sh "$DEST"
