"""Text-line detection CPU per page: the detector as folio runs it (the page normalised in
float32) vs the same detector with rapidocr's stock pre-processing (float64 mean and std,
so the page is normalised in float64 and copied back), on the same pages, alternating, in
one run. Both must find the same lines.

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
from orchestrator.stages.textlines import LineDetector
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
    decode_stage(encoded_pages, args.rounds, args.workers)


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
    differ = sum(not (a is None and b is None) and (a is None or b is None
                                                    or not np.array_equal(a, b))
                 for a, b in zip(lines[1], lines[workers], strict=True))
    total = len(pages) * rounds
    for n, seconds in wall.items():
        print(f"decode stage, lines.workers={n}: {total / seconds:6.2f} pages/s "
              f"({total} pages, batches of {batch}, {os.cpu_count()} cores)")
    print(f"pages whose lines differ: {differ} of {len(pages)}")
    print(f"lines.workers={workers} / 1: {wall[1] / wall[workers]:.2f}x")


if __name__ == "__main__":
    main()
