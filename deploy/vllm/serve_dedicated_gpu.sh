#!/usr/bin/env bash
# GLM-OCR on a GPU of its OWN (80 GB card: A100-80G, H100; the layout runs elsewhere).
#
# Numbers from deploy/vllm/sizing.py (deploy/vllm/README.md shows the arithmetic and the
# rows for 24/48/141 GB cards). Overrides as in serve_shared_gpu.sh:
#   GLM_OCR_MODEL, VLLM_HOST (default 127.0.0.1), VLLM_PORT, VLLM_GPU_UTIL (default 0.92),
#   VLLM_MAX_SEQS (default 512),
#   VLLM_FP8=1, VLLM_NO_MTP=1. Extra arguments are passed to `vllm serve`.
set -euo pipefail

MODEL="${GLM_OCR_MODEL:-zai-org/GLM-OCR}"
SEQS="${VLLM_MAX_SEQS:-512}"
args=(
    --served-model-name glm-ocr             # the name folio sends
    --host "${VLLM_HOST:-127.0.0.1}" --port "${VLLM_PORT:-8012}"
    --gpu-memory-utilization "${VLLM_GPU_UTIL:-0.92}"  # vLLM's default: 8% for driver and fragmentation
    --max-model-len 16384                   # 6,144 image + 8,192 table output + prompt = 14,352
    --max-num-batched-tokens 16384          # bigger steps: more crops through the vision encoder at once
    --max-num-seqs "$SEQS"                  # the usual OCR setting; KV holds 2x the average region at 512
    --max-cudagraph-capture-size "$SEQS"    # CUDA graphs for every decode batch size up to max-num-seqs
    --enable-chunked-prefill                # long table prefills split across steps: decodes keep flowing
    --no-enable-prefix-caching              # OCR prompts never share a prefix past ~5 template tokens
    --mm-processor-cache-gb 0               # crops never repeat: hashing and caching them is pure cost
    --limit-mm-per-prompt '{"image": 1, "video": 0}'  # one crop per request
)
if [[ "${VLLM_NO_MTP:-0}" != 1 ]]; then
    args+=(--speculative-config '{"method": "mtp", "num_speculative_tokens": 1}')  # MTP drafts
fi
if [[ "${VLLM_FP8:-0}" == 1 ]]; then
    args+=(--quantization fp8)              # FP8 weights on Hopper/Ada
fi
exec vllm serve "$MODEL" "${args[@]}" "$@"
