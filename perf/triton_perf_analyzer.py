"""perf_analyzer against folio_layout over gRPC: a concurrency sweep on real pages -> CSV.

perf_analyzer 2.51.0 comes with the ``tritonclient==2.51.0`` wheel (``.venv/bin/perf_analyzer``;
newer ones need glibc 2.38). It looks for ``libb64.so.0d`` and ``libcudart.so.12`` by
soname; both ship inside ``nvidia_pytriton.libs`` under hashed names, so ``setup()``
symlinks them into ``build/perf_analyzer_libs`` for its LD_LIBRARY_PATH.

The requests are the corpus pages (``--input-data``: one entry per page, the encoded bytes
as base64, shape [nbytes]); perf_analyzer cycles through them. On small, noisy machines the
default time windows do not stabilise, so it counts requests per window instead
(``--measurement-mode count_windows``).

Usage::

    python perf/triton_perf_analyzer.py --url 127.0.0.1:8001 --out perf/results
    # the commands it runs are printed; one of them, for concurrency 4:
    LD_LIBRARY_PATH=build/perf_analyzer_libs .venv/bin/perf_analyzer -m folio_layout \\
        -u 127.0.0.1:8001 -i grpc --input-data build/perf/folio_layout_input.json \\
        --concurrency-range 4:4 --measurement-mode count_windows \\
        --measurement-request-count 32 -s 25 -r 8 -f build/perf/pa_c4.csv
"""

from __future__ import annotations

import base64
import csv
import json
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

from triton_common import (
    CONCURRENCY,
    ROOT,
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

LIB_DIR = ROOT / "build" / "perf_analyzer_libs"
WORK = ROOT / "build" / "perf"
SONAMES = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


def perf_analyzer_binary() -> Path:
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.is_file():
        raise SystemExit(f"{binary} not found: pip install 'tritonclient[grpc]==2.51.0'")
    return binary


def setup() -> dict[str, str]:
    """Symlink the two libraries perf_analyzer needs; return its environment."""
    import pytriton

    libs = Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"
    LIB_DIR.mkdir(parents=True, exist_ok=True)
    for soname, pattern in SONAMES.items():
        found = sorted(libs.glob(pattern))
        if not found:
            raise SystemExit(f"{pattern} not in {libs}: is nvidia-pytriton==0.7.0 installed?")
        link = LIB_DIR / soname
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(found[0])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(
        p for p in (str(LIB_DIR), sysconfig.get_config_var("LIBDIR") or "",
                    env.get("LD_LIBRARY_PATH", "")) if p)
    return env


def write_input_data(pages: list[tuple[str, bytes]], path: Path) -> Path:
    """perf_analyzer's --input-data JSON: one entry per page (base64 bytes, shape [n])."""
    data = [{"IMAGE": {"b64": base64.b64encode(body).decode("ascii"), "shape": [len(body)]}}
            for _, body in pages]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": data}))
    return path


def command(url: str, input_data: Path, concurrency: int, csv_path: Path, *,
            model: str = "folio_layout", request_count: int = 32,
            stability: int = 25, max_trials: int = 8) -> list[str]:
    return [
        str(perf_analyzer_binary()), "-m", model, "-u", url, "-i", "grpc",
        "--input-data", str(input_data),
        "--concurrency-range", f"{concurrency}:{concurrency}",
        "--measurement-mode", "count_windows",
        "--measurement-request-count", str(request_count),
        "-s", str(stability), "-r", str(max_trials),
        "--percentile", "95",
        "-f", str(csv_path),
    ]


def parse_csv(path: Path) -> dict[str, Any]:
    """perf_analyzer's -f CSV (one row per concurrency) -> throughput and latencies (ms)."""
    with path.open() as fh:
        row = next(csv.DictReader(fh))
    us = {k: float(v) for k, v in row.items() if k and v and k != "Concurrency"}
    return {
        "throughput_pages_s": round(us["Inferences/Second"], 3),
        "latency_avg_ms": round(sum(us[k] for k in (
            "Client Send", "Network+Server Send/Recv", "Server Queue",
            "Server Compute Input", "Server Compute Infer", "Server Compute Output",
            "Client Recv") if k in us) / 1000.0, 1),
        "latency_p50_ms": round(us["p50 latency"] / 1000.0, 1),
        "latency_p90_ms": round(us["p90 latency"] / 1000.0, 1),
        "latency_p95_ms": round(us["p95 latency"] / 1000.0, 1),
        "latency_p99_ms": round(us["p99 latency"] / 1000.0, 1),
        "server_queue_ms": round(us.get("Server Queue", 0.0) / 1000.0, 1),
        "server_compute_ms": round((us.get("Server Compute Input", 0.0)
                                    + us.get("Server Compute Infer", 0.0)
                                    + us.get("Server Compute Output", 0.0)) / 1000.0, 1),
    }


def sweep(url: str, pages: list[tuple[str, bytes]], out: Path, *,
          concurrency: tuple[int, ...] = CONCURRENCY, request_count: int = 32,
          stability: int = 25, max_trials: int = 8) -> list[dict[str, Any]]:
    env = setup()
    input_data = write_input_data(pages, WORK / "folio_layout_input.json")
    rows: list[dict[str, Any]] = []
    batch_rows: list[dict[str, Any]] = []
    for c in concurrency:
        csv_path = WORK / f"pa_c{c}.csv"
        # Noisy shared machines may never meet the stability bound: widen it, and say so.
        for stability_pct in (stability, 2 * stability, 4 * stability):
            cmd = command(url, input_data, c, csv_path, request_count=request_count,
                          stability=stability_pct, max_trials=max_trials)
            print("+ LD_LIBRARY_PATH=" + str(LIB_DIR) + " " + shlex.join(cmd), flush=True)
            csv_path.unlink(missing_ok=True)
            before = batch_histogram(url)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            after = batch_histogram(url)
            if done.returncode == 0 and csv_path.is_file():
                break
            print(f"perf_analyzer: no stable measurement within {stability_pct}% "
                  f"at concurrency {c}", flush=True)
        else:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"perf_analyzer failed at concurrency {c} ({done.returncode})")
        delta = histogram_delta(before, after)
        row = {"tool": "perf_analyzer", "concurrency": c, **parse_csv(csv_path),
               "stability_pct": stability_pct,
               **{f"{s}_mean_batch": round(mean_batch(delta.get(s, {})), 2) for s in delta},
               "layout_batches": hist_text(delta.get("layout", {}))}
        rows.append(row)
        batch_rows.extend(batches_of(tool="perf_analyzer", concurrency=c, delta=delta))
        print(json.dumps(row), flush=True)
    write_csv(out / "triton_perf_analyzer.csv", rows)
    write_csv(out / "triton_batches_perf_analyzer.csv", batch_rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = sweep_parser(__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--request-count", type=int, default=32,
                        help="requests per measurement window (count_windows)")
    args = parser.parse_args(argv)
    pages = corpus_pages(args.pages) if args.pages else corpus_pages()
    sweep(args.url, pages, args.out, concurrency=tuple(args.concurrency),
          request_count=args.request_count)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
