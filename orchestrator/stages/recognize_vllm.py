"""Recognition by a vLLM server: region crops fanned out over the OpenAI chat API.

``VLLMRecognizer`` implements the ``Recognizer`` protocol. Pipeline worker threads call
``recognize(tasks)`` concurrently with the regions of different pages; inside, one
asyncio event loop (its own thread) runs every request:

    recognize(tasks) --encode pool (resize to budget, encode, base64: once)-->
        one priority queue (smallest prefill first, aged) --semaphore--> httpx stream

- Scheduling: regions from all pages wait in ONE priority queue keyed by estimated
  prefill cost (image tokens from the crop size + prompt tokens), smallest first. Ageing
  keeps large regions from starving: the key is ``cost + enqueue_time * ageing``, so a
  region gains ``ageing_tokens_per_s`` of priority per second of waiting.
- Crops are resized only when the server would have to shrink them (the server never
  receives a crop over the profile's pixel budget), encoded once, base64'd once, and the
  request body is built once, in a thread pool off the event loop.
- Requests stream (``stream_options.include_usage``) so each region gets its time to
  first token (TTFT) and time per output token (TPOT).
- Errors: 429/5xx, connection resets and read timeouts are retried with exponential
  backoff and jitter (tenacity), at most ``retries`` times; other 4xx (bad image, too
  long) are that region's error at once. A refused connection means the server is down:
  dispatch pauses (one log line), /health is probed for up to ``dead_server_wait_s``, and
  the interrupted regions are re-queued without spending their retries. If the server
  does not come back, every unfinished region gets an error starting with
  ``UNREACHABLE_PREFIX`` and ``server_unreachable`` turns True.

Usage::

    rec = VLLMRecognizer(VLLMConfig(url="http://127.0.0.1:8012", profile="glm-ocr"))
    results = rec.recognize(tasks)          # one RecognitionResult per task, in order
    future = rec.submit(tasks)              # non-blocking: concurrent.futures.Future
    rec.metrics()                           # requests/s, tokens/s, TTFT p50/p95, goodput
    rec.close()
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from orchestrator.config import VLLMConfig
from orchestrator.errors import ConfigError, RecognitionError, RecognizerUnavailable
from orchestrator.stages.crop import EncodedCrop, Encoder, encode_crop, encode_task_crop
from orchestrator.stages.profiles import ContextFit, ModelProfile, fit_context, resolve_profile
from orchestrator.types import RecognitionResult, RegionTask, Task

log = logging.getLogger("folio.vllm")

UNREACHABLE_PREFIX = "vLLM server unreachable"
CHAT_PATH = "/v1/chat/completions"
HEALTH_PATH = "/health"
MODELS_PATH = "/v1/models"
# Status codes worth another try: rate limiting, timeouts, server-side failures.
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
HEALTH_PROBE_TIMEOUT_S = 2.0
HEALTH_PROBE_MAX_INTERVAL_S = 2.0
CONNECT_TIMEOUT_S = 10.0
RETRY_AFTER_CAP_S = 30.0
# A region re-queued this many times by server outages is given up on (a server that
# answers /health but refuses every connection).
MAX_REQUEUES = 50


_IMAGE_PLACEHOLDER = "@@folio-image@@"


def build_request(
    profile: ModelProfile, model: str, task: Task, image_url: str, max_tokens: int | None = None
) -> dict[str, Any]:
    """The chat-completions body for one region: the image, then the task's prompt.

    ``max_tokens`` None: the profile's length for the task."""
    messages: list[dict[str, Any]] = []
    if profile.system_prompt:
        messages.append({"role": "system", "content": profile.system_prompt})
    messages.append(
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": profile.prompt(task)},
            ],
        }
    )
    return {
        **profile.extra_body,
        "model": model,
        "messages": messages,
        "max_tokens": profile.max_tokens_for(task) if max_tokens is None else max_tokens,
        **profile.sampling.request_fields(),
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def request_bytes(
    profile: ModelProfile, model: str, task: Task, image_url: str, max_tokens: int | None = None
) -> bytes:
    """``build_request`` serialised, splicing the (large, JSON-safe) data URL in as is."""
    head, tail = json.dumps(
        build_request(profile, model, task, _IMAGE_PLACEHOLDER, max_tokens),
        separators=(",", ":"),
    ).split(_IMAGE_PLACEHOLDER)
    return b"".join((head.encode(), image_url.encode("ascii"), tail.encode()))


# --- errors inside the client -----------------------------------------------------------


class _Retryable(Exception):
    """A failure worth another attempt (429, 5xx, reset, timeout)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class _Rejected(Exception):
    """The server refused this region's request (400 and other 4xx): no retry."""


class _ServerDown(Exception):
    """No connection could be made: the server is down or restarting."""


def _error_message(status: int, body: bytes) -> str:
    try:
        err = json.loads(body)["error"]
        message = err.get("message") if isinstance(err, dict) else str(err)
    except (ValueError, KeyError, TypeError):
        message = body[:300].decode("utf-8", "replace").strip()
    return f"HTTP {status}: {message}"


def _retry_after(headers: httpx.Headers) -> float | None:
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


# --- jobs and measurements --------------------------------------------------------------


@dataclass(eq=False, slots=True)
class _Job:
    task: RegionTask
    body: bytes
    crop: EncodedCrop
    key: float
    seq: int
    enqueued: float
    future: asyncio.Future[RecognitionResult]
    attempts: int = 0
    requeues: int = 0
    first_dispatch: float | None = None


@dataclass(slots=True)
class _Stats:
    """Run-level counters; written on the loop thread, read by ``metrics()`` under a lock."""

    ok: int = 0
    errors: int = 0
    retries: int = 0
    requeues: int = 0
    device_crops: int = 0  # crops cut and encoded on the layout device
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_start: float | None = None
    last_end: float | None = None
    paused_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    good: int = 0


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


# --- the recogniser ---------------------------------------------------------------------


class VLLMRecognizer:
    """Region crops to text through a vLLM OpenAI-compatible server. Thread-safe.

    ``profile`` overrides the one ``cfg.profile`` names; ``encoder`` replaces
    ``encode_crop`` (tests use it to send a corrupt image); ``transport`` replaces
    httpx's (tests use it to record what is sent).
    """

    name = "vllm"
    reads_lines = False  # one request per region crop; line boxes come from the page

    # created on the loop thread by _setup()
    _client: httpx.AsyncClient
    _probe_client: httpx.AsyncClient
    _queue: asyncio.PriorityQueue[tuple[float, int, _Job]]
    _sem: asyncio.Semaphore
    _resume: asyncio.Event
    _state: str
    _down_since: float
    _last_probe: tuple[float, bool]
    _probe_task: asyncio.Task[None] | None
    _model_lock: asyncio.Lock
    _inflight: set[asyncio.Task[None]]
    _jobs: set[_Job]
    _batches: set[asyncio.Task[Any]]
    _stopping: bool
    _dispatcher: asyncio.Task[None]

    def __init__(
        self,
        cfg: VLLMConfig,
        *,
        profile: ModelProfile | None = None,
        encoder: Encoder | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.cfg = cfg
        self.profile = profile or resolve_profile(cfg)
        self.model: str | None = cfg.model
        # From the server's /v1/models: its context window, and how requests fit it
        # (None: not known yet, or not reported: the profile's values are sent).
        self.max_model_len: int | None = None
        self._fit: ContextFit | None = None
        self._models_read = False
        self._encoder: Encoder = encoder or encode_crop
        self._transport = transport
        self._base = cfg.url.rstrip("/")
        self._stats = _Stats()
        self._stats_lock = threading.Lock()
        self._seq = itertools.count()
        self._closed = False
        self._pending: set[concurrent.futures.Future[list[RecognitionResult]]] = set()
        self._pending_lock = threading.Lock()
        self._encode_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=cfg.encode_threads, thread_name_prefix="folio-vllm-encode"
        )
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, name="folio-vllm-loop", daemon=True)
        self._thread.start()
        self._ready.wait()
        try:
            asyncio.run_coroutine_threadsafe(self._read_models_at_start(), self._loop).result()
        except BaseException:
            self.close()
            raise

    # -- public API (any thread) -----------------------------------------------------------

    def submit(
        self, tasks: Sequence[RegionTask]
    ) -> concurrent.futures.Future[list[RecognitionResult]]:
        """Queue ``tasks``; the future resolves to one result per task, in order."""
        with self._pending_lock:
            if self._closed:
                raise RecognitionError("the vLLM recogniser is closed")
            future = asyncio.run_coroutine_threadsafe(self._recognize(list(tasks)), self._loop)
            self._pending.add(future)
        future.add_done_callback(self._forget)
        return future

    def _forget(self, future: concurrent.futures.Future[list[RecognitionResult]]) -> None:
        with self._pending_lock:
            self._pending.discard(future)

    def recognize(self, tasks: Sequence[RegionTask]) -> list[RecognitionResult]:
        if not tasks:
            return []
        try:
            return self.submit(tasks).result()
        except concurrent.futures.CancelledError:
            raise RecognitionError("the vLLM recogniser was closed during recognition") from None

    @property
    def server_unreachable(self) -> bool:
        """True while the server is given up on (it did not come back in time)."""
        return self._state == "dead"

    def metrics(self) -> dict[str, Any]:
        """Run-level figures: throughput, TTFT percentiles, goodput under ``ttft_sla_s``."""
        with self._stats_lock:
            s = self._stats
            finished = s.ok + s.errors
            elapsed = (
                (s.last_end - s.first_start)
                if s.first_start is not None and s.last_end is not None
                else 0.0
            )
            ttft = list(s.ttft)
            out: dict[str, Any] = {
                "model": self.model,
                "profile": self.profile.name,
                "regions_ok": s.ok,
                "regions_failed": s.errors,
                "retries": s.retries,
                "requeues": s.requeues,
                "device_crops": s.device_crops,
                "prompt_tokens": s.prompt_tokens,
                "completion_tokens": s.completion_tokens,
                "elapsed_s": round(elapsed, 3),
                "paused_s": round(s.paused_s, 3),
                "requests_per_s": s.ok / elapsed if elapsed > 0 else 0.0,
                "output_tokens_per_s": s.completion_tokens / elapsed if elapsed > 0 else 0.0,
                "ttft_p50_s": _percentile(ttft, 50),
                "ttft_p95_s": _percentile(ttft, 95),
                "tpot_p50_s": _percentile(s.tpot, 50),
                "latency_p50_s": _percentile(s.latency, 50),
                "latency_p95_s": _percentile(s.latency, 95),
                "ttft_sla_s": self.cfg.ttft_sla_s,
                "max_model_len": self.max_model_len,
                # share of finished regions that succeeded with TTFT within the SLA
                "goodput": s.good / finished if finished else None,
                "server_unreachable": self.server_unreachable,
            }
        return out

    def close(self) -> None:
        """Stop: queued and in-flight regions are abandoned (their callers get an error)."""
        with self._pending_lock:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._encode_pool.shutdown(wait=True, cancel_futures=True)
        with self._pending_lock:
            pending, self._pending = list(self._pending), set()
        for future in pending:  # batches whose coroutines were stopped mid-way
            future.cancel()

    def __enter__(self) -> VLLMRecognizer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the event loop --------------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._setup())
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _setup(self) -> None:
        cfg = self.cfg
        api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(cfg.timeout_s, connect=min(CONNECT_TIMEOUT_S, cfg.timeout_s))
        limits = httpx.Limits(
            max_connections=cfg.max_in_flight, max_keepalive_connections=cfg.max_in_flight
        )
        self._client = httpx.AsyncClient(
            base_url=self._base, timeout=timeout, limits=limits, headers=headers,
            transport=self._transport,
        )
        # /health and /v1/models on their own small pool: never queued behind completions
        self._probe_client = httpx.AsyncClient(
            base_url=self._base, timeout=HEALTH_PROBE_TIMEOUT_S, headers=headers,
            limits=httpx.Limits(max_connections=2),
        )
        self._queue: asyncio.PriorityQueue[tuple[float, int, _Job]] = asyncio.PriorityQueue()
        self._sem = asyncio.Semaphore(cfg.max_in_flight)
        self._resume = asyncio.Event()
        self._resume.set()
        self._state = "up"  # "up" | "paused" | "dead"
        self._down_since = 0.0
        self._last_probe = (0.0, False)
        self._probe_task: asyncio.Task[None] | None = None
        self._model_lock = asyncio.Lock()
        self._inflight: set[asyncio.Task[None]] = set()
        self._jobs: set[_Job] = set()  # every job whose result is not set yet
        self._batches: set[asyncio.Task[Any]] = set()  # running _recognize calls
        self._stopping = False
        self._dispatcher = asyncio.create_task(self._dispatch())

    async def _shutdown(self) -> None:
        self._stopping = True
        self._dispatcher.cancel()
        if self._probe_task is not None:
            self._probe_task.cancel()
        for task in list(self._inflight):
            task.cancel()
        await asyncio.gather(self._dispatcher, *self._inflight, return_exceptions=True)
        for job in list(self._jobs):  # queued or interrupted: the callers get an error
            self._finish(job, RecognitionResult(text=None, error="vLLM recogniser closed"))
        if self._batches:  # let the batches return; stop those still encoding
            _, stuck = await asyncio.wait(set(self._batches), timeout=5)
            for task in stuck:
                task.cancel()
            await asyncio.gather(*stuck, return_exceptions=True)
        await self._client.aclose()
        await self._probe_client.aclose()
        await asyncio.get_running_loop().shutdown_asyncgens()

    # -- one batch (one page's regions) ----------------------------------------------------

    async def _recognize(self, tasks: list[RegionTask]) -> list[RecognitionResult]:
        current = asyncio.current_task()
        if current is not None:
            self._batches.add(current)
            current.add_done_callback(self._batches.discard)
        results: list[RecognitionResult | None] = [None] * len(tasks)
        wanted = [i for i, t in enumerate(tasks) if t.task.recognized]
        for i, t in enumerate(tasks):
            if not t.task.recognized:
                results[i] = RecognitionResult(text=None)
        if wanted:
            try:
                model = await self._ensure_model()
            except (RecognizerUnavailable, ConfigError) as exc:
                for i in wanted:
                    results[i] = RecognitionResult(text=None, error=str(exc))
                self._count_errors(len(wanted))
                return [r for r in results if r is not None]
            futures = [self._enqueue(tasks[i], model) for i in wanted]
            for i, result in zip(wanted, await asyncio.gather(*futures), strict=True):
                results[i] = result
        return [r if r is not None else RecognitionResult(text=None) for r in results]

    async def _enqueue(self, task: RegionTask, model: str) -> RecognitionResult:
        loop = asyncio.get_running_loop()
        try:
            crop, body = await loop.run_in_executor(self._encode_pool, self._prepare, task, model)
        except Exception as exc:
            self._count_errors(1)
            return RecognitionResult(text=None, error=f"crop encoding failed: {exc}")
        if self._stopping:
            return RecognitionResult(text=None, error="vLLM recogniser closed")
        if task.device_image is not None:
            with self._stats_lock:
                self._stats.device_crops += 1
        now = time.monotonic()
        cost = self.profile.prompt_tokens_estimate(task.task, crop.height, crop.width)
        job = _Job(
            task=task,
            body=body,
            crop=crop,
            key=cost + now * self.cfg.ageing_tokens_per_s,
            seq=next(self._seq),
            enqueued=now,
            future=loop.create_future(),
        )
        self._jobs.add(job)
        if self._state == "dead" and not await self._probe_once():
            self._fail_unreachable(job)
        else:
            self._queue.put_nowait((job.key, job.seq, job))
        return await job.future

    def _prepare(self, task: RegionTask, model: str) -> tuple[EncodedCrop, bytes]:
        fit = self._fit
        # The crop encoded within the budget that fits the server's window, and the output
        # capped at what fits beside this prompt.
        profile = self.profile if fit is None else fit.profiles[task.task]
        crop = encode_task_crop(task, profile, self._encoder)
        if fit is None:
            return crop, request_bytes(self.profile, model, task.task, crop.data_url)
        max_tokens = fit.max_tokens(task.task, crop.image_tokens)
        return crop, request_bytes(self.profile, model, task.task, crop.data_url, max_tokens)


    # -- dispatch --------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        while True:
            await self._sem.acquire()
            try:
                await self._resume.wait()
                _, _, job = await self._queue.get()
            except BaseException:
                self._sem.release()
                raise
            if not self._resume.is_set():  # the server went down while we waited
                self._queue.put_nowait((job.key, job.seq, job))
                self._sem.release()
                continue
            task = asyncio.create_task(self._run_job(job))
            self._inflight.add(task)
            task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._sem.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("vLLM job failed unexpectedly", exc_info=task.exception())

    async def _run_job(self, job: _Job) -> None:
        if job.future.done():
            return
        if self._state == "dead" and not await self._probe_once():
            self._fail_unreachable(job)
            return
        now = time.monotonic()
        if job.first_dispatch is None:
            job.first_dispatch = now
        with self._stats_lock:
            if self._stats.first_start is None:
                self._stats.first_start = now
        try:
            result = await self._attempts(job)
        except _ServerDown as exc:
            job.requeues += 1
            with self._stats_lock:
                self._stats.requeues += 1
            if job.requeues > MAX_REQUEUES:
                self._finish(job, self._error(job, f"{UNREACHABLE_PREFIX}: {exc}"))
                return
            self._server_down(exc)
            self._queue.put_nowait((job.key, job.seq, job))
            return
        except _Rejected as exc:
            result = self._error(job, f"rejected by the server: {exc}")
        except _Retryable as exc:
            result = self._error(job, f"failed after {job.attempts} attempts: {exc}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an unexpected reply: that region's error
            result = self._error(job, f"{type(exc).__name__}: {exc}")
        self._finish(job, result)

    async def _attempts(self, job: _Job) -> RecognitionResult:
        cfg = self.cfg
        retrying = AsyncRetrying(
            stop=stop_after_attempt(cfg.retries + 1),
            wait=self._backoff,
            retry=retry_if_exception_type(_Retryable),
            before_sleep=self._count_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                return await self._send(job)
        raise AssertionError("unreachable")  # pragma: no cover

    def _backoff(self, state: RetryCallState) -> float:
        cfg = self.cfg
        n = max(0, state.attempt_number - 1)
        delay = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2.0**n)
        delay += random.uniform(0, delay / 2)  # jitter: retries of many regions spread out
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, _Retryable) and exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, RETRY_AFTER_CAP_S))
        return delay

    def _count_retry(self, state: RetryCallState) -> None:
        with self._stats_lock:
            self._stats.retries += 1
        exc = state.outcome.exception() if state.outcome is not None else None
        log.debug("vLLM attempt %d failed, retrying: %s", state.attempt_number, exc)

    async def _send(self, job: _Job) -> RecognitionResult:
        """One streamed request; raises _Retryable / _Rejected / _ServerDown."""
        job.attempts += 1
        start = time.monotonic()
        first: float | None = None
        parts: list[str] = []
        finish_reason: str | None = None
        usage: dict[str, Any] = {}
        model = self.model
        done = False
        try:
            async with self._client.stream(
                "POST", CHAT_PATH, content=job.body,
                headers={"Content-Type": "application/json"},
            ) as resp:
                if resp.status_code != 200:
                    body = await resp.aread()
                    message = _error_message(resp.status_code, body)
                    if resp.status_code in RETRY_STATUS:
                        raise _Retryable(message, _retry_after(resp.headers))
                    raise _Rejected(message)
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":  # read on to the end: no generator left open
                        done = True
                        continue
                    chunk = json.loads(data)
                    if "error" in chunk:  # an error reported mid-stream
                        err = chunk["error"]
                        code = err.get("code") if isinstance(err, dict) else None
                        message = _error_message(int(code or 500), data.encode())
                        if isinstance(code, int) and 400 <= code < 500 and code not in RETRY_STATUS:
                            raise _Rejected(message)
                        raise _Retryable(message)
                    choices = chunk.get("choices") or ()
                    if choices:
                        if first is None:
                            first = time.monotonic()
                        choice = choices[0]
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            parts.append(piece)
                        if choice.get("finish_reason"):
                            finish_reason = choice["finish_reason"]
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    model = chunk.get("model", model)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise _ServerDown(f"{type(exc).__name__}: {exc}") from exc
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc or 'connection lost'}") from exc
        if not done and finish_reason is None:
            raise _Retryable("stream ended before the completion finished")
        end = time.monotonic()
        latency = end - start
        ttft = (first if first is not None else end) - start
        completion = int(usage.get("completion_tokens", 0) or 0)
        tpot = (latency - ttft) / (completion - 1) if completion > 1 else 0.0
        prompt_tokens = int(usage.get("prompt_tokens", 0) or 0)
        text = self.profile.postprocess(job.task.task, "".join(parts))
        stats: dict[str, Any] = {
            "model": model,
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "finish_reason": finish_reason,
            "latency_s": latency,
            "ttft_s": ttft,
            "tpot_s": tpot,
            "attempts": job.attempts,
            "queue_s": (job.first_dispatch or start) - job.enqueued,
            "image_tokens": job.crop.image_tokens,
            "sent_width": job.crop.width,
            "sent_height": job.crop.height,
            "resized": job.crop.resized,
        }
        with self._stats_lock:
            s = self._stats
            s.ok += 1
            s.prompt_tokens += prompt_tokens
            s.completion_tokens += completion
            s.ttft.append(ttft)
            s.latency.append(latency)
            if completion > 1:
                s.tpot.append(tpot)
            if ttft <= self.cfg.ttft_sla_s:
                s.good += 1
            s.last_end = end
        return RecognitionResult(text=text, stats=stats,
                                 text_format=self.profile.text_format(job.task.task))

    # -- results ---------------------------------------------------------------------------

    def _error(self, job: _Job, message: str) -> RecognitionResult:
        self._count_errors(1)
        return RecognitionResult(
            text=None,
            error=message,
            stats={"model": self.model, "attempts": job.attempts,
                   "image_tokens": job.crop.image_tokens},
        )

    def _count_errors(self, n: int) -> None:
        with self._stats_lock:
            self._stats.errors += n
            if self._stats.first_start is not None:
                self._stats.last_end = time.monotonic()

    def _finish(self, job: _Job, result: RecognitionResult) -> None:
        self._jobs.discard(job)
        if not job.future.done():  # each region's result is set exactly once
            job.future.set_result(result)

    def _fail_unreachable(self, job: _Job) -> None:
        waited = self.cfg.dead_server_wait_s
        self._finish(
            job,
            self._error(job, f"{UNREACHABLE_PREFIX} for {waited:.0f} s ({self._base})"),
        )

    # -- a dead server ---------------------------------------------------------------------

    def _server_down(self, exc: Exception) -> None:
        if self._state == "paused":
            return
        if self._state == "dead":
            return
        self._state = "paused"
        self._down_since = time.monotonic()
        self._resume.clear()
        log.warning(
            "vLLM server at %s refused the connection (%s); pausing dispatch of %d queued "
            "regions and probing %s for up to %.0f s",
            self._base, exc, self._queue.qsize(), HEALTH_PATH, self.cfg.dead_server_wait_s,
        )
        self._probe_task = asyncio.create_task(self._probe_until_up())

    async def _health_ok(self) -> bool:
        try:
            resp = await self._probe_client.get(HEALTH_PATH)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200

    async def _probe_once(self) -> bool:
        """After giving up: one /health probe (at most one a second) to see if it's back."""
        when, ok = self._last_probe
        now = time.monotonic()
        if now - when >= 1.0:
            ok = await self._health_ok()
            self._last_probe = (time.monotonic(), ok)
            if ok and self._state == "dead":
                log.warning("vLLM server at %s answers again; resuming", self._base)
                self._state = "up"
        return ok

    async def _probe_until_up(self) -> None:
        deadline = self._down_since + self.cfg.dead_server_wait_s
        interval = 0.25
        while True:
            if await self._health_ok():
                down = time.monotonic() - self._down_since
                with self._stats_lock:
                    self._stats.paused_s += down
                log.warning("vLLM server at %s is back after %.1f s; resuming", self._base, down)
                self._state = "up"
                self._resume.set()
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * 2, HEALTH_PROBE_MAX_INTERVAL_S)
        with self._stats_lock:
            self._stats.paused_s += time.monotonic() - self._down_since
        self._state = "dead"
        self._last_probe = (time.monotonic(), False)
        failed = 0
        while not self._queue.empty():
            _, _, job = self._queue.get_nowait()
            self._fail_unreachable(job)
            failed += 1
        log.error(
            "%s for %.0f s (%s): %d queued regions marked as errors; later regions fail at "
            "once unless /health answers again",
            UNREACHABLE_PREFIX, self.cfg.dead_server_wait_s, self._base, failed,
        )
        self._resume.set()

    # -- the served model ------------------------------------------------------------------

    def _adopt_models(self, payload: Any) -> None:
        """Take the model and its context window from a /v1/models answer.

        Raises ConfigError when the configured model is not served (naming those that
        are), or when even the smallest request cannot fit the window; ValueError etc.
        for an answer that is not a model list.
        """
        entries = [e for e in payload["data"] if isinstance(e, dict) and "id" in e]
        served = [str(e["id"]) for e in entries]
        if not served:
            raise ValueError("the model list is empty")
        wanted = self.cfg.model
        if wanted is not None and wanted not in served:
            raise ConfigError(
                f"the vLLM server at {self._base} does not serve model {wanted!r} "
                f"(vllm.model / --vllm-model); it serves: {', '.join(served)}"
            )
        entry = entries[served.index(wanted)] if wanted is not None else entries[0]
        length = entry.get("max_model_len")
        fit = None
        if isinstance(length, int) and not isinstance(length, bool) and length >= 1:
            fit = fit_context(self.profile, length)
        # else not reported: the profile's values stand
        self.model, self._fit = str(entry["id"]), fit
        self.max_model_len = fit.max_model_len if fit is not None else None
        self._models_read = True
        if fit is not None and fit.changed:
            log.warning(
                "vLLM model %s at %s has max_model_len=%d: profile %r requests are fitted "
                "into it (%s)", self.model, self._base, length, self.profile.name,
                fit.describe(),
            )

    async def _read_models_at_start(self) -> None:
        """One look at /v1/models: a model that is not served, or a window that holds no
        request, is a ConfigError now; a server that does not answer yet is waited for
        when the first regions come (``_ensure_model``)."""
        try:
            resp = await self._probe_client.get(MODELS_PATH)
            resp.raise_for_status()
            payload = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            log.warning("vLLM server at %s: no model list at start (%s); checked again "
                        "when the first regions are sent", self._base, exc)
            return
        try:
            self._adopt_models(payload)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("vLLM server at %s: unexpected %s answer (%s: %s); sending the "
                        "profile's values", self._base, MODELS_PATH, type(exc).__name__, exc)
            self._models_read = True

    async def _ensure_model(self) -> str:
        """The model name to send: ``cfg.model``, else the server's first model.

        The model list is read once: a configured model is sent as is when the server
        gives none (a dead server then fails the regions through the dispatcher), while
        without one the list is waited for up to ``dead_server_wait_s``."""
        if self.model is not None and self._models_read:
            return self.model
        async with self._model_lock:
            if self.model is not None and self._models_read:
                return self.model
            if self.model is not None:  # configured; one more look for the window
                self._models_read = True
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                    resp = await self._probe_client.get(MODELS_PATH)
                    resp.raise_for_status()
                    self._adopt_models(resp.json())
                return self.model
            start = time.monotonic()
            interval = 0.25
            while True:
                try:
                    resp = await self._probe_client.get(MODELS_PATH)
                    resp.raise_for_status()
                    self._adopt_models(resp.json())
                    assert self.model is not None
                    return self.model
                except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as exc:
                    waited = time.monotonic() - start
                    if waited >= self.cfg.dead_server_wait_s:
                        raise RecognizerUnavailable(
                            f"{UNREACHABLE_PREFIX} for {waited:.0f} s ({self._base}): "
                            f"no model list from {MODELS_PATH}: {exc}"
                        ) from exc
                    if interval == 0.25:
                        log.warning("vLLM server at %s: no model list yet (%s); waiting up "
                                    "to %.0f s", self._base, exc, self.cfg.dead_server_wait_s)
                await asyncio.sleep(min(interval, max(0.0, self.cfg.dead_server_wait_s - waited)))
                interval = min(interval * 2, HEALTH_PROBE_MAX_INTERVAL_S)


__all__ = [
    "UNREACHABLE_PREFIX",
    "VLLMRecognizer",
    "build_request",
    "request_bytes",
]
