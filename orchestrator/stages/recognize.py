"""Recognize: region crops in, text out.

One ``Recognizer`` interface; the embedded default runs rapidocr's PP-OCR ONNX models
in-process, ``orchestrator.stages.recognize_vllm.VLLMRecognizer`` sends crops to a vLLM server.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from orchestrator.config import FolioConfig, RecognizeConfig
from orchestrator.errors import ConfigError, RecognitionError
from orchestrator.types import (
    LineCrop,
    LineText,
    RecognitionResult,
    RegionTask,
    TextFormat,
    UInt8Array,
)

log = logging.getLogger("folio.recognize")


@runtime_checkable
class Recognizer(Protocol):
    """Batch in, text out. Thread-safe: pipeline workers call it concurrently.

    Returns one result per task, in order. A region that fails gets a result with
    ``error`` set; only a failure of the recogniser as a whole raises. ``reads_lines``:
    True when it reads a region's text lines (the crop stage cuts each line out), False
    when it reads whole region crops (the lines' boxes are then stored with the region's
    text).
    """

    name: str
    reads_lines: bool

    def recognize(self, tasks: Sequence[RegionTask]) -> list[RecognitionResult]: ...

    def close(self) -> None: ...


def rapidocr_engine(threads: int, params: dict[str, Any]) -> Any:
    """A rapidocr engine with folio's settings, plus ``params`` (rapidocr's dotted keys)."""
    from rapidocr import RapidOCR

    common = {
        # An empty detection on a blank region is normal, not a warning.
        "Global.log_level": "error",
        # Upright pages (the decode stage turns pages upright): the angle classifier
        # flips some lines into garbage.
        "Global.use_cls": False,
        "EngineConfig.onnxruntime.intra_op_num_threads": threads,
        "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        # rapidocr turns onnxruntime's arena off; with it on, recognition takes about 20%
        # less CPU (fewer page faults on every differently sized crop).
        "EngineConfig.onnxruntime.enable_cpu_mem_arena": True,
    }
    return RapidOCR(params={**common, **params})


REC_MODEL = "PP-OCRv6_rec_small.onnx"  # the recognition model in the rapidocr wheel


def rapidocr_rec_engine(threads: int, precision: str, width_bucket: int,
                        params: dict[str, Any]) -> Any:
    """A rapidocr engine whose text-line recogniser runs at ``precision`` ("fp32" or
    "bf16", as ``resolve_rec_precision`` gives it)."""
    engine = rapidocr_engine(threads, {"Rec.model_path": str(_rapidocr_models() / REC_MODEL),
                                       **params})
    if precision == "bf16":
        # rapidocr reads the character list from the onnxruntime session when it loads
        # the model; only the forward pass is swapped.
        engine._load_rec_model().session = OpenVINOSession(
            _rapidocr_models() / REC_MODEL, threads, "bf16", width_bucket)
    return engine


def cpu_has_native_bf16() -> bool:
    """Whether OpenVINO finds BF16 arithmetic in this CPU (AVX512-BF16 or AMX)."""
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_rec_precision(precision: str, key: str = "recognize.precision") -> str:
    """A precision setting (``key``) made concrete for this machine: "fp32" or "bf16"."""
    if precision == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "bf16" and not cpu_has_native_bf16():
        raise ConfigError(f"{key} = bf16 needs a CPU with native BF16 "
                          "(AVX512-BF16 or AMX), and this one has none: use auto or fp32")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"{key} must be fp32|bf16|auto, got {precision!r}")
    return precision


# Serialises each thread's first OpenVINO inference (see OpenVINOSession.__call__).
_OPENVINO_FIRST_CALL = threading.Lock()


class OpenVINOSession:
    """Stands in for one of rapidocr's onnxruntime sessions: the same ONNX file compiled
    by OpenVINO at ``precision`` ("bf16" or "fp32").

    One compiled model per calling thread: a compiled model with one stream runs one
    request at a time, so a shared one would serialise the pool's workers. CPU pinning off:
    with it, every single-thread model is pinned to the same core.
    """

    def __init__(self, model_path: Path, threads: int, precision: str,
                 width_bucket: int | None = None) -> None:
        import openvino

        self._core = openvino.Core()
        self._model = self._core.read_model(str(model_path))
        self._threads = threads
        self._precision = {"bf16": "bf16", "fp32": "f32"}[precision]
        self._bucket = width_bucket
        self._local = threading.local()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # OpenVINO compiles each new input shape once (a first call costs ~1.6x a repeat);
        # text-line widths vary freely, so with a bucket they are padded (with rapidocr's
        # own padding value) up to a multiple of it, and repeats hit the cache.
        width = batch.shape[-1]
        padded = width if self._bucket is None else -(-width // self._bucket) * self._bucket
        if padded != width:
            batch = np.pad(batch, ((0, 0), (0, 0), (0, 0), (0, padded - width)))
        request = self.thread_request()
        if not getattr(self._local, "served", False):
            # A thread's first infer() runs alone: OpenVINO's Python binding initialises
            # its numpy bridge lazily, in a C++ static whose initialiser drops and retakes
            # the GIL; a second thread entering it while holding the GIL deadlocks both
            # (seen: a whole `folio run` hung with both pool workers inside infer()).
            with _OPENVINO_FIRST_CALL:
                out = request.infer({0: batch})[0]
            self._local.served = True
            return out
        # infer() hands back copies of the outputs (share_outputs=False), so nothing here
        # is overwritten by this thread's next call.
        return request.infer({0: batch})[0]

    def thread_request(self) -> Any:
        """This thread's infer request, on a compiled model of its own (made on first use)."""
        request = getattr(self._local, "request", None)
        if request is None:
            compiled = self._core.compile_model(self._model, "CPU", {
                "INFERENCE_PRECISION_HINT": self._precision,
                "INFERENCE_NUM_THREADS": self._threads,
                "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY",
                "ENABLE_CPU_PINNING": False,
            })
            request = self._local.request = compiled.create_infer_request()
        return request


class RapidOCRRecognizer:
    """The embedded default: rapidocr's PP-OCR recognition model, in-process.

    It reads text lines: each task carries its region's lines, found once on the page by
    the decode stage and cut out by the crop stage, in reading order. ``recognize`` reads
    them inline in the calling thread; ``submit`` hands each line to a pool of ``workers``
    threads as a job of its own, taken oldest page first, so every core stays busy down
    to the last line of a run instead of idling while one thread reads a long page alone.

    One rapidocr engine serves every thread (its recogniser's session is thread-safe, and
    the BF16 session compiles one model per thread); folio calls the recogniser directly,
    never the engine's ``__call__`` (which stores per-call parameters on the engine).
    """

    name = "rapidocr"
    reads_lines = True  # the crop stage cuts each line out; no region crops are needed

    def __init__(self, cfg: RecognizeConfig) -> None:
        self._cfg = cfg
        self._engine: Any = None
        self._engine_lock = threading.Lock()
        self._pool: _JobPool | None = None
        self._pool_lock = threading.Lock()
        self._closed = False
        self._pages = itertools.count()
        self._pending: set[_PageWork] = set()  # submitted, not finished: failed on close
        self.precision = resolve_rec_precision(cfg.precision)
        self.model = f"rapidocr-{_rapidocr_version()}:PP-OCRv6-small:rec-{self.precision}"

    def _recogniser(self) -> Any:
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    self._engine = rapidocr_rec_engine(
                        self._cfg.threads, self.precision, self._cfg.bf16_width_bucket_px,
                        {"Global.use_det": False})
        return self._engine._load_rec_model()

    def _read(self, image: UInt8Array | None) -> tuple[str, float]:
        """One text line's text and confidence. One line per call: lines padded to the
        widest in a batch waste CPU (rec 2.2 s vs 2.8 s at rapidocr's batch of 6)."""
        from rapidocr.ch_ppocr_rec import TextRecInput

        if image is None:
            raise RecognitionError("a text line reached the recogniser without its pixels")
        out = self._recogniser()(TextRecInput(img=[image]))
        return str(out.txts[0]), float(out.scores[0])

    def _assemble(self, task: RegionTask, reads: Sequence[tuple[str, float]],
                  start: float, work_s: float) -> RecognitionResult:
        """The region's result from its lines' reads (in the task's line order)."""
        lines = [
            LineText(bbox=line.bbox, text=text, score=score,
                     low_confidence=score < self._cfg.min_line_score)
            for line, (text, score) in zip(task.lines, reads, strict=True)
        ]
        return RecognitionResult(
            text=region_text(task.lines, [t for t, _ in reads]),
            lines=lines,
            confidence=text_confidence(reads),
            text_format=TextFormat.PLAIN,
            stats={"model": self.model, "latency_s": time.perf_counter() - start,
                   "work_s": work_s},
        )

    # -- inline ----------------------------------------------------------------------

    def _one(self, task: RegionTask) -> RecognitionResult:
        start = time.perf_counter()
        reads = [self._read(line.image) for line in task.lines]
        return self._assemble(task, reads, start, time.perf_counter() - start)

    def recognize(self, tasks: Sequence[RegionTask]) -> list[RecognitionResult]:
        results: list[RecognitionResult] = []
        for task in tasks:
            try:
                results.append(self._one(task))
            except Exception as exc:
                results.append(_failed(exc))
        return results

    # -- pooled ----------------------------------------------------------------------

    def submit(
        self, tasks: Sequence[RegionTask]
    ) -> concurrent.futures.Future[list[RecognitionResult]]:
        """Queue ``tasks`` on the worker pool; resolves to one result per task, in order."""
        future: concurrent.futures.Future[list[RecognitionResult]] = concurrent.futures.Future()
        page = _PageWork(len(tasks), future)
        if not tasks:
            future.set_result([])
            return future
        pool = self._job_pool()
        order = next(self._pages)
        with self._pool_lock:
            self._pending.add(page)
        future.add_done_callback(lambda _: self._forget(page))
        start = time.perf_counter()
        for index, task in enumerate(tasks):
            if not task.lines:
                page.done(index, self._assemble(task, [], start, 0.0))
                continue
            region = _RegionWork(len(task.lines))
            for line in range(len(task.lines)):
                pool.put(order, functools.partial(
                    self._line_job, page, index, task, region, line, start))
        return future

    def _forget(self, page: _PageWork) -> None:
        with self._pool_lock:
            self._pending.discard(page)

    def _job_pool(self) -> _JobPool:
        with self._pool_lock:
            if self._closed:
                raise RecognitionError("the rapidocr recogniser is closed")
            if self._pool is None:
                self._pool = _JobPool(self._cfg.workers)
            return self._pool

    def _line_job(self, page: _PageWork, index: int, task: RegionTask, region: _RegionWork,
                  line: int, start: float) -> None:
        began = time.perf_counter()
        try:
            read: tuple[str, float] | Exception = self._read(task.lines[line].image)
        except Exception as exc:
            read = exc
        reads = region.done(line, read, time.perf_counter() - began)
        if reads is None:
            return  # other lines of the region are still being read
        failure = next((r for r in reads if isinstance(r, Exception)), None)
        if failure is not None:
            page.done(index, _failed(failure))
            return
        try:
            page.done(index, self._assemble(task, reads, start,  # type: ignore[arg-type]
                                            region.work_s))
        except Exception as exc:
            page.done(index, _failed(exc))

    def close(self) -> None:
        with self._pool_lock:
            self._closed = True
            pool, self._pool = self._pool, None
            pending, self._pending = list(self._pending), set()
        if pool is not None:
            pool.close()
        for page in pending:
            page.fail(RecognitionError("the rapidocr recogniser was closed"))


def region_text(lines: Sequence[LineCrop], texts: Sequence[str]) -> str:
    """A region's text from its lines (in reading order): a row's lines joined by a space,
    rows by a newline; lines read as nothing are left out."""
    rows: list[list[str]] = []
    last_row: int | None = None
    for line, text in zip(lines, texts, strict=True):
        if not text.strip():
            continue
        if rows and line.row == last_row:
            rows[-1].append(text.strip())
        else:
            rows.append([text.strip()])
        last_row = line.row
    return "\n".join(" ".join(row) for row in rows)


def text_confidence(reads: Sequence[tuple[str, float]]) -> float | None:
    """The mean of the lines' scores weighted by their length (None: nothing was read)."""
    weights = [(len(text.strip()), score) for text, score in reads if text.strip()]
    total = sum(w for w, _ in weights)
    if not total:
        return None
    return sum(w * score for w, score in weights) / total


def _failed(exc: BaseException) -> RecognitionResult:
    return RecognitionResult(text=None, error=f"{type(exc).__name__}: {exc}")


class _PageWork:
    """One submitted page: its region results fill in from any worker, in any order."""

    def __init__(self, regions: int,
                 future: concurrent.futures.Future[list[RecognitionResult]]) -> None:
        self._results: list[RecognitionResult | None] = [None] * regions
        self._left = regions
        self._lock = threading.Lock()
        self.future = future

    def done(self, index: int, result: RecognitionResult) -> None:
        with self._lock:
            self._results[index] = result
            self._left -= 1
            finished = self._left == 0
        if finished:
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # failed on close
                self.future.set_result([r for r in self._results if r is not None])

    def fail(self, exc: BaseException) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.future.set_exception(exc)


class _RegionWork:
    """The lines of one region being read by several workers."""

    def __init__(self, lines: int) -> None:
        self._reads: list[tuple[str, float] | Exception | None] = [None] * lines
        self._left = lines
        self._lock = threading.Lock()
        self.work_s = 0.0  # thread-seconds so far: each line read

    def done(self, line: int, read: tuple[str, float] | Exception, read_s: float
             ) -> list[tuple[str, float] | Exception] | None:
        """Record one line; returns every line's read once the last one is in."""
        with self._lock:
            self._reads[line] = read
            self.work_s += read_s
            self._left -= 1
            if self._left:
                return None
        return [r for r in self._reads if r is not None]


class _JobPool:
    """Worker threads taking jobs oldest page first (FIFO within a page)."""

    def __init__(self, workers: int) -> None:
        self._heap: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"folio-rapidocr-{i}",
                                          daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def put(self, page_order: int, job: Callable[[], None]) -> None:
        with self._cond:
            if self._closed:
                raise RecognitionError("the rapidocr recogniser is closed")
            heapq.heappush(self._heap, (page_order, next(self._seq), job))
            self._cond.notify()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._heap and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                _, _, job = heapq.heappop(self._heap)
            try:
                job()  # jobs record their own failures in their page's results
            except Exception:  # a bug: keep the worker alive for the other pages
                log.exception("rapidocr job failed")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()


def _rapidocr_models() -> Path:
    import rapidocr

    return Path(rapidocr.__file__).parent / "models"


def _rapidocr_version() -> str:
    from importlib.metadata import version

    return version("rapidocr")


def make_recognizer(cfg: FolioConfig) -> Recognizer:
    """The recogniser the config names."""
    if cfg.recognize.engine == "vllm":
        from orchestrator.stages.recognize_vllm import VLLMRecognizer

        return VLLMRecognizer(cfg.vllm)
    return RapidOCRRecognizer(cfg.recognize)
