"""A gRPC client for the ``folio_layout`` Triton ensemble.

``AsyncTritonLayoutClient`` (asyncio, ``tritonclient.grpc.aio``): one channel, at most
``TritonConfig.max_in_flight`` requests in flight, a deadline per attempt
(``timeout_s``), retries with exponential backoff (tenacity) on UNAVAILABLE, deadline
and model-not-ready errors for at most ``ready_wait_s`` (and at most ``retries`` deadline
failures) per page, a readiness wait, and typed results (``Detections``).

``TritonLayoutClient`` is the same client behind a synchronous facade, for a pipeline
thread: it owns an event loop in a daemon thread. ``TritonLayoutBackend`` plugs it into
``orchestrator.engines.pipeline`` (``folio run --layout triton``) and returns ``LayoutResult``.

Per-page errors from the server come back as the ``PageError`` they name
(``PageDecodeError``, ``PixelLimitExceeded``); a server that stays away longer than the
retry budget gives ``LayoutServerUnavailable``.

Usage::

    with TritonLayoutClient(TritonConfig(url="127.0.0.1:8001")) as client:
        for item in client.detect_many([Path("page.png").read_bytes()]):
            print(item if isinstance(item, Exception) else item.boxes)
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    wait_exponential,
    wait_random,
)
from tritonclient.utils import InferenceServerException

from orchestrator.config import FolioConfig, TritonConfig
from orchestrator.errors import (
    FolioError,
    LayoutError,
    LayoutServerUnavailable,
    LayoutServerUnreachable,
    PageError,
)
from orchestrator.serving.triton_stages import error_from_message
from orchestrator.types import Detections

if TYPE_CHECKING:
    from orchestrator.types import DecodedPage, EncodedPage, LayoutResult

log = logging.getLogger(__name__)

T = TypeVar("T")

INPUT_NAME = "IMAGE"
OUTPUT_NAMES = ("BOXES", "SCORES", "CLASSES")
# Status codes after which the same request may succeed later.
_TRANSIENT_STATUS = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
# Messages Triton gives while a (re)starting server has not loaded the model yet.
_NOT_READY_MARKERS = ("unknown model", "is not ready", "not found", "Server is stopping")
BACKOFF_INITIAL_S = 0.25
BACKOFF_MAX_S = 4.0
PNG_COMPRESSION = 1  # fast: the PNG only carries rendered PDF pixels to the server


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, InferenceServerException):
        status = exc.status() or ""
        message = exc.message() or ""
        if error_from_message(message) is not None:
            return False  # the server answered for this page: a page error, final
        return status in _TRANSIENT_STATUS or any(m in message for m in _NOT_READY_MARKERS)
    return isinstance(exc, ConnectionError | asyncio.TimeoutError)


def _is_deadline(exc: BaseException) -> bool:
    return isinstance(exc, InferenceServerException) and (
        exc.status() == "StatusCode.DEADLINE_EXCEEDED"
    )


def _server_error(exc: InferenceServerException) -> FolioError:
    """A non-transient server error as the folio exception it names."""
    message = exc.message() or str(exc)
    named = error_from_message(message)
    if named is not None:
        return named
    return LayoutError(f"{exc.status() or 'error'}: {message}")


class _RetryBudget:
    """tenacity stop condition: give up after ``wait_s`` since the first failure, or
    after ``deadline_retries`` attempts that hit their deadline."""

    def __init__(self, wait_s: float, deadline_retries: int) -> None:
        self.wait_s = wait_s
        self.deadline_retries = deadline_retries
        self.deadlines = 0

    def __call__(self, state: RetryCallState) -> bool:
        exc = state.outcome.exception() if state.outcome is not None else None
        if exc is not None and _is_deadline(exc):
            self.deadlines += 1
            if self.deadlines > self.deadline_retries:
                return True
        return (state.seconds_since_start or 0.0) >= self.wait_s


def _log_retry(state: RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    log.warning("folio_layout request failed (attempt %d, %.1f s): %s; retrying",
                state.attempt_number, state.seconds_since_start or 0.0, exc)


class AsyncTritonLayoutClient:
    """asyncio client for ``folio_layout``; create, use and close it on one event loop."""

    def __init__(self, cfg: TritonConfig | None = None) -> None:
        self.cfg = cfg or TritonConfig()
        self._client: grpcclient.InferenceServerClient | None = None
        self._slots = asyncio.Semaphore(self.cfg.max_in_flight)
        self._labels: list[str] | None = None
        self._parameters: dict[str, str] = {}

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        if self._client is None:  # made on first use, inside the running loop
            self._client = grpcclient.InferenceServerClient(self.cfg.url)
        return self._client

    async def wait_ready(self, timeout_s: float | None = None) -> None:
        """Wait until the server reports ``folio_layout`` ready.

        Raises ``LayoutServerUnreachable`` when nothing answers at the address within
        ``connect_wait_s`` (a wrong URL fails in seconds), ``LayoutServerUnavailable`` when
        a server answers but the model is not ready within ``timeout_s`` (default
        ``ready_wait_s``); waiting for a live server's model is logged once.
        """
        timeout_s = self.cfg.ready_wait_s if timeout_s is None else timeout_s
        start = time.monotonic()
        deadline = start + timeout_s
        connect_deadline = start + min(self.cfg.connect_wait_s, timeout_s)
        delay = BACKOFF_INITIAL_S
        last: str = "no answer"
        live = False
        while True:
            try:
                if await self.client.is_model_ready(self.cfg.model_name, client_timeout=2.0):
                    return
                last = f"model {self.cfg.model_name!r} not ready"
                answered = True
            except InferenceServerException as exc:
                last = exc.message() or str(exc)
                # UNAVAILABLE / DEADLINE_EXCEEDED: no server behind the address (yet)
                answered = (exc.status() or "") not in _TRANSIENT_STATUS
            if answered and not live:
                live = True
                log.warning("Triton at %s answers; waiting up to %.0f s for %r to be ready",
                            self.cfg.url, timeout_s, self.cfg.model_name)
            now = time.monotonic()
            if not live and (now >= connect_deadline or now + delay > deadline):
                raise LayoutServerUnreachable(
                    f"no Triton server answers at {self.cfg.url} (gRPC) after "
                    f"{now - start:.0f} s: {last}; check --triton-url (triton.url)"
                )
            if now + delay > deadline:
                raise LayoutServerUnavailable(
                    f"Triton at {self.cfg.url} answers, but {self.cfg.model_name!r} is not "
                    f"ready after {timeout_s:.0f} s: {last}"
                )
            pause = delay if live else min(delay, max(0.05, connect_deadline - now))
            await asyncio.sleep(pause)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def model_parameters(self) -> dict[str, str]:
        """The ensemble's config parameters (``labels``, ``model``)."""
        if not self._parameters:
            config = await self._retrying(
                lambda: self.client.get_model_config(
                    self.cfg.model_name, as_json=True, client_timeout=self.cfg.timeout_s
                )
            )
            params = config.get("config", {}).get("parameters", {})
            self._parameters = {k: v.get("string_value", "") for k, v in params.items()}
        return self._parameters

    async def labels(self) -> list[str]:
        """Class names from the ensemble's ``labels`` parameter (CLASSES index them)."""
        if self._labels is None:
            params = await self.model_parameters()
            if "labels" not in params:
                raise LayoutError(f"{self.cfg.model_name} publishes no 'labels' parameter")
            self._labels = [str(x) for x in json.loads(params["labels"])]
        return self._labels

    async def _retrying(self, call: Any) -> Any:
        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_transient),
            wait=wait_exponential(multiplier=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S)
            + wait_random(0, BACKOFF_INITIAL_S),
            stop=_RetryBudget(self.cfg.ready_wait_s, self.cfg.retries),
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await call()
        except InferenceServerException as exc:
            if _is_transient(exc):
                raise LayoutServerUnavailable(
                    f"Triton at {self.cfg.url} unavailable for {self.cfg.ready_wait_s:.0f} s "
                    f"(or {self.cfg.retries} deadlines of {self.cfg.timeout_s:.0f} s): "
                    f"{exc.message()}"
                ) from exc
            raise _server_error(exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def detect(self, data: bytes) -> Detections:
        """The detections of one encoded page; raises the page's error."""
        array = np.frombuffer(data, dtype=np.uint8).reshape(1, -1)

        async def once() -> Detections:
            request = grpcclient.InferInput(INPUT_NAME, list(array.shape), "UINT8")
            request.set_data_from_numpy(array)
            outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUT_NAMES]
            result = await self.client.infer(
                self.cfg.model_name, [request], outputs=outputs,
                client_timeout=self.cfg.timeout_s,
            )
            boxes = result.as_numpy("BOXES")
            scores = result.as_numpy("SCORES")
            classes = result.as_numpy("CLASSES")
            if boxes is None or scores is None or classes is None:
                raise LayoutError("folio_layout response lacks BOXES/SCORES/CLASSES")
            return Detections(
                boxes=np.ascontiguousarray(boxes.reshape(-1, 4), dtype=np.float32),
                scores=np.ascontiguousarray(scores.reshape(-1), dtype=np.float32),
                classes=np.ascontiguousarray(classes.reshape(-1), dtype=np.int32),
            )

        async with self._slots:
            result: Detections = await self._retrying(once)
            return result

    async def detect_many(self, items: Sequence[bytes]) -> list[Detections | Exception]:
        """Detections per page in order; a page that failed holds its exception."""

        async def one(data: bytes) -> Detections | Exception:
            try:
                return await self.detect(data)
            except FolioError as exc:
                return exc

        return list(await asyncio.gather(*(one(d) for d in items)))

    async def inference_statistics(self) -> dict[str, Any]:
        """Triton's statistics of every model (batch sizes formed per step)."""
        stats: dict[str, Any] = await self.client.get_inference_statistics(as_json=True)
        return stats

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class TritonLayoutClient:
    """Synchronous facade over ``AsyncTritonLayoutClient`` for use from any thread.

    Waits for readiness (``ready_wait_s``) and reads the labels on construction.
    """

    def __init__(self, cfg: TritonConfig | None = None, *, wait_ready: bool = True) -> None:
        self.cfg = cfg or TritonConfig()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="triton-layout-client", daemon=True
        )
        self._thread.start()
        self._async = self._call(self._make())
        try:
            if wait_ready:
                self._call(self._async.wait_ready())
            self.labels: list[str] = self._call(self._async.labels())
        except BaseException:
            self.close()
            raise

    async def _make(self) -> AsyncTritonLayoutClient:
        return AsyncTritonLayoutClient(self.cfg)  # its Semaphore belongs to our loop

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

    @property
    def model_parameters(self) -> dict[str, str]:
        return self._call(self._async.model_parameters())

    def detect_many(self, items: Sequence[bytes]) -> list[Detections | Exception]:
        """One entry per page: its ``Detections`` or its exception (never raises for a page)."""
        return self._call(self._async.detect_many(items))

    def submit(self, data: bytes) -> Future[Detections]:
        """Start one page's request; the future raises the page's error."""
        return asyncio.run_coroutine_threadsafe(self._async.detect(data), self._loop)

    def inference_statistics(self) -> dict[str, Any]:
        return self._call(self._async.inference_statistics())

    def close(self) -> None:
        if not self._loop.is_running():
            return
        if getattr(self, "_async", None) is not None:
            try:
                self._call(self._async.close())
            except Exception:
                log.debug("closing the Triton channel failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> TritonLayoutClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def encode_pixels(pixels: np.ndarray) -> bytes:
    """PNG bytes of an HWC uint8 BGR bitmap (rendered PDF pages travel to the server so)."""
    import cv2

    ok, buf = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise PageError("cannot PNG-encode the rendered page for the layout server")
    return bytes(buf)


class TritonLayoutBackend:
    """``orchestrator.engines.pipeline.LayoutBackend`` over the ``folio_layout`` ensemble."""

    name = "triton"

    def __init__(self, cfg: FolioConfig) -> None:
        self._cfg = cfg
        self._client = TritonLayoutClient(cfg.triton)
        params = self._client.model_parameters
        self.manifest: dict[str, Any] = {
            "url": cfg.triton.url,
            "model": cfg.triton.model_name,
            "server_model": params.get("model", ""),
            "labels": list(self._client.labels),
        }

    @property
    def labels(self) -> list[str]:
        return self._client.labels

    def detect(
        self, pages: Sequence[DecodedPage], encoded: Sequence[EncodedPage]
    ) -> list[LayoutResult | PageError]:
        from orchestrator.stages.layout import layout_result

        start = time.perf_counter()
        items: list[bytes | PageError] = []
        for page, source in zip(pages, encoded, strict=True):
            try:
                if page.rotation:  # turned upright by the decode stage: send what it saw
                    items.append(encode_pixels(page.image))
                elif source.data is not None:
                    items.append(source.data)
                elif source.pixels is not None:
                    items.append(encode_pixels(source.pixels))
                else:
                    items.append(PageError(source.error or "page has neither bytes nor pixels"))
            except PageError as exc:
                items.append(exc)
        sendable = [i for i in items if isinstance(i, bytes)]
        answers = iter(self._client.detect_many(sendable))
        per_page = (time.perf_counter() - start) / max(1, len(pages))
        results: list[LayoutResult | PageError] = []
        for page, item in zip(pages, items, strict=True):
            out: Detections | Exception = item if isinstance(item, PageError) else next(answers)
            if isinstance(out, PageError):
                results.append(out)
            elif isinstance(out, Exception):
                results.append(PageError(f"layout failed: {out}"))
            else:
                result = layout_result(out, self.labels, self._cfg.layout, page.width, page.height)
                result.layout_s = per_page
                results.append(result)
        return results

    def close(self) -> None:
        self._client.close()

