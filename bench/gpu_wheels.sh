#!/usr/bin/env bash
# Wheels the GPU check needs beyond a CUDA image's torch/transformers/triton: pydantic and its parts
# (the engine's configs are pydantic dataclasses), for the GPU machine's Python (default 3.12).
# Saved under .whl/ (git-ignored); install there with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY_VERSION:-3.12}"
python -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
ls .whl
