"""Request bodies for ``folio_layout`` from a folder of real pages.

Image files are sent as they are; each PDF page is rendered with pypdfium2 (at ``dpi``,
200 by default, as the pipeline renders) and PNG-encoded. Used by the Triton tests and
the load generators in ``perf/`` so that every measurement sends the same bytes.

Usage::

    for name, data in page_requests(Path("../shared/corpus/pages")):
        ...   # name "multipage.pdf#3", data: PNG bytes
"""

from __future__ import annotations

import io
from pathlib import Path

from orchestrator.config import DEFAULT_DPI, DEFAULT_IMAGE_EXTENSIONS

PNG_COMPRESS_LEVEL = 1


def render_pdf(path: Path, dpi: int = DEFAULT_DPI) -> list[tuple[str, bytes]]:
    """Every page of a PDF as (``name#page``, PNG bytes), rendered at ``dpi``."""
    import pypdfium2 as pdfium

    pages: list[tuple[str, bytes]] = []
    pdf = pdfium.PdfDocument(str(path))
    try:
        for index in range(len(pdf)):
            page = pdf[index]
            image = page.render(scale=dpi / 72.0).to_pil().convert("RGB")
            buf = io.BytesIO()
            image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
            pages.append((f"{path.name}#{index + 1}", buf.getvalue()))
            page.close()
    finally:
        pdf.close()
    return pages


def page_requests(folder: Path, dpi: int = DEFAULT_DPI) -> list[tuple[str, bytes]]:
    """(name, encoded bytes) for every image and PDF page in ``folder``, sorted by name."""
    out: list[tuple[str, bytes]] = []
    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if suffix == ".pdf":
            out.extend(render_pdf(path, dpi))
        elif suffix in DEFAULT_IMAGE_EXTENSIONS:
            out.append((path.name, path.read_bytes()))
    return out
