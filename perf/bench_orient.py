"""Orientation probe cost per page: the probe reads as they were (six fp32 reads: three
lines as they stand and turned) vs now (three reads at ``decode.orient_precision``, the
turned reading only when the lines do not read confidently), on the same pages, in one run.

Every page is tried in four rotations; the page's text lines are detected once per
rotation (shared by both, not timed: the decode stage finds them for every page anyway);
the two detectors must agree on each, so the ratio compares the same verdicts.

    .venv/bin/python perf/bench_orient.py [SOURCE...]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

from corpus import CORPUS_PAGES

from orchestrator.config import FolioConfig
from orchestrator.stages.decode import Decoder
from orchestrator.stages.orient import OrientationDetector, rotate_clockwise
from orchestrator.stages.sources import open_sources
from orchestrator.stages.textlines import LineDetector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sources", nargs="*", default=[str(CORPUS_PAGES)])
    parser.add_argument("--pages", type=int, default=None, help="stop after N pages")
    args = parser.parse_args()
    cfg = FolioConfig().override({"decode.orient": False, "decode.device": "cpu"})
    decoder = Decoder(cfg.decode, cfg.sources)
    lines = LineDetector(cfg.lines)
    detectors = {
        "both ways, fp32": OrientationDetector(dataclasses.replace(
            cfg.decode, orient_confident=1.0, orient_precision="fp32")),
        "now": OrientationDetector(cfg.decode),
    }
    images = []
    for encoded in open_sources(args.sources, cfg.sources).pages():
        if args.pages is not None and len(images) >= args.pages:
            break
        (decoded,) = decoder.decode([encoded])
        if not isinstance(decoded, Exception):
            images.append(decoded.image)
    warm = rotate_clockwise(images[0], 180)
    for det in detectors.values():  # warm-up: engines, first-call compiles
        det.detect(warm, lines.detect(warm))
    cpu = dict.fromkeys(detectors, 0.0)
    differ = 0
    for image in images:
        for turn in (0, 90, 180, 270):
            turned = rotate_clockwise(image, turn)
            found = lines.detect(turned)
            verdicts = set()
            for name, det in detectors.items():
                start = time.thread_time()
                verdicts.add(det.detect(turned, found))
                cpu[name] += time.thread_time() - start
            differ += len(verdicts) > 1
    tried = 4 * len(images)
    for name, seconds in cpu.items():
        print(f"{name:16s} {1000 * seconds / tried:6.1f} ms CPU/page ({tried} pages)")
    print(f"verdicts that differ: {differ} of {tried}")
    print(f"ratio both-ways fp32 / now: {cpu['both ways, fp32'] / cpu['now']:.2f}x")


if __name__ == "__main__":
    main()
