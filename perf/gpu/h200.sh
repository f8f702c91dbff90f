#!/usr/bin/env bash
# The layout stage's figures on one H100/H200, in one run of under 5 minutes.
#
# Run on the GPU machine from the repository root, with the inputs that
# perf/gpu/prepare.py wrote into .gpu/ (A4 300-dpi JPEG pages, the model artifacts), and
# OUT naming a folder for the results:
#
#     OUT=/path/to/results bash perf/gpu/h200.sh
#
# folio is not installed there: PYTHONPATH=. makes the checkout importable. Each section
# has its own time budget (timeout) and writes under $OUT as it goes, so one that
# overruns or fails leaves the others; $OUT/summary.txt has one line per section (exit
# status, seconds, budget). The sections, in order:
#   env      versions, the GPU, the inputs
#   bench    perf/bench_layout_gpu.py: decode-only, model-only, whole stage and ratios,
#            peak memory; eager and CUDA graph (bench.txt, bench.json)
#   agree    perf/gpu/check_postprocess.py: torch post-processing on the GPU vs numpy on
#            host copies, every page, FP32 and BF16 (agree.txt, agree.json)
#   memory   perf/gpu/memory.py: peak GPU memory per batch size, CDLA (model, whole
#            stage) and PP-DocLayoutV3 BF16 (memory.txt, memory.json)
#   crop     perf/gpu/crop.py: crop + encode of the regions on the GPU vs the host path
#            (crop.txt, crop.json)
#   lines    perf/gpu/lines.py: the text-line detector's forward pass in torch, fp32 and
#            BF16, pages/s and host CPU per page, BF16 against fp32 (lines.txt, lines.json)
#
# A dry run of the script itself on a CPU, with tiny sizes:
#
#     DEVICE=cpu OUT=/tmp/gpu-out GPU_DIR=/tmp/gpu BATCH=2 COUNT=4 REPEATS=1 \
#         BATCH_SIZES=1,2 DOCLAYOUT_BATCH_SIZES=1 LINES_COUNT=2 LINES_BATCH=2 \
#         bash perf/gpu/h200.sh
set -u
cd "$(dirname "$0")/../.."
: "${OUT:?set OUT to the folder for the results}"
DEVICE=${DEVICE:-cuda}
GPU_DIR=${GPU_DIR:-.gpu}
PAGES=${PAGES:-$GPU_DIR/pages}
MODELS=${MODELS:-$GPU_DIR/models}
BATCH=${BATCH:-64}
COUNT=${COUNT:-704}  # 11 full batches of 64: 32 passes over the 22 pages
REPEATS=${REPEATS:-2}
BATCH_SIZES=${BATCH_SIZES:-1,8,16,32,64}
LINES_COUNT=${LINES_COUNT:-88}  # pages timed per precision and batch size
LINES_BATCH=${LINES_BATCH:-8}
DOCLAYOUT_BATCH_SIZES=${DOCLAYOUT_BATCH_SIZES-$BATCH_SIZES}  # empty: no PP-DocLayoutV3
PYTHON=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
: > "$OUT/summary.txt"

# section NAME BUDGET_S COMMAND...: run COMMAND under its budget, output to $OUT/NAME.txt.
section() {
    local name=$1 budget=$2
    shift 2
    local start end rc
    start=$(date +%s)
    echo "=== $name (budget ${budget}s): $*" | tee "$OUT/$name.txt"
    timeout --kill-after=5 "$budget" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    rc=${PIPESTATUS[0]}
    end=$(date +%s)
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "=== $name: over its ${budget}s budget, stopped" | tee -a "$OUT/$name.txt"
    fi
    echo "$name rc=$rc $((end - start))s budget=${budget}s" >> "$OUT/summary.txt"
}

section env 15 bash -c '
    '"$PYTHON"' -c "import sys, numpy, torch; print(sys.version.split()[0], \"numpy\", numpy.__version__, \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no GPU\")"
    '"$PYTHON"' -c "import torchvision; print(\"torchvision\", torchvision.__version__)" || echo "no torchvision"
    '"$PYTHON"' -c "import transformers; print(\"transformers\", transformers.__version__)" || echo "no transformers"
    '"$PYTHON"' -c "import nvidia.dali" 2>/dev/null && echo "DALI installed" || echo "no DALI"
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,clocks.max.sm --format=csv
    nproc; ls '"$PAGES"' | wc -l; du -sh '"$PAGES"' '"$MODELS"''

section bench 100 "$PYTHON" perf/bench_layout_gpu.py --device "$DEVICE" --pages "$PAGES" \
    --model-dir "$MODELS" --count "$COUNT" --batch-size "$BATCH" --repeats "$REPEATS" \
    --cuda-graph --json "$OUT/bench.json"

section agree 40 "$PYTHON" perf/gpu/check_postprocess.py --device "$DEVICE" --pages "$PAGES" \
    --model-dir "$MODELS" --batch-size 8 --json "$OUT/agree.json"

section memory 80 "$PYTHON" perf/gpu/memory.py --device "$DEVICE" --pages "$PAGES" \
    --model-dir "$MODELS" --batch-sizes "$BATCH_SIZES" \
    --doclayout-batch-sizes "$DOCLAYOUT_BATCH_SIZES" --json "$OUT/memory.json"

section crop 30 "$PYTHON" perf/gpu/crop.py --device "$DEVICE" --pages "$PAGES" \
    --model-dir "$MODELS" --batch-size 8 --repeats "$REPEATS" --json "$OUT/crop.json"

section lines 30 "$PYTHON" perf/gpu/lines.py --device "$DEVICE" --pages "$PAGES" \
    --model-dir "$MODELS" --count "$LINES_COUNT" --batch-size "$LINES_BATCH" \
    --json "$OUT/lines.json"

echo "=== summary"
cat "$OUT/summary.txt"
