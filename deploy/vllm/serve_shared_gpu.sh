#!/usr/bin/env bash
# GLM-OCR on ONE GPU shared with folio's Triton layout ensemble (80 GB card: A100-80G, H100).
#
# Numbers from deploy/vllm/sizing.py (the arithmetic is in deploy/vllm/README.md); for
# another card take its row of the table there, or override:
#   GLM_OCR_MODEL  model folder or hub id   (default zai-org/GLM-OCR)
#   VLLM_HOST      address to listen on     (default 127.0.0.1; the compose file's
#                  container sets 0.0.0.0 and publishes the port on FOLIO_BIND_ADDRESS)
#   VLLM_PORT      port                     (default 8012, folio's vllm.url default)
#   VLLM_GPU_UTIL  --gpu-memory-utilization (default 0.89: 8 GiB left to the layout side)
#   VLLM_MAX_SEQS  --max-num-seqs           (default 256)
#   VLLM_FP8=1     FP8 weights (Hopper/Ada); check accuracy on your documents first
#   VLLM_NO_MTP=1  no MTP speculative decoding
# Extra arguments are passed to `vllm serve`. deploy/docker-compose.yml runs this script
# inside its vLLM container, so these flags are the only copy.
set -euo pipefail

MODEL="${GLM_OCR_MODEL:-zai-org/GLM-OCR}"
SEQS="${VLLM_MAX_SEQS:-256}"
args=(
    --served-model-name glm-ocr             # the name folio sends (vllm.model, or found via /v1/models)
    --host "${VLLM_HOST:-127.0.0.1}" --port "${VLLM_PORT:-8012}"
    --gpu-memory-utilization "${VLLM_GPU_UTIL:-0.89}"  # vLLM's share; Triton keeps the other 11% (8 GiB)
    --max-model-len 16384                   # 6,144 image + 8,192 table output + prompt = 14,352
    --max-num-batched-tokens 8192           # per step; >= one full-budget image (6,160) so no crop is refused
    --max-num-seqs "$SEQS"                  # concurrent regions decoding; KV for 2x the average region
    --max-cudagraph-capture-size "$SEQS"    # every decode batch size up to max-num-seqs replays a CUDA graph
    --enable-chunked-prefill                # long table prefills split across steps: decodes keep flowing
    --no-enable-prefix-caching              # OCR prompts never share a prefix past ~5 template tokens
    --mm-processor-cache-gb 0               # crops never repeat: hashing and caching them is pure cost
    --limit-mm-per-prompt '{"image": 1, "video": 0}'  # one crop per request: profile for one image only
)
if [[ "${VLLM_NO_MTP:-0}" != 1 ]]; then
    # GLM-OCR's own MTP layer drafts one token per step; OCR text is predictable, so most
    # drafts are accepted: fewer decode steps per region for one more layer of KV.
    args+=(--speculative-config '{"method": "mtp", "num_speculative_tokens": 1}')
fi
if [[ "${VLLM_FP8:-0}" == 1 ]]; then
    args+=(--quantization fp8)              # FP8 weights: 2.0 -> ~1.2 GiB, faster prefill GEMMs
fi
exec vllm serve "$MODEL" "${args[@]}" "$@"
