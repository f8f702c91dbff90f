"""``folio show``: draw one stored page with its regions, to check layout by eye.

The page is read again from its source (``load_page``), at the DPI recorded in the
config of the run that wrote it, and its regions are drawn as coloured rectangles
labelled ``index label``.

Usage::

    source, page = resolve_page(Path("out.db"), "3")               # 3rd page, export order
    source, page = resolve_page(Path("out.db"), "scans/a.pdf#2")   # SOURCE#N
    render_page(Path("out.db"), source, page, Path("page.png"), cfg.sources)
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from orchestrator.config import SourceConfig
from orchestrator.errors import SourceError
from orchestrator.stages.orient import rotate_clockwise
from orchestrator.stages.sink import open_existing
from orchestrator.stages.sources import decode_for_display, identity, load_page
from orchestrator.types import PageRef

# label -> RGB; unknown labels get a colour from PALETTE by hash.
LABEL_COLOURS: dict[str, tuple[int, int, int]] = {
    "title": (214, 39, 40),
    "text": (31, 119, 180),
    "table": (44, 160, 44),
    "table_caption": (152, 223, 138),
    "figure": (255, 127, 14),
    "figure_caption": (255, 187, 120),
    "caption": (255, 187, 120),
    "equation": (148, 103, 189),
    "formula": (148, 103, 189),
    "reference": (140, 86, 75),
    "header": (127, 127, 127),
    "footer": (127, 127, 127),
}
PALETTE = ((23, 190, 207), (188, 189, 34), (227, 119, 194), (197, 176, 213), (196, 156, 148))


def _colour(label: str) -> tuple[int, int, int]:
    return LABEL_COLOURS.get(label) or PALETTE[sum(label.encode()) % len(PALETTE)]


def _open(db: Path) -> Any:
    return open_existing(Path(db))


def resolve_page(db: Path, spec: str) -> tuple[str, int]:
    """``"N"`` (1-based, in export order) or ``"SOURCE#N"`` -> (source identity, page).

    SOURCE may be the stored identity, a path that resolves to it, or a unique suffix of
    it (e.g. the file name).
    """
    conn = _open(db)
    try:
        text = spec.strip()
        if text.isdigit():
            n = int(text)
            total = conn.execute("SELECT COUNT(*) FROM pages").fetchone()[0]
            if not 1 <= n <= total:
                raise SourceError(f"page {n} is out of range: the database has {total} page(s)")
            row = conn.execute(
                "SELECT d.source, p.page FROM documents d JOIN pages p ON p.document_id = d.id "
                "ORDER BY d.source, p.page LIMIT 1 OFFSET ?",
                (n - 1,),
            ).fetchone()
            return str(row[0]), int(row[1])
        source_spec, sep, page_text = text.rpartition("#")
        if not sep or not page_text.strip().isdigit() or not source_spec:
            raise SourceError(f"page {spec!r} is neither a number nor SOURCE#N")
        page = int(page_text)
        source = _match_source(conn, source_spec)
        found = conn.execute(
            "SELECT 1 FROM pages p JOIN documents d ON d.id = p.document_id "
            "WHERE d.source = ? AND p.page = ?",
            (source, page),
        ).fetchone()
        if found is None:
            raise SourceError(f"{source} has no stored page {page}")
        return source, page
    finally:
        conn.close()


def _match_source(conn: Any, spec: str) -> str:
    candidates = [spec, identity(spec)]
    for candidate in candidates:
        if conn.execute("SELECT 1 FROM documents WHERE source = ?", (candidate,)).fetchone():
            return candidate
    tail = spec.replace("\\", "/").lstrip("/")
    matches = [
        s
        for (s,) in conn.execute("SELECT source FROM documents ORDER BY source")
        if s == tail or s.endswith(os.sep + tail)
    ]
    if len(matches) == 1:
        return str(matches[0])
    if not matches:
        raise SourceError(f"no document {spec!r} in the database")
    raise SourceError(
        f"{spec!r} matches {len(matches)} documents: " + ", ".join(matches[:5])
    )


def _stored(conn: Any, source: str, page: int) -> tuple[Any, list[Any], dict[str, Any] | None]:
    row = conn.execute(
        "SELECT p.id, p.width, p.height, p.status, p.error, r.config, p.rotation FROM pages p "
        "JOIN documents d ON d.id = p.document_id LEFT JOIN runs r ON r.id = p.run_id "
        "WHERE d.source = ? AND p.page = ?",
        (source, page),
    ).fetchone()
    if row is None:
        raise SourceError(f"{source} has no stored page {page}")
    regions = conn.execute(
        "SELECT idx, label, x0, y0, x1, y1 FROM regions WHERE page_id = ? ORDER BY idx", (row[0],)
    ).fetchall()
    config = json.loads(row[5]) if row[5] else None
    return row, regions, config


def stored_page_pixels(source: str, page: int, rotation: int, run_config: dict[str, Any] | None,
                       cfg: SourceConfig) -> Any:
    """A stored page read again from its source as the run that wrote it saw it: at that
    run's DPI, turned upright as the decode stage turned it (HWC uint8 BGR)."""
    dpi = (run_config or {}).get("sources", {}).get("dpi")
    if isinstance(dpi, int | float) and dpi > 0:
        cfg = dataclasses.replace(cfg, dpi=int(dpi))
    return rotate_clockwise(decode_for_display(load_page(PageRef(source, page), cfg)), rotation)


def render_page(
    db: Path, source: str | None, page: int, out: Path, cfg: SourceConfig
) -> Path:
    """Draw a stored page and its regions into a PNG at ``out``; returns ``out``.

    ``source`` None: ``page`` is the 1-based page number in export order.
    """
    from PIL import Image, ImageDraw, ImageFont

    if source is None:
        source, page = resolve_page(db, str(page))
    conn = _open(db)
    try:
        (_, width, height, status, error, _, rotation), regions, config = _stored(
            conn, source, page
        )
    finally:
        conn.close()
    pixels = stored_page_pixels(source, page, rotation, config, cfg)
    image = Image.fromarray(pixels[:, :, ::-1].copy()).convert("RGB")
    # Boxes are in the page pixels recorded at write time; rescale if the image differs.
    sx = image.width / width if width else 1.0
    sy = image.height / height if height else 1.0
    draw = ImageDraw.Draw(image)
    line = max(2, round(max(image.size) / 800))
    font_size = max(12, round(max(image.size) / 90))
    font = ImageFont.load_default(size=font_size)
    for idx, label, x0, y0, x1, y1 in regions:
        colour = _colour(label)
        box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
        draw.rectangle(box, outline=colour, width=line)
        tag = f"{idx} {label}"
        left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)
        tx, ty = box[0], max(0.0, box[1] - (bottom - top) - 2 * line)
        pad = 2 * line
        draw.rectangle((tx, ty, tx + right - left + pad, ty + bottom - top + pad), fill=colour)
        draw.text((tx + line - left, ty + line - top), tag, fill=(255, 255, 255), font=font)
    if status != "ok":
        draw.text((10, 10), f"error: {error}", fill=(214, 39, 40), font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG")
    return out
