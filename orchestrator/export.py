"""Export a folio database: JSONL (one object per page), Markdown (one file per page),
or a compacted copy (``VACUUM INTO``).

Pages come out ordered by source, then page number; regions in reading order. The
database is opened read-only, so a finished one on read-only media exports too.

Usage::

    export_jsonl(Path("out.db"), Path("out.jsonl"))        # -> pages written
    export_markdown(Path("out.db"), Path("md/"))           # -> files written
    compact(Path("out.db"), Path("small.db"))              # -> bytes of the copy
    page_markdown(outcome.regions, page=3)                 # the pipeline can reuse it

A JSONL line::

    {"source": "/abs/scan.pdf", "page": 1, "width": 1700, "height": 2200, "rotation": 0,
     "status": "ok", "error": null, "timings": {"read_s": 0.04, ...},
     "regions": [{"index": 0, "label": "title", "task": "text",
                  "bbox": [x0, y0, x1, y1], "score": 0.93, "text": "..."}, ...],
     "markdown": "## ..."}
"""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
import unicodedata
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from orchestrator.errors import SinkError
from orchestrator.sink import REGION_STATS, STAGE_TIMINGS, open_existing
from orchestrator.types import RecognitionResult, Region, Task

TITLE_LABELS = frozenset({"title", "doc_title", "paragraph_title", "section_title"})
MAX_STEM_CHARS = 80

_PAGE_COLUMNS = (
    "d.source, p.page, p.width, p.height, p.rotation, p.status, p.error, "
    + ", ".join(f"p.{t}" for t in STAGE_TIMINGS)
)
_REGION_COLUMNS = (
    "r.idx, r.label, r.task, r.score, r.x0, r.y0, r.x1, r.y1, r.polygon, r.text, r.error, "
    + ", ".join(f"r.{k}" for k in REGION_STATS)
)
_PAGES_QUERY = f"""
SELECT p.id, {_PAGE_COLUMNS}, {_REGION_COLUMNS}
FROM documents d
JOIN pages p ON p.document_id = d.id
LEFT JOIN regions r ON r.page_id = p.id
ORDER BY d.source, p.page, r.idx
"""
_N_PAGE = 1 + 7 + len(STAGE_TIMINGS)


# ---------------------------------------------------------------------------- markdown


def _formula(text: str) -> str:
    body = text.strip()
    if body.startswith("$$") or body.startswith("\\[") or body.startswith("\\begin{"):
        return body
    if body.startswith("$") and body.endswith("$") and len(body) > 1:
        body = body.strip("$").strip()
    return f"$$\n{body}\n$$"


def page_markdown(
    regions: Sequence[tuple[Region, RecognitionResult | None]], page: int | None = None
) -> str:
    """The page's text in reading order as Markdown.

    Titles become ``## `` headings, text regions paragraphs, tables and formulas are kept
    as recognised (formulas wrapped in ``$$`` unless already delimited), figures become a
    placeholder ``![figure](page-N-region-K)``. Regions without text are left out.
    """
    blocks: list[str] = []
    for region, result in sorted(regions, key=lambda item: item[0].index):
        task = Task(region.task)
        if task is Task.ABANDON:
            continue
        if task is Task.SKIP:
            where = f"page-{page}-region-{region.index}" if page is not None else (
                f"region-{region.index}"
            )
            blocks.append(f"![{region.label}]({where})")
            continue
        text = (result.text if result is not None else None) or ""
        text = text.strip()
        if not text:
            continue
        if task is Task.FORMULA:
            blocks.append(_formula(text))
        elif task is Task.TABLE:
            blocks.append(text)
        elif region.label in TITLE_LABELS:
            blocks.append("## " + " ".join(text.split()))
        else:
            blocks.append(text)
    return "\n\n".join(blocks) + ("\n" if blocks else "")


# ---------------------------------------------------------------------------- reading


def _open(db: Path) -> sqlite3.Connection:
    # Read-only: exporting never changes the database, and works from read-only media.
    return open_existing(Path(db))


def _region(row: Sequence[Any]) -> tuple[Region, RecognitionResult, dict[str, Any]]:
    idx, label, task, score, x0, y0, x1, y1, polygon, text, error, *stats = row
    region = Region(
        index=idx,
        label=label,
        task=Task(task),
        score=score if score is not None else 0.0,
        bbox=(x0, y0, x1, y1),
        polygon=tuple(tuple(p) for p in json.loads(polygon)) if polygon else None,
    )
    extra = {k: v for k, v in zip(REGION_STATS, stats, strict=True) if v is not None}
    return region, RecognitionResult(text=text, error=error, stats=extra), extra


def iter_pages(conn: sqlite3.Connection) -> Iterator[dict[str, Any]]:
    """Every page as an export dict (source, page, ..., regions, markdown), in order."""
    rows = conn.execute(_PAGES_QUERY)
    for _, group in itertools.groupby(rows, key=lambda r: r[0]):
        members = list(group)
        head = members[0]
        source, page, width, height, rotation, status, error, *timings = head[1:_N_PAGE]
        regions: list[tuple[Region, RecognitionResult | None]] = []
        items: list[dict[str, Any]] = []
        for row in members:
            if row[_N_PAGE] is None:  # LEFT JOIN: a page without regions
                continue
            region, result, stats = _region(row[_N_PAGE:])
            regions.append((region, result))
            item: dict[str, Any] = {
                "index": region.index,
                "label": region.label,
                "task": str(region.task),
                "bbox": [round(v, 2) for v in region.bbox],
                "score": round(region.score, 4),
                "text": result.text,
            }
            if region.polygon is not None:
                item["polygon"] = [list(p) for p in region.polygon]
            if result.error is not None:
                item["error"] = result.error
            item.update(stats)
            items.append(item)
        yield {
            "source": source,
            "page": page,
            "width": width,
            "height": height,
            "rotation": rotation,
            "status": status,
            "error": error,
            "timings": {k: v for k, v in zip(STAGE_TIMINGS, timings, strict=True) if v is not None},
            "regions": items,
            "markdown": page_markdown(regions, page=page),
        }


# ---------------------------------------------------------------------------- writers


def export_jsonl(db: Path, out: Path) -> int:
    """Write one JSON object per page to ``out`` (``-`` is not special); returns pages."""
    conn = _open(db)
    count = 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as fh:
            for page in iter_pages(conn):
                fh.write(json.dumps(page, ensure_ascii=False))
                fh.write("\n")
                count += 1
    finally:
        conn.close()
    return count


def safe_stem(source: str) -> str:
    """A filesystem-safe file-name stem from a source path (letters, digits, ``._-``)."""
    stem = Path(source).stem if source else "page"
    stem = unicodedata.normalize("NFC", stem)
    stem = re.sub(r"[^\w.\-]+", "_", stem, flags=re.UNICODE).strip("._-")
    return (stem or "page")[:MAX_STEM_CHARS]


def export_markdown(db: Path, out_dir: Path) -> int:
    """Write one ``<stem>_p<NNNN>.md`` per page into ``out_dir``; returns files written.

    Two sources with the same stem (``a/scan.pdf``, ``b/scan.pdf``) get ``scan``,
    ``scan-2``...: names are unique within one export.
    """
    conn = _open(db)
    out_dir.mkdir(parents=True, exist_ok=True)
    stems: dict[str, str] = {}  # source -> unique stem
    used: set[str] = set()
    count = 0
    try:
        for page in iter_pages(conn):
            source = page["source"]
            stem = stems.get(source)
            if stem is None:
                base = safe_stem(source)
                stem, n = base, 1
                while stem.casefold() in used:
                    n += 1
                    stem = f"{base}-{n}"
                used.add(stem.casefold())
                stems[source] = stem
            text = page["markdown"]
            if page["status"] != "ok":
                text = f"<!-- page failed: {page['error']} -->\n" + text
            (out_dir / f"{stem}_p{page['page']:04d}.md").write_text(text, encoding="utf-8")
            count += 1
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
