"""Text-line detection CPU per page: the detector as folio runs it (the page normalised in
float32) vs the same detector with rapidocr's stock pre-processing (float64 mean and std,
so the page is normalised in float64 and copied back), on the same pages, alternating, in
one run. Both must find the same lines.

Then what the host still spends per page when the forward pass runs on a GPU
(``lines.engine = "torch"``: rapidocr's resize, the upload, DB post-processing on the map
that comes back) against the whole detection on the CPU, on the same pages.

Then the decode stage as a run drives it (decode, lines, orientation, batches of
``decode.batch_size``) with ``lines.workers`` = ``--workers`` against 1, wall-clock pages/s
on the same pages, alternating; both must give every page the same lines.

    .venv/bin/python perf/bench_lines.py [--rounds R] [--workers N] [SOURCE...]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from typing import Any

import numpy as np
from corpus import CORPUS_PAGES

from orchestrator.config import DecodeConfig, FolioConfig, LinesConfig
from orchestrator.stages.decode import Decoder
from orchestrator.stages.sources import open_sources
from orchestrator.stages.textlines import LineDetector, TorchLineModel
from orchestrator.types import EncodedPage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sources", nargs="*", default=[str(CORPUS_PAGES)])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="lines.workers for the decode stage (default: the cores)")
    args = parser.parse_args()
    cfg = FolioConfig().override({"decode.orient": False, "decode.device": "cpu"})
    decoder = Decoder(cfg.decode, cfg.sources)
    images = []
    encoded_pages = list(open_sources(args.sources, cfg.sources).pages())
    for encoded in encoded_pages:
        (decoded,) = decoder.decode([encoded])
        if not isinstance(decoded, Exception):
            images.append(decoded.image)
    folio, stock = LineDetector(cfg.lines), LineDetector(cfg.lines)
    det = stock._detector()
    # Back to plain lists, as rapidocr's config gives them (its pre-processing then makes
    # float64 arrays of them).
    det.mean, det.std = [float(v) for v in det.mean], [float(v) for v in det.std]
    for detector in (folio, stock):
        detector.detect(images[0])  # warm-up: engines, first-call compiles
    cpu = {"float32 (folio)": 0.0, "float64 (rapidocr's)": 0.0}
    differ = 0
    for _ in range(args.rounds):
        for image in images:
            found = []
            for name, detector in zip(cpu, (folio, stock), strict=True):
                start = time.thread_time()
                found.append(detector.detect(image))
                cpu[name] += time.thread_time() - start
            a, b = found
            differ += len(a) != len(b) or not np.array_equal(a.quads, b.quads)
    pages = len(images) * args.rounds
    for name, seconds in cpu.items():
        print(f"{name:<22} {1000 * seconds / pages:7.1f} ms CPU/page over {pages} pages")
    base, now = cpu["float64 (rapidocr's)"], cpu["float32 (folio)"]
    print(f"pages whose lines differ: {differ} of {pages}")
    print(f"float64 / float32: {base / now:.2f}x")
    host_share(folio, images, args.rounds)
    decode_stage(encoded_pages, args.rounds, args.workers)


def host_share(detector: LineDetector, images: list[np.ndarray], rounds: int) -> None:
    """Host CPU per page: the whole detection (OpenVINO) vs the torch engine's host part
    (resize; DB post-processing of the map, here the OpenVINO map, which the torch
    engine's equals: tests/test_textlines.py)."""
    det = detector._detector()
    upload = TorchLineModel.host_preprocess(det)
    cpu = {"whole": 0.0, "resize": 0.0, "post": 0.0}
    for _ in range(rounds):
        for image in images:
            start = time.thread_time()
            detector.detect(image)
            cpu["whole"] += time.thread_time() - start
            start = time.thread_time()
            upload()(image)  # what the torch engine does on the host before the upload
            cpu["resize"] += time.thread_time() - start
            prob = det.session(det.get_preprocess()(image))
            start = time.thread_time()
            boxes, _ = det.postprocess_op(prob, image.shape[:2])
            det.sorted_boxes(boxes)
            cpu["post"] += time.thread_time() - start
    pages = len(images) * rounds
    whole, host = cpu["whole"], cpu["resize"] + cpu["post"]
    print(f"host CPU/page, forward on the CPU ({detector.precision} OpenVINO): "
          f"{1000 * whole / pages:7.1f} ms")
    print(f"host CPU/page, forward on a GPU (lines.engine torch): {1000 * host / pages:7.1f} ms "
          f"(resize {1000 * cpu['resize'] / pages:.1f}, DB post-processing "
          f"{1000 * cpu['post'] / pages:.1f})")
    print(f"pages per host core, forward on a GPU / on the CPU: {whole / host:.2f}x")


def decode_stage(pages: list[EncodedPage], rounds: int, workers: int) -> None:
    """The decode stage's wall-clock pages/s with ``lines.workers`` = ``workers`` vs 1."""
    batch = max(FolioConfig().decode.batch_size, workers)
    decoders = {n: Decoder(replace(DecodeConfig(), device="cpu", batch_size=batch),
                           FolioConfig().sources, replace(LinesConfig(), workers=n))
                for n in dict.fromkeys((1, workers))}
    wall = dict.fromkeys(decoders, 0.0)
    found: dict[int, list[Any]] = {}
    for decoder in decoders.values():
        decoder.decode(pages[:1])  # warm-up: engines, first-call compiles
    for _ in range(rounds):
        for n, decoder in decoders.items():
            start = time.perf_counter()
            found[n] = [page for i in range(0, len(pages), batch)
                        for page in decoder.decode(pages[i:i + batch])]
            wall[n] += time.perf_counter() - start
    for decoder in decoders.values():
        decoder.close()
    lines = {n: [getattr(getattr(p, "lines", None), "quads", None) for p in out]
             for n, out in found.items()}
    differ = sum(not (a is b or (a is not None and b is not None and np.array_equal(a, b)))
                 for a, b in zip(lines[1], lines[workers], strict=True))
    total = len(pages) * rounds
    for n, seconds in wall.items():
        print(f"decode stage, lines.workers={n}: {total / seconds:6.2f} pages/s "
              f"({total} pages, batches of {batch}, {os.cpu_count()} cores)")
    print(f"pages whose lines differ: {differ} of {len(pages)}")
    print(f"lines.workers={workers} / 1: {wall[1] / wall[workers]:.2f}x")


if __name__ == "__main__":
    main()
