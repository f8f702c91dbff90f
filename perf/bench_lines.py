"""Text-line detection CPU per page: the detector as folio runs it (the page normalised in
float32) vs the same detector with rapidocr's stock pre-processing (float64 mean and std,
so the page is normalised in float64 and copied back), on the same pages, alternating, in
one run. Both must find the same lines.

    .venv/bin/python perf/bench_lines.py [--rounds R] [SOURCE...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from corpus import CORPUS_PAGES

from orchestrator.config import FolioConfig
from orchestrator.stages.decode import Decoder
from orchestrator.stages.sources import open_sources
from orchestrator.stages.textlines import LineDetector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sources", nargs="*", default=[str(CORPUS_PAGES)])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    cfg = FolioConfig().override({"decode.orient": False, "decode.device": "cpu"})
    decoder = Decoder(cfg.decode, cfg.sources)
    images = []
    for encoded in open_sources(args.sources, cfg.sources).pages():
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


if __name__ == "__main__":
    main()
