"""Page sources: files, folders, PDFs and Arrow/Parquet shards -> ``EncodedPage``.

Every source yields pages one at a time, in a stable order, and never raises for a bad
input: a missing path, an unreadable file, a corrupt PDF or an over-sized page becomes an
``EncodedPage`` with ``error`` set, and the run goes on.

- Image files (JPEG, PNG, TIFF, WebP, JPEG 2000, BMP) yield their raw bytes, undecoded;
  decoding (and the header pixel-limit check) is the decode stage's job. A multi-frame
  TIFF is one page per frame: frame 1 as raw bytes, later frames decoded here to BGR
  pixels (after a header pixel-limit check), since no decoder reads frame N from bytes.
- PDFs are rendered lazily with pypdfium2 at ``sources.dpi``: open -> (per page) size
  check -> render -> copy to a BGR array -> close bitmap and page -> yield. Memory is one
  page at a time whatever the page count. ``/Rotate`` is honoured by PDFium.
- Arrow IPC (file and stream format, memory-mapped) and Parquet (row group by row group)
  shards with an image column stored as ``struct<bytes: binary, path: string>`` (the
  Hugging Face ``datasets`` Image feature) or plain binary: encoded bytes are sliced from
  the column's buffers, no decoding, no temp files. Page = row + 1.
- Folders are walked recursively; files are taken by extension, in the order of their
  identity strings (the order ``export`` uses), hidden files are skipped.

Usage::

    sources = open_sources(["scans/", "book.pdf", "train-00000.parquet"], cfg.sources)
    for page in sources.pages(skip=lambda ref: ref in done):
        ...
    page = load_page(PageRef("/abs/book.pdf", 12), cfg.sources)   # one page again

PDFium is not thread-safe: every pypdfium2 call here runs under one module lock, so
sources and ``load_page`` may be used from several threads.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from orchestrator.config import SourceConfig
from orchestrator.errors import SourceError
from orchestrator.types import EncodedPage, PageRef

Skip = Callable[[PageRef], bool]

SHARD_EXTENSIONS = (".arrow", ".parquet")
TIFF_EXTENSIONS = (".tif", ".tiff")
PDF_REOPEN_PAGES = 64  # a PDF is closed and reopened after this many rendered pages
# After this many pages in a row that PDFium cannot load, later pages are probed
# (PDF_PROBE_PAGES of them, evenly spread, the last included); when none of them loads,
# the rest of the document is one error page instead of one per page: a page tree whose
# /Count says 1,000,000 over one real page would otherwise give 999,999 error rows.
PDF_LOAD_FAILURES_BEFORE_PROBE = 8
PDF_PROBE_PAGES = 64
PARQUET_BATCH_ROWS = 64  # rows decoded at a time from a Parquet row group
POINTS_PER_INCH = 72.0

# One lock for every PDFium call in the process (PDFium has global state).
_PDFIUM_LOCK = threading.RLock()

_LOAD_FAILED = "cannot load page"
_ARROW_FILE_MAGIC = b"ARROW1"
_ARROW_STREAM_MAGIC = b"\xff\xff\xff\xff"
_PARQUET_MAGIC = b"PAR1"
_IMAGE_MAGICS: tuple[bytes, ...] = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"II*\x00",  # TIFF little-endian
    b"MM\x00*",  # TIFF big-endian
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000 (jp2)
    b"\xffO\xffQ",  # JPEG 2000 codestream (j2k)
    b"BM",
)


@runtime_checkable
class PageSource(Protocol):
    """One document: yields its pages in order, skipping (not reading) done ones."""

    source: str

    def pages(self, skip: Skip | None = None) -> Iterator[EncodedPage]: ...


def identity(path: str | Path) -> str:
    """The identity string of a document: its absolute, normalised path.

    ``os.path.realpath`` gives what ``Path.resolve()`` gives, but a symlink loop comes back
    as a path instead of a RuntimeError, so it can become an error page like any
    unreadable file.
    """
    return os.path.realpath(os.path.expanduser(str(path)))


def _error(source: str, page: int, message: str, read_s: float = 0.0) -> EncodedPage:
    return EncodedPage(PageRef(source, page), error=message, read_s=read_s)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


# ---------------------------------------------------------------------------- errors


class ErrorSource:
    """A path that yields no real page: one error page (missing path, empty folder...)."""

    def __init__(self, source: str, message: str) -> None:
        self.source = source
        self.message = message

    def pages(self, skip: Skip | None = None) -> Iterator[EncodedPage]:
        ref = PageRef(self.source, 1)
        if skip is None or not skip(ref):
            yield EncodedPage(ref, error=self.message)

    def load(self, page: int) -> EncodedPage:
        return _error(self.source, page, self.message)

    def count_pages(self) -> int:
        return 1


# ---------------------------------------------------------------------------- images


class ImageFileSource:
    """One image file: one page of raw encoded bytes (TIFF: one page per frame)."""

    def __init__(self, path: Path, source: str, cfg: SourceConfig) -> None:
        self.path = path
        self.source = source
        self._cfg = cfg
        self._tiff = path.suffix.lower() in TIFF_EXTENSIONS

    def pages(self, skip: Skip | None = None) -> Iterator[EncodedPage]:
        first = PageRef(self.source, 1)
        if skip is None or not skip(first):
            yield self.load(1)
        if not self._tiff:
            return
        frames = self._tiff_frames()
        for page in range(2, frames + 1):
            if skip is None or not skip(PageRef(self.source, page)):
                yield self.load(page)

    def load(self, page: int) -> EncodedPage:
        start = time.perf_counter()
        if page == 1:
            try:
                data = self.path.read_bytes()
            except OSError as exc:
                return _error(self.source, 1, f"cannot read file: {_reason(exc)}")
            elapsed = time.perf_counter() - start
            if not data:
                return _error(self.source, 1, "file is empty (0 bytes)", elapsed)
            return EncodedPage(PageRef(self.source, 1), data=data, read_s=elapsed)
        return self._tiff_frame(page, start)

    def count_pages(self) -> int:
        return self._tiff_frames() if self._tiff else 1

    def _tiff_frames(self) -> int:
        from PIL import Image

        try:
            with Image.open(self.path) as img:
                return int(getattr(img, "n_frames", 1))
        except Exception:  # frame 1 (bytes) reports the real error later
            return 1

    def _tiff_frame(self, page: int, start: float) -> EncodedPage:
        from PIL import Image

        ref = PageRef(self.source, page)
        try:
            with Image.open(self.path) as img:
                frames = int(getattr(img, "n_frames", 1))
                if page > frames:
                    return EncodedPage(ref, error=f"file has {frames} frame(s), no page {page}")
                img.seek(page - 1)
                width, height = img.size
                if width * height > self._cfg.max_pixels:
                    return EncodedPage(
                        ref,
                        error=f"frame is {width} x {height} px, over the limit of "
                        f"{self._cfg.max_pixels} pixels (sources.max_pixels)",
                    )
                pixels = pil_to_bgr(img)
        except Exception as exc:  # a bad frame is an error page, not a crash
            return EncodedPage(ref, error=f"cannot read TIFF frame {page}: {_reason(exc)}")
        return EncodedPage(ref, pixels=pixels, read_s=time.perf_counter() - start)


def pil_to_bgr(img: Any) -> np.ndarray:
    """A PIL image of any mode (palette, 1-bit, 16-bit, CMYK, alpha) -> HWC uint8 BGR."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = float(arr.max()) or 1.0
        gray = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        from PIL import Image

        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    rgb = np.asarray(img.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


# ---------------------------------------------------------------------------- PDFs


class PdfSource:
    """A PDF rendered lazily, one page at a time, at ``cfg.dpi``; BGR pixels out."""

    def __init__(self, path: Path, source: str, cfg: SourceConfig) -> None:
        self.path = path
        self.source = source
        self._cfg = cfg
        self.scale = cfg.dpi / POINTS_PER_INCH

    def pages(self, skip: Skip | None = None) -> Iterator[EncodedPage]:
        start = time.perf_counter()
        pdf, problem = self._open()
        if pdf is None:
            if skip is None or not skip(PageRef(self.source, 1)):
                yield _error(self.source, 1, problem, time.perf_counter() - start)
            return
        try:
            with _PDFIUM_LOCK:
                count = len(pdf)
            rendered = 0
            load_failures = 0
            for index in range(count):
                ref = PageRef(self.source, index + 1)
                if skip is not None and skip(ref):
                    continue
                if load_failures >= PDF_LOAD_FAILURES_BEFORE_PROBE:
                    if not self._any_loads(pdf, range(index, count)):
                        yield _error(
                            self.source, index + 1,
                            f"pages {index + 1}-{count} not read: the PDF declares {count} "
                            f"pages, but the last {load_failures} did not load and none of "
                            f"the later pages probed loads (a wrong /Count or a damaged "
                            f"page tree)",
                        )
                        return
                    load_failures = 0
                if rendered and rendered % PDF_REOPEN_PAGES == 0:
                    # PDFium keeps every object it parsed (image streams included) until
                    # the document closes: ~page-size bytes per page, 0.7 GB over a
                    # 4000-page scan. Reopening bounds it.
                    with _PDFIUM_LOCK:
                        pdf.close()
                    pdf, problem = self._open()
                    if pdf is None:
                        yield _error(self.source, index + 1, problem)
                        return
                rendered += 1
                # Render and release under the lock; yield with no page object alive.
                page = self._render(pdf, index)
                failed_load = (page.error or "").startswith(_LOAD_FAILED)
                load_failures = load_failures + 1 if failed_load else 0
                yield page
        finally:
            if pdf is not None:
                with _PDFIUM_LOCK:
                    pdf.close()

    def load(self, page: int) -> EncodedPage:
        pdf, problem = self._open()
        if pdf is None:
            return _error(self.source, page, problem)
        try:
            with _PDFIUM_LOCK:
                count = len(pdf)
            if not 1 <= page <= count:
                return _error(self.source, page, f"PDF has {count} page(s), no page {page}")
            return self._render(pdf, page - 1)
        finally:
            with _PDFIUM_LOCK:
                pdf.close()

    def count_pages(self) -> int:
        pdf, _ = self._open()
        if pdf is None:
            return 1
        with _PDFIUM_LOCK:
            try:
                return len(pdf)
            finally:
                pdf.close()

    def _document_input(self) -> tuple[Any, int]:
        """What PDFium opens (the path; a seekable file object for a stored object) and
        its size in bytes. Raises OSError when it cannot be read."""
        return self.path, self.path.stat().st_size

    def _open(self) -> tuple[Any, str]:
        import pypdfium2 as pdfium

        try:
            data, size = self._document_input()
        except OSError as exc:
            return None, f"cannot read file: {_reason(exc)}"
        if size == 0:
            _close_input(data)
            return None, "file is empty (0 bytes)"
        with _PDFIUM_LOCK:
            try:
                pdf = pdfium.PdfDocument(data, autoclose=True)
            except (pdfium.PdfiumError, OSError, ValueError) as exc:
                _close_input(data)
                return None, f"cannot open PDF: {_reason(exc)}"
            # Filled-in form fields are drawn only with forms initialised; optional.
            with contextlib.suppress(Exception):
                pdf.init_forms()
        return pdf, ""

    @staticmethod
    def _any_loads(pdf: Any, indices: range) -> bool:
        """Whether any of up to PDF_PROBE_PAGES pages spread over ``indices`` (the last
        one included) loads."""
        n = len(indices)
        picks = sorted({indices[(k * (n - 1)) // max(1, PDF_PROBE_PAGES - 1)]
                        for k in range(min(n, PDF_PROBE_PAGES))} | {indices[-1]})
        with _PDFIUM_LOCK:
            for index in picks:
                try:
                    page = pdf[index]
                except Exception:  # PdfiumError: "Failed to load page."
                    continue
                page.close()
                return True
        return False

    def _render(self, pdf: Any, index: int) -> EncodedPage:
        start = time.perf_counter()
        ref = PageRef(self.source, index + 1)
        dpi = self._cfg.dpi
        page = bitmap = None
        try:
            with _PDFIUM_LOCK:
                try:
                    page = pdf[index]
                except Exception as exc:  # PdfiumError: no such page object
                    return EncodedPage(ref, error=f"{_LOAD_FAILED}: {_reason(exc)}",
                                       read_s=time.perf_counter() - start)
                # PDFium's width/height already account for /Rotate; render() uses the
                # same ceil(size * scale) rule.
                width_pt, height_pt = page.get_size()
                width = int(np.ceil(width_pt * self.scale))
                height = int(np.ceil(height_pt * self.scale))
                if width < 1 or height < 1:
                    return EncodedPage(
                        ref,
                        error=f"page has no area ({width_pt:.1f} x {height_pt:.1f} pt)",
                        read_s=time.perf_counter() - start,
                    )
                if width * height > self._cfg.max_pixels:
                    return EncodedPage(
                        ref,
                        error=f"page is {width} x {height} px at {dpi} dpi, over the limit "
                        f"of {self._cfg.max_pixels} pixels (sources.max_pixels)",
                        read_s=time.perf_counter() - start,
                    )
                bitmap = page.render(scale=self.scale)
                raw = bitmap.to_numpy()
                if raw.ndim == 2:
                    raw = raw[:, :, None].repeat(3, axis=2)
                pixels = np.ascontiguousarray(raw[:, :, :3])  # a copy: bitmap is freed below
        except Exception as exc:  # one bad page must not stop the document
            return EncodedPage(
                ref, error=f"cannot render page: {_reason(exc)}", read_s=time.perf_counter() - start
            )
        finally:
            with _PDFIUM_LOCK:
                if bitmap is not None:
                    bitmap.close()
                if page is not None:
                    page.close()
        return EncodedPage(ref, pixels=pixels, read_s=time.perf_counter() - start)


def _close_input(data: Any) -> None:
    """Close a file object PDFium was to read (a path needs nothing)."""
    close = getattr(data, "close", None)
    if callable(close):
        close()


# ---------------------------------------------------------------------------- shards


def _binary_cells(column: Any, image_column: str) -> tuple[Any, Any]:
    """(bytes array, path array or None) of an image column chunk, nulls preserved."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    kind = column.type
    if pa.types.is_struct(kind):
        names = [kind.field(i).name for i in range(kind.num_fields)]
        if "bytes" not in names:
            raise SourceError(f"column {image_column!r} is a struct without a 'bytes' field")
        data = pc.struct_field(column, [names.index("bytes")])
        paths = pc.struct_field(column, [names.index("path")]) if "path" in names else None
        return data, paths
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return column, None
    raise SourceError(
        f"column {image_column!r} is {kind}, not struct<bytes, path> or binary "
        "(sources.image_column)"
    )


def _timed(batches: Iterator[Any]) -> Iterator[tuple[Any, float]]:
    """Each batch with the seconds it took to read (decode, for Parquet)."""
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        yield batch, time.perf_counter() - start


def _iter_cells(
    data: Any, paths: Any, source: str, first_row: int, skip: Skip | None, batch_s: float = 0.0
) -> Iterator[EncodedPage]:
    """Yield one EncodedPage per row of a binary array, slicing its buffers directly.

    ``read_s`` of a page: its share of the batch's read time plus its own copy.
    """
    import pyarrow as pa

    start = time.perf_counter()
    n = len(data)
    if n == 0:
        return
    large = pa.types.is_large_binary(data.type)
    buffers = data.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64 if large else np.int32)
    offsets = offsets[data.offset : data.offset + n + 1]
    body = memoryview(buffers[2]) if buffers[2] is not None else memoryview(b"")
    valid = (
        np.ones(n, dtype=bool)
        if data.null_count == 0
        else np.asarray(data.is_valid().to_numpy(zero_copy_only=False))
    )
    bounds = offsets.tolist()
    flags = valid.tolist()
    per_row = (batch_s + time.perf_counter() - start) / n
    clock = time.perf_counter
    for i in range(n):
        ref = PageRef(source, first_row + i + 1)
        if skip is not None and skip(ref):
            continue
        lo, hi = bounds[i], bounds[i + 1]
        if not flags[i] or hi == lo:
            where = ""
            if paths is not None and paths[i].is_valid:
                where = f" (image.path = {paths[i].as_py()!r})"
            yield EncodedPage(ref, error=f"row {first_row + i} has no image bytes{where}")
            continue
        copy_start = clock()
        cell = body[lo:hi].tobytes()
        yield EncodedPage(ref, data=cell, read_s=per_row + clock() - copy_start)


class ArrowShardSource:
    """An Arrow IPC shard (file or stream format), memory-mapped; one page per row."""

    def __init__(self, path: Path, source: str, cfg: SourceConfig) -> None:
        self.path = path
        self.source = source
        self._column = cfg.image_column

    def _input(self) -> Any:
        """The shard as a seekable pyarrow file (here memory-mapped)."""
        import pyarrow as pa

        return pa.memory_map(str(self.path), "r")

    def _batches(self) -> Iterator[Any]:
        import pyarrow as pa

        with self._input() as mapped:
            head = mapped.read(8)
            mapped.seek(0)
            if head.startswith(_ARROW_FILE_MAGIC):
                reader = pa.ipc.open_file(mapped)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
            else:
                yield from pa.ipc.open_stream(mapped)

    def pages(self, skip: Skip | None = None) -> Iterator[EncodedPage]:
        row = 0
        try:
            for batch, batch_s in _timed(self._batches()):
                data, paths = _binary_cells(self._image(batch), self._column)
                yield from _iter_cells(data, paths, self.source, row, skip, batch_s)
                row += batch.num_rows
        except Exception as exc:  # a broken shard: error page, run goes on
            page = row + 1
            if skip is None or not skip(PageRef(self.source, page)):
                yield _error(self.source, page, f"cannot read Arrow shard: {_reason(exc)}")

    def load(self, page: int) -> EncodedPage:
        row = 0
        try:
            for batch in self._batches():
                if row + batch.num_rows >= page:
                    cell = batch.slice(page - 1 - row, 1)
                    data, paths = _binary_cells(self._image(cell), self._column)
                    return next(_iter_cells(data, paths, self.source, page - 1, None))
                row += batch.num_rows
        except Exception as exc:
            return _error(self.source, page, f"cannot read Arrow shard: {_reason(exc)}")
        return _error(self.source, page, f"shard has {row} row(s), no page {page}")

    def count_pages(self) -> int:
        try:
            return sum(batch.num_rows for batch in self._batches())
        except Exception:
            return 1

    def _image(self, batch: Any) -> Any:
        index = batch.schema.get_field_index(self._column)
        if index < 0:
            raise SourceError(
                f"no column {self._column!r} (sources.image_column); "
                f"columns: {', '.join(batch.schema.names)}"
            )
        return batch.column(index)


class ParquetShardSource:
    """A Parquet shard read row group by row group (image column only); page = row + 1.

    Within a row group, rows are decoded ``PARQUET_BATCH_ROWS`` at a time: memory stays at
    a few dozen pages whatever the row-group size, and small batches decode faster (the
    buffers are reused instead of faulting in a fresh row-group-sized allocation).
    """

    def __init__(self, path: Path, source: str, cfg: SourceConfig) -> None:
        self.path = path
        self.source = source
        self._column = cfg.image_column

    def _parquet_file(self) -> Any:
        """The shard opened for reading (here memory-mapped)."""
        import pyarrow.parquet as pq

        return pq.ParquetFile(str(self.path), memory_map=True)

    def _open(self) -> Any:
        pf = self._parquet_file()
        if self._column not in pf.schema_arrow.names:
            raise SourceError(
                f"no column {self._column!r} (sources.image_column); "
                f"columns: {', '.join(pf.schema_arrow.names)}"
            )
        return pf

    def _batches(self, pf: Any, group: int) -> Iterator[Any]:
        return iter(
            pf.iter_batches(
                batch_size=PARQUET_BATCH_ROWS, row_groups=[group], columns=[self._column]
            )
        )

    def pages(self, skip: Skip | None = None) -> Iterator[EncodedPage]:
        row = 0
        try:
            pf = self._open()
            for group in range(pf.num_row_groups):
                rows = pf.metadata.row_group(group).num_rows
                if skip is not None and all(
                    skip(PageRef(self.source, row + i + 1)) for i in range(rows)
                ):
                    row += rows  # whole row group done: not even read
                    continue
                first = row
                for batch, batch_s in _timed(self._batches(pf, group)):
                    data, paths = _binary_cells(batch.column(0), self._column)
                    yield from _iter_cells(data, paths, self.source, first, skip, batch_s)
                    first += batch.num_rows
                row += rows
        except Exception as exc:  # a broken shard: error page, run goes on
            page = row + 1
            if skip is None or not skip(PageRef(self.source, page)):
                yield _error(self.source, page, f"cannot read Parquet shard: {_reason(exc)}")

    def load(self, page: int) -> EncodedPage:
        row = 0
        try:
            pf = self._open()
            for group in range(pf.num_row_groups):
                rows = pf.metadata.row_group(group).num_rows
                if row + rows >= page:
                    for batch in self._batches(pf, group):
                        if row + batch.num_rows >= page:
                            cell = batch.column(0).slice(page - 1 - row, 1)
                            data, paths = _binary_cells(cell, self._column)
                            return next(_iter_cells(data, paths, self.source, page - 1, None))
                        row += batch.num_rows
                row += rows
        except Exception as exc:
            return _error(self.source, page, f"cannot read Parquet shard: {_reason(exc)}")
        return _error(self.source, page, f"shard has {row} row(s), no page {page}")

    def count_pages(self) -> int:
        try:
            return int(self._open().metadata.num_rows)
        except Exception:
            return 1


# ---------------------------------------------------------------------------- opening


def _sniff(path: Path) -> str | None:
    """The kind of a file by its first bytes: 'pdf', 'arrow', 'parquet', 'image' or None."""
    try:
        with path.open("rb") as fh:
            head = fh.read(16)
    except OSError:
        return None
    return sniff_bytes(head)


def sniff_bytes(head: bytes) -> str | None:
    """The kind of a document by its first 16 bytes (as ``_sniff``)."""
    if head.startswith(b"%PDF") or b"%PDF-" in head:
        return "pdf"
    if head.startswith(_ARROW_FILE_MAGIC) or head.startswith(_ARROW_STREAM_MAGIC):
        return "arrow"
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    if head.startswith(_IMAGE_MAGICS) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    return None


def _kind(path: Path, cfg: SourceConfig, sniff: bool) -> str | None:
    suffix = path.suffix.lower()
    if suffix in {e.lower() for e in cfg.pdf_extensions}:
        return "pdf"
    if suffix in {e.lower() for e in cfg.image_extensions}:
        return "image"
    if suffix == ".arrow":
        return "arrow"
    if suffix == ".parquet":
        return "parquet"
    return _sniff(path) if sniff else None


def _file_source(path: Path, source: str, kind: str, cfg: SourceConfig) -> PageSource:
    if kind == "pdf":
        return PdfSource(path, source, cfg)
    if kind == "arrow":
        return ArrowShardSource(path, source, cfg)
    if kind == "parquet":
        return ParquetShardSource(path, source, cfg)
    return ImageFileSource(path, source, cfg)


def _walk(folder: Path, cfg: SourceConfig) -> tuple[list[tuple[str, Path, str]], int]:
    """(identity, path, kind) of every known file under a folder, and the skipped count."""
    found: list[tuple[str, Path, str]] = []
    skipped = 0

    def on_error(exc: OSError) -> None:
        nonlocal skipped
        skipped += 1

    for root, dirs, files in os.walk(folder, onerror=on_error):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            path = Path(root) / name
            kind = None if name.startswith(".") else _kind(path, cfg, sniff=False)
            if kind is None:
                skipped += 1
            else:
                found.append((str(path), path, kind))
    found.sort(key=lambda item: item[0])
    return found, skipped


class SourceSet:
    """The documents of a run, in order; ``pages()`` chains them."""

    def __init__(self, sources: list[PageSource], skipped_files: int) -> None:
        self._sources = sources
        self.skipped_files = skipped_files
        self.sources: list[str] = [s.source for s in sources]

    def __len__(self) -> int:
        return len(self._sources)

    def __iter__(self) -> Iterator[PageSource]:
        return iter(self._sources)

    def pages(self, skip: Skip | None = None) -> Iterator[EncodedPage]:
        for source in self._sources:
            yield from source.pages(skip)

    def count_pages(self) -> int:
        """Total pages (opens each PDF and reads shard metadata; images count 1 per frame)."""
        return sum(int(getattr(s, "count_pages", lambda: 1)()) for s in self._sources)


def _missing(path: Path, text: str) -> str:
    """Why a path that does not exist cannot be read: a symlink loop, or not found."""
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"cannot read file: symlink loop ({text})"
    return f"file not found: {text}"


def _open_one(
    given: str | Path, cfg: SourceConfig, seen: set[str]
) -> tuple[list[PageSource], int]:
    text = str(given)
    path = Path(os.path.expanduser(text))
    source = identity(path)
    if source in seen:
        return [], 0
    if not path.exists():
        seen.add(source)
        return [ErrorSource(source, _missing(path, text))], 0
    if path.is_dir():
        seen.add(source)
        found, skipped = _walk(Path(source), cfg)
        fresh = [(s, p, k) for s, p, k in found if s not in seen]
        if not found:
            return [ErrorSource(source, f"no images or PDFs found in {text}")], skipped
        seen.update(s for s, _, _ in fresh)
        return [_file_source(p, s, k, cfg) for s, p, k in fresh], skipped
    if not path.is_file():
        seen.add(source)
        return [ErrorSource(source, f"not a regular file: {text}")], 0
    seen.add(source)
    kind = _kind(path, cfg, sniff=True)
    if kind is None:
        return [ErrorSource(source, f"unsupported file type: {text}")], 0
    return [_file_source(path, source, kind, cfg)], 0


def open_sources(paths: Sequence[str | Path], cfg: SourceConfig) -> SourceSet:
    """Open files, folders, PDFs and shards as one ordered set of documents.

    A path that does not exist (or a folder without any image or PDF) becomes one error
    page, so the run goes on; a document named twice is read once. Raises
    ``SourceError`` only when no path is given at all.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    if not paths:
        raise SourceError("no input paths given")
    seen: set[str] = set()
    sources: list[PageSource] = []
    skipped = 0
    for given in paths:
        opened, n_skipped = _open_one(given, cfg, seen)
        sources.extend(opened)
        skipped += n_skipped
    return SourceSet(sources, skipped)


def source_for(source: str, cfg: SourceConfig) -> PageSource:
    """The source object behind an identity string (a file path)."""
    path = Path(source)
    if not path.exists():
        return ErrorSource(source, f"file not found: {source}")
    if path.is_dir():
        return ErrorSource(source, f"{source} is a folder, not a document")
    kind = _kind(path, cfg, sniff=True)
    if kind is None:
        return ErrorSource(source, f"unsupported file type: {source}")
    return _file_source(path, source, kind, cfg)


def load_page(ref: PageRef, cfg: SourceConfig) -> EncodedPage:
    """Fetch one page again (bytes, rendered pixels or an error), e.g. for ``show``."""
    if ref.page < 1:
        return _error(ref.source, ref.page, f"page numbers start at 1, got {ref.page}")
    src = source_for(ref.source, cfg)
    load = getattr(src, "load", None)
    if load is None:  # pragma: no cover - every source here has load()
        return _error(ref.source, ref.page, "source cannot load single pages")
    page: EncodedPage = load(ref.page)
    return page


def decode_for_display(page: EncodedPage) -> np.ndarray:
    """An EncodedPage -> HWC uint8 BGR with PIL (for ``show``; not the pipeline's decoder)."""
    if page.error is not None:
        raise SourceError(f"{page.ref}: {page.error}")
    if page.pixels is not None:
        return page.pixels
    from PIL import Image, ImageOps

    assert page.data is not None
    with Image.open(io.BytesIO(page.data)) as img:
        img.load()
        return pil_to_bgr(ImageOps.exif_transpose(img) or img)
