"""Benchmark: the GPU-resident layout stage, encoded pages in, regions out, on any device.

In one run, on the same pages (``--pages``: a folder of encoded page images, read once
into memory and cycled to ``--count`` pages):

- decode only: the decoder alone (nvJPEG / DALI on CUDA, OpenCV on the CPU), the stage's
  ceiling; then decode + resize/normalise into the batch buffer;
- model only: the TorchScript model on a prepared batch buffer;
- post-processing only: torch on the model's outputs (and numpy on host copies of them,
  for comparison);
- the whole stage (``GpuLayoutStage.run``: decode, model and post-processing of
  consecutive batches overlapped), its ratio to the slowest of its parts and to the
  decode-only ceiling; the same work one batch after another, not overlapped;
- peak GPU memory (allocated and reserved by torch) of the whole stage;
- with ``--cuda-graph``: the model and the whole stage again with the model replayed as a
  CUDA graph (``layout.cuda_graph``).

``--json FILE`` also writes every figure. Needs only torch (+ torchvision on CUDA),
numpy, OpenCV and PIL: no DALI, pypdfium2 or onnx.

Usage::

    .venv/bin/python perf/bench_layout_gpu.py --device cpu --count 4 --batch-size 2
    PYTHONPATH=. python perf/bench_layout_gpu.py --device cuda --pages .gpu/pages \\
        --model-dir .gpu/models --count 704 --batch-size 64 --cuda-graph --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from corpus import CORPUS_PAGES

from orchestrator.config import FolioConfig
from orchestrator.errors import ConfigError, LayoutError
from orchestrator.stages import postprocess, postprocess_torch
from orchestrator.stages.layout_gpu import GpuLayoutStage, TorchDecoder
from orchestrator.types import LayoutResult

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".bmp")
GIB = 1024**3


def read_pages(folder: Path) -> list[bytes]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"no page images in {folder}")
    return [p.read_bytes() for p in files]


def batches_of(pages: Sequence[bytes], count: int, batch_size: int) -> list[list[bytes]]:
    cycled = [pages[i % len(pages)] for i in range(count)]
    return [cycled[i:i + batch_size] for i in range(0, count, batch_size)]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(pages: int, fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best pages/s over ``repeats`` timed runs of ``fn`` (one untimed run first)."""
    fn()
    synchronize(device)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        best = max(best, pages / (time.perf_counter() - start))
    return best


def measure_parts(stage: GpuLayoutStage, batches: list[list[bytes]], repeats: int,
                  out: dict[str, Any]) -> None:
    """Decode-only, decode + prep, model-only and post-processing pages/s into ``out``."""
    device = stage.device
    count = sum(len(b) for b in batches)
    bs = stage.batch_size
    decoder = stage.decoder
    if isinstance(decoder, TorchDecoder):
        torch_decoder = decoder

        def decode_only() -> None:
            for b in batches:  # each batch's pages freed before the next is decoded
                torch_decoder.decode(b)

        out["decode_pages_s"] = rate(count, decode_only, device, repeats)

    def decode_prep() -> None:
        for b in batches:
            stage.decode(b)

    out["decode_prep_pages_s"] = rate(count, decode_prep, device, repeats)

    model_batches = max(1, count // bs)
    full = stage.decode([batches[0][i % len(batches[0])] for i in range(bs)])

    def model_only() -> None:
        for _ in range(model_batches):
            stage.forward(full)

    out["model_pages_s"] = rate(model_batches * bs, model_only, device, repeats)

    stage.forward(full)
    assert full.raw is not None
    raw = full.raw
    sizes = [s for s, r in zip(full.decoded.sizes, full.decoded.rows, strict=True)
             if r is not None]
    labels, layout_cfg = stage.labels, stage.cfg.layout
    out["post_torch_pages_s"] = rate(
        len(sizes), lambda: postprocess_torch.postprocess(raw, sizes, layout_cfg, labels),
        device, repeats)
    host = [o.float().cpu().numpy() for o in raw]
    out["post_numpy_pages_s"] = rate(
        len(sizes), lambda: postprocess.postprocess(host, sizes, layout_cfg, labels),
        device, repeats)


def measure(stage: GpuLayoutStage, batches: list[list[bytes]], repeats: int,
            variant: str) -> dict[str, Any]:
    device = stage.device
    count = sum(len(b) for b in batches)
    out: dict[str, Any] = {"variant": variant, "pages": count, "batch_size": stage.batch_size}
    measure_parts(stage, batches, repeats, out)

    regions: list[int] = []

    def whole() -> None:
        regions.clear()
        for batch in stage.run(batches):
            regions.extend(len(r.regions) for r in batch.results if isinstance(r, LayoutResult))

    def sequential() -> None:
        for b in batches:
            stage.detect(b)

    if device.type == "cuda":
        # The peak of the stage alone: the parts above left blocks in torch's cache.
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    out["stage_pages_s"] = rate(count, whole, device, repeats)
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
        free, total = torch.cuda.mem_get_info(device)
        out["device_used_gib"] = (total - free) / GIB  # incl. the CUDA context, other users
    out["sequential_pages_s"] = rate(count, sequential, device, repeats)
    out["regions_per_page"] = statistics.mean(regions) if regions else 0.0
    out["failed_pages"] = count - len(regions)
    parts = {k: out[k] for k in ("decode_prep_pages_s", "model_pages_s", "post_torch_pages_s")}
    slowest = min(parts, key=lambda k: parts[k])
    out["slowest_part"] = slowest
    out["ratio_to_slowest_part"] = out["stage_pages_s"] / parts[slowest]
    ceiling = out.get("decode_pages_s", out["decode_prep_pages_s"])
    out["ratio_to_decode_only"] = out["stage_pages_s"] / ceiling
    return out


def report(r: dict[str, Any]) -> None:
    print(f"[{r['variant']}] {r['pages']} pages, batch size {r['batch_size']}")
    if "decode_pages_s" in r:
        print(f"  decode only:              {r['decode_pages_s']:9.1f} pages/s")
    print(f"  decode + resize/normalise:{r['decode_prep_pages_s']:9.1f} pages/s")
    print(f"  model only:               {r['model_pages_s']:9.1f} pages/s")
    print(f"  post-processing, torch:   {r['post_torch_pages_s']:9.1f} pages/s "
          f"(numpy on host copies: {r['post_numpy_pages_s']:.1f})")
    print(f"  whole stage, overlapped:  {r['stage_pages_s']:9.1f} pages/s "
          f"({r['regions_per_page']:.1f} regions/page, {r['failed_pages']} failed)")
    print(f"  whole stage, sequential:  {r['sequential_pages_s']:9.1f} pages/s")
    print(f"  ratio whole / slowest part ({r['slowest_part']}): "
          f"{r['ratio_to_slowest_part']:.2f}x")
    print(f"  ratio whole / decode-only ceiling: {r['ratio_to_decode_only']:.2f}x")
    if "peak_allocated_gib" in r:
        print(f"  peak GPU memory: {r['peak_allocated_gib']:.2f} GiB allocated, "
              f"{r['peak_reserved_gib']:.2f} GiB reserved by torch; device in use "
              f"{r['device_used_gib']:.2f} GiB")
    else:
        print("  peak GPU memory: n/a (cpu)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=Path, default=CORPUS_PAGES,
                        help="folder of encoded page images (default: the corpus)")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="layout model artifacts (default: layout.model_dir)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--count", type=int, default=None,
                        help="pages per timed run (default: 8 batches)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--batches-in-flight", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also measure the model replayed as a CUDA graph")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)

    overrides: dict[str, Any] = {
        "layout.batch_size": args.batch_size, "layout.precision": args.precision,
        "layout.batches_in_flight": args.batches_in_flight, "layout.gpu_resident": "on",
    }
    if args.model_dir is not None:
        overrides["layout.model_dir"] = str(args.model_dir)
    cfg = FolioConfig().override(overrides)
    if args.device == "cpu":
        torch.set_num_threads(max(1, cfg.layout.threads))
    pages = read_pages(args.pages)
    count = args.count or 8 * args.batch_size
    batches = batches_of(pages, count, args.batch_size)

    stage = GpuLayoutStage(cfg, device=args.device)
    name = (torch.cuda.get_device_name(stage.device) if stage.device.type == "cuda"
            else "cpu")
    print(f"device {stage.device} ({name}), "
          f"torch {torch.__version__}, precision {stage.model.precision}, decoder "
          f"{type(stage.decoder).__name__}, {len(pages)} distinct pages "
          f"({sum(map(len, pages)) / len(pages) / 1e6:.2f} MB each on average)")
    results: list[dict[str, Any]] = []
    device = str(stage.device)

    def record(result: dict[str, Any]) -> None:
        # Written after each variant, so a run stopped later still leaves the figures.
        results.append(result)
        if args.json is not None:
            args.json.write_text(json.dumps(
                {"device": device, "torch": torch.__version__, "results": results},
                indent=2) + "\n")

    record(measure(stage, batches, args.repeats, "eager"))
    report(results[-1])
    if args.cuda_graph and stage.device.type != "cuda":
        print("[cuda-graph] n/a: CUDA graphs need a CUDA device")
    elif args.cuda_graph:
        del stage
        try:
            graphed = GpuLayoutStage(cfg.override({"layout.cuda_graph": True}),
                                     device=args.device)
            record(measure(graphed, batches, args.repeats, "cuda-graph"))
            report(results[-1])
        except (LayoutError, ConfigError, RuntimeError) as exc:
            print(f"[cuda-graph] failed: {type(exc).__name__}: {exc}")
            record({"variant": "cuda-graph", "error": f"{type(exc).__name__}: {exc}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())

