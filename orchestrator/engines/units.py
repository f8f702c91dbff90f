"""Units: the pieces a distributed run cuts its documents into, read and written whole.

A unit is a run of consecutive pages of one document:

- an image file: all its pages (one; a multi-frame TIFF: every frame);
- a PDF: pages ``first..last``, at most ``ray.unit_pages`` of them;
- a Parquet shard: whole row groups, as many as fit in ``ray.unit_pages`` rows (at least
  one), so a unit reads only its own row groups;
- an Arrow shard: rows ``first..last``, at most ``ray.unit_pages``;
- a path that yields no page (missing, unsupported, an empty folder): page 1, an error.

A unit's output is one Parquet file named after the document and the range
(``unit_name``), so the name says which pages it holds and a re-run finds it. Reading a
unit yields exactly its pages, in order, each once: a page the source fails to produce
becomes an error page, never a gap, so every unit ends complete.

Documents are local paths (the same ``orchestrator.stages.sources`` classes as the in-process
pipeline read them) or objects in a store (``orchestrator.engines.storage``): PDFs and shards are
read in place with ranged reads, image files are fetched whole.

Usage::

    documents, skipped = list_documents(["scans/", "s3://bucket/books/"], cfg.sources)
    units = [u for d in documents for u in plan_units(d, cfg.sources, cfg.ray.unit_pages)]
    for page in read_unit(units[0], cfg.sources):     # EncodedPage, first..last
        ...
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from orchestrator.config import SourceConfig
from orchestrator.engines import storage
from orchestrator.errors import SourceError
from orchestrator.output.export import safe_stem
from orchestrator.stages.sources import (
    TIFF_EXTENSIONS,
    ArrowShardSource,
    ErrorSource,
    ImageFileSource,
    PageSource,
    ParquetShardSource,
    PdfSource,
    _kind,
    open_sources,
    sniff_bytes,
    source_for,
)
from orchestrator.types import EncodedPage, PageRef

KINDS = ("image", "pdf", "parquet", "arrow", "error")


@dataclass(frozen=True, slots=True)
class Document:
    """One input document: its identity (absolute path or URI) and kind."""

    source: str
    kind: str  # one of KINDS
    error: str | None = None  # kind "error": why it yields no page


@dataclass(frozen=True, slots=True)
class Unit:
    """Pages ``first..last`` (1-based, inclusive) of one document."""

    source: str
    kind: str
    first: int
    last: int
    error: str | None = None

    @property
    def pages(self) -> int:
        return self.last - self.first + 1

    @property
    def name(self) -> str:
        return unit_name(self.source, self.first, self.last)

    def holds(self, ref: PageRef) -> bool:
        return ref.source == self.source and self.first <= ref.page <= self.last


def unit_name(source: str, first: int, last: int) -> str:
    """The output file name of pages ``first..last`` of ``source``: readable stem, a digest
    of the full identity (two ``scan.pdf`` in different folders differ), the range."""
    digest = hashlib.sha1(source.encode("utf-8")).hexdigest()[:12]
    return f"{safe_stem(source)}-{digest}.p{first:06d}-{last:06d}.parquet"


# ---------------------------------------------------------------------------- listing


def list_documents(paths: Sequence[str | Path], cfg: SourceConfig) -> tuple[list[Document], int]:
    """Every document under ``paths`` (files, folders, URIs of objects or prefixes), and
    how many files were skipped (unknown type, hidden). Local paths are opened exactly as
    the in-process pipeline opens them."""
    if not paths:
        raise SourceError("no input paths given")
    local = [p for p in paths if not storage.is_uri(p)]
    documents: list[Document] = []
    skipped = 0
    if local:
        opened = open_sources(local, cfg)
        documents.extend(_document(s) for s in opened)
        skipped += opened.skipped_files
    seen: set[str] = set()
    for uri in (str(p) for p in paths if storage.is_uri(p)):
        found, n = _list_remote(uri, cfg)
        documents.extend(d for d in found if d.source not in seen)
        seen.update(d.source for d in found)
        skipped += n
    return documents, skipped


def _document(src: PageSource) -> Document:
    if isinstance(src, ErrorSource):
        return Document(src.source, "error", src.message)
    kinds: tuple[tuple[type, str], ...] = (
        (PdfSource, "pdf"), (ParquetShardSource, "parquet"), (ArrowShardSource, "arrow"),
        (ImageFileSource, "image"))
    for cls, kind in kinds:
        if isinstance(src, cls):
            return Document(src.source, kind)
    raise SourceError(f"no unit reader for {type(src).__name__}")  # pragma: no cover


def _list_remote(uri: str, cfg: SourceConfig) -> tuple[list[Document], int]:
    """A stored object or every object under a prefix, in name order, hidden ones skipped."""
    fs, path = storage.filesystem(uri)
    fs.invalidate_cache()  # a re-run must see objects written since
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return [Document(uri, "error", f"file not found: {uri}")], 0
    except OSError as exc:
        return [Document(uri, "error", f"cannot list {uri}: {exc}")], 0
    if info.get("type") != "directory":
        kind = _kind(Path(path), cfg, sniff=False)
        if kind is None:
            kind = sniff_bytes(fs.cat_file(path, start=0, end=16))
        if kind is None:
            return [Document(uri, "error", f"unsupported file type: {uri}")], 0
        return [Document(fs.unstrip_protocol(path), kind)], 0
    found: list[Document] = []
    skipped = 0
    root = path.rstrip("/")
    for name in sorted(fs.find(root)):
        relative = name[len(root):].strip("/").split("/")
        if any(part.startswith(".") for part in relative[:-1]):
            continue  # a hidden folder is not entered (as in a local walk)
        kind = None if relative[-1].startswith(".") else _kind(
            Path(name), cfg, sniff=False)
        if kind is None:
            skipped += 1
        else:
            found.append(Document(fs.unstrip_protocol(name), kind))
    if not found:
        return [Document(uri, "error", f"no images or PDFs found in {uri}")], skipped
    return found, skipped


# ---------------------------------------------------------------------------- planning


def plan_units(doc: Document, cfg: SourceConfig, unit_pages: int) -> list[Unit]:
    """The units of one document (none for a PDF or shard without pages)."""
    if doc.kind == "error":
        return [Unit(doc.source, "error", 1, 1, doc.error)]
    if doc.kind == "image" and PurePosixPath(doc.source).suffix.lower() not in TIFF_EXTENSIONS:
        return [Unit(doc.source, doc.kind, 1, 1)]  # one page, known without reading it
    with open_document(doc, cfg) as src:
        if doc.kind == "parquet":
            groups = _row_groups(src)
            if groups is None:  # unreadable: reading it yields the error as page 1
                return [Unit(doc.source, doc.kind, 1, 1)]
            return _group_runs(doc, groups, unit_pages)
        count = int(src.count_pages())  # type: ignore[attr-defined]
    if doc.kind == "image":  # a TIFF's frames stay together: one file, read once
        return [Unit(doc.source, doc.kind, 1, count)]
    return [Unit(doc.source, doc.kind, first, min(first + unit_pages - 1, count))
            for first in range(1, count + 1, unit_pages)]


def _row_groups(src: Any) -> list[int] | None:
    try:
        pf = src._open()
        return [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
    except Exception:  # any failure is reported when the unit is read
        return None


def _group_runs(doc: Document, groups: list[int], unit_pages: int) -> list[Unit]:
    """Consecutive row groups, as many as fit in ``unit_pages`` rows (at least one)."""
    units: list[Unit] = []
    first = row = 1
    for rows in groups:
        if rows == 0:
            continue
        if row > first and row - first + rows > unit_pages:
            units.append(Unit(doc.source, doc.kind, first, row - 1))
            first = row
        row += rows
    if row > first:
        units.append(Unit(doc.source, doc.kind, first, row - 1))
    return units


# ---------------------------------------------------------------------------- reading


def read_unit(unit: Unit, cfg: SourceConfig) -> Iterator[EncodedPage]:
    """Pages ``unit.first..unit.last`` in order, each exactly once; a page its source
    did not produce (a shard that broke off, a PDF that could not be reopened) is an error
    page naming why."""
    expected = unit.first
    reason = "the source ended before this page"
    doc = Document(unit.source, unit.kind, unit.error)
    try:
        with open_document(doc, cfg) as src:
            for page in src.pages(skip=lambda ref: not unit.holds(ref)):
                number = page.ref.page
                if number < expected or not unit.holds(page.ref):
                    continue
                while expected < number:  # pages the source skipped over
                    yield EncodedPage(PageRef(unit.source, expected), error=reason)
                    expected += 1
                yield page
                expected += 1
                if page.error is not None:
                    reason = f"not read after page {number}: {page.error}"
    except SourceError as exc:
        reason = str(exc)
    while expected <= unit.last:
        yield EncodedPage(PageRef(unit.source, expected), error=reason)
        expected += 1


@contextlib.contextmanager
def open_document(doc: Document, cfg: SourceConfig) -> Iterator[PageSource]:
    """The page source of a document: the in-process pipeline's classes, reading stored
    objects through ``orchestrator.engines.storage``."""
    if doc.kind == "error":
        yield ErrorSource(doc.source, doc.error or "no page")
        return
    if not storage.is_uri(doc.source):
        yield source_for(doc.source, cfg)
        return
    if doc.kind == "pdf":
        yield StoredPdf(Path(doc.source), doc.source, cfg)
    elif doc.kind == "parquet":
        yield StoredParquet(Path(doc.source), doc.source, cfg)
    elif doc.kind == "arrow":
        yield StoredArrow(Path(doc.source), doc.source, cfg)
    else:
        # Images are fetched whole (they are small, and PIL reads a TIFF's later frames
        # from a file): into a temporary file read by the local class, then deleted.
        suffix = PurePosixPath(doc.source).suffix
        with tempfile.TemporaryDirectory(prefix="folio-") as folder:
            local = Path(folder) / f"page{suffix}"
            try:
                local.write_bytes(storage.read_bytes(doc.source))
            except FileNotFoundError:
                yield ErrorSource(doc.source, f"file not found: {doc.source}")
                return
            except OSError as exc:
                yield ErrorSource(doc.source, f"cannot read file: {exc}")
                return
            yield ImageFileSource(local, doc.source, cfg)


class StoredPdf(PdfSource):
    """A PDF in a store, read by PDFium through a block-cached file object: a page range
    fetches the cross-reference table and its own pages' objects, not the whole file."""

    def _document_input(self) -> tuple[Any, int]:
        try:
            fh = storage.open_input(self.source)
        except SourceError as exc:
            raise OSError(str(exc)) from exc
        return fh, int(fh.size)


class StoredParquet(ParquetShardSource):
    """A Parquet shard in a store: footer and row groups read by ranged requests."""

    def _parquet_file(self) -> Any:
        import pyarrow.parquet as pq

        return pq.ParquetFile(storage.open_input(self.source))


class StoredArrow(ArrowShardSource):
    """An Arrow IPC shard in a store, read through a block-cached file object."""

    def _input(self) -> Any:
        import pyarrow as pa

        return pa.PythonFile(storage.open_input(self.source), mode="r")
