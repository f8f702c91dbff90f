"""The pipeline: stages connected by bounded queues, so they overlap.

    reader --q--> decode (+ text lines, orientation) --q--> layout --q--> coverage + crop
                  (N dispatchers) --> recogniser's queue (up to recognize.pages_in_flight
                  pages) --> finisher --> sink writer

The recogniser spreads the queued work over its own workers (rapidocr: a thread pool
taking region detections and single text lines oldest page first; vLLM: requests to the
server), so cores stay busy across page boundaries. A recogniser without ``submit``
gets one page per dispatcher thread.

Each arrow is a bounded queue (``pipeline.queue_pages``), so memory stays bounded
whatever the source size. Every page ends as exactly one ``PageOutcome`` handed to the
sink: ok, or an error row with its reason. Pages already ``ok`` in the database are
skipped before they are read, so a re-run resumes.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import faulthandler
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from orchestrator.config import FolioConfig
from orchestrator.errors import FolioError, PageError
from orchestrator.stages.coverage import cover_page
from orchestrator.stages.crop import region_tasks
from orchestrator.stages.decode import Decoder
from orchestrator.stages.recognize import Recognizer, make_recognizer
from orchestrator.types import (
    DecodedPage,
    EncodedPage,
    LayoutResult,
    LineText,
    PageOutcome,
    PageRef,
    RecognitionResult,
    Region,
    RegionTask,
)

if TYPE_CHECKING:
    from orchestrator.stages.sources import SourceSet

log = logging.getLogger("folio.pipeline")

STAGES = ("read", "decode", "lines", "layout", "crop", "recognize")
# The queues between stages: to decode, to layout, to recognition (laid-out pages), pages
# inside the recogniser, and pages waiting for the sink's writer.
QUEUES = ("decode", "layout", "recognize", "recognizing", "sink")


class LayoutBackend(Protocol):
    """Finds the regions of a batch of decoded pages (in-process or over Triton)."""

    name: str
    manifest: dict[str, Any]

    def detect(
        self, pages: Sequence[DecodedPage], encoded: Sequence[EncodedPage]
    ) -> list[LayoutResult | PageError]: ...

    def close(self) -> None: ...


class InProcessLayout:
    """The TorchScript layout model and post-processing in this process."""

    name = "inprocess"

    def __init__(self, cfg: FolioConfig, device: str) -> None:
        from orchestrator.stages.layout import LayoutModel

        self._cfg = cfg.layout
        self._model = LayoutModel(cfg.layout, device="cuda" if device == "gpu" else "cpu")
        self.manifest: dict[str, Any] = dict(getattr(self._model, "manifest", {}))

    def detect(
        self, pages: Sequence[DecodedPage], encoded: Sequence[EncodedPage]
    ) -> list[LayoutResult | PageError]:
        from orchestrator.stages.layout import layout_result

        start = time.perf_counter()
        batch = np.stack([p.model_input for p in pages])
        detections = self._model.detect(batch, [(p.height, p.width) for p in pages])
        per_page = (time.perf_counter() - start) / len(pages)
        results: list[LayoutResult | PageError] = []
        for page, det in zip(pages, detections, strict=True):
            result = layout_result(det, self._model.labels, self._cfg, page.width, page.height)
            result.layout_s = per_page
            results.append(result)
        return results

    def close(self) -> None:
        pass


class GpuResidentLayout:
    """The layout stage on the layout device from the encoded pages
    (``orchestrator.stages.layout_gpu``: decode, resize, model and post-processing there;
    only boxes come back). A page the decode stage turned upright, or rendered from a PDF,
    is sent as its pixels (uint8), as the Triton backend does; the rest as their bytes.
    ``keep_pages``: each result holds its page on the device (``page_pixels``), so a
    recogniser that reads region crops gets them cut and encoded there."""

    name = "gpu_resident"

    def __init__(self, cfg: FolioConfig, device: str, *, keep_pages: bool = False) -> None:
        from orchestrator.stages.layout_gpu import GpuLayoutStage

        self._stage = GpuLayoutStage(cfg, device=device, keep_pages=keep_pages)
        self.manifest: dict[str, Any] = dict(getattr(self._stage.model, "manifest", {}))

    def detect(
        self, pages: Sequence[DecodedPage], encoded: Sequence[EncodedPage]
    ) -> list[LayoutResult | PageError]:
        items = [source.data if source.data is not None and not page.rotation else page.image
                 for page, source in zip(pages, encoded, strict=True)]
        batch = self._stage.detect(items)
        for result, image in zip(batch.results, batch.images, strict=True):
            if isinstance(result, LayoutResult):
                result.page_pixels = image
        return batch.results

    def close(self) -> None:
        pass


def make_layout_backend(cfg: FolioConfig, device: str, *, keep_pages: bool = False
                        ) -> LayoutBackend:
    """Triton when ``layout.backend`` says so; else in this process, the GPU-resident stage
    where ``layout.gpu_resident`` selects it (auto: on a CUDA device), keeping the pages on
    the device with ``keep_pages`` (for a recogniser in this process that reads crops)."""
    if cfg.layout.backend == "triton":
        from client.triton_layout import TritonLayoutBackend

        return TritonLayoutBackend(cfg)
    from orchestrator.stages.layout_gpu import gpu_resident_enabled

    if gpu_resident_enabled(cfg, device):
        return GpuResidentLayout(cfg, device, keep_pages=keep_pages)
    return InProcessLayout(cfg, device)


# The error pages --json and the runs table list by name; the rest are counted.
MAX_LISTED_ERRORS = 100


@dataclass(slots=True)
class RunSummary:
    """What a run did. Times: ``elapsed_s`` is the run's wall time; ``stage_wall_s`` the
    wall seconds each stage spent on pages, summed over pages (stages overlap and some run
    on several threads, so the sum can exceed ``elapsed_s``); ``cpu_s`` the process's CPU
    seconds (user + system) over the run."""

    db: Path | str  # the SQLite database; for the Ray engine, the output folder or URI
    run_id: int
    pages: int = 0
    ok: int = 0
    errors: int = 0
    resumed: int = 0  # pages already ok in the database, skipped
    skipped_files: int = 0
    regions: int = 0
    recognized: int = 0
    lines: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    stage_wall_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    recognition: dict[str, Any] = field(default_factory=dict)
    error_pages: list[dict[str, Any]] = field(default_factory=list)  # the first ones
    interrupted: str | None = None  # the signal that stopped the run early
    dropped: int = 0  # pages in flight when an interrupted run stopped waiting for them

    @property
    def first_errors(self) -> list[str]:
        return [f"{e['source']}#{e['page']}: {e['error']}" for e in self.error_pages[:10]]

    @property
    def pages_per_s(self) -> float:
        """Pages read to the end (ok) per second of the run: error pages cost next to
        nothing and would make a run of broken inputs look fast."""
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def add(self, outcome: PageOutcome) -> None:
        """Count one finished page."""
        self.pages += 1
        if outcome.status == "ok":
            self.ok += 1
        else:
            self.errors += 1
            if len(self.error_pages) < MAX_LISTED_ERRORS:
                self.error_pages.append({"source": outcome.ref.source, "page": outcome.ref.page,
                                         "error": outcome.error})
        self.regions += len(outcome.regions)
        self.recognized += sum(1 for _, r in outcome.regions if r is not None and r.text)
        self.lines += sum(len(r.lines) for _, r in outcome.regions if r is not None)
        for key, seconds in outcome.timings.items():
            stage = key.removesuffix("_s")
            self.stage_wall_s[stage] = self.stage_wall_s.get(stage, 0.0) + seconds

    @property
    def exit_code(self) -> int:
        """0 when every page is ok, 3 when some failed (their error rows are stored)."""
        return 3 if self.errors else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "pages": self.pages,
            "ok": self.ok,
            "errors": self.errors,
            "resumed": self.resumed,
            "skipped_files": self.skipped_files,
            "regions": self.regions,
            "recognized": self.recognized,
            "lines": self.lines,
            "elapsed_s": round(self.elapsed_s, 3),
            "cpu_s": round(self.cpu_s, 3),
            "pages_per_s": round(self.pages_per_s, 3),
            "stage_wall_s": {k: round(v, 3) for k, v in self.stage_wall_s.items()},
            "recognition": self.recognition,
            "error_pages": self.error_pages,
            "errors_not_listed": max(0, self.errors - len(self.error_pages)),
            "interrupted": self.interrupted,
            "dropped": self.dropped,
        }


_DONE = object()  # end-of-stream marker passed down the queues
_POLL_S = 0.2  # how often a blocked stage checks whether the run was aborted


def cap_threads(cfg: FolioConfig) -> None:
    """Keep each stage's native thread pools small so stages don't oversubscribe cores."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(cfg.layout.threads))
    import cv2
    import torch

    torch.set_num_threads(cfg.layout.threads)
    # Raises once set in this process (e.g. a second Pipeline): keep the first value.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    cv2.setNumThreads(1)


class Pipeline:
    """Runs sources through every stage into a sink. One instance per run."""

    def __init__(
        self,
        cfg: FolioConfig,
        *,
        layout: LayoutBackend | None = None,
        recognizer: Recognizer | None = None,
        decoder: Decoder | None = None,
    ) -> None:
        cap_threads(cfg)
        self.cfg = cfg
        self.interrupted_by: str | None = None  # what set run()'s stop event (a signal)
        self._queues: dict[str, Callable[[], int]] = {}  # depth of each queue while running
        self.decoder = decoder or Decoder(cfg.decode, cfg.sources, cfg.lines)
        self.recognizer = recognizer or make_recognizer(cfg)
        # A recogniser reading region crops gets them cut where the page already is.
        self.layout = layout or make_layout_backend(
            cfg, self.decoder.device,
            keep_pages=not getattr(self.recognizer, "reads_lines", True))

    def manifest(self) -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        packages: dict[str, str | None] = {}
        for name in ("folio-ocr", "torch", "nvidia-dali-cuda120", "onnxruntime", "openvino",
                     "rapidocr", "pypdfium2", "numpy", "pyarrow"):
            try:
                packages[name] = version(name)
            except PackageNotFoundError:
                packages[name] = None
        return {
            "layout": {"backend": self.layout.name, **self.layout.manifest},
            "recognizer": {"name": self.recognizer.name,
                           "model": getattr(self.recognizer, "model", None)},
            "decode_device": self.decoder.device,
            "lines": self.decoder.lines_engine,
            "packages": packages,
        }

    def close(self) -> None:
        self.layout.close()
        self.recognizer.close()
        self.decoder.close()

    def queue_depths(self) -> dict[str, int]:
        """Items waiting in each queue between stages now (zeros outside a run)."""
        queues = self._queues
        return {name: queues[name]() if name in queues else 0 for name in QUEUES}

    def run(
        self,
        sources: Sequence[str | Path],
        db: Path,
        *,
        on_page: Callable[[PageOutcome], None] | None = None,
        on_skip: Callable[[PageRef], None] | None = None,
        on_sources: Callable[[SourceSet], None] | None = None,
        stop: threading.Event | None = None,
    ) -> RunSummary:
        """OCR ``sources`` into ``db``; returns the summary.

        ``on_page`` gets each page's outcome as it is written, ``on_skip`` each page skipped
        as already done, ``on_sources`` the opened sources before the first page (e.g. to
        count them for a progress bar). ``stop``: once set, no new page is read; the pages
        in flight are finished for up to ``pipeline.drain_timeout_s`` and then dropped
        unwritten (a re-run does them), everything written is flushed, and the summary says
        ``interrupted`` (set it to the signal's name before setting the event).
        """
        from orchestrator.stages.sink import SQLiteSink
        from orchestrator.stages.sources import open_sources

        source_set = open_sources(list(sources), self.cfg.sources)
        if on_sources is not None:
            on_sources(source_set)
        with SQLiteSink(db, self.cfg.sink) as sink:
            self._queues["sink"] = sink.queued
            run_id = sink.start_run(self.cfg.to_dict(), self.manifest(), source_set.sources)
            done = sink.done_pages()
            summary = RunSummary(db=db, run_id=run_id, skipped_files=source_set.skipped_files)
            counted = _Counter(summary)

            watchdog = StallWatchdog(self.cfg.pipeline.stall_timeout_s)

            def skip(ref: Any) -> bool:
                if ref in done:
                    summary.resumed += 1
                    watchdog.progress()
                    if on_skip is not None:
                        on_skip(ref)
                    return True
                return False

            def emit(outcome: PageOutcome) -> None:
                sink.submit(outcome)
                counted.add(outcome)
                watchdog.progress()
                if on_page is not None:
                    on_page(outcome)

            start, cpu = time.perf_counter(), time.process_time()
            try:
                with watchdog:
                    summary.dropped = self._run_stages(source_set.pages(skip=skip), emit, stop)
            finally:
                self._queues = {}
            summary.elapsed_s = time.perf_counter() - start
            summary.cpu_s = time.process_time() - cpu
            metrics = getattr(self.recognizer, "metrics", None)
            if callable(metrics):
                summary.recognition = metrics()
            if stop is not None and stop.is_set():
                summary.interrupted = self.interrupted_by or "stop"
            if summary.pages == 0 and summary.interrupted is None:
                sink.discard_run(run_id)  # nothing to do: no runs row for it
            else:
                sink.finish_run(run_id, summary.to_dict(),
                                status="interrupted" if summary.interrupted else "finished")
        return summary

    # -- stages ---------------------------------------------------------------------

    def _run_stages(
        self, pages: Iterator[EncodedPage], emit: Callable[[PageOutcome], None],
        stop: threading.Event | None = None,
    ) -> int:
        """Runs every stage to the end; returns how many pages in flight were dropped
        because ``stop`` was set and they did not finish within the drain timeout."""
        size = self.cfg.pipeline.queue_pages
        # Set when a stage fails: every other stage then stops instead of blocking forever
        # on a queue the failed stage no longer fills or drains.
        abort = threading.Event()
        # Set when an interrupted run stops waiting for its pages in flight: whatever still
        # finishes is dropped, not written (a re-run does those pages).
        dropping = threading.Event()
        counts = {"read": 0, "written": 0}
        counts_lock = threading.Lock()

        def written(outcome: PageOutcome) -> None:
            if dropping.is_set():
                return
            emit(outcome)
            with counts_lock:
                counts["written"] += 1

        to_decode = _Channel(size, abort)
        to_layout = _Channel(size, abort)
        to_recognize = _Channel(size, abort)
        failures: list[BaseException] = []
        workers = self.cfg.recognize.workers

        def guarded(target: Callable[[], None]) -> Callable[[], None]:
            def body() -> None:
                try:
                    target()
                except BaseException as exc:  # a stage bug: stop the run, report it
                    failures.append(exc)
                    abort.set()
                    log.exception("pipeline stage failed")
            return body

        def reader() -> None:
            limit = self.cfg.pipeline.limit
            count = 0
            try:
                for page in pages:
                    if stop is not None and stop.is_set():
                        break  # interrupted: what is in flight drains, nothing new starts
                    with counts_lock:
                        counts["read"] += 1
                    if page.error is not None:
                        written(error_outcome(page.ref, page.error, {"read_s": page.read_s}))
                    else:
                        to_decode.put(page)
                    count += 1
                    if (limit is not None and count >= limit) or failures:
                        break
            finally:
                to_decode.put(_DONE)

        def decoder() -> None:
            try:
                for batch in _batches(to_decode, self.decoder.batch_size):
                    for page, out in zip(batch, self.decoder.decode(batch), strict=True):
                        decoded = decoded_or_error(page, out)
                        if isinstance(decoded, PageOutcome):
                            written(decoded)
                        else:
                            to_layout.put((page, decoded))
            finally:
                to_layout.put(_DONE)

        def layout() -> None:
            try:
                for batch in _batches(to_layout, self.cfg.layout.batch_size):
                    encoded = [e for e, _ in batch]
                    decoded = [d for _, d in batch]
                    for page, result in zip(decoded, lay_out(self.layout, decoded, encoded),
                                            strict=True):
                        if isinstance(result, PageOutcome):
                            written(result)
                        else:
                            to_recognize.put((page, result))
            finally:
                for _ in range(workers):
                    to_recognize.put(_DONE)

        submit = getattr(self.recognizer, "submit", None)
        # A recogniser that queues work (rapidocr's pool, vLLM) gets many pages in flight
        # from a few threads; one without ``submit`` gets one page per worker thread.
        in_flight = _Channel(self.cfg.recognize.in_flight_pages(), abort)
        self._queues.update(decode=to_decode.qsize, layout=to_layout.qsize,
                            recognize=to_recognize.qsize, recognizing=in_flight.qsize)
        dispatchers_left = [workers]
        dispatchers_lock = threading.Lock()

        def recognizer() -> None:
            try:
                while (item := to_recognize.get()) is not _DONE:
                    page, result = item
                    started = start_recognition(self.recognizer, page, result, self.cfg)
                    if isinstance(started, PageOutcome):
                        written(started)
                    else:
                        in_flight.put(started)
            finally:
                if submit is not None:
                    with dispatchers_lock:
                        dispatchers_left[0] -= 1
                        if dispatchers_left[0] == 0:
                            in_flight.put(_DONE)

        def finisher() -> None:
            while (pending := in_flight.get()) is not _DONE:
                outcome = pending.outcome(abort)
                if outcome is None:
                    return  # the run stopped waiting: this page is dropped unwritten
                written(outcome)

        threads = [threading.Thread(target=guarded(fn), name=f"folio-{name}", daemon=True)
                   for name, fn in (("read", reader), ("decode", decoder), ("layout", layout))]
        threads += [threading.Thread(target=guarded(recognizer), name=f"folio-rec-{i}",
                                     daemon=True) for i in range(workers)]
        if submit is not None:
            threads.append(threading.Thread(target=guarded(finisher), name="folio-finish",
                                            daemon=True))
        for thread in threads:
            thread.start()
        self._wait(threads, stop, abort, dropping)
        if failures:
            raise failures[0]
        with counts_lock:
            return counts["read"] - counts["written"] if dropping.is_set() else 0

    def _wait(self, threads: list[threading.Thread], stop: threading.Event | None,
              abort: threading.Event, dropping: threading.Event) -> None:
        """Join the stage threads. Once ``stop`` is set, in-flight pages get
        ``pipeline.drain_timeout_s`` to finish; then every stage is told to give up
        (``abort``), and whatever still finishes is dropped rather than written, so no
        stage writes to the sink or reaches the recogniser after the run returns."""
        stopped_at: float | None = None
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(timeout=_POLL_S)
            if stop is None or not stop.is_set():
                continue
            now = time.monotonic()
            if stopped_at is None:
                stopped_at = now
            if now - stopped_at >= self.cfg.pipeline.drain_timeout_s and not abort.is_set():
                dropping.set()
                abort.set()
            if abort.is_set() and now - stopped_at >= 2 * self.cfg.pipeline.drain_timeout_s:
                # A stage stuck in a call that ignores the abort (a recogniser without a
                # timeout): leave it; nothing it finishes is written.
                log.warning("stage threads still busy after the drain timeout: %s",
                            ", ".join(t.name for t in threads if t.is_alive()))
                return


class StallWatchdog:
    """Ends the process when no page finishes for ``timeout_s`` (0: never).

    A stage stuck for good (a native deadlock, a call without a timeout) would otherwise
    leave a run hanging forever, which no supervisor notices; an exit it can restart, and
    the re-run resumes. faulthandler's timer runs in a C thread that needs no GIL, so it
    fires even when the stuck call holds the GIL and no Python thread can run: it prints
    every thread's stack to stderr ("Timeout (h:mm:ss)!") and exits with status 1.
    Progress re-arms the timer at most once per ``_REARM_S``. The timer is one per process:
    runs in one process share it (it fires when none of them progresses), and it is
    cancelled when the last of them ends.
    """

    _REARM_S = 1.0
    _lock = threading.Lock()
    _running = 0  # watched runs in this process

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s
        self._armed_at = 0.0

    def __enter__(self) -> StallWatchdog:
        if self._timeout_s > 0:
            with StallWatchdog._lock:
                StallWatchdog._running += 1
                self._arm()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timeout_s > 0:
            with StallWatchdog._lock:
                StallWatchdog._running -= 1
                if StallWatchdog._running == 0:
                    faulthandler.cancel_dump_traceback_later()

    def progress(self) -> None:
        if self._timeout_s > 0 and time.monotonic() - self._armed_at >= self._REARM_S:
            with StallWatchdog._lock:
                self._arm()

    def _arm(self) -> None:
        self._armed_at = time.monotonic()
        faulthandler.dump_traceback_later(self._timeout_s, exit=True, file=_stderr_fd())


def _stderr_fd() -> int:
    """stderr's descriptor; fd 2 when sys.stderr was swapped for an object without one."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return 2


def decoded_or_error(page: EncodedPage, out: DecodedPage | PageError
                     ) -> DecodedPage | PageOutcome:
    """A decoder's answer for one page: the decoded page, or its error outcome."""
    if isinstance(out, PageError):
        return error_outcome(page.ref, str(out), {"read_s": page.read_s})
    return out


def lay_out(layout: LayoutBackend, decoded: Sequence[DecodedPage],
            encoded: Sequence[EncodedPage]) -> list[LayoutResult | PageOutcome]:
    """The layout of a batch of decoded pages: each page's regions, or its error outcome
    (a backend failing the whole batch fails each of its pages)."""
    try:
        results = layout.detect(decoded, encoded)
    except FolioError as exc:
        results = [PageError(f"layout failed: {exc}")] * len(decoded)
    return [error_outcome(page.ref, str(result), page_times(page))
            if isinstance(result, PageError) else result
            for page, result in zip(decoded, results, strict=True)]


def start_recognition(
    recognizer: Recognizer, page: DecodedPage, layout: LayoutResult, cfg: FolioConfig
) -> PageOutcome | InFlightPage:
    """Coverage, crop and recognition of one laid-out page: its outcome, or, for a
    recogniser that queues work (``submit``), the page in flight (``outcome()`` waits)."""
    start = time.perf_counter()
    layout = cover_page(layout, page.lines, cfg.lines, cfg.layout)
    reads_lines = bool(getattr(recognizer, "reads_lines", True))
    tasks = region_tasks(page, layout, cfg.crop, reads_lines=reads_lines)
    crop_s = time.perf_counter() - start
    submit = getattr(recognizer, "submit", None)
    if submit is None:
        results = recognizer.recognize(tasks) if tasks else []
        recognize_s = time.perf_counter() - start - crop_s
        return page_outcome(page, layout, tasks, results, crop_s, recognize_s)
    return InFlightPage(page, layout, tasks, crop_s, submit(tasks))


class InFlightPage:
    """A page whose regions were submitted to a queueing recogniser."""

    def __init__(self, page: DecodedPage, layout: LayoutResult, tasks: Sequence[RegionTask],
                 crop_s: float, future: concurrent.futures.Future[list[RecognitionResult]]
                 ) -> None:
        self.page, self.layout, self.tasks, self.crop_s = page, layout, tasks, crop_s
        self.future = future
        self._submitted = time.perf_counter()
        self._done = self._submitted
        future.add_done_callback(self._mark_done)

    def _mark_done(self, _: object) -> None:
        self._done = time.perf_counter()

    @property
    def recognize_s(self) -> float:
        return self._done - self._submitted

    def outcome(self, abort: threading.Event | None = None) -> PageOutcome | None:
        """Wait for the page's regions and build its outcome; None when ``abort`` is set
        before they arrive (the run stopped waiting)."""
        try:
            results = self.future.result() if abort is None else _result_unless(self.future,
                                                                                 abort)
            if results is None:
                return None
        except Exception as exc:  # the recogniser was closed or cancelled mid-page
            failed = RecognitionResult(text=None, error=f"recognition failed: {exc}")
            results = [failed] * len(self.tasks)
        return page_outcome(self.page, self.layout, self.tasks, results, self.crop_s,
                            _recognize_seconds(self, results))


class _Counter:
    """Folds outcomes into the summary; called from several stage threads."""

    def __init__(self, summary: RunSummary) -> None:
        self._summary = summary
        self._lock = threading.Lock()

    def add(self, outcome: PageOutcome) -> None:
        with self._lock:
            self._summary.add(outcome)


def _result_unless(future: concurrent.futures.Future[list[RecognitionResult]],
                   abort: threading.Event) -> list[RecognitionResult] | None:
    """The future's result, or None once ``abort`` is set before it arrives."""
    while True:
        try:
            return future.result(timeout=_POLL_S)
        except concurrent.futures.TimeoutError:
            if abort.is_set():
                return None


def page_outcome(
    page: DecodedPage,
    layout: LayoutResult,
    tasks: Sequence[RegionTask],
    results: Sequence[RecognitionResult],
    crop_s: float,
    recognize_s: float,
) -> PageOutcome:
    """A recognised page's outcome: every stage that ends a page (this pipeline's
    recogniser threads, the Ray engine's recognition actors) builds it here."""
    by_index: dict[int, RecognitionResult] = {}
    for task, result in zip(tasks, results, strict=True):
        if not result.lines and task.lines:
            # A recogniser that reads whole regions: the lines' boxes come from the
            # page's detection, the text from the region.
            result.lines = [LineText(bbox=line.bbox) for line in task.lines]
        by_index[task.region.index] = result
    regions: list[tuple[Region, RecognitionResult | None]] = [
        (region, by_index.get(region.index)) for region in layout.regions
    ]
    failed = [r.error for r in results if r.error]
    timings = {**page_times(page), "layout_s": layout.layout_s, "crop_s": crop_s,
               "recognize_s": recognize_s}
    error = None
    if failed:
        # The page stays retryable: a re-run redoes it and replaces its regions.
        error = f"{len(failed)} of {len(results)} regions failed: {failed[0]}"
    return PageOutcome(
        ref=page.ref,
        status="error" if failed else "ok",
        error=error,
        width=page.width,
        height=page.height,
        regions=regions,
        timings=timings,
        rotation=page.rotation,
    )


def _recognize_seconds(pending: InFlightPage, results: Sequence[RecognitionResult]) -> float:
    """A page's recognition time: the thread-seconds its regions took where the recogniser
    reports them (rapidocr's pool, whose pages overlap in the queue), else how long the
    page waited for its results (vLLM: the work happens on the server)."""
    work = [w for r in results if isinstance(w := r.stats.get("work_s"), float)]
    if not results or len(work) != len(results):
        return pending.recognize_s
    return sum(work)


def page_times(page: DecodedPage) -> dict[str, float]:
    return {"read_s": page.read_s, "decode_s": page.decode_s, "lines_s": page.lines_s}


def error_outcome(ref: Any, error: str, timings: dict[str, float]) -> PageOutcome:
    return PageOutcome(ref=ref, status="error", error=error, width=None, height=None,
                       regions=[], timings=timings)


class _Channel:
    """A bounded queue between two stages whose put/get give up once the run aborts."""

    def __init__(self, size: int, abort: threading.Event) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(size)
        self._abort = abort

    def put(self, item: Any) -> None:
        while not self._abort.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue

    def get(self) -> Any:
        """The next item, or the end marker once the run is aborted."""
        while not self._abort.is_set():
            try:
                return self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return _DONE

    def get_nowait(self) -> Any:
        return self._queue.get_nowait()

    def qsize(self) -> int:
        return self._queue.qsize()



def _batches(q: _Channel, max_size: int) -> Iterator[list[Any]]:
    """Yield batches of up to ``max_size`` items: block for the first, take what's ready."""
    while True:
        item = q.get()
        if item is _DONE:
            return
        batch = [item]
        while len(batch) < max_size:
            try:
                item = q.get_nowait()
            except queue.Empty:
                break
            if item is _DONE:
                yield batch
                return
            batch.append(item)
        yield batch


def run(sources: Sequence[str | Path], db: Path, cfg: FolioConfig) -> RunSummary:
    """OCR ``sources`` into the SQLite database ``db``: the Python twin of ``folio run``."""
    pipeline = Pipeline(cfg)
    try:
        return pipeline.run(sources, db)
    finally:
        pipeline.close()
