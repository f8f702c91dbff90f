"""End-to-end pages/s: the pipeline vs a naive loop over the same models, in one run.

The naive loop is what the systems we replace do: one page at a time, each stage after
the other. Two baselines: ``naive`` leaves every library at its default thread count (all
cores: what those systems run), ``naive-staged`` uses the pipeline's own per-stage
thread settings (so the ratio isolates the overlap). The pipeline overlaps the stages
with bounded queues and gives each stage a capped thread pool.
Each mode runs in its own subprocess (thread settings are per process), on the same
pages, alternating, after a warm-up page.

    .venv/bin/python perf/bench_pipeline.py [--pages N] [--rounds R] [--modes M,...] [SOURCE...]

``pipeline-page-workers`` (not run by default) is the pipeline with rapidocr's worker
pool hidden, each recognition thread taking a whole page: what the pool gains.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import Any

from corpus import CORPUS_PAGES

REPO = Path(__file__).resolve().parents[1]
MODES = ("naive", "naive-staged", "pipeline", "pipeline-page-workers")
DEFAULT_MODES = MODES[:3]
DEFAULT_SOURCES = [
    CORPUS_PAGES / name
    for name in ("typewriter.png", "baiona.png", "multipage.pdf", "cardinal.pdf", "epson.pdf")
]


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE read as a TOML value when it is one, else a string."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            out[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = value
    return out


def _naive(sources: list[str], db: Path, limit: int, overrides: dict[str, Any],
           staged: bool = False) -> dict[str, float]:
    from orchestrator.config import FolioConfig
    from orchestrator.engines.pipeline import InProcessLayout
    from orchestrator.stages.coverage import cover_page
    from orchestrator.stages.crop import region_tasks
    from orchestrator.stages.decode import Decoder
    from orchestrator.stages.recognize import RapidOCRRecognizer
    from orchestrator.stages.sink import SQLiteSink
    from orchestrator.stages.sources import open_sources
    from orchestrator.types import PageOutcome

    cores = os.cpu_count() or 1
    cfg = FolioConfig().override({**overrides, "decode.batch_size": 1})
    if not staged:
        cfg = cfg.override({"decode.threads": cores, "lines.threads": cores,
                            "layout.threads": cores, "recognize.threads": cores})
    import torch

    torch.set_num_threads(cfg.layout.threads)
    decoder = Decoder(cfg.decode, cfg.sources, cfg.lines)
    layout = InProcessLayout(cfg, "cpu")
    recognizer = RapidOCRRecognizer(cfg.recognize)
    pages = 0
    with SQLiteSink(db, cfg.sink) as sink:
        start = time.perf_counter()
        for encoded in open_sources(sources, cfg.sources).pages():
            if pages >= limit:
                break
            pages += 1
            (decoded,) = decoder.decode([encoded])
            assert not isinstance(decoded, Exception), decoded
            (result,) = layout.detect([decoded], [encoded])
            assert not isinstance(result, Exception), result
            result = cover_page(result, decoded.lines, cfg.lines, cfg.layout)
            tasks = region_tasks(decoded, result, cfg.crop)
            texts = dict(zip((t.region.index for t in tasks), recognizer.recognize(tasks),
                             strict=True))
            sink.write_batch([PageOutcome(
                ref=decoded.ref, status="ok", error=None, width=decoded.width,
                height=decoded.height, regions=[(r, texts.get(r.index)) for r in result.regions],
            )])
        elapsed = time.perf_counter() - start
    return {"pages": pages, "elapsed_s": elapsed}


class _OnePagePerWorker:
    """rapidocr without its pool: the pipeline then gives each worker thread a whole page
    (how folio ran before the pool), for the ``pipeline-page-workers`` mode."""

    name = "rapidocr"

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.model = inner.model

    def recognize(self, tasks: Any) -> Any:
        return self._inner.recognize(tasks)

    def close(self) -> None:
        self._inner.close()


def _pipeline(sources: list[str], db: Path, limit: int, overrides: dict[str, Any],
              pool: bool = True) -> dict[str, float]:
    from orchestrator.config import FolioConfig
    from orchestrator.engines.pipeline import Pipeline
    from orchestrator.stages.recognize import RapidOCRRecognizer

    cfg = FolioConfig().override({**overrides, "pipeline.limit": limit})
    pipeline = Pipeline(cfg, recognizer=None if pool else _OnePagePerWorker(
        RapidOCRRecognizer(cfg.recognize)))
    try:
        summary = pipeline.run(sources, db)
    finally:
        pipeline.close()
    assert summary.errors == 0, summary.first_errors
    return {"pages": summary.pages, "elapsed_s": summary.elapsed_s}


def _child(mode: str, sources: list[str], limit: int,
           overrides: dict[str, Any]) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        runner = {"naive": _naive, "pipeline": _pipeline,
                  "naive-staged": functools.partial(_naive, staged=True),
                  "pipeline-page-workers": functools.partial(_pipeline, pool=False)}[mode]
        # Warm-up: load models and first-call allocations outside the timed run.
        runner(sources, Path(tmp) / "warm.db", 1, overrides)
        cpu = time.process_time()
        result = runner(sources, Path(tmp) / "bench.db", limit, overrides)
        result["cpu_s"] = time.process_time() - cpu
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sources", nargs="*", default=[str(s) for s in DEFAULT_SOURCES])
    parser.add_argument("--pages", type=int, default=14)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma-separated, from {','.join(MODES)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every mode, e.g. recognize.precision=bf16")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.sources, args.pages, _overrides(args.set))))
        return
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            out = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--pages", str(args.pages),
                 *(f"--set={kv}" for kv in args.set), *args.sources],
                check=True, capture_output=True, text=True, cwd=REPO,
            ).stdout.strip().splitlines()[-1]
            result = json.loads(out)
            results[mode].append(result)
            print(f"{mode:12s} {result['pages']} pages in {result['elapsed_s']:.1f} s = "
                  f"{result['pages'] / result['elapsed_s']:.3f} pages/s, "
                  f"{result['cpu_s'] / result['elapsed_s']:.2f} cores busy", flush=True)
    rate = {m: sum(r["pages"] for r in rs) / sum(r["elapsed_s"] for r in rs)
            for m, rs in results.items()}
    for baseline in ("naive", "naive-staged", "pipeline-page-workers"):
        if "pipeline" in rate and baseline in rate:
            print(f"pipeline / {baseline} = {rate['pipeline'] / rate[baseline]:.2f}x "
                  f"({rate['pipeline']:.3f} vs {rate[baseline]:.3f} pages/s, "
                  f"{os.cpu_count()} cores)")
    if "pipeline" in rate and "naive-staged" in rate:
        # The single-threaded loop's CPU per page is the work itself (no overlap, no
        # spinning): no schedule of it on N cores beats N / work pages/s.
        staged = results["naive-staged"]
        work = sum(r["cpu_s"] for r in staged) / sum(r["pages"] for r in staged)
        cores = os.cpu_count() or 1
        ceiling = cores / work
        print(f"work: {work:.2f} CPU-s/page; {cores}-core ceiling {ceiling:.3f} pages/s; "
              f"pipeline at {rate['pipeline'] / ceiling:.0%} of it")
        if "naive" in rate:
            print(f"ceiling / naive = {ceiling / rate['naive']:.2f}x (the most any schedule of "
                  f"this work could gain over the default-threads loop)")


if __name__ == "__main__":
    main()
