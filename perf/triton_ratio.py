"""Ensemble-over-gRPC time vs in-process time for the same pages (target: <= 1.3x).

In-process is folio's own layout path in one process: the DALI decoder
(``orchestrator.stages.decode.Decoder``) and ``LayoutModel.detect`` (TorchScript FP32 +
``postprocess``), with the pipeline's thread settings (``layout.threads``, one decode
thread), in two modes:

- ``sequential``: one page at a time, decode then detect (latency);
- ``pipelined``: decode batches in one thread, detect them in another, batch
  ``layout.batch_size`` -- what ``orchestrator.engines.pipeline`` does between its decode and
  layout stages (throughput).

Over gRPC the same bytes go through ``folio_layout`` with folio's client: ``sequential``
at concurrency 1; ``pipelined`` at concurrency ``layout.batch_size``. Each mode runs one
warm-up pass each way, then ``--passes`` rounds of (in-process pass, gRPC pass), so that
load from other jobs hits both alike; the ratio is gRPC wall time / in-process wall time,
over all rounds and per round (range).

Usage::

    python perf/triton_ratio.py --url 127.0.0.1:8001 --out perf/results
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from triton_common import corpus_pages, sweep_parser, write_csv

from client.triton_layout import TritonLayoutClient
from orchestrator.config import FolioConfig, TritonConfig
from orchestrator.types import EncodedPage, PageRef


class InProcess:
    def __init__(self, cfg: FolioConfig) -> None:
        from orchestrator.engines.pipeline import cap_threads
        from orchestrator.stages.decode import Decoder
        from orchestrator.stages.layout import LayoutModel

        cap_threads(cfg)
        self.cfg = cfg
        self.decoder = Decoder(cfg.decode, cfg.sources)
        self.model = LayoutModel(cfg.layout, device="cpu")

    def _decode(self, bodies: list[bytes]) -> list[Any]:
        pages = self.decoder.decode(
            [EncodedPage(PageRef("p", i + 1), data=b) for i, b in enumerate(bodies)])
        for page in pages:
            if isinstance(page, Exception):
                raise page
        return pages

    def _detect(self, pages: list[Any]) -> None:
        batch = np.stack([p.model_input for p in pages])
        self.model.detect(batch, [(p.height, p.width) for p in pages])

    def sequential(self, bodies: list[bytes]) -> float:
        start = time.perf_counter()
        for body in bodies:
            self._detect(self._decode([body]))
        return time.perf_counter() - start

    def pipelined(self, bodies: list[bytes]) -> float:
        size = self.cfg.layout.batch_size
        handoff: queue.Queue[list[Any] | None] = queue.Queue(2)

        def decode() -> None:
            for i in range(0, len(bodies), size):
                handoff.put(self._decode(bodies[i:i + size]))
            handoff.put(None)

        start = time.perf_counter()
        worker = threading.Thread(target=decode)
        worker.start()
        while (pages := handoff.get()) is not None:
            self._detect(pages)
        worker.join()
        return time.perf_counter() - start


def grpc_pass(client: TritonLayoutClient, bodies: list[bytes]) -> float:
    start = time.perf_counter()
    results = client.detect_many(bodies)
    elapsed = time.perf_counter() - start
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise failed[0]
    return elapsed


def measure(url: str, pages: list[tuple[str, bytes]], cfg: FolioConfig,
            passes: int) -> list[dict[str, Any]]:
    """Alternate in-process and gRPC passes (``passes`` each) so that load from other jobs
    on a shared machine hits both alike; report totals and the per-round ratio range."""
    bodies = [body for _, body in pages]
    local = InProcess(cfg)
    rows: list[dict[str, Any]] = []
    for mode, concurrency in (("sequential", 1), ("pipelined", cfg.layout.batch_size)):
        run = local.sequential if mode == "sequential" else local.pipelined
        tcfg = TritonConfig(url=url, max_in_flight=concurrency, timeout_s=120.0)
        with TritonLayoutClient(tcfg) as client:
            run(bodies)  # warm-up both
            grpc_pass(client, bodies)
            inproc, remote = [], []
            for _ in range(passes):
                inproc.append(run(bodies))
                remote.append(grpc_pass(client, bodies))
        ratios = sorted(r / i for r, i in zip(remote, inproc, strict=True))
        n = len(bodies) * passes
        row = {
            "mode": mode,
            "pages": n,
            "grpc_concurrency": concurrency,
            "inprocess_s": round(sum(inproc), 2),
            "grpc_s": round(sum(remote), 2),
            "inprocess_pages_s": round(n / sum(inproc), 3),
            "grpc_pages_s": round(n / sum(remote), 3),
            "ratio_grpc_over_inprocess": round(sum(remote) / sum(inproc), 3),
            "ratio_per_round": f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = sweep_parser(__doc__)
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--model-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    pages = corpus_pages(args.pages) if args.pages else corpus_pages()
    cfg = FolioConfig().override({"decode.device": "cpu", "layout.model_dir": args.model_dir})
    rows = measure(args.url, pages, cfg, args.passes)
    write_csv(args.out / "triton_ratio.csv", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
