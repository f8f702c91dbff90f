"""The Ray engine: folio's stages as a Ray Data pipeline, pages out as Parquet units.

    driver: list documents ─> plan (tasks: each document cut into units) ─> drop the units
    whose file is already complete ─> read (tasks: a unit's pages; PDFs rendered there,
    page by page) ─> decode + text lines + orientation + layout (actors, batched; GPU
    where ``ray.layout_gpus`` asks) ─> coverage + crop + recognition (actors: rapidocr on
    CPU, or vLLM clients) ─> driver: gathers each unit's pages and writes its Parquet file

Every stage calls the code the in-process pipeline runs (``Decoder.decode``,
``make_layout_backend``, ``lay_out``, ``start_recognition`` and ``page_outcome``); only
the plumbing between them is Ray's. Pages travel between stages as pickled stage values.

Exactly once: a unit's file is written only with all of its pages, atomically, under a
name fixed by its document and range (``orchestrator.engines.parquet_out``). A re-run skips the
units whose file exists and redoes the rest; the driver keeps each page once, so a task
that Ray retries after an actor died (Ray Data restarts actors and retries their tasks)
cannot write a page twice. A killed driver loses only the units it had not written.

Usage::

    summary = run(["s3://bucket/scans/"], "s3://bucket/ocr/", cfg)   # Ray started or joined
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from orchestrator import errors
from orchestrator.config import FolioConfig, SourceConfig
from orchestrator.engines import parquet_out, storage
from orchestrator.engines.pipeline import (
    RunSummary,
    StallWatchdog,
    cap_threads,
    decoded_or_error,
    error_outcome,
    lay_out,
    make_layout_backend,
    start_recognition,
)
from orchestrator.engines.units import Document, Unit, list_documents, plan_units, read_unit
from orchestrator.errors import ConfigError, EngineError, FolioError
from orchestrator.types import DecodedPage, EncodedPage, PageOutcome

log = logging.getLogger("folio.ray")

# Set before ray is first imported: a Ray started here then takes 127.0.0.1 as its node
# address, and its servers listen there only (Ray binds every other address to 0.0.0.0).
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass(slots=True)
class RayRunSummary(RunSummary):
    """A run's counts, plus its units: planned, already complete before, written now."""

    units: int = 0
    units_skipped: int = 0
    units_written: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.db), **RunSummary.to_dict(self), "units": self.units,
                "units_skipped": self.units_skipped, "units_written": self.units_written}


# ---------------------------------------------------------------------------- stages


def _dump(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def _plan(row: dict[str, Any], sources: SourceConfig, unit_pages: int) -> list[dict[str, Any]]:
    doc = Document(row["source"], row["kind"], row["error"])
    return [asdict(unit) for unit in plan_units(doc, sources, unit_pages)]


def _read(row: dict[str, Any], sources: SourceConfig) -> Iterator[dict[str, Any]]:
    """A unit's pages, one row each, yielded as they are read (a PDF page is rendered
    only when the previous one has left), so a task holds about one page."""
    unit = Unit(**row)
    for page in read_unit(unit, sources):
        yield {"unit": unit.name, "page": page.ref.page, "item": _dump(page)}


class LayoutStage:
    """An actor: decode (+ text lines, orientation) and layout of batches of pages."""

    def __init__(self, cfg: FolioConfig) -> None:
        from orchestrator.stages.decode import Decoder

        cap_threads(cfg)
        self._decoder = Decoder(cfg.decode, cfg.sources, cfg.lines)
        self._layout = make_layout_backend(cfg, self._decoder.device)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        pages: list[EncodedPage] = [pickle.loads(b) for b in batch["item"]]
        items: list[Any] = [None] * len(pages)
        readable: list[int] = []
        for i, page in enumerate(pages):
            if page.error is not None:
                items[i] = error_outcome(page.ref, page.error, {"read_s": page.read_s})
            else:
                readable.append(i)
        decoded: list[tuple[int, DecodedPage]] = []
        size = self._decoder.batch_size
        for start in range(0, len(readable), size):
            chunk = readable[start:start + size]
            outs = self._decoder.decode([pages[i] for i in chunk])
            for i, out in zip(chunk, outs, strict=True):
                page_or_error = decoded_or_error(pages[i], out)
                if isinstance(page_or_error, PageOutcome):
                    items[i] = page_or_error
                else:
                    decoded.append((i, page_or_error))
        if decoded:
            results = lay_out(self._layout, [d for _, d in decoded],
                              [pages[i] for i, _ in decoded])
            for (i, upright), laid_out in zip(decoded, results, strict=True):
                if isinstance(laid_out, PageOutcome):
                    items[i] = laid_out
                else:
                    # The recognition stage crops from the full page; the model input
                    # (a few MB) is not needed there and would only travel.
                    upright.model_input = upright.model_input[:0]
                    items[i] = (upright, laid_out)
        return {"unit": batch["unit"], "page": batch["page"],
                "item": [_dump(item) for item in items]}


class RecognizeStage:
    """An actor: coverage, crop and recognition of laid-out pages; pages with an error
    outcome pass through. With several vLLM servers (``ray.vllm_urls``) pages go to
    them in turn."""

    def __init__(self, cfg: FolioConfig) -> None:
        from orchestrator.stages.recognize import make_recognizer

        cap_threads(cfg)
        self._cfg = cfg
        urls = cfg.ray.vllm_urls if cfg.recognize.engine == "vllm" else ()
        self._recognizers = ([make_recognizer(cfg.override({"vllm.url": url}))
                              for url in urls] or [make_recognizer(cfg)])
        self._turn = itertools.cycle(self._recognizers)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        started: list[Any] = []
        for blob in batch["item"]:
            item = pickle.loads(blob)
            if isinstance(item, PageOutcome):
                started.append(item)
                continue
            page, layout = item
            started.append(start_recognition(next(self._turn), page, layout, self._cfg))
        outcomes = [s if isinstance(s, PageOutcome) else s.outcome() for s in started]
        return {"unit": batch["unit"], "page": batch["page"],
                "item": [_dump(o) for o in outcomes]}


# ---------------------------------------------------------------------------- driver


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for one run: the session this process already has; else a new one on this
    machine (``address`` None, listening on 127.0.0.1 only) or the cluster at
    ``address``, shut down afterwards."""
    if address is None:
        os.environ.setdefault(_LOCAL_ONLY_ENV, "0")
    import ray

    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=address or "local", include_dashboard=False,
                 logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise EngineError(f"cannot reach the Ray cluster at {address}: {exc}") from exc
    try:
        yield
    finally:
        ray.shutdown()


def _configure_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    # A page is the unit of flow: each row its own block, so a page goes on to the next
    # stage as soon as it is done (the stages batch rows again, batch_size). With Ray's
    # 128 MB blocks the pages of a unit travelled together and recognition waited for the
    # layout of the whole unit.
    ctx.target_max_block_size = 1
    # folio reports progress itself; Ray Data's bars and plans would interleave.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _runtime_env(cfg: FolioConfig) -> dict[str, Any] | None:
    """The driver's store settings (``ray.forward_env``) for every task and actor."""
    env = {name: os.environ[name] for name in cfg.ray.forward_env if name in os.environ}
    return {"env_vars": env} if env else None


def _plan_all(documents: Sequence[Document], cfg: FolioConfig) -> list[Unit]:
    """Every document's units, planned in parallel tasks (page counts need the files)."""
    import ray.data

    if not documents:
        return []
    ds: Any = ray.data.from_items([asdict(d) for d in documents],
                                  override_num_blocks=len(documents))
    rows = ds.flat_map(_plan, fn_kwargs={"sources": cfg.sources,
                                         "unit_pages": cfg.ray.unit_pages},
                       num_cpus=cfg.ray.read_cpus, runtime_env=_runtime_env(cfg)).take_all()
    units = [Unit(**row) for row in rows]
    units.sort(key=lambda u: (u.source, u.first))
    return units


def _page_stream(units: Sequence[Unit], cfg: FolioConfig) -> Any:
    import ray.data

    r = cfg.ray
    env = _runtime_env(cfg)
    ds: Any = ray.data.from_items([asdict(u) for u in units], override_num_blocks=len(units))
    ds = ds.flat_map(_read, fn_kwargs={"sources": cfg.sources}, num_cpus=r.read_cpus,
                     runtime_env=env)
    ds = ds.map_batches(
        LayoutStage, fn_constructor_kwargs={"cfg": cfg}, batch_size=cfg.layout.batch_size,
        compute=ray.data.ActorPoolStrategy(size=r.layout_actors), num_cpus=r.layout_cpus,
        num_gpus=r.layout_gpus or None, batch_format="numpy", runtime_env=env)
    # Each actor runs two batches at once, both feeding its recogniser's queue, so the
    # queue does not run dry at the end of every batch.
    return ds.map_batches(
        RecognizeStage, fn_constructor_kwargs={"cfg": cfg},
        batch_size=max(1, cfg.recognize.in_flight_pages() // 2),
        compute=ray.data.ActorPoolStrategy(size=r.recognize_actors,
                                           max_tasks_in_flight_per_actor=2,
                                           max_concurrent_calls_per_actor=2),
        num_cpus=r.recognize_cpus, resources=r.recognize_resources or None,
        batch_format="numpy", runtime_env=env)


def run(
    sources: Sequence[str | Path],
    out: str | Path,
    cfg: FolioConfig,
    *,
    on_page: Callable[[PageOutcome], None] | None = None,
) -> RayRunSummary:
    """OCR ``sources`` into Parquet units under ``out`` (a folder or a store URI) on Ray:
    the Python twin of ``folio run --engine ray``. Units already complete are skipped."""
    if cfg.pipeline.limit is not None:
        raise ConfigError("pipeline.limit (--limit) is not supported by the Ray engine: "
                          "a partial unit would overlap the whole one of a later run")
    out = str(out) if storage.is_uri(out) else str(storage.local_path(out).resolve())
    documents, skipped_files = list_documents(list(sources), cfg.sources)
    summary = RayRunSummary(db=out, run_id=0, skipped_files=skipped_files)
    # Before Ray starts: an output that cannot be written, or was cut into other units,
    # fails at once.
    parquet_out.open_output(out, cfg.ray.unit_pages, cfg.to_dict(), _manifest(cfg))
    with ray_session(cfg.ray.address):
        import ray.exceptions

        _configure_ray_data()
        start = time.perf_counter()
        try:
            units = _plan_all(documents, cfg)
            done = parquet_out.done_units(out)
            todo = [u for u in units if u.name not in done]
            log.info("%d documents -> %d units in %.1f s; %d already complete",
                     len(documents), len(units), time.perf_counter() - start,
                     len(units) - len(todo))
            summary.units = len(units)
            summary.units_skipped = len(units) - len(todo)
            summary.resumed = sum(u.pages for u in units if u.name in done)
            if todo:
                _collect(_page_stream(todo, cfg), todo, out, cfg, summary, on_page)
        except ray.exceptions.RayError as exc:
            raise _stage_error(exc) from exc
        summary.elapsed_s = time.perf_counter() - start
    storage.remove_temporaries(out)
    return summary


def _collect(stream: Any, units: Sequence[Unit], out: str, cfg: FolioConfig,
             summary: RayRunSummary, on_page: Callable[[PageOutcome], None] | None) -> None:
    """Gather each unit's pages as they arrive and write the unit once it is whole."""
    by_name = {u.name: u for u in units}
    pending: dict[str, dict[int, PageOutcome]] = {}
    written: set[str] = set()
    with StallWatchdog(cfg.pipeline.stall_timeout_s) as watchdog:
        for batch in stream.iter_batches(batch_size=None, batch_format="numpy"):
            for raw_name, raw_page, blob in zip(batch["unit"], batch["page"], batch["item"],
                                                strict=True):
                name, number = str(raw_name), int(raw_page)
                if name in written or number in pending.get(name, {}):
                    continue  # delivered again by a retried task: kept once
                outcome: PageOutcome = pickle.loads(blob)
                pages = pending.setdefault(name, {})
                pages[number] = outcome
                summary.add(outcome)
                watchdog.progress()
                if on_page is not None:
                    on_page(outcome)
                unit = by_name[name]
                if len(pages) == unit.pages:
                    parquet_out.write_unit(out, unit, list(pages.values()))
                    written.add(unit.name)
                    del pending[unit.name]
                    summary.units_written += 1
    missing = [name for name in by_name if name not in written]
    if missing:
        raise EngineError(f"{len(missing)} unit(s) ended incomplete, e.g. {missing[0]}; "
                          "re-run to redo them")


def _manifest(cfg: FolioConfig) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    packages: dict[str, str | None] = {}
    for name in ("folio-ocr", "ray", "torch", "rapidocr", "pyarrow", "fsspec"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {"engine": "ray", "layout": {"backend": cfg.layout.backend},
            "recognizer": {"name": cfg.recognize.engine}, "packages": packages}


def _stage_error(exc: BaseException) -> FolioError:
    """The error to raise for a failed Ray pipeline: the folio error a stage raised (an
    actor that could not load its model: ModelArtifactError, as in-process), else
    EngineError. An actor's constructor error reaches the driver only as text (Ray keeps
    no exception object for it), as its last line ``module.Class: message``."""
    line = _first_line(exc)
    name, _, message = line.partition(": ")
    cls = getattr(errors, name.rsplit(".", 1)[-1], None) if name.startswith(
        "orchestrator.errors.") else None
    if isinstance(cls, type) and issubclass(cls, FolioError) and message:
        return cls(message)
    return EngineError(f"the Ray pipeline failed: {line}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # Ray's task errors start with a banner; the cause is on the last line.
    return (lines[-1] if lines else type(exc).__name__)[:300]
