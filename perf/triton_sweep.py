"""One command: build the cpu repository, start the bundled Triton, run every folio_layout
load test, write CSVs and a Markdown summary.

1. ``folio repo build --target cpu`` into build/perf/model_repository_cpu (unless ``--url``);
2. start the tritonserver bundled in nvidia-pytriton on free ports;
3. perf_analyzer concurrency sweep (1, 2, 4, 8)  -> perf/results/triton_perf_analyzer.csv
4. the Python load generator, same sweep         -> perf/results/triton_loadgen.csv
5. gRPC vs in-process on the same pages         -> perf/results/triton_ratio.csv
   batch sizes Triton formed, per step and level -> perf/results/triton_batches_*.csv
6. perf/results/triton_summary.md (the tables for perf/RESULTS.md) and triton_run.json.

Usage::

    perf/triton_sweep.sh                       # everything, about 10 minutes on 2 cores
    perf/triton_sweep.sh --url 127.0.0.1:8001  # against a server you started
    perf/triton_sweep.sh --skip-ratio --concurrency 1 4
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import triton_loadgen
import triton_perf_analyzer
import triton_ratio
from triton_common import (
    CONCURRENCY,
    RESULTS,
    ROOT,
    corpus_pages,
    dump_json,
    machine,
)

from orchestrator.config import FolioConfig


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for _, title in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(row.get(key, "")) for key, _ in columns) + " |"
            for row in rows]
    return "\n".join([head, rule, *body])


SWEEP_COLUMNS = [
    ("concurrency", "concurrency"), ("throughput_pages_s", "pages/s"),
    ("latency_p50_ms", "p50 ms"), ("latency_p90_ms", "p90 ms"), ("latency_p99_ms", "p99 ms"),
    ("preprocess_mean_batch", "preprocess mean batch"),
    ("layout_mean_batch", "layout mean batch"), ("layout_batches", "layout batches (size x runs)"),
]
RATIO_COLUMNS = [
    ("mode", "mode"), ("pages", "pages"), ("grpc_concurrency", "gRPC concurrency"),
    ("inprocess_pages_s", "in-process pages/s"), ("grpc_pages_s", "gRPC pages/s"),
    ("ratio_grpc_over_inprocess", "gRPC / in-process time"),
    ("ratio_per_round", "per round"),
]


def summary(pa: list[dict[str, Any]], lg: list[dict[str, Any]], ratio: list[dict[str, Any]],
            info: dict[str, Any]) -> str:
    parts = [f"Measured {info['date']} on {info['cpu']} ({info['cores']} cores), "
             f"commit {info['commit'] or '?'}, {info['pages']} pages; load average before: "
             f"{info['loadavg']}."]
    if pa:
        parts += ["", "perf_analyzer (gRPC, count_windows):", "", _table(pa, SWEEP_COLUMNS)]
    if lg:
        parts += ["", "Python load generator (folio's asyncio client):", "",
                  _table(lg, SWEEP_COLUMNS)]
    if ratio:
        parts += ["", "gRPC ensemble vs in-process, same pages:", "", _table(ratio, RATIO_COLUMNS)]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None,
                        help="use a running server (gRPC HOST:PORT) instead of starting one")
    parser.add_argument("--pages", type=Path, default=None, help="folder of pages (corpus)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--request-count", type=int, default=None,
                        help="perf_analyzer requests per window (default: 2 x pages)")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--skip-perf-analyzer", action="store_true")
    parser.add_argument("--skip-loadgen", action="store_true")
    parser.add_argument("--skip-ratio", action="store_true")
    args = parser.parse_args(argv)

    pages = corpus_pages(args.pages) if args.pages else corpus_pages()
    info = {**machine(), "date": time.strftime("%Y-%m-%d %H:%M"), "pages": len(pages),
            "loadavg": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    concurrency = tuple(args.concurrency)
    server = None
    url = args.url
    if url is None:
        from orchestrator.serving.serve import ServerPorts, start_server
        from orchestrator.serving.triton_repo import build_repository

        # Its own copy: rebuilding build/model_repository/cpu (`folio serve --target cpu`)
        # must not pull the files from under the server being measured.
        repo = build_repository("cpu", ROOT / "build" / "perf" / "model_repository_cpu")
        server = start_server(repo, ports=ServerPorts.free(),
                              log_path=ROOT / "build" / "logs" / "triton_sweep.log")
        url = server.grpc_url
        print(f"tritonserver ready at {url} (log {server.log_path})", flush=True)
    pa: list[dict[str, Any]] = []
    lg: list[dict[str, Any]] = []
    ratio: list[dict[str, Any]] = []
    try:
        if not args.skip_perf_analyzer:
            pa = triton_perf_analyzer.sweep(
                url, pages, args.out, concurrency=concurrency,
                request_count=args.request_count or 2 * len(pages))
        if not args.skip_loadgen:
            lg = triton_loadgen.sweep(url, pages, args.out, concurrency=concurrency,
                                      passes=args.passes)
        if not args.skip_ratio:
            cfg = FolioConfig().override({"decode.device": "cpu"})
            ratio = triton_ratio.measure(url, pages, cfg, args.passes)
            triton_perf_analyzer.write_csv(args.out / "triton_ratio.csv", ratio)
    finally:
        if server is not None:
            server.stop()
    text = summary(pa, lg, ratio, info)
    (args.out / "triton_summary.md").write_text(text)
    dump_json(args.out / "triton_run.json", {"machine": info, "perf_analyzer": pa,
                                             "loadgen": lg, "ratio": ratio})
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
