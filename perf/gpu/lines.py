"""Text-line detection's forward pass on the device (``lines.engine = "torch"``,
``orchestrator.stages.textlines.TorchLineModel``): pages/s and host CPU per page in fp32
and BF16, one page per call as the decode stage calls it and in batches of same-size
pages, peak GPU memory, and how far the BF16 probability map is from the fp32 one.

The inputs come from ``perf/gpu/prepare.py``: the detector's ONNX file and
``lines.json`` (the input size rapidocr's resize gives an A4 page at ``lines.side_px``,
and the detector's mean and std), so rapidocr itself is not needed on the GPU machine.
The pages are resized to that size on the host with OpenCV, outside the timings, as the
decode stage does before the upload.

Usage::

    PYTHONPATH=. python perf/gpu/lines.py --device cuda --pages .gpu/pages --model-dir .gpu/models
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # perf/: its helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: orchestrator

from bench_layout_gpu import read_pages, synchronize

from orchestrator.stages.textlines import TorchLineModel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--count", type=int, default=44, help="pages timed per setting")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    spec = json.loads((args.model_dir / "lines.json").read_text())
    height, width = spec["input_hw"]
    pages = []
    for data in read_pages(args.pages):
        bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if bgr.shape[0] < bgr.shape[1]:
            bgr = cv2.rotate(bgr, cv2.ROTATE_90_CLOCKWISE)  # landscape pages: one input size
        pages.append(np.ascontiguousarray(
            cv2.resize(bgr, (width, height), interpolation=cv2.INTER_LINEAR)[None]))
    device = torch.device(args.device)
    figures: dict[str, Any] = {"device": str(device), "input_hw": [height, width],
                               "pages": len(pages), "count": args.count, "results": []}
    if device.type == "cuda":
        figures["gpu"] = torch.cuda.get_device_name(device)
    maps: dict[str, list[np.ndarray]] = {}
    for precision in ("fp32", "bf16"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = TorchLineModel(args.model_dir / spec["model"], str(device), precision,
                               spec["mean"], spec["std"])
        maps[precision] = [model(page) for page in pages]  # warm-up; kept for agreement
        row: dict[str, Any] = {"precision": precision}
        for batch in (1, args.batch_size):
            inputs = [np.concatenate([pages[(i + j) % len(pages)] for j in range(batch)])
                      for i in range(0, args.count, batch)]
            model(inputs[0])
            synchronize(device)
            wall, cpu = time.perf_counter(), time.thread_time()
            for x in inputs:
                model(x)  # returns the map on the host: synchronised
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            done = batch * len(inputs)
            row[f"batch_{batch}"] = {"pages_s": done / wall, "host_cpu_ms_per_page":
                                     1000 * cpu / done}
            print(f"lines forward {precision} batch {batch:2d} on {device}: "
                  f"{done / wall:8.1f} pages/s, host CPU {1000 * cpu / done:6.2f} ms/page "
                  f"({done} pages of {height} x {width})", flush=True)
        if device.type == "cuda":
            row["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            print(f"  peak GPU memory {row['peak_allocated_gib']:.2f} GiB allocated", flush=True)
        figures["results"].append(row)
        del model
    diffs = [np.abs(a - b) for a, b in zip(maps["fp32"], maps["bf16"], strict=True)]
    flipped = [np.mean((a > spec["pixel_threshold"]) != (b > spec["pixel_threshold"]))
               for a, b in zip(maps["fp32"], maps["bf16"], strict=True)]
    figures["bf16_vs_fp32"] = {"mean_abs": float(np.mean([d.mean() for d in diffs])),
                               "max_abs": float(max(d.max() for d in diffs)),
                               "pixels_flipped": float(np.mean(flipped))}
    print("bf16 vs fp32 probability map: mean |diff| {mean_abs:.2e}, max {max_abs:.3f}, "
          "text pixels flipped at the threshold {pixels_flipped:.2e}".format(
              **figures["bf16_vs_fp32"]), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
