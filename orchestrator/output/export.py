"""Export a folio database: JSONL (one object per page), Markdown (one file per page or
per document), or a compacted copy (``VACUUM INTO``).

Pages come out ordered by source, then page number; regions in reading order, each with
its text lines. The database is read through a read-only connection, so a finished one
on read-only media exports too; where it can be written, an older schema is brought up
to date first and statistics are gathered for the joins (``ANALYZE``).

Usage::

    for page in read_pages(Path("out.db")): ...            # dicts, as JSONL writes them
    export_jsonl(Path("out.db"), Path("out.jsonl"))        # -> pages written
    export_markdown(Path("out.db"), Path("md/"))           # -> files written
    export_markdown(Path("out.db"), Path("md/"), per="document", figures=True,
                    include_furniture=True)
    compact(Path("out.db"), Path("small.db"))              # -> bytes of the copy

A JSONL line (``schema_version`` 2)::

    {"schema_version": 2, "source": "/abs/scan.pdf", "page": 1, "width": 1700,
     "height": 2200, "rotation": 0, "status": "ok", "error": null,
     "timings": {"read_s": 0.04, ...},
     "regions": [{"index": 0, "label": "title", "task": "text", "origin": "layout",
                  "bbox": [x0, y0, x1, y1], "score": 0.93, "text": "...",
                  "text_format": "plain", "confidence": 0.98,
                  "lines": [{"bbox": [x0, y0, x1, y1], "text": "...", "score": 0.98}]},
                 ...],
     "markdown": "## ..."}
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import sqlite3
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from orchestrator.errors import SinkError
from orchestrator.output.markdown import page_markdown
from orchestrator.stages.sink import (
    REGION_STATS,
    STAGE_TIMINGS,
    connect,
    ensure_schema,
    open_existing,
)
from orchestrator.types import LineText, Origin, RecognitionResult, Region, Task, TextFormat

JSONL_SCHEMA_VERSION = 2
MAX_STEM_CHARS = 80

_PAGE_COLUMNS = (
    "d.source, p.page, p.width, p.height, p.rotation, p.status, p.error, "
    + ", ".join(f"p.{t}" for t in STAGE_TIMINGS)
)
_REGION_COLUMNS = (
    "r.idx, r.label, r.task, r.score, r.x0, r.y0, r.x1, r.y1, r.polygon, r.origin, r.text, "
    "r.text_format, r.confidence, r.error, "
    + ", ".join(f"r.{k}" for k in REGION_STATS)
)
_PAGES_QUERY = f"""
SELECT p.id, {_PAGE_COLUMNS}, {_REGION_COLUMNS}
FROM documents d
JOIN pages p ON p.document_id = d.id
LEFT JOIN regions r ON r.page_id = p.id
ORDER BY d.source, p.page, r.idx
"""
_LINES_QUERY = """
SELECT region_idx, x0, y0, x1, y1, text, score, low_confidence FROM lines
WHERE page_id = ? ORDER BY region_idx, idx
"""
_N_PAGE = 1 + 7 + len(STAGE_TIMINGS)


# ---------------------------------------------------------------------------- reading


def _tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _open(db: Path) -> sqlite3.Connection:
    """A read-only connection to a folio database (``NotAFolioDatabase`` when it is
    not one). Where the file can be written, an older schema is brought up to date first
    and statistics are gathered for the joins; on read-only media it is exported as it is."""
    conn = open_existing(Path(db))
    tables = _tables(conn)
    with contextlib.suppress(sqlite3.Error, SinkError):
        writer = connect(Path(db))
        try:
            if "lines" not in tables:
                ensure_schema(writer, Path(db))  # an older folio database: migrate it
            writer.execute("ANALYZE")
        finally:
            writer.close()
    if "lines" not in tables and "lines" not in _tables(conn):
        conn.close()
        raise SinkError(f"{db} was written by an older folio and is read-only here: "
                        "copy it somewhere writable to export it")
    return conn


def _region(row: Sequence[Any]) -> tuple[Region, RecognitionResult, dict[str, Any]]:
    (idx, label, task, score, x0, y0, x1, y1, polygon, origin, text, text_format, confidence,
     error, *stats) = row
    region = Region(
        index=idx,
        label=label,
        task=Task(task),
        score=score if score is not None else 0.0,
        bbox=(x0, y0, x1, y1),
        polygon=tuple(tuple(p) for p in json.loads(polygon)) if polygon else None,
        origin=Origin(origin),
    )
    extra = {k: v for k, v in zip(REGION_STATS, stats, strict=True) if v is not None}
    result = RecognitionResult(
        text=text, error=error, stats=extra, confidence=confidence,
        text_format=TextFormat(text_format) if text_format else TextFormat.PLAIN)
    return region, result, extra


def _page_lines(conn: sqlite3.Connection, page_id: int) -> dict[int, list[LineText]]:
    lines: dict[int, list[LineText]] = {}
    for region_idx, x0, y0, x1, y1, text, score, low in conn.execute(_LINES_QUERY, (page_id,)):
        lines.setdefault(region_idx, []).append(
            LineText(bbox=(x0, y0, x1, y1), text=text, score=score, low_confidence=bool(low)))
    return lines


def _line_item(line: LineText) -> dict[str, Any]:
    item: dict[str, Any] = {"bbox": [round(v, 2) for v in line.bbox], "text": line.text,
                            "score": None if line.score is None else round(line.score, 4)}
    if line.low_confidence:
        item["low_confidence"] = True
    return item


def iter_pages(conn: sqlite3.Connection, *, include_furniture: bool = False
               ) -> Iterator[dict[str, Any]]:
    """Every page as an export dict (source, page, ..., regions with their lines, markdown),
    in order. ``page["_regions"]`` holds the (Region, RecognitionResult) pairs."""
    rows = conn.execute(_PAGES_QUERY)
    for page_id, group in itertools.groupby(rows, key=lambda r: r[0]):
        members = list(group)
        head = members[0]
        source, page, width, height, rotation, status, error, *timings = head[1:_N_PAGE]
        lines = _page_lines(conn, page_id) if head[_N_PAGE] is not None else {}
        regions: list[tuple[Region, RecognitionResult | None]] = []
        items: list[dict[str, Any]] = []
        for row in members:
            if row[_N_PAGE] is None:  # LEFT JOIN: a page without regions
                continue
            region, result, stats = _region(row[_N_PAGE:])
            result.lines = lines.get(region.index, [])
            regions.append((region, result))
            item: dict[str, Any] = {
                "index": region.index,
                "label": region.label,
                "task": str(region.task),
                "origin": str(region.origin),
                "bbox": [round(v, 2) for v in region.bbox],
                "score": round(region.score, 4),
                "text": result.text,
                "text_format": None if result.text is None else str(result.text_format),
                "confidence": None if result.confidence is None else round(result.confidence, 4),
                "lines": [_line_item(line) for line in result.lines],
            }
            if region.polygon is not None:
                item["polygon"] = [list(p) for p in region.polygon]
            if result.error is not None:
                item["error"] = result.error
            item.update(stats)
            items.append(item)
        yield {
            "schema_version": JSONL_SCHEMA_VERSION,
            "source": source,
            "page": page,
            "width": width,
            "height": height,
            "rotation": rotation,
            "status": status,
            "error": error,
            "timings": {k: v for k, v in zip(STAGE_TIMINGS, timings, strict=True) if v is not None},
            "regions": items,
            "markdown": page_markdown(regions, include_furniture=include_furniture),
            "_regions": regions,
        }


# ---------------------------------------------------------------------------- writers


def read_pages(db: Path, *, include_furniture: bool = False) -> Iterator[dict[str, Any]]:
    """Every stored page as the dict JSONL export writes (regions with their lines, the
    page's Markdown), in order: the Python API's way to read results."""
    conn = _open(db)
    try:
        for page in iter_pages(conn, include_furniture=include_furniture):
            page.pop("_regions")
            yield page
    finally:
        conn.close()


def export_jsonl(db: Path, out: Path, *, include_furniture: bool = False) -> int:
    """Write one JSON object per page to ``out``; returns pages written. Every region and
    line is written; ``include_furniture`` only affects each page's ``markdown`` field."""
    count = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for page in read_pages(db, include_furniture=include_furniture):
            fh.write(json.dumps(page, ensure_ascii=False))
            fh.write("\n")
            count += 1
    return count


def safe_stem(source: str) -> str:
    """A filesystem-safe file-name stem from a source path (letters, digits, ``._-``)."""
    stem = Path(source).stem if source else "page"
    stem = unicodedata.normalize("NFC", stem)
    stem = re.sub(r"[^\w.\-]+", "_", stem, flags=re.UNICODE).strip("._-")
    return (stem or "page")[:MAX_STEM_CHARS]


class _Stems:
    """Unique file-name stems per source: ``a/scan.pdf``, ``b/scan.pdf`` -> ``scan``,
    ``scan-2`` (case-insensitively unique, for case-insensitive file systems)."""

    def __init__(self) -> None:
        self._stems: dict[str, str] = {}
        self._used: set[str] = set()

    def __call__(self, source: str) -> str:
        stem = self._stems.get(source)
        if stem is None:
            base = safe_stem(source)
            stem, n = base, 1
            while stem.casefold() in self._used:
                n += 1
                stem = f"{base}-{n}"
            self._used.add(stem.casefold())
            self._stems[source] = stem
        return stem


class _FigureWriter:
    """Writes figure crops (PNG) into ``out_dir/figures`` from the pages' sources, read
    again as the run that wrote them saw them; a page that cannot be read again gets
    placeholders."""

    def __init__(self, conn: sqlite3.Connection, out_dir: Path) -> None:
        self._conn = conn
        self._dir = out_dir / "figures"

    def links(self, page: dict[str, Any], stem: str) -> dict[int, str]:
        from orchestrator.config import SourceConfig
        from orchestrator.errors import FolioError
        from orchestrator.output.show import stored_page_pixels

        figures = [r for r, _ in page["_regions"] if r.label == "figure" or r.task is Task.SKIP]
        if not figures or page["status"] != "ok":
            return {}
        row = self._conn.execute(
            "SELECT r.config FROM pages p JOIN documents d ON d.id = p.document_id "
            "LEFT JOIN runs r ON r.id = p.run_id WHERE d.source = ? AND p.page = ?",
            (page["source"], page["page"])).fetchone()
        config = json.loads(row[0]) if row and row[0] else None
        try:
            pixels = stored_page_pixels(page["source"], page["page"], page["rotation"], config,
                                        SourceConfig())
        except (FolioError, OSError):
            return {}
        import cv2

        sy = pixels.shape[0] / page["height"] if page["height"] else 1.0
        sx = pixels.shape[1] / page["width"] if page["width"] else 1.0
        self._dir.mkdir(parents=True, exist_ok=True)
        links: dict[int, str] = {}
        for region in figures:
            x0, y0, x1, y1 = region.bbox
            crop = pixels[max(0, int(y0 * sy)):int(y1 * sy) + 1,
                          max(0, int(x0 * sx)):int(x1 * sx) + 1]
            if crop.size == 0:
                continue
            name = f"{stem}_p{page['page']:04d}_r{region.index:02d}.png"
            if cv2.imwrite(str(self._dir / name), crop):
                links[region.index] = f"figures/{name}"
        return links


def _linker(links: dict[int, str]) -> Callable[[Region], str | None]:
    def link(region: Region) -> str | None:
        return links.get(region.index)
    return link


def export_markdown(db: Path, out_dir: Path, *, per: str = "page",
                    include_furniture: bool = False, figures: bool = False) -> int:
    """Write Markdown into ``out_dir``; returns files written.

    ``per="page"``: one ``<stem>_p<NNNN>.md`` per page; ``per="document"``: one
    ``<stem>.md`` per document, its pages in order. ``figures``: crops of figure regions
    are written to ``out_dir/figures/`` and linked; otherwise a figure is a placeholder
    without a link. ``include_furniture``: headers, footers and page numbers are written
    too (they are always in the database and the JSONL).
    """
    if per not in ("page", "document"):
        raise SinkError(f"markdown export is per page or per document, not {per!r}")
    conn = _open(db)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems = _Stems()
    writer = _FigureWriter(conn, out_dir) if figures else None
    count = 0
    document: list[str] = []
    current: str | None = None

    def flush_document() -> None:
        nonlocal count
        if current is not None and document:
            (out_dir / f"{stems(current)}.md").write_text("\n".join(document), encoding="utf-8")
            count += 1
        document.clear()

    try:
        for page in iter_pages(conn):
            source = page["source"]
            stem = stems(source)
            links = writer.links(page, stem) if writer is not None else {}
            text = page_markdown(page["_regions"], include_furniture=include_furniture,
                                 figure_link=_linker(links))
            if page["status"] != "ok":
                text = f"<!-- page failed: {page['error']} -->\n" + text
            if per == "page":
                (out_dir / f"{stem}_p{page['page']:04d}.md").write_text(text, encoding="utf-8")
                count += 1
                continue
            if source != current:
                flush_document()
                current = source
            document.append(f"<!-- page {page['page']} -->\n\n{text}")
        flush_document()
    finally:
        conn.close()
    return count


def compact(db: Path, out: Path) -> int:
    """Write a defragmented copy of ``db`` to ``out`` with ``VACUUM INTO``; returns its size."""
    if out.exists():
        raise SinkError(f"{out} exists; compact writes a new file")
    conn = _open(db)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        conn.execute("VACUUM INTO ?", (str(out),))
    except sqlite3.Error as exc:
        raise SinkError(f"VACUUM INTO {out} failed: {exc}") from exc
    finally:
        conn.close()
    return out.stat().st_size
