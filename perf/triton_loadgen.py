"""A Python load generator for folio_layout: the perf_analyzer sweep, through folio's client.

For each concurrency level, that many asyncio workers send the corpus pages (the same bytes
as perf_analyzer's --input-data) through ``client.triton_layout.AsyncTritonLayoutClient``
over one gRPC channel, ``--passes`` times over the page list after a warm-up. It records
throughput, latency percentiles and the batch sizes Triton formed per ensemble step, so
the perf_analyzer figures can be cross-checked with the client folio itself uses.

Usage::

    python perf/triton_loadgen.py --url 127.0.0.1:8001 --out perf/results
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from triton_common import (
    CONCURRENCY,
    batch_histogram,
    corpus_pages,
    hist_text,
    histogram_delta,
    mean_batch,
    sweep_parser,
    write_csv,
)
from triton_common import (
    batch_rows as batches_of,
)

from client.triton_layout import AsyncTritonLayoutClient
from orchestrator.config import TritonConfig
from orchestrator.types import Detections


async def run_level(url: str, pages: list[tuple[str, bytes]], concurrency: int,
                    passes: int) -> dict[str, Any]:
    cfg = TritonConfig(url=url, max_in_flight=concurrency, timeout_s=120.0)
    client = AsyncTritonLayoutClient(cfg)
    try:
        await client.wait_ready()
        bodies = [body for _, body in pages]
        await asyncio.gather(*(client.detect(bodies[i % len(bodies)])
                               for i in range(concurrency)))  # warm-up
        jobs = list(range(len(bodies) * passes))
        latencies: list[float] = []
        errors = 0
        position = 0

        async def worker() -> None:
            nonlocal position, errors
            while position < len(jobs):
                job = jobs[position]
                position += 1
                start = time.perf_counter()
                try:
                    result = await client.detect(bodies[job % len(bodies)])
                    assert isinstance(result, Detections)
                except Exception:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        before = await asyncio.to_thread(batch_histogram, url)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        after = await asyncio.to_thread(batch_histogram, url)
    finally:
        await client.close()
    ms = np.array(latencies) * 1000.0
    delta = histogram_delta(before, after)
    return {
        "tool": "python_loadgen",
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "throughput_pages_s": round(len(latencies) / wall, 3),
        "latency_avg_ms": round(float(ms.mean()), 1),
        "latency_p50_ms": round(float(np.percentile(ms, 50)), 1),
        "latency_p90_ms": round(float(np.percentile(ms, 90)), 1),
        "latency_p95_ms": round(float(np.percentile(ms, 95)), 1),
        "latency_p99_ms": round(float(np.percentile(ms, 99)), 1),
        **{f"{s}_mean_batch": round(mean_batch(delta.get(s, {})), 2) for s in delta},
        "layout_batches": hist_text(delta.get("layout", {})),
        "_delta": delta,
    }


def sweep(url: str, pages: list[tuple[str, bytes]], out: Path, *,
          concurrency: tuple[int, ...] = CONCURRENCY, passes: int = 2) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    batch_rows: list[dict[str, Any]] = []
    for c in concurrency:
        row = asyncio.run(run_level(url, pages, c, passes))
        delta = row.pop("_delta")
        batch_rows.extend(batches_of(tool="python_loadgen", concurrency=c, delta=delta))
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_csv(out / "triton_loadgen.csv", rows)
    write_csv(out / "triton_batches_loadgen.csv", batch_rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = sweep_parser(__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--passes", type=int, default=2, help="passes over the pages per level")
    args = parser.parse_args(argv)
    pages = corpus_pages(args.pages) if args.pages else corpus_pages()
    sweep(args.url, pages, args.out, concurrency=tuple(args.concurrency), passes=args.passes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
