"""Recognize: region crops in, text out.

One ``Recognizer`` interface; the embedded default runs rapidocr's PP-OCR ONNX models
in-process, ``orchestrator.recognize_vllm.VLLMRecognizer`` sends crops to a vLLM server.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from orchestrator.config import FolioConfig, RecognizeConfig
from orchestrator.errors import ConfigError, RecognitionError
from orchestrator.types import RecognitionResult, RegionTask, UInt8Array

log = logging.getLogger("folio.recognize")


@runtime_checkable
class Recognizer(Protocol):
    """Batch in, text out. Thread-safe: pipeline workers call it concurrently.

    Returns one result per task, in order. A region that fails gets a result with
    ``error`` set; only a failure of the recogniser as a whole raises.
    """

    name: str

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
        engine._load_rec_model().session = _OpenVINOBF16Session(
            _rapidocr_models() / REC_MODEL, threads, width_bucket)
    return engine


def cpu_has_native_bf16() -> bool:
    """Whether OpenVINO finds BF16 arithmetic in this CPU (AVX512-BF16 or AMX)."""
    import openvino

    return "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_rec_precision(precision: str) -> str:
    """``recognize.precision`` made concrete for this machine: "fp32" or "bf16"."""
    if precision == "auto":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if precision == "bf16" and not cpu_has_native_bf16():
        raise ConfigError("recognize.precision = bf16 needs a CPU with native BF16 "
                          "(AVX512-BF16 or AMX), and this one has none: use auto or fp32")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"recognize.precision must be fp32|bf16|auto, got {precision!r}")
    return precision


# Serialises each thread's first OpenVINO inference (see _OpenVINOBF16Session.__call__).
_OPENVINO_FIRST_CALL = threading.Lock()


class _OpenVINOBF16Session:
    """Stands in for rapidocr's onnxruntime session of the recognition model: the same
    ONNX file compiled by OpenVINO with BF16 arithmetic.

    One compiled model per calling thread: a compiled model with one stream runs one
    request at a time, so a shared one would serialise the pool's workers. CPU pinning off:
    with it, every single-thread model is pinned to the same core.
    """

    def __init__(self, model_path: Path, threads: int, width_bucket: int) -> None:
        import openvino

        self._core = openvino.Core()
        self._model = self._core.read_model(str(model_path))
        self._threads = threads
        self._bucket = width_bucket
        self._local = threading.local()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        # OpenVINO compiles each new input shape once (a first call costs ~1.6x a repeat);
        # line widths vary freely, so they are padded (with rapidocr's own padding value)
        # up to a multiple of the bucket, and repeats hit the cache.
        width = batch.shape[-1]
        padded = -(-width // self._bucket) * self._bucket
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
                "INFERENCE_PRECISION_HINT": "bf16",
                "INFERENCE_NUM_THREADS": self._threads,
                "NUM_STREAMS": 1,
                "PERFORMANCE_HINT": "LATENCY",
                "ENABLE_CPU_PINNING": False,
            })
            request = self._local.request = compiled.create_infer_request()
        return request


class RapidOCRRecognizer:
    """The embedded default: rapidocr's PP-OCR ONNX models, in-process.

    A block crop is read in two steps: text-line detection, then recognition of each line;
    a crop no taller than one text line goes to recognition only. ``recognize`` runs the
    steps inline in the calling thread (one region after the other). ``submit`` hands them
    to a pool of ``workers`` threads as separate jobs, one detection per region and one job
    per text line, taken oldest page first: every core stays busy down to the last line of
    a run instead of idling while one thread reads a long page alone.

    One rapidocr engine, so one onnxruntime session per model, serves every thread:
    ``InferenceSession.run`` is thread-safe, and folio calls the engine's step methods,
    never its ``__call__`` (which stores per-call parameters on the engine).
    """

    name = "rapidocr"

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

    # -- the steps (shared by the inline and pooled paths) ------------------------------

    def _steps(self) -> Any:
        if self._engine is None:
            with self._engine_lock:
                if self._engine is None:
                    self._engine = rapidocr_rec_engine(
                        self._cfg.threads, self.precision, self._cfg.bf16_width_bucket_px, {
                            # "max" caps the long side; the default "min" upscales crops 2-4x.
                            "Det.limit_type": "max",
                            "Det.limit_side_len": self._cfg.det_limit_side_len,
                        })
        return self._engine

    def _is_line(self, task: RegionTask) -> bool:
        return task.image.shape[0] <= self._cfg.single_line_max_height_px

    def _detect(self, image: UInt8Array) -> _DetectedLines:
        """Text-line boxes (in ``image`` pixels) and the line crops to read."""
        from rapidocr.main import RapidOCRError
        from rapidocr.utils.process_img import map_boxes_to_original

        engine = self._steps()
        prepared, record = engine.preprocess_img(image)
        try:
            crops, det = engine.detect_and_crop(prepared, record)
        except RapidOCRError:  # no text line in the crop: normal for a blank region
            return _DetectedLines(np.zeros((0, 4, 2), np.float32), [])
        boxes = map_boxes_to_original(det.boxes, record, image.shape[0], image.shape[1])
        return _DetectedLines(boxes, list(crops))

    def _read(self, image: UInt8Array, *, whole_crop: bool = False) -> tuple[str, float]:
        """One text line's text and confidence. One line per call: lines padded to the
        widest in a batch waste CPU (rec 2.2 s vs 2.8 s at rapidocr's batch of 6)."""
        from rapidocr.ch_ppocr_rec import TextRecInput

        engine = self._steps()
        if whole_crop:  # a region that is one line: rapidocr's own bounds first
            image, _ = engine.preprocess_img(image)
        out = engine._load_rec_model()(TextRecInput(img=[image]))
        return str(out.txts[0]), float(out.scores[0])

    def _assemble(self, found: _DetectedLines, reads: Sequence[tuple[str, float]]) -> str:
        """The region's text from its lines: blank and low-confidence lines dropped."""
        min_score = self._steps().text_score
        keep = [i for i, (text, score) in enumerate(reads) if text.strip() and score >= min_score]
        return "\n".join(_lines_in_order(found.boxes[keep], [reads[i][0] for i in keep]))

    def _result(self, text: str, start: float, work_s: float | None = None) -> RecognitionResult:
        """``latency_s``: the region's wall time; ``work_s``: the thread-seconds spent on it
        (the same inline; in the pool, its detection plus every line, wherever they ran)."""
        latency = time.perf_counter() - start
        return RecognitionResult(text=text, stats={
            "model": self.model, "latency_s": latency,
            "work_s": latency if work_s is None else work_s})

    # -- inline ----------------------------------------------------------------------

    def _line_region(self, task: RegionTask, start: float) -> RecognitionResult:
        """A region no taller than one line: recognition only."""
        text, _ = self._read(task.image, whole_crop=True)
        return self._result(text if text.strip() else "", start)

    def _one(self, task: RegionTask) -> RecognitionResult:
        start = time.perf_counter()
        if self._is_line(task):
            return self._line_region(task, start)
        found = self._detect(task.image)
        return self._result(self._assemble(found, [self._read(c) for c in found.crops]), start)

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
        for i, task in enumerate(tasks):
            pool.put(order, functools.partial(self._region_job, pool, order, page, i, task))
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

    def _region_job(self, pool: _JobPool, order: int, page: _PageWork, index: int,
                    task: RegionTask) -> None:
        start = time.perf_counter()
        try:
            if self._is_line(task):
                page.done(index, self._line_region(task, start))
                return
            found = self._detect(task.image)
        except Exception as exc:
            page.done(index, _failed(exc))
            return
        if not found.crops:
            page.done(index, self._result("", start))
            return
        region = _RegionWork(len(found.crops), time.perf_counter() - start)
        try:
            for line, crop in enumerate(found.crops):
                pool.put(order, functools.partial(
                    self._line_job, page, index, region, found, line, crop, start))
        except RecognitionError as exc:  # closed meanwhile: close() fails the page
            page.fail(exc)

    def _line_job(self, page: _PageWork, index: int, region: _RegionWork,
                  found: _DetectedLines, line: int, crop: UInt8Array, start: float) -> None:
        began = time.perf_counter()
        try:
            read: tuple[str, float] | Exception = self._read(crop)
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
            text = self._assemble(found, reads)  # type: ignore[arg-type]
            page.done(index, self._result(text, start, region.work_s))
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


def _failed(exc: BaseException) -> RecognitionResult:
    return RecognitionResult(text=None, error=f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True, slots=True)
class _DetectedLines:
    boxes: np.ndarray  # (N, 4, 2) line quadrilaterals in the region crop's pixels
    crops: list[UInt8Array]  # the N line images, in the same order


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

    def __init__(self, lines: int, detect_s: float) -> None:
        self._reads: list[tuple[str, float] | Exception | None] = [None] * lines
        self._left = lines
        self._lock = threading.Lock()
        self.work_s = detect_s  # thread-seconds so far: detection, then each line read

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


def _lines_in_order(boxes: Any, txts: Sequence[str] | None) -> list[str]:
    """Text lines top to bottom; lines whose vertical centres overlap read left to right."""
    if boxes is None or not txts:
        return []
    arr = np.asarray(boxes, dtype=np.float32)  # (N, 4, 2)
    top = arr[:, :, 1].min(axis=1)
    bottom = arr[:, :, 1].max(axis=1)
    left = arr[:, :, 0].min(axis=1)
    centre = (top + bottom) / 2
    height = np.maximum(bottom - top, 1.0)
    order = np.argsort(centre, kind="stable")
    rows: list[list[int]] = []
    for i in order:
        if rows and abs(centre[i] - centre[rows[-1][-1]]) < 0.5 * height[i]:
            rows[-1].append(int(i))
        else:
            rows.append([int(i)])
    lines: list[str] = []
    for row in rows:
        words = [txts[i] for i in sorted(row, key=lambda j: left[j]) if txts[i].strip()]
        if words:
            lines.append(" ".join(words))
    return lines


def _rapidocr_models() -> Path:
    import rapidocr

    return Path(rapidocr.__file__).parent / "models"


def _rapidocr_version() -> str:
    from importlib.metadata import version

    return version("rapidocr")


def make_recognizer(cfg: FolioConfig) -> Recognizer:
    """The recogniser the config names."""
    if cfg.recognize.engine == "vllm":
        from orchestrator.recognize_vllm import VLLMRecognizer

        return VLLMRecognizer(cfg.vllm)
    return RapidOCRRecognizer(cfg.recognize)
