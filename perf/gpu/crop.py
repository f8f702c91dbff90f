"""Crop + encode of the recognised regions for the vLLM recogniser: on the device the page
is on (``orchestrator.stages.crop_gpu``) against the host path (``crop.region_tasks`` +
``crop.encode_crop`` on the page in host memory), on the same pages and regions.

The regions come from the GPU-resident layout stage, which keeps the decoded pages on the
device. Prints regions/s and ms/page of both and their ratio; ``--json FILE`` writes them.

Usage::

    PYTHONPATH=. python perf/gpu/crop.py --device cuda --pages .gpu/pages --model-dir .gpu/models
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # perf/: its helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: orchestrator

from bench_layout_gpu import batches_of, read_pages
from corpus import CORPUS_PAGES

from orchestrator.config import FolioConfig
from orchestrator.stages.crop import region_tasks
from orchestrator.stages.crop_gpu import region_crops
from orchestrator.stages.layout_gpu import GpuLayoutStage
from orchestrator.stages.profiles import BUILTIN_PROFILES
from orchestrator.types import DecodedPage, LayoutResult, PageRef


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=Path, default=CORPUS_PAGES)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", default="glm-ocr", choices=sorted(BUILTIN_PROFILES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    overrides: dict[str, Any] = {"layout.batch_size": args.batch_size,
                                 "layout.gpu_resident": "on"}
    if args.model_dir is not None:
        overrides["layout.model_dir"] = str(args.model_dir)
    cfg = FolioConfig().override(overrides)
    profile = BUILTIN_PROFILES[args.profile]
    stage = GpuLayoutStage(cfg, device=args.device, keep_pages=True)
    device = stage.device
    pages = read_pages(args.pages)
    found: list[tuple[torch.Tensor, LayoutResult]] = []
    for batch in stage.run(batches_of(pages, len(pages), args.batch_size)):
        for image, result in zip(batch.images, batch.results, strict=True):
            if image is not None and isinstance(result, LayoutResult):
                found.append((image, result))
    host_pages = [np.ascontiguousarray(image.flip(0).permute(1, 2, 0).cpu().numpy())
                  for image, _ in found]

    def on_device() -> int:
        count = sum(len(region_crops(image, layout, cfg.crop, profile))
                    for image, layout in found)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return count

    def on_host() -> int:
        from orchestrator.stages.crop import encode_crop

        count = 0
        for bgr, (_, layout) in zip(host_pages, found, strict=True):
            page = DecodedPage(ref=PageRef("page", 1), image=bgr,
                               model_input=np.zeros((3, 1, 1), np.float32))
            for task in region_tasks(page, layout, cfg.crop, reads_lines=False):
                assert task.image is not None
                encode_crop(task.image, profile)
                count += 1
        return count

    figures: dict[str, Any] = {"device": str(device), "profile": profile.name,
                               "pages": len(found)}
    for name, fn in (("device", on_device), ("host", on_host)):
        regions = fn()  # warm-up: nvJPEG's encoder, allocator
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        figures[name] = {"regions": regions, "regions_s": regions / best,
                         "ms_per_page": 1e3 * best / max(1, len(found))}
        where = f"crop_gpu on {device}" if name == "device" else "host path (OpenCV)"
        print(f"crop + encode, {where:18s} ({profile.name}): {regions} regions of "
              f"{len(found)} pages, {regions / best:8.1f} regions/s, "
              f"{1e3 * best / max(1, len(found)):7.2f} ms/page", flush=True)
    ratio = figures["device"]["regions_s"] / figures["host"]["regions_s"]
    figures["ratio_device_to_host"] = ratio
    print(f"ratio crop_gpu / host path: {ratio:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
