"""The arithmetic behind the vLLM serving profiles (deploy/vllm/README.md).

Every number comes from a stated model size or a stated assumption below; nothing here
was measured on a GPU yet (vLLM cannot be carried to this project's GPU machines), so
the first GPU deployment should replace the ASSUMED lines with measurements and rerun::

    python deploy/vllm/sizing.py            # the tables in the README
    python deploy/vllm/sizing.py --json     # the same, machine-readable

The layout side's share can come from a measurement instead of the assumed sum:
``perf/gpu/memory.py`` writes the device memory a layout process holds per model and batch
size, and ``--layout-measured memory.json --layout-model cdla-stage --layout-batch 64``
reserves that row's figure plus ``LAYOUT_MEASURED_HEADROOM_GIB`` (``--layout-gib`` sets
the reservation directly).

Standard library only.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

GIB = 1024**3
KIB = 1024

# --- GLM-OCR, from its config.json and model card (stated) --------------------------------
PARAMS = 0.9e9  # model card: 0.9B (CogViT encoder + GLM-0.5B decoder)
DECODER_LAYERS = 16
MTP_LAYERS = 1  # num_nextn_predict_layers: the MTP draft layer keeps its own KV
KV_HEADS = 8
HEAD_DIM = 128
PATCH, MERGE = 14, 2
MAX_IMAGE_TOKENS = 6144  # processor cap: 9,633,792 px over 2 temporal frames / (28*28)
MAX_OUTPUT_TOKENS = 8192  # folio's glm-ocr profile, tables (text 4096, formulas 2048)
PROMPT_TOKENS = 16  # template + "Table Recognition:"

# --- assumptions (ASSUMED: replace with measurements) -------------------------------------
WEIGHTS_GIB = 2.0  # 0.9e9 x 2 B (BF16) = 1.68 GiB, rounded up for untied embeddings/norms
WEIGHTS_FP8_GIB = 1.2  # linear layers at 1 B, embeddings/norms/vision stem kept in BF16
ACTIVATION_GIB_PER_8K_TOKENS = 1.0  # peak of one step of 8k tokens (MLP 2x4608 wide) + sampler
ENCODER_ACTIVATION_GIB = 0.5  # one 6,144-token image: 24,576 patches x 1024 x 2 B per tensor
CUDA_GRAPHS_GIB = 1.0
CONTEXT_WORKSPACE_GIB = 1.0  # CUDA context, cuBLAS/attention workspaces
# The layout side (Triton: server context, DALI and TorchScript python-backend stubs each
# with a CUDA context, nvJPEG pools for a batch of 8 A4 pages at 200 dpi, PP-DocLayoutV3
# 33M parameters and its activations at batch 8 x 800 x 800):
LAYOUT_CONTEXTS_GIB = 1.5  # 3 processes x ~0.5 GiB
LAYOUT_DALI_GIB = 1.0  # 8 x 1654 x 2339 x 3 B = 93 MB decoded, pools ~4x, resize buffers
LAYOUT_MODEL_GIB = 2.0  # 132 MB FP32 weights + activations at batch 8 + allocator slack
LAYOUT_HEADROOM_GIB = 3.5  # unmeasured: room for batch 16 or FP32 before vLLM is squeezed
# Over a measured layout peak: pages larger than the measured A4 300-dpi ones decode to
# more pixels, and allocator fragmentation varies run to run. ASSUMED.
LAYOUT_MEASURED_HEADROOM_GIB = 1.0
AVG_REGION_TOKENS = 800  # a layout block: ~400 image + ~150 output + prompt, rounded up
KV_HEADROOM = 2.0  # KV for twice the average: long tables preempt nothing
DEDICATED_UTILIZATION = 0.92  # vLLM's default: the rest is driver/fragmentation headroom


@dataclass(frozen=True)
class Gpu:
    name: str
    usable_gib: float  # what CUDA reports as total


GPUS = (
    Gpu("24 GB (L4, A10)", 22.0),
    Gpu("48 GB (L40S, A6000)", 44.4),
    Gpu("80 GB (A100-80G, H100)", 79.1),
    Gpu("141 GB (H200)", 139.7),
)


def kv_bytes_per_token(mtp: bool = True, fp8_kv: bool = False) -> int:
    layers = DECODER_LAYERS + (MTP_LAYERS if mtp else 0)
    return 2 * layers * KV_HEADS * HEAD_DIM * (1 if fp8_kv else 2)  # K and V


def layout_reserve_gib() -> float:
    return LAYOUT_CONTEXTS_GIB + LAYOUT_DALI_GIB + LAYOUT_MODEL_GIB + LAYOUT_HEADROOM_GIB


def non_kv_gib(batched_tokens: int, fp8: bool = False) -> float:
    return ((WEIGHTS_FP8_GIB if fp8 else WEIGHTS_GIB)
            + ACTIVATION_GIB_PER_8K_TOKENS * batched_tokens / 8192
            + ENCODER_ACTIVATION_GIB + CUDA_GRAPHS_GIB + CONTEXT_WORKSPACE_GIB)


def pow2_floor(x: float) -> int:
    return int(2 ** math.floor(math.log2(max(1.0, x))))


@dataclass(frozen=True)
class Profile:
    gpu: str
    shared: bool
    gpu_memory_utilization: float
    vllm_gib: float
    kv_gib: float
    kv_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    client_max_in_flight: int


def measured_layout_gib(path: str, model: str, batch: int) -> float:
    """The reservation for a measured layout side: the device memory in use of one row of
    perf/gpu/memory.py's JSON (model, batch size) plus the measured-case headroom."""
    with open(path, encoding="utf-8") as fh:
        rows = json.load(fh)
    for row in rows:
        if row.get("model") == model and row.get("batch") == batch:
            return float(row["device_used_gib"]) + LAYOUT_MEASURED_HEADROOM_GIB
    raise SystemExit(f"{path}: no row for model {model!r} at batch {batch}")


def profile(gpu: Gpu, shared: bool, fp8: bool = False,
            layout_gib: float | None = None) -> Profile:
    # one step must hold a whole image (vLLM rejects an item over the encoder budget):
    # 6,144 + 16 -> 8,192 shared (smaller activation peak), 16,384 on a GPU of its own
    batched = 8192 if shared else 16384
    assert batched >= MAX_IMAGE_TOKENS + PROMPT_TOKENS
    max_model_len = 2 ** math.ceil(math.log2(MAX_IMAGE_TOKENS + MAX_OUTPUT_TOKENS
                                             + PROMPT_TOKENS))
    util = DEDICATED_UTILIZATION
    reserve = layout_reserve_gib() if layout_gib is None else layout_gib
    if shared:  # what the layout side leaves, never more than a GPU of vLLM's own
        util = min(util, math.floor((1 - reserve / gpu.usable_gib) * 100) / 100)
    vllm_gib = util * gpu.usable_gib
    kv_gib = vllm_gib - non_kv_gib(batched, fp8)
    kv_tokens = int(kv_gib * GIB / kv_bytes_per_token())
    seqs = min(512 if not shared else 256,
               pow2_floor(kv_tokens / (AVG_REGION_TOKENS * KV_HEADROOM)))
    return Profile(
        gpu=gpu.name, shared=shared, gpu_memory_utilization=util,
        vllm_gib=round(vllm_gib, 1), kv_gib=round(kv_gib, 1), kv_tokens=kv_tokens,
        max_num_seqs=seqs, max_num_batched_tokens=batched, max_model_len=max_model_len,
        # a quarter more than the server batches, so its waiting queue never runs dry,
        # while the rest waits in folio's queue (smallest prefill first)
        client_max_in_flight=seqs + seqs // 4,
    )


def report(layout_gib: float | None = None) -> str:
    kv = kv_bytes_per_token()
    if layout_gib is None:
        layout_line = (
            f"Layout side reserved: {LAYOUT_CONTEXTS_GIB} contexts + {LAYOUT_DALI_GIB} DALI + "
            f"{LAYOUT_MODEL_GIB} model + {LAYOUT_HEADROOM_GIB} headroom = "
            f"{layout_reserve_gib():.1f} GiB")
    else:
        layout_line = f"Layout side reserved (measured, with headroom): {layout_gib:.1f} GiB"
    lines = [
        "KV cache per token (BF16): 2 (K,V) x (16 decoder + 1 MTP layers) x 8 KV heads x 128"
        f" x 2 B = {kv:,} B = {kv / KIB:.0f} KiB",
        f"Longest sequence: {MAX_IMAGE_TOKENS:,} image + {MAX_OUTPUT_TOKENS:,} output + "
        f"{PROMPT_TOKENS} prompt = {MAX_IMAGE_TOKENS + MAX_OUTPUT_TOKENS + PROMPT_TOKENS:,}"
        f" tokens -> --max-model-len {profile(GPUS[2], True).max_model_len:,}; its KV: "
        f"{(MAX_IMAGE_TOKENS + MAX_OUTPUT_TOKENS + PROMPT_TOKENS) * kv / GIB:.2f} GiB",
        layout_line,
        f"vLLM non-KV at 8k batched tokens: {WEIGHTS_GIB} weights + "
        f"{ACTIVATION_GIB_PER_8K_TOKENS} activations + {ENCODER_ACTIVATION_GIB} encoder + "
        f"{CUDA_GRAPHS_GIB} CUDA graphs + {CONTEXT_WORKSPACE_GIB} context = "
        f"{non_kv_gib(8192):.1f} GiB (16k: {non_kv_gib(16384):.1f} GiB)",
        "",
        "| GPU | layout on it | --gpu-memory-utilization | vLLM GiB | KV GiB | KV tokens "
        "| --max-num-seqs | --max-num-batched-tokens | folio vllm.max_in_flight |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for gpu in GPUS:
        for shared in (True, False):
            p = profile(gpu, shared, layout_gib=layout_gib)
            lines.append(
                f"| {p.gpu} | {'yes' if shared else 'no'} | {p.gpu_memory_utilization:.2f} | "
                f"{p.vllm_gib} | {p.kv_gib} | {p.kv_tokens:,} | {p.max_num_seqs} | "
                f"{p.max_num_batched_tokens:,} | {p.client_max_in_flight} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--layout-gib", type=float, default=None,
                    help="the layout side's reservation in GiB (replaces the assumed sum)")
    ap.add_argument("--layout-measured", default=None,
                    help="perf/gpu/memory.py's JSON: reserve a measured row (+ headroom)")
    ap.add_argument("--layout-model", default="cdla-stage",
                    help="the row's model: cdla-stage, cdla-model or ppdoclayoutv3")
    ap.add_argument("--layout-batch", type=int, default=64, help="the row's batch size")
    args = ap.parse_args()
    layout_gib = args.layout_gib
    if args.layout_measured is not None:
        layout_gib = measured_layout_gib(args.layout_measured, args.layout_model,
                                         args.layout_batch)
    if args.json:
        print(json.dumps([asdict(profile(g, s, layout_gib=layout_gib))
                          for g in GPUS for s in (True, False)], indent=2))
    else:
        print(report(layout_gib))


if __name__ == "__main__":
    main()
