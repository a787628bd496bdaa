#!/usr/bin/env bash
# Wheels that benchmarks/device_check.sh carries to the GPU machine (Python 3.12, no network there):
# pfl 0.6.0 and the dependencies of its torch path that the machine lacks, drjax, ml_collections, and
# rouge-score + nltk (+ defusedxml), which ml_ecs imports. Into .whl/ (ignored by git).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  pfl==0.6.0 'dp-accounting>=0.4,<0.6' 'multiprocess>=0.70.15,<0.71' 'prv-accountant>=0.2.0,<0.3.0' dill dm-tree \
  drjax==0.2.1 ml_collections nltk defusedxml
pip wheel -q --no-deps rouge-score==0.1.2 -w .whl   # sdist only on PyPI: pure Python, built here
du -ch .whl/*.whl | tail -1
