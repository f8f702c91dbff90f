"""The torch post-processing against the numpy one on the same raw outputs, on a device.

Each page is decoded and prepared by the GPU-resident stage's decoder, run through the
layout model at each precision, then post-processed twice: in torch on the device, and in
numpy on host copies of the same outputs. Prints, per precision, how many pages agree box
for box (classes, order and scores exactly, boxes within ``--atol`` pixels) and exits 1
when any page differs. ``--json FILE`` writes the per-page comparison.

Usage::

    PYTHONPATH=. python perf/gpu/check_postprocess.py --device cuda --pages .gpu/pages \\
        --model-dir .gpu/models
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # perf/: its helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: orchestrator

from bench_layout_gpu import read_pages
from corpus import CORPUS_PAGES

from orchestrator.config import FolioConfig
from orchestrator.stages import postprocess, postprocess_torch
from orchestrator.stages.layout_gpu import GpuLayoutStage


def compare(stage: GpuLayoutStage, pages: list[bytes], atol: float) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for start in range(0, len(pages), stage.batch_size):
        work = stage.forward(stage.decode(pages[start:start + stage.batch_size]))
        assert work.raw is not None, work.failure
        sizes = [s for s, r in zip(work.decoded.sizes, work.decoded.rows, strict=True)
                 if r is not None]
        on_device = postprocess_torch.postprocess(work.raw, sizes, stage.cfg.layout, stage.labels)
        host = [o.float().cpu().numpy() for o in work.raw]
        on_host = postprocess.postprocess(host, sizes, stage.cfg.layout, stage.labels)
        for offset, (a, b) in enumerate(zip(on_host, on_device, strict=True)):
            same_order = a.classes.tolist() == b.classes.tolist()
            same_scores = a.scores.tolist() == b.scores.tolist()
            box_diff = (float(np.abs(a.boxes - b.boxes).max())
                        if same_order and len(a.boxes) else 0.0)
            rows.append({"page": start + offset, "boxes": len(a.boxes),
                         "boxes_torch": len(b.boxes), "same_classes_and_order": same_order,
                         "same_scores": same_scores, "max_box_diff_px": box_diff,
                         "agree": same_order and same_scores and box_diff <= atol})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=Path, default=CORPUS_PAGES)
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--atol", type=float, default=1e-3, help="box tolerance, pixels")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    pages = read_pages(args.pages)
    report: dict[str, Any] = {"device": args.device, "pages": len(pages)}
    failed = False
    for precision in ("fp32", "bf16"):
        overrides: dict[str, Any] = {"layout.precision": precision,
                                     "layout.batch_size": args.batch_size}
        if args.model_dir is not None:
            overrides["layout.model_dir"] = str(args.model_dir)
        stage = GpuLayoutStage(FolioConfig().override(overrides), device=args.device)
        rows = compare(stage, pages, args.atol)
        agree = sum(r["agree"] for r in rows)
        boxes = sum(r["boxes"] for r in rows)
        worst = max((r["max_box_diff_px"] for r in rows), default=0.0)
        print(f"{precision}: torch on {stage.device} vs numpy on the host: {agree} of "
              f"{len(rows)} pages agree box for box ({boxes} boxes; largest box difference "
              f"{worst:.2e} px)")
        for r in rows:
            if not r["agree"]:
                print(f"  page {r['page']}: {r}")
        report[precision] = rows
        failed |= agree != len(rows)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
