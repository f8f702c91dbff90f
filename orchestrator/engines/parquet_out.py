"""Parquet output of distributed runs: one file per unit, one row per page.

An output folder (local or ``s3://``/``gs://``... prefix) holds:

- ``<stem>-<digest>.p<first>-<last>.parquet``: the pages ``first..last`` of one document
  (``orchestrator.engines.units``), written whole and atomically: the name exists only with every
  page of the unit in it, so a re-run skips exactly the units already there;
- ``_folio.json``: the output's format version, unit size, and the configuration and
  models of the run that started it;
- ``_tmp/``: local writes in progress (removed when a run ends).

Schema (``PARQUET_SCHEMA_VERSION`` 1, also in each file's metadata as
``folio.schema_version``; the unit in ``folio.unit``), one row per page, ordered by page::

    source      string        document identity: absolute path or URI
    page        int64         1-based page (shards: row + 1)
    width       int32         page size in pixels (null for a page that failed early)
    height      int32
    rotation    int16         degrees the page was turned clockwise to be upright
    status      string        "ok" | "error"
    error       string        why, for an error page
    timings     struct<read_s, decode_s, lines_s, layout_s, crop_s, recognize_s: double>
    regions     list<struct<
        index int32, label string, task string, origin string, score double,
        bbox list<double> [x0, y0, x1, y1], polygon list<list<double>>,
        recognized bool (false: kept without reading, e.g. a figure),
        text string, text_format string, confidence double, error string,
        stats struct<model string, prompt_tokens int64, completion_tokens int64,
                     finish_reason string, latency_s double, ttft_s double, tpot_s double>,
        lines list<struct<bbox list<double>, text string, score double,
                          low_confidence bool>>>>

Boxes are in page pixels of the upright page, as in the SQLite sink and the JSONL export.

Usage::

    write_unit("s3://bucket/out", unit, outcomes)       # atomic, deterministic name
    done = done_units("s3://bucket/out")                # names already complete
    summary = import_output("s3://bucket/out", Path("out.db"))   # into the SQLite sink
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.config import SinkConfig
from orchestrator.engines import storage
from orchestrator.engines.units import Unit
from orchestrator.errors import ConfigError, SinkError
from orchestrator.stages.sink import REGION_STATS, STAGE_TIMINGS, SQLiteSink
from orchestrator.types import (
    LineText,
    Origin,
    PageOutcome,
    PageRef,
    RecognitionResult,
    Region,
    Task,
    TextFormat,
)

PARQUET_SCHEMA_VERSION = 1
MANIFEST = "_folio.json"
SUFFIX = ".parquet"

_BOX = pa.list_(pa.float64())
_LINE = pa.struct([("bbox", _BOX), ("text", pa.string()), ("score", pa.float64()),
                   ("low_confidence", pa.bool_())])
_STAT_TYPES = {"model": pa.string(), "prompt_tokens": pa.int64(),
               "completion_tokens": pa.int64(), "finish_reason": pa.string(),
               "latency_s": pa.float64(), "ttft_s": pa.float64(), "tpot_s": pa.float64()}
_STATS = pa.struct([(name, _STAT_TYPES[name]) for name in REGION_STATS])
_REGION = pa.struct([
    ("index", pa.int32()), ("label", pa.string()), ("task", pa.string()),
    ("origin", pa.string()), ("score", pa.float64()), ("bbox", _BOX),
    ("polygon", pa.list_(_BOX)), ("recognized", pa.bool_()), ("text", pa.string()),
    ("text_format", pa.string()), ("confidence", pa.float64()), ("error", pa.string()),
    ("stats", _STATS), ("lines", pa.list_(_LINE)),
])
SCHEMA = pa.schema(
    [("source", pa.string()), ("page", pa.int64()), ("width", pa.int32()),
     ("height", pa.int32()), ("rotation", pa.int16()), ("status", pa.string()),
     ("error", pa.string()),
     ("timings", pa.struct([(name, pa.float64()) for name in STAGE_TIMINGS])),
     ("regions", pa.list_(_REGION))],
    metadata={b"folio.schema_version": str(PARQUET_SCHEMA_VERSION).encode()},
)


# ---------------------------------------------------------------------------- rows


def outcome_row(outcome: PageOutcome) -> dict[str, Any]:
    """One page as a row of ``SCHEMA``."""
    return {
        "source": outcome.ref.source,
        "page": outcome.ref.page,
        "width": outcome.width,
        "height": outcome.height,
        "rotation": outcome.rotation,
        "status": outcome.status,
        "error": outcome.error,
        "timings": {name: outcome.timings.get(name) for name in STAGE_TIMINGS},
        "regions": [_region_item(region, result) for region, result in outcome.regions],
    }


def _region_item(region: Region, result: RecognitionResult | None) -> dict[str, Any]:
    stats = result.stats if result is not None else {}
    return {
        "index": region.index,
        "label": region.label,
        "task": str(region.task),
        "origin": str(region.origin),
        "score": float(region.score),
        "bbox": [float(v) for v in region.bbox],
        "polygon": None if region.polygon is None else [[float(x), float(y)]
                                                         for x, y in region.polygon],
        "recognized": result is not None,
        "text": None if result is None else result.text,
        "text_format": None if result is None or result.text is None
        else str(result.text_format),
        "confidence": None if result is None else result.confidence,
        "error": None if result is None else result.error,
        "stats": {name: stats.get(name) for name in REGION_STATS},
        "lines": [] if result is None else [
            {"bbox": [float(v) for v in line.bbox], "text": line.text, "score": line.score,
             "low_confidence": line.low_confidence} for line in result.lines],
    }


def row_outcome(row: dict[str, Any]) -> PageOutcome:
    """A row of ``SCHEMA`` back as the ``PageOutcome`` the sink stores."""
    regions: list[tuple[Region, RecognitionResult | None]] = []
    for item in row["regions"] or []:
        polygon = item["polygon"]
        region = Region(
            index=item["index"], label=item["label"], task=Task(item["task"]),
            score=item["score"], bbox=_box(item["bbox"]),
            polygon=None if polygon is None else tuple((p[0], p[1]) for p in polygon),
            origin=Origin(item["origin"]),
        )
        result = None
        if item["recognized"]:
            result = RecognitionResult(
                text=item["text"], error=item["error"],
                stats={k: v for k, v in (item["stats"] or {}).items() if v is not None},
                lines=[LineText(bbox=_box(line["bbox"]), text=line["text"],
                                score=line["score"], low_confidence=line["low_confidence"])
                       for line in item["lines"] or []],
                confidence=item["confidence"],
                text_format=TextFormat(item["text_format"] or TextFormat.PLAIN),
            )
        regions.append((region, result))
    timings = {k: v for k, v in (row["timings"] or {}).items() if v is not None}
    return PageOutcome(
        ref=PageRef(row["source"], int(row["page"])), status=row["status"],
        error=row["error"], width=row["width"], height=row["height"], regions=regions,
        timings=timings, rotation=row["rotation"] or 0,
    )


def _box(values: Sequence[float]) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = values
    return (x0, y0, x1, y1)


# ---------------------------------------------------------------------------- files


def unit_table(unit: Unit, outcomes: Sequence[PageOutcome]) -> pa.Table:
    """The unit's pages as a table, in page order; refuses a unit that is not whole."""
    pages = sorted(outcomes, key=lambda o: o.ref.page)
    numbers = [o.ref.page for o in pages]
    if numbers != list(range(unit.first, unit.last + 1)) or any(
            o.ref.source != unit.source for o in pages):
        raise SinkError(f"unit {unit.name} is not whole: pages {numbers}")
    meta = {**(SCHEMA.metadata or {}), b"folio.unit": json.dumps(
        {"source": unit.source, "kind": unit.kind, "first": unit.first,
         "last": unit.last}).encode()}
    return pa.Table.from_pylist([outcome_row(o) for o in pages],
                                schema=SCHEMA.with_metadata(meta))


def write_unit(out: str, unit: Unit, outcomes: Sequence[PageOutcome]) -> int:
    """Write a whole unit as ``out/<unit.name>`` atomically; returns bytes written."""
    sink = pa.BufferOutputStream()
    pq.write_table(unit_table(unit, outcomes), sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    storage.write_atomic(out, unit.name, data)
    return len(data)


def done_units(out: str) -> set[str]:
    """Names of the unit files already complete in ``out``."""
    return set(storage.list_names(out, SUFFIX))


def read_unit_file(uri: str) -> pa.Table:
    if storage.is_uri(uri):
        with storage.open_input(uri) as fh:
            return pq.read_table(fh)
    return pq.read_table(storage.local_path(uri))


def check_table(name: str, table: pa.Table) -> None:
    """A unit file's schema version and its pages against its unit (SinkError if not)."""
    meta = table.schema.metadata or {}
    version = meta.get(b"folio.schema_version", b"?").decode()
    if version != str(PARQUET_SCHEMA_VERSION):
        raise SinkError(f"{name} has schema version {version}; this folio reads "
                        f"{PARQUET_SCHEMA_VERSION}")
    unit = json.loads(meta.get(b"folio.unit", b"{}"))
    pages = table.column("page").to_pylist()
    if not unit or pages != list(range(unit["first"], unit["last"] + 1)):
        raise SinkError(f"{name} does not hold its unit's pages")


# ---------------------------------------------------------------------------- manifest


def open_output(out: str, unit_pages: int, config: dict[str, Any],
                manifest: dict[str, Any]) -> None:
    """Create ``out/_folio.json`` for a new output, or check that an existing output was
    cut into units of the same size (other sizes would name other page ranges, and a page
    could then be written twice)."""
    uri = storage.join(out, MANIFEST)
    if storage.exists(uri):
        existing = read_manifest(out)
        if existing.get("schema_version") != PARQUET_SCHEMA_VERSION:
            raise ConfigError(f"{out} holds folio output of schema version "
                              f"{existing.get('schema_version')}, not {PARQUET_SCHEMA_VERSION}")
        if existing.get("unit_pages") != unit_pages:
            raise ConfigError(f"{out} was written with ray.unit_pages = "
                              f"{existing.get('unit_pages')}; resume it with the same value")
        return
    body = {"format": "folio-pages", "schema_version": PARQUET_SCHEMA_VERSION,
            "unit_pages": unit_pages, "config": config, "manifest": manifest}
    storage.write_atomic(out, MANIFEST, json.dumps(body, indent=1, default=str).encode())


def read_manifest(out: str) -> dict[str, Any]:
    uri = storage.join(out, MANIFEST)
    try:
        body: dict[str, Any] = json.loads(storage.read_bytes(uri))
    except FileNotFoundError as exc:
        raise ConfigError(f"{out} is not a folio output (no {MANIFEST})") from exc
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {uri}: {exc}") from exc
    return body


# ---------------------------------------------------------------------------- import


@dataclass(slots=True)
class ImportSummary:
    db: Path
    run_id: int
    files: int = 0
    pages: int = 0
    ok: int = 0
    errors: int = 0


def iter_outcomes(out: str) -> Iterator[tuple[str, list[PageOutcome]]]:
    """Each unit file's name and pages, in name order."""
    for name in sorted(done_units(out)):
        table = read_unit_file(storage.join(out, name))
        check_table(name, table)
        yield name, [row_outcome(row) for row in table.to_pylist()]


def import_output(out: str, db: Path, cfg: SinkConfig | None = None) -> ImportSummary:
    """Load a Parquet output into the SQLite sink, one transaction per unit file. Pages
    are upserted by (document, page), so importing again replaces, never duplicates."""
    header = read_manifest(out)
    with SQLiteSink(db, cfg) as sink:
        config = {**header.get("config", {}), "imported_from": out}
        run_id = sink.start_run(config, header.get("manifest", {}), [])
        summary = ImportSummary(db=db, run_id=run_id)
        for _, outcomes in iter_outcomes(out):
            sink.write_batch(outcomes)
            summary.files += 1
            summary.pages += len(outcomes)
            summary.ok += sum(o.status == "ok" for o in outcomes)
        summary.errors = summary.pages - summary.ok
        sink.finish_run(run_id, {"imported_from": out, "files": summary.files,
                                 "pages": summary.pages, "ok": summary.ok,
                                 "errors": summary.errors})
    return summary
