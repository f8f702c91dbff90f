"""Peak GPU memory of the layout side per batch size, for the memory split with vLLM.

For each batch size:

- ``cdla-model``: the shipped CDLA TorchScript alone (BF16 on CUDA) on a batch of inputs;
- ``cdla-stage``: the whole GPU-resident stage (decode, resize, model, post-processing,
  ``layout.batches_in_flight`` batches in flight) on real pages: what a folio process
  holds on the GPU while it runs;
- ``ppdoclayoutv3``: PP-DocLayoutV3 (transformers' ``PPDocLayoutV3ForObjectDetection``,
  its default configuration with random weights: the same shapes and memory as the real
  checkpoint), BF16, eager, 800 x 800 inputs.

Per row: torch's peak allocated and reserved bytes, the device memory in use (CUDA
context, nvJPEG's own buffers and torch's cache together) and pages/s. On the CPU the
memory columns are empty and only the timings mean anything (a dry run).

Usage::

    PYTHONPATH=. python perf/gpu/memory.py --device cuda --pages .gpu/pages \\
        --model-dir .gpu/models --batch-sizes 1,8,16,32,64 --json memory.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # perf/: its helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: orchestrator

from bench_layout_gpu import batches_of, read_pages
from corpus import CORPUS_PAGES

from orchestrator.config import FolioConfig
from orchestrator.stages.layout import LayoutModel
from orchestrator.stages.layout_gpu import GpuLayoutStage

GIB = 1024**3
DOCLAYOUT_SIZE = 800  # PP-DocLayoutV3's input side


def measured(device: torch.device, pages: int, run: Callable[[], object],
             warmups: int = 2) -> dict[str, Any]:
    """Warm up (TorchScript optimises a new batch size on its first two calls), then run
    once measured: peak memory and pages/s of that run."""
    for _ in range(warmups):
        run()
    row: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        free, total = torch.cuda.mem_get_info(device)
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / GIB, 3)
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / GIB, 3)
        row["device_used_gib"] = round((total - free) / GIB, 3)
        row["device_total_gib"] = round(total / GIB, 3)
    row["pages_s"] = round(pages / (time.perf_counter() - start), 1)
    return row


def release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def cdla_rows(cfg: FolioConfig, device: torch.device, pages: list[bytes],
              sizes: list[int]) -> list[dict[str, Any]]:
    model = LayoutModel(cfg.layout, device=str(device))
    h, w = model.input_shape[1:]
    rows = []
    for size in sizes:
        x = torch.randn((size, 3, h, w), device=device).to(model.input_dtype)

        def forward(x: torch.Tensor = x) -> object:
            return model.forward_tensors(x)

        row = measured(device, size, forward)
        rows.append({"model": "cdla-model", "precision": model.precision, "batch": size, **row})
        print(rows[-1], flush=True)
        del x
        release(device)
        stage = GpuLayoutStage(cfg.override({"layout.batch_size": size}), device=str(device),
                               model=model)
        batches = batches_of(pages, 3 * size, size)

        def run(stage: GpuLayoutStage = stage, batches: list[list[bytes]] = batches) -> object:
            return list(stage.run(batches))

        row = measured(device, 3 * size, run)
        rows.append({"model": "cdla-stage", "precision": model.precision, "batch": size,
                     "batches_in_flight": cfg.layout.batches_in_flight, **row})
        print(rows[-1], flush=True)
        del stage
        release(device)
    return rows


def doclayout_rows(device: torch.device, sizes: list[int]) -> list[dict[str, Any]]:
    import transformers

    config = transformers.PPDocLayoutV3Config()
    model = transformers.PPDocLayoutV3ForObjectDetection(config)
    model = model.to(device=device, dtype=torch.bfloat16).eval()  # type: ignore[call-arg]
    params = sum(p.numel() for p in model.parameters())
    rows = []
    for size in sizes:
        x = torch.randn((size, 3, DOCLAYOUT_SIZE, DOCLAYOUT_SIZE), device=device,
                        dtype=torch.bfloat16)

        def forward(x: torch.Tensor = x) -> object:
            with torch.inference_mode():
                return model(pixel_values=x)

        row = measured(device, size, forward, warmups=1)
        rows.append({"model": "ppdoclayoutv3", "precision": "bf16", "batch": size,
                     "parameters": params, "transformers": transformers.__version__, **row})
        print(rows[-1], flush=True)
        del x
        release(device)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=Path, default=CORPUS_PAGES)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-sizes", default="1,8,16,32,64")
    parser.add_argument("--doclayout-batch-sizes", default=None,
                        help="PP-DocLayoutV3's (default: --batch-sizes; empty: skip it)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    doc_sizes = sizes if args.doclayout_batch_sizes is None else [
        int(s) for s in args.doclayout_batch_sizes.split(",") if s]
    overrides: dict[str, Any] = {"layout.gpu_resident": "on"}
    if args.model_dir is not None:
        overrides["layout.model_dir"] = str(args.model_dir)
    cfg = FolioConfig().override(overrides)
    rows: list[dict[str, Any]] = []
    try:
        rows += cdla_rows(cfg, device, read_pages(args.pages), sizes)
        if doc_sizes:
            rows += doclayout_rows(device, doc_sizes)
    finally:
        if args.json is not None:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print()
    print("| model | batch | peak allocated GiB | peak reserved GiB | device in use GiB "
          "| pages/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['batch']} | {r.get('peak_allocated_gib', 'n/a')} | "
              f"{r.get('peak_reserved_gib', 'n/a')} | {r.get('device_used_gib', 'n/a')} | "
              f"{r['pages_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
