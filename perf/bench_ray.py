"""The Ray engine against the in-process pipeline on the same pages, in one run.

Modes, each in its own subprocess (thread settings are per process), alternating:

- ``inprocess``: the pipeline into SQLite, from cold: its imports and model loading are
  in the timed run, as the Ray run's actors import and load theirs;
- ``ray``: ``--engine ray`` with the default [ray] section (one decode+layout actor, one
  recognition actor with ``recognize.workers`` threads) into Parquet, on a Ray started in
  the subprocess before the clock starts (a cluster is up before a job in real use);
  its run includes planning, starting the actors and loading their models;
- ``ray-1`` / ``ray-2``: one or two recognition actors with one recogniser thread each,
  for the engine's scaling.

Two rates per run: the whole run, and first to last page (the stream once it flows,
which is what a run of 10^7 pages sees). Ratios are against the in-process run of the
same invocation.

    .venv/bin/python perf/bench_ray.py [--rounds R] [--modes M,...] [--set KEY=VALUE] [SOURCE...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's folio, also for the Ray workers (cwd)

from bench_pipeline import DEFAULT_SOURCES, _overrides  # noqa: E402

MODES = ("inprocess", "ray", "ray-1", "ray-2")
MODE_SETTINGS: dict[str, dict[str, Any]] = {
    "inprocess": {},
    "ray": {},
    "ray-1": {"recognize.workers": 1, "ray.recognize_actors": 1, "ray.recognize_cpus": 0.5},
    "ray-2": {"recognize.workers": 1, "ray.recognize_actors": 2, "ray.recognize_cpus": 0.5},
}


class _Clock:
    """When the first and the last page came out."""

    def __init__(self) -> None:
        self.first = self.last = 0.0
        self.pages = 0

    def __call__(self, _: object) -> None:
        now = time.perf_counter()
        self.first = self.first or now
        self.last = now
        self.pages += 1

    def stream_s(self) -> float:
        return self.last - self.first


def _inprocess(sources: list[str], cfg: Any, tmp: Path) -> dict[str, float]:
    start = time.perf_counter()  # cold, like a Ray run's actors: imports and models count
    from orchestrator.pipeline import Pipeline

    pipeline = Pipeline(cfg)
    clock = _Clock()
    try:
        summary = pipeline.run(sources, tmp / "bench.db", on_page=clock)
    finally:
        pipeline.close()
    run_s = time.perf_counter() - start
    assert summary.errors == 0, summary.first_errors
    return {"pages": summary.pages, "run_s": run_s, "stream_s": clock.stream_s()}


def _ray(sources: list[str], cfg: Any, tmp: Path) -> dict[str, float]:
    from orchestrator.engines import ray_engine

    with ray_engine.ray_session(None):  # started before the clock
        clock = _Clock()
        start = time.perf_counter()
        summary = ray_engine.run(sources, tmp / "out", cfg, on_page=clock)
        run_s = time.perf_counter() - start
    assert summary.errors == 0, summary.first_errors
    return {"pages": summary.pages, "run_s": run_s, "stream_s": clock.stream_s()}


def _child(mode: str, sources: list[str], overrides: dict[str, Any]) -> dict[str, float]:
    from orchestrator.config import FolioConfig

    cfg = FolioConfig().override({**overrides, **MODE_SETTINGS[mode]})
    with tempfile.TemporaryDirectory() as tmp:
        runner = _inprocess if mode == "inprocess" else _ray
        return runner(sources, cfg, Path(tmp))


def _rate(runs: list[dict[str, float]], key: str) -> float:
    """Pages per second over all rounds; first to last page counts the pages after the
    first (the clock starts when it comes out)."""
    pages = sum(r["pages"] - (key == "stream_s") for r in runs)
    seconds = sum(r[key] for r in runs)
    return pages / seconds if seconds > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sources", nargs="*", default=[str(s) for s in DEFAULT_SOURCES])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES),
                        help=f"comma-separated, from {','.join(MODES)}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every mode, e.g. recognize.precision=fp32")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.sources, _overrides(args.set))))
        return
    modes = args.modes.split(",")
    if unknown := set(modes) - set(MODES):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode in modes:
            done = subprocess.run(
                [sys.executable, __file__, "--child", mode,
                 *(f"--set={kv}" for kv in args.set), *args.sources],
                capture_output=True, text=True, cwd=REPO,
            )
            if done.returncode != 0:
                sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[mode].append(result)
            pages, run_s, stream_s = result["pages"], result["run_s"], result["stream_s"]
            print(f"{mode:10s} {pages} pages: run {run_s:.1f} s = {pages / run_s:.3f} pages/s; "
                  f"first to last page {stream_s:.1f} s", flush=True)
    stream = {m: _rate(rs, "stream_s") for m, rs in results.items()}
    run = {m: _rate(rs, "run_s") for m, rs in results.items()}
    cores = os.cpu_count()
    if "inprocess" in results and "ray" in results:
        print(f"ray / in-process = {_ratio(stream, 'ray', 'inprocess')} first to last page "
              f"({stream['ray']:.3f} vs {stream['inprocess']:.3f} pages/s, {cores} cores); "
              f"{_ratio(run, 'ray', 'inprocess')} whole run ({run['ray']:.3f} vs "
              f"{run['inprocess']:.3f}, both from cold: imports, models, Ray's actors)")
    if "ray-1" in results and "ray-2" in results:
        print(f"ray 2 recognition actors / 1 = {_ratio(stream, 'ray-2', 'ray-1')} first to "
              f"last page ({stream['ray-2']:.3f} vs {stream['ray-1']:.3f} pages/s), "
              f"{_ratio(run, 'ray-2', 'ray-1')} whole run; one recogniser thread per actor, "
              f"{cores} cores")


def _ratio(rates: dict[str, float], top: str, bottom: str) -> str:
    """``top / bottom`` as "1.23x", or "n/a" where a run was too short to time its
    stream (its pages came out together)."""
    if rates[top] <= 0 or rates[bottom] <= 0:
        return "n/a"
    return f"{rates[top] / rates[bottom]:.2f}x"


if __name__ == "__main__":
    main()
