"""The Ray engine against the in-process pipeline on the same pages, in one run.

Modes, each run in its own subprocess (thread settings and CPU affinity are per process),
alternating, from cold (imports and model loading are in the timed run: the in-process
pipeline loads its models, the Ray engine plans, starts its actors and they load theirs;
the Ray itself is started before the clock, as a cluster is up before a job):

- ``inprocess``: the pipeline into SQLite;
- ``ray``: ``--engine ray`` into Parquet with the default [ray] section (one decode+layout
  actor, one recognition actor with ``recognize.workers`` threads);
- ``ray-1`` / ``ray-2``: the engine's scaling: Ray pinned to 1 core with one actor per
  stage, or to 2 cores with two per stage, one recogniser thread per actor.

Each mode runs twice per round, on the first ``--small`` documents and on all of them;
the extra pages over the extra time is the engine's rate with its fixed start-up cost
cancelled (what a run of 10^7 pages sees). The whole-run rate of the large run is printed
too. Ratios are against the in-process runs of the same invocation.

    .venv/bin/python perf/bench_ray.py [--small K] [--rounds R] [--modes M,...]
                                       [--set KEY=VALUE] [SOURCE...]
"""

from __future__ import annotations

import argparse
import json
import logging
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
_ONE_THREAD = {"recognize.workers": 1, "ray.read_cpus": 0.25, "ray.layout_cpus": 0.25,
               "ray.recognize_cpus": 0.5}
# (cores Ray is pinned to, or None: all; config overrides)
MODE_SETTINGS: dict[str, tuple[int | None, dict[str, Any]]] = {
    "inprocess": (None, {}),
    "ray": (None, {}),
    "ray-1": (1, {**_ONE_THREAD, "ray.layout_actors": 1, "ray.recognize_actors": 1}),
    "ray-2": (2, {**_ONE_THREAD, "ray.layout_actors": 2, "ray.recognize_actors": 2}),
}


def _inprocess(sources: list[str], cfg: Any, tmp: Path) -> dict[str, float]:
    start = time.perf_counter()
    from orchestrator.engines.pipeline import Pipeline

    pipeline = Pipeline(cfg)
    try:
        summary = pipeline.run(sources, tmp / "bench.db")
    finally:
        pipeline.close()
    assert summary.errors == 0, summary.first_errors
    return {"pages": summary.pages, "run_s": time.perf_counter() - start}


def _ray(sources: list[str], cfg: Any, tmp: Path, cores: int | None) -> dict[str, float]:
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # 127.0.0.1 only (ray_engine)
    if cores is not None:  # Ray's processes inherit the driver's CPU affinity
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    import ray

    from orchestrator.engines import ray_engine

    ray.init(address="local", num_cpus=cores, include_dashboard=False,
             logging_level=logging.WARNING)
    try:
        start = time.perf_counter()
        summary = ray_engine.run(sources, tmp / "out", cfg)
        run_s = time.perf_counter() - start
    finally:
        ray.shutdown()
    assert summary.errors == 0, summary.first_errors
    return {"pages": summary.pages, "run_s": run_s}


def _child(mode: str, sources: list[str], overrides: dict[str, Any]) -> dict[str, float]:
    from orchestrator.config import FolioConfig

    cores, settings = MODE_SETTINGS[mode]
    cfg = FolioConfig().override({**overrides, **settings})
    with tempfile.TemporaryDirectory() as tmp:
        if mode == "inprocess":
            return _inprocess(sources, cfg, Path(tmp))
        return _ray(sources, cfg, Path(tmp), cores)


def _measure(mode: str, sources: list[str], settings: list[str]) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, *(f"--set={kv}" for kv in settings),
         *sources], capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        sys.exit(f"{mode} failed:\n{done.stderr[-3000:]}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sources", nargs="*", default=[str(s) for s in DEFAULT_SOURCES])
    parser.add_argument("--small", type=int, default=2,
                        help="documents in the small run (default: the first 2)")
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
    if not 1 <= args.small < len(args.sources):
        parser.error("--small must leave the large run more documents than the small one")
    totals = {mode: [0.0, 0.0, 0.0, 0.0] for mode in modes}  # small/large pages, seconds
    for _ in range(args.rounds):
        for mode in modes:
            small = _measure(mode, args.sources[:args.small], args.set)
            large = _measure(mode, args.sources, args.set)
            extra_pages = large["pages"] - small["pages"]
            extra_s = large["run_s"] - small["run_s"]
            for i, value in enumerate((small["pages"], small["run_s"], large["pages"],
                                       large["run_s"])):
                totals[mode][i] += value
            print(f"{mode:10s} {large['pages']} pages: run {large['run_s']:.1f} s = "
                  f"{large['pages'] / large['run_s']:.3f} pages/s; {small['pages']} pages: "
                  f"{small['run_s']:.1f} s; the {extra_pages} more in {extra_s:.1f} s",
                  flush=True)
    marginal = {m: (t[2] - t[0]) / (t[3] - t[1]) if t[3] > t[1] else 0.0
                for m, t in totals.items()}
    whole = {m: t[2] / t[3] for m, t in totals.items()}
    cores = len(os.sched_getaffinity(0))
    if "inprocess" in totals and "ray" in totals:
        print(f"ray / in-process = {_ratio(marginal, 'ray', 'inprocess')} without start-up "
              f"({marginal['ray']:.3f} vs {marginal['inprocess']:.3f} pages/s, {cores} cores); "
              f"{_ratio(whole, 'ray', 'inprocess')} whole run ({whole['ray']:.3f} vs "
              f"{whole['inprocess']:.3f} pages/s)")
    if "ray-1" in totals and "ray-2" in totals:
        print(f"ray 2 cores, 2 actors per stage / 1 core, 1 actor = "
              f"{_ratio(marginal, 'ray-2', 'ray-1')} without start-up ({marginal['ray-2']:.3f} "
              f"vs {marginal['ray-1']:.3f} pages/s); {_ratio(whole, 'ray-2', 'ray-1')} whole run")


def _ratio(rates: dict[str, float], top: str, bottom: str) -> str:
    """``top / bottom`` as "1.23x", or "n/a" where the large run took no longer than the
    small one (too few pages to tell the rate from the noise)."""
    if rates[top] <= 0 or rates[bottom] <= 0:
        return "n/a"
    return f"{rates[top] / rates[bottom]:.2f}x"


if __name__ == "__main__":
    main()
