#!/usr/bin/env bash
# One command for the folio_layout load tests (perf_analyzer + Python load generator +
# gRPC-vs-in-process ratio) on the bundled Triton server; see perf/triton_sweep.py.
#   perf/triton_sweep.sh [--url HOST:PORT] [--concurrency 1 2 4 8] [--skip-ratio] ...
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -f build/models/manifest.json ] || make models
exec "$PY" perf/triton_sweep.py "$@"
