"""vLLM recognition: region-level load test, client overhead, crop encode cost.

Against a running vLLM server (``make vllm-cpu`` serves the tiny Qwen2-VL on
127.0.0.1:8012), with region crops cut from the corpus pages:

1. **Load test**: folio's ``VLLMRecognizer`` recognises every region (several pages at
   once, as pipeline workers do): requests/s, output tokens/s, TTFT p50/p95, goodput
   (share of regions with TTFT under the SLA).
2. **Client overhead**: the same regions sent by a bare asyncio + httpx loop (semaphore,
   streaming, nothing else) from payloads encoded beforehand; folio's throughput as a
   ratio of the bare loop's, same concurrency, run order rotated per round, medians
   (target >= 0.9x). Two folio runs: "client" gets the same pre-encoded payloads in one
   call (queue, scheduling, streaming, parsing: the client's own overhead); "pipeline"
   gets raw crops page by page from ``--workers`` threads, as ``folio run`` drives it
   (encoding included, on the same 2 cores as the CPU server here).
3. **Crop encode cost** per region, no server needed: folio's single pass (resize only
   when over budget, encode once, base64 once) vs encode-decode-encode (crop saved as
   PNG, decoded, resized, encoded as JPEG, base64'd: how the anchors hand crops
   between stages) (target >= 2x).

Run::

    make vllm-cpu
    .venv/bin/python perf/bench_vllm.py [--url http://127.0.0.1:8012] [--regions 240]
        [--concurrency 8] [--rounds 3] [--profile qwen2-vl-tiny] [--json out.json]
    .venv/bin/python perf/bench_vllm.py --encode-only      # part 3 only, no server
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
from PIL import Image

from orchestrator.config import VLLMConfig
from orchestrator.stages.crop import EncodedCrop, encode_crop
from orchestrator.stages.profiles import BUILTIN_PROFILES, GLM_OCR, ModelProfile
from orchestrator.stages.recognize_vllm import (
    CHAT_PATH,
    VLLMRecognizer,
    request_bytes,
)
from orchestrator.types import PageRef, Region, RegionTask, Task

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus" / "pages"
PAGES = ("baiona.png", "linn.png", "typewriter.png")
TASKS = (Task.TEXT, Task.TEXT, Task.TEXT, Task.TABLE, Task.FORMULA)


def load_page(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.ascontiguousarray(np.asarray(im.convert("RGB"))[:, :, ::-1])


def make_regions(n: int, seed: int = 7) -> list[list[RegionTask]]:
    """``n`` region crops in pages of 12: mostly text lines, some blocks, a few large."""
    rng = np.random.default_rng(seed)
    pages = [(name, load_page(CORPUS / name)) for name in PAGES]
    out: list[list[RegionTask]] = []
    for k in range(0, n, 12):
        name, page = pages[(k // 12) % len(pages)]
        h, w = page.shape[:2]
        tasks = []
        for i in range(min(12, n - k)):
            kind = rng.random()
            if kind < 0.6:  # a text line
                rh, rw = int(h * rng.uniform(0.012, 0.03)), int(w * rng.uniform(0.3, 0.9))
            elif kind < 0.9:  # a paragraph or formula block
                rh, rw = int(h * rng.uniform(0.05, 0.2)), int(w * rng.uniform(0.3, 0.9))
            else:  # a large table
                rh, rw = int(h * rng.uniform(0.3, 0.6)), int(w * rng.uniform(0.6, 1.0))
            y0, x0 = int(rng.integers(0, h - rh)), int(rng.integers(0, w - rw))
            task = TASKS[i % len(TASKS)]
            tasks.append(RegionTask(
                ref=PageRef(name, k // 12 + 1),
                region=Region(i, task.value, task, 0.9, (x0, y0, x0 + rw, y0 + rh)),
                image=np.ascontiguousarray(page[y0:y0 + rh, x0:x0 + rw]),
            ))
        out.append(tasks)
    return out


# --- 3. encode cost -----------------------------------------------------------------------


def encode_decode_encode(image: np.ndarray, profile: ModelProfile) -> str:
    """The two-hop path: crop -> PNG -> decode -> resize to budget -> encode -> base64
    (the final encoding in the profile's format, as folio's single pass)."""
    ok, png = cv2.imencode(".png", image)
    assert ok
    decoded = cv2.imdecode(png, cv2.IMREAD_COLOR)
    h, w = decoded.shape[:2]
    target = profile.budget.fit(h, w)
    if target is not None:
        decoded = cv2.resize(decoded, (target[1], target[0]), interpolation=cv2.INTER_AREA)
    if profile.image_format == "png":
        ok, out = cv2.imencode(".png", decoded, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    else:
        ok, out = cv2.imencode(".jpg", decoded, [cv2.IMWRITE_JPEG_QUALITY, profile.jpeg_quality])
    assert ok
    return f"data:image/{profile.image_format};base64," + base64.b64encode(out.tobytes()).decode()


def bench_encode(regions: list[RegionTask], profile: ModelProfile, repeats: int = 3
                 ) -> dict[str, Any]:
    cv2.setNumThreads(1)
    single: list[float] = []
    double: list[float] = []
    for _ in range(repeats):
        for t in regions:
            start = time.perf_counter()
            encode_crop(t.image, profile)
            single.append(time.perf_counter() - start)
            start = time.perf_counter()
            encode_decode_encode(t.image, profile)
            double.append(time.perf_counter() - start)
    s_mean, d_mean = statistics.fmean(single), statistics.fmean(double)
    return {
        "profile": profile.name,
        "regions": len(regions),
        "single_pass_ms_mean": round(s_mean * 1e3, 3),
        "single_pass_ms_p50": round(statistics.median(single) * 1e3, 3),
        "encode_decode_encode_ms_mean": round(d_mean * 1e3, 3),
        "encode_decode_encode_ms_p50": round(statistics.median(double) * 1e3, 3),
        "speedup_mean": round(d_mean / s_mean, 2),
        "speedup_p50": round(statistics.median(double) / statistics.median(single), 2),
    }


# --- 1./2. against the server -------------------------------------------------------------


def run_folio(url: str, profile: ModelProfile, pages: list[list[RegionTask]],
              concurrency: int, pre: dict[int, EncodedCrop] | None = None, workers: int = 0
              ) -> dict[str, Any]:
    """All regions through one VLLMRecognizer.

    ``workers=0``: one ``recognize`` call with every region (what the bare loop does);
    ``workers=N``: N threads each recognising one page at a time (what the pipeline does).
    ``pre``: crops encoded beforehand (the encoder just looks them up).
    """
    encoder = None
    if pre is not None:
        def encoder(image: np.ndarray, _: ModelProfile) -> EncodedCrop:
            return pre[id(image)]
    cfg = VLLMConfig(url=url, profile=profile.name, max_in_flight=concurrency,
                     timeout_s=120.0)
    flat = [t for p in pages for t in p]
    with VLLMRecognizer(cfg, profile=profile, encoder=encoder) as rec:
        rec.recognize(pages[0][:2])  # warm: model lookup, connections
        rec._stats = type(rec._stats)()  # measure the run below only
        queue = list(pages)
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not queue:
                        return
                    page = queue.pop()
                check(rec.recognize(page))

        start, cpu = time.perf_counter(), time.process_time()
        if workers == 0:
            check(rec.recognize(flat))
        else:
            threads = [threading.Thread(target=worker) for _ in range(workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        m = rec.metrics()
    n = len(flat)
    return {**m, "wall_s": round(wall, 3), "regions": n, "requests_per_s_wall": n / wall,
            "client_cpu_ms_per_region": 1e3 * cpu / n}


def check(results: list[Any]) -> None:
    bad = [r.error for r in results if r.error]
    assert not bad, bad[0]


async def _bare(url: str, bodies: list[bytes], concurrency: int
                ) -> tuple[float, float, list[float]]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(body: bytes) -> None:
            async with sem:
                start = time.perf_counter()
                first = None
                async with client.stream("POST", CHAT_PATH, content=body,
                                         headers={"Content-Type": "application/json"}) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if first is None and line.startswith("data:"):
                            first = time.perf_counter()
                        if line == "data: [DONE]":
                            break
                ttfts.append((first or time.perf_counter()) - start)

        await asyncio.gather(*(one(b) for b in bodies[:2]))  # warm connections
        ttfts.clear()
        start, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - start, time.process_time() - cpu, ttfts


def run_bare(url: str, bodies: list[bytes], concurrency: int) -> dict[str, Any]:
    wall, cpu, ttfts = asyncio.run(_bare(url, bodies, concurrency))
    return {"wall_s": round(wall, 3), "regions": len(bodies),
            "requests_per_s_wall": len(bodies) / wall,
            "client_cpu_ms_per_region": 1e3 * cpu / len(bodies),
            "ttft_p50_s": float(np.percentile(ttfts, 50))}


def served_model(url: str) -> str:
    return str(httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8012")
    ap.add_argument("--profile", default="qwen2-vl-tiny", choices=sorted(BUILTIN_PROFILES))
    ap.add_argument("--regions", type=int, default=240)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--workers", type=int, default=8, help="page threads, pipeline-style run")
    ap.add_argument("--encode-only", action="store_true")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)
    profile = BUILTIN_PROFILES[args.profile]
    pages = make_regions(args.regions)
    flat = [t for p in pages for t in p]
    report: dict[str, Any] = {
        "encode": [bench_encode(flat, GLM_OCR), bench_encode(flat, profile)],
    }
    print(json.dumps(report["encode"], indent=2))
    if not args.encode_only:
        model = served_model(args.url)
        pre = {id(t.image): encode_crop(t.image, profile) for t in flat}
        bodies = [request_bytes(profile, model, t.task, pre[id(t.image)].data_url) for t in flat]
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            runs: dict[str, dict[str, Any]] = {}
            order = ["bare", "client", "pipeline"]
            for name in order[r % 3:] + order[:r % 3]:  # rotate: no run always goes first
                if name == "bare":
                    runs[name] = run_bare(args.url, bodies, args.concurrency)
                elif name == "client":
                    runs[name] = run_folio(args.url, profile, pages, args.concurrency, pre=pre)
                else:
                    runs[name] = run_folio(args.url, profile, pages, args.concurrency,
                                           workers=args.workers)
            bare, client, pipe = runs["bare"], runs["client"], runs["pipeline"]
            row = {
                "round": r + 1,
                "bare_rps": round(bare["requests_per_s_wall"], 2),
                "folio_client_rps": round(client["requests_per_s_wall"], 2),
                "folio_pipeline_rps": round(pipe["requests_per_s_wall"], 2),
                "ratio_client": round(client["requests_per_s_wall"]
                                      / bare["requests_per_s_wall"], 3),
                "ratio_pipeline": round(pipe["requests_per_s_wall"]
                                        / bare["requests_per_s_wall"], 3),
                "output_tokens_per_s": round(pipe["output_tokens_per_s"], 1),
                "ttft_p50_s": round(pipe["ttft_p50_s"], 4),
                "ttft_p95_s": round(pipe["ttft_p95_s"], 4),
                "goodput": pipe["goodput"],
                "bare_ttft_p50_s": round(bare["ttft_p50_s"], 4),
                "bare_cpu_ms_per_region": round(bare["client_cpu_ms_per_region"], 3),
                "folio_client_cpu_ms_per_region": round(client["client_cpu_ms_per_region"], 3),
                "folio_pipeline_cpu_ms_per_region": round(pipe["client_cpu_ms_per_region"], 3),
            }
            rounds.append(row)
            print(json.dumps(row))
        report["rounds"] = rounds
        report["median"] = {
            k: statistics.median(r[k] for r in rounds)
            for k in rounds[0] if k != "round"
        }
        report["setup"] = {"url": args.url, "model": model, "profile": profile.name,
                           "regions": len(flat), "concurrency": args.concurrency,
                           "pipeline_workers": args.workers}
        print(json.dumps({"median": report["median"]}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
