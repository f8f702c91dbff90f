"""Shared pieces of the folio_layout load tests (``perf/triton_*.py``).

- ``corpus_pages``: the request bodies (real pages; PDF pages rendered at 200 dpi as PNG);
- ``batch_histogram`` / ``histogram_delta``: the batch sizes Triton formed per ensemble
  step, from the model statistics API;
- ``write_csv``: one CSV per measurement under ``perf/results/``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python perf/triton_*.py` from anywhere
    sys.path.insert(0, str(ROOT))

from corpus import CORPUS_PAGES  # noqa: E402  (after the sys.path fix above)

RESULTS = ROOT / "perf" / "results"
STEPS = ("preprocess", "layout", "postprocess")
CONCURRENCY = (1, 2, 4, 8)


def corpus_pages(folder: Path = CORPUS_PAGES, dpi: int = 200) -> list[tuple[str, bytes]]:
    from client.pages import page_requests

    pages = page_requests(folder, dpi)
    if not pages:
        raise SystemExit(f"no pages in {folder}")
    return pages


def batch_histogram(url: str) -> dict[str, dict[int, int]]:
    """{step: {batch size: executions}} so far, from Triton's statistics (gRPC)."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(as_json=True)
    finally:
        client.close()
    out: dict[str, dict[int, int]] = {}
    for entry in stats.get("model_stats", []):
        if entry["name"] in STEPS:
            out[entry["name"]] = {
                int(b["batch_size"]): int(b["compute_infer"]["count"])
                for b in entry.get("batch_stats", [])
            }
    return out


def histogram_delta(
    before: Mapping[str, Mapping[int, int]], after: Mapping[str, Mapping[int, int]]
) -> dict[str, dict[int, int]]:
    delta: dict[str, dict[int, int]] = {}
    for step, sizes in after.items():
        old = before.get(step, {})
        delta[step] = {b: n - old.get(b, 0) for b, n in sorted(sizes.items())
                       if n - old.get(b, 0) > 0}
    return delta


def mean_batch(hist: Mapping[int, int]) -> float:
    runs = sum(hist.values())
    return sum(b * n for b, n in hist.items()) / runs if runs else 0.0


def hist_text(hist: Mapping[int, int]) -> str:
    return " ".join(f"{b}x{n}" for b, n in sorted(hist.items()))


def write_csv(path: Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    rows = list(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields.extend(k for k in row if k not in fields)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip()
                   for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "commit": commit}


def dump_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def sweep_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every Triton load script shares: server, pages, results folder."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--url", default="127.0.0.1:8001", help="Triton gRPC HOST:PORT")
    parser.add_argument("--pages", type=Path, default=None, help="folder of pages (corpus)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def batch_rows(tool: str, concurrency: int, delta: Mapping[str, Mapping[int, int]]
               ) -> list[dict[str, Any]]:
    """CSV rows of the batches each ensemble step ran during one concurrency level."""
    return [
        {"tool": tool, "concurrency": concurrency, "model": step, "batch_size": b,
         "executions": n}
        for step, hist in delta.items() for b, n in hist.items()
    ]
