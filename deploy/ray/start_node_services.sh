#!/usr/bin/env bash
# On one GPU node of a folio Ray cluster: start its vLLM server on 127.0.0.1 (the node's
# recognition actors reach it at vllm.url = http://127.0.0.1:8012), wait until it answers,
# then join the Ray cluster with the node's GPU and its "vllm" slots.
#
#   RAY_HEAD=10.0.0.1:6379 deploy/ray/start_node_services.sh
#
# The GPU is shared: vLLM takes VLLM_GPU_UTIL of it at start (deploy/vllm/README.md, the
# "layout on it" row for the card), the layout actors the rest. Start vLLM first so it
# sizes its KV cache before the layout model allocates.
#   RAY_HEAD        the head's GCS address (required unless RAY_START=0)
#   VLLM_SLOTS      recognition actors this node takes (default 4; [ray] recognize_resources)
#   RAY_START=0     start vLLM only (KubeRay starts Ray itself)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
port="${VLLM_PORT:-8012}"

VLLM_PORT="$port" nohup "$here/../vllm/serve_shared_gpu.sh" --host 127.0.0.1 \
    > "${VLLM_LOG:-/tmp/folio-vllm.log}" 2>&1 &
for _ in $(seq 1 180); do           # model load and CUDA graph capture: a few minutes at most
    if curl -fsS "http://127.0.0.1:${port}/health" > /dev/null 2>&1; then
        break
    fi
    sleep 2
done
curl -fsS "http://127.0.0.1:${port}/health" > /dev/null || {
    echo "vLLM did not come up; see ${VLLM_LOG:-/tmp/folio-vllm.log}" >&2
    exit 1
}
if [[ "${RAY_START:-1}" == 1 ]]; then
    exec ray start --address "${RAY_HEAD:?set RAY_HEAD=HOST:PORT}" --num-gpus 1 \
        --resources "{\"vllm\": ${VLLM_SLOTS:-4}}" --block
fi
