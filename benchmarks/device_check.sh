#!/usr/bin/env bash
# The accelerator check (benchmarks/device_check.py): bash benchmarks/device_check.sh [sanity|small|full] [--skip=pfl,...]
# Installs the carried wheels (.whl/, made by benchmarks/make_wheels.sh; not committed) into /tmp/site first,
# and needs nothing else from outside. Results go to $OUT (or a new temporary folder).
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-full}"; shift || true
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "${DEVICE_CHECK_WHEELS:-1}" != 0 ]; then
  t0=$(date +%s)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || echo "[device_check] wheel install FAILED; going on without it"
  echo "[device_check] wheels installed in $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}"
case ":$PYTHONPATH:" in *":$PWD:"*) ;; *) export PYTHONPATH="$PYTHONPATH:$PWD" ;; esac
OUT="${OUT:-$(mktemp -d)}"
exec "$PY" -m benchmarks.device_check --mode="$MODE" --out="$OUT" "$@"
