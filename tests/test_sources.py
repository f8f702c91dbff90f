"""Page sources on real corpus files: folders, images, PDFs, Arrow/Parquet shards."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pypdfium2 as pdfium
import pytest
from PIL import Image

from orchestrator.config import SourceConfig
from orchestrator.errors import SourceError
from orchestrator.stages import sources as sources_mod
from orchestrator.stages.sources import PageSource, PdfSource, load_page, open_sources
from orchestrator.types import EncodedPage, PageRef

CFG = SourceConfig()


@pytest.fixture
def corpus(corpus_dir: Path) -> Path:
    return corpus_dir


def _pages(paths: list[str | Path], cfg: SourceConfig = CFG, skip=None) -> list[EncodedPage]:
    return list(open_sources(paths, cfg).pages(skip))


# ---------------------------------------------------------------------------- folders


def test_folder_walk_is_recursive_sorted_and_counts_skipped(corpus: Path, tmp_path: Path) -> None:
    png = corpus / "pages" / "baiona.png"
    layout = ["b/2.png", "a.pdf", "B/x.JPG", "sub/deep/IMG.PNG", "a b/1.tif", "zz.webp"]
    for rel in layout:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        src = corpus / "bad" / "trivial.pdf" if rel.endswith(".pdf") else png
        shutil.copy(src, tmp_path / rel)
    for rel in ["notes.txt", ".hidden.png", "sub/readme.md", ".git/config.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")

    opened = open_sources([tmp_path], CFG)
    expected = sorted(str(tmp_path.resolve() / rel) for rel in layout)
    assert opened.sources == expected
    assert opened.skipped_files == 3  # notes.txt, .hidden.png, sub/readme.md (.git not walked)
    pages = list(opened.pages())
    assert [p.ref.source for p in pages] == expected
    assert all(p.error is None for p in pages)
    # Same order again: stable.
    assert open_sources([tmp_path], CFG).sources == expected


def test_corpus_folder(corpus: Path) -> None:
    opened = open_sources([corpus / "pages"], CFG)
    names = [Path(s).name for s in opened.sources]
    assert names == sorted(names)
    assert "linn.png" in names and "multipage.pdf" in names
    assert opened.skipped_files == 1  # linn.txt


def test_folder_without_documents_is_one_error_page(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    opened = open_sources([tmp_path / "empty"], CFG)
    pages = list(opened.pages())
    assert len(pages) == 1 and opened.skipped_files == 1
    assert pages[0].ref == PageRef(str((tmp_path / "empty").resolve()), 1)
    assert pages[0].error == f"no images or PDFs found in {tmp_path / 'empty'}"


def test_missing_path_is_an_error_page_and_no_paths_raise(corpus: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pdf"
    pages = _pages([missing, corpus / "pages" / "linn.png"])
    assert pages[0].ref == PageRef(str(missing.resolve()), 1)
    assert pages[0].error is not None and "not found" in pages[0].error
    assert pages[1].data is not None
    with pytest.raises(SourceError):
        open_sources([], CFG)


def test_same_document_twice_is_read_once(corpus: Path) -> None:
    linn = corpus / "pages" / "linn.png"
    opened = open_sources([linn, corpus / "pages", linn], CFG)
    assert opened.sources.count(str(linn.resolve())) == 1


def test_every_source_is_a_page_source(corpus: Path) -> None:
    documents = [p for p in (corpus / "pages").iterdir() if p.suffix in (".png", ".pdf")]
    opened = list(open_sources([corpus / "pages"], CFG))
    assert len(opened) == len(documents) >= 10
    for source in opened:
        assert isinstance(source, PageSource)


def test_a_symlink_loop_given_as_a_source_is_an_error_page(corpus: Path, tmp_path: Path
                                                           ) -> None:
    """As inside a folder: the loop is its own error page, the sources beside it are read."""
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    good = corpus / "pages" / "linn.png"
    pages = _pages([tmp_path / "a.png", good])
    assert [p.ref.page for p in pages] == [1, 1]
    assert pages[0].ref.source == str(tmp_path / "a.png")
    assert pages[0].error is not None and "symlink loop" in pages[0].error
    assert pages[1].ref.source == str(good.resolve()) and pages[1].data is not None
    inside = _pages([tmp_path])  # the same loop met inside a folder
    assert len(inside) == 2 and all(p.error and "symbolic links" in p.error for p in inside)


# ---------------------------------------------------------------------------- images


def _write_formats(corpus: Path, folder: Path) -> dict[str, Path]:
    rgb = Image.open(corpus / "pages" / "baiona.png").convert("RGB")
    made = {}
    for name, kwargs in {
        "page.jpg": {},
        "page.webp": {},
        "page.jp2": {},
        "page.bmp": {},
        "page.tiff": {"compression": "tiff_lzw"},
    }.items():
        rgb.save(folder / name, **kwargs)
        made[name] = folder / name
    rgb.convert("1").save(folder / "mono.png")
    made["mono.png"] = folder / "mono.png"
    shutil.copy(corpus / "pages" / "linn.png", folder / "palette.png")  # palette 0/1 PNG
    made["palette.png"] = folder / "palette.png"
    return made


def test_image_files_yield_their_raw_bytes(corpus: Path, tmp_path: Path) -> None:
    made = _write_formats(corpus, tmp_path)
    pages = {Path(p.ref.source).name: p for p in _pages([tmp_path])}
    assert set(pages) == set(made)
    for name, path in made.items():
        page = pages[name]
        assert page.ref.page == 1 and page.error is None and page.pixels is None
        assert page.data == path.read_bytes(), name


def test_multiframe_tiff_is_one_page_per_frame(corpus: Path, tmp_path: Path) -> None:
    frames = [
        Image.open(corpus / "pages" / "baiona.png").convert("RGB"),
        Image.open(corpus / "pages" / "linn.png"),  # palette frame
        Image.new("1", (300, 200), 1),
    ]
    path = tmp_path / "scan.tif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    pages = _pages([path])
    assert [p.ref.page for p in pages] == [1, 2, 3]
    assert pages[0].data == path.read_bytes()
    assert pages[1].pixels is not None and pages[1].pixels.shape == (3300, 2550, 3)
    assert pages[2].pixels is not None and pages[2].pixels.shape == (200, 300, 3)
    assert int(pages[2].pixels.min()) == 255  # white 1-bit frame -> white BGR
    frame = load_page(PageRef(str(path.resolve()), 2), CFG).pixels
    assert frame is not None and frame.shape == (3300, 2550, 3)
    # Over the pixel limit: an error for the frame, not a decode.
    small = SourceConfig(max_pixels=1_000_000)
    assert "sources.max_pixels" in (_pages([path], small)[1].error or "")


def test_empty_and_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "empty.pdf").write_bytes(b"")
    (tmp_path / "mystery.bin").write_bytes(b"not a document at all")
    pages = _pages([tmp_path / "empty.png", tmp_path / "empty.pdf", tmp_path / "mystery.bin"])
    assert [p.error for p in pages] == [
        "file is empty (0 bytes)",
        "file is empty (0 bytes)",
        f"unsupported file type: {tmp_path / 'mystery.bin'}",
    ]


def test_explicit_file_without_extension_is_sniffed(corpus: Path, tmp_path: Path) -> None:
    shutil.copy(corpus / "pages" / "linn.png", tmp_path / "scan")
    shutil.copy(corpus / "pages" / "cardinal.pdf", tmp_path / "book")
    pages = _pages([tmp_path / "scan", tmp_path / "book"])
    assert pages[0].data == (corpus / "pages" / "linn.png").read_bytes()
    assert [p.ref.page for p in pages[1:]] == [1, 2, 3, 4]


def test_odd_path_names(corpus: Path, tmp_path: Path) -> None:
    folder = tmp_path / "dir with spaces" / "l'été \"quoted\" 文档"
    folder.mkdir(parents=True)
    png = folder / "pàge #1 'x'.png"
    pdf = folder / "c'est \"ça\" — ünïcødé.pdf"
    shutil.copy(corpus / "pages" / "linn.png", png)
    shutil.copy(corpus / "pages" / "cardinal.pdf", pdf)
    for paths in ([folder], [pdf, png], [str(pdf), str(png)]):
        opened = open_sources(paths, CFG)
        # A folder is walked in sorted order; explicit paths keep the order given.
        assert opened.sources == [str(pdf.resolve()), str(png.resolve())]
        pages = list(opened.pages())
        assert len(pages) == 5 and all(p.error is None for p in pages)
    assert load_page(PageRef(str(pdf.resolve()), 3), CFG).pixels is not None
    assert load_page(PageRef(str(png.resolve()), 1), CFG).data == png.read_bytes()


def test_skip_means_not_read(corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(corpus / "pages" / "linn.png", tmp_path / "a.png")
    shutil.copy(corpus / "pages" / "typewriter.png", tmp_path / "b.png")
    done = PageRef(str((tmp_path / "a.png").resolve()), 1)
    real = Path.read_bytes

    def guarded(self: Path) -> bytes:
        assert self.name != "a.png", "a skipped page was read"
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", guarded)
    pages = _pages([tmp_path], skip=lambda ref: ref == done)
    assert [Path(p.ref.source).name for p in pages] == ["b.png"]


# ---------------------------------------------------------------------------- PDFs


def test_pdf_page_counts_and_pixels(corpus: Path) -> None:
    multipage = _pages([corpus / "pages" / "multipage.pdf"])
    assert [p.ref.page for p in multipage] == [1, 2, 3, 4, 5, 6]
    cardinal = _pages([corpus / "pages" / "cardinal.pdf"])
    assert [p.ref.page for p in cardinal] == [1, 2, 3, 4]
    for page in cardinal:
        assert page.error is None and page.data is None and page.pixels is not None
        assert page.pixels.dtype == np.uint8 and page.pixels.ndim == 3
        assert page.pixels.shape[2] == 3 and page.pixels.flags.c_contiguous
    # Letter at 200 dpi: 1700 x 2200, landscape copies 2200 x 1700.
    assert [p.pixels.shape[:2] for p in cardinal if p.pixels is not None] == [
        (2200, 1700), (1700, 2200), (2200, 1700), (1700, 2200)
    ]
    low = _pages([corpus / "pages" / "cardinal.pdf"], SourceConfig(dpi=100))[0].pixels
    assert low is not None and low.shape == (1100, 850, 3)


def test_pdf_rotate_is_honoured(corpus: Path) -> None:
    path = corpus / "pages" / "rotated_skew.pdf"
    with pdfium.PdfDocument(path) as pdf:
        page = pdf[0]
        left, bottom, right, top = page.get_mediabox()
        rotation = page.get_rotation()
        page.close()
    assert rotation == 90 and (right - left) > (top - bottom)  # landscape box, /Rotate 90
    (rendered,) = _pages([path])
    assert rendered.pixels is not None and rendered.pixels.shape[:2] == (2200, 1700)  # portrait


def test_pdf_rendering_is_lazy_and_releases_pages(
    corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    renders: list[int] = []
    live: list[int] = []
    real_render = PdfSource._render

    def counting(self: PdfSource, pdf: object, index: int) -> EncodedPage:
        renders.append(index)
        return real_render(self, pdf, index)

    opened, closed = [0], [0]
    real_get, real_close = pdfium.PdfDocument.get_page, pdfium.PdfPage.close

    def get_page(self: pdfium.PdfDocument, index: int) -> pdfium.PdfPage:
        opened[0] += 1
        return real_get(self, index)

    def close(self: pdfium.PdfPage, *args: object, **kwargs: object) -> object:
        closed[0] += 1
        return real_close(self, *args, **kwargs)

    monkeypatch.setattr(PdfSource, "_render", counting)
    monkeypatch.setattr(pdfium.PdfDocument, "get_page", get_page)
    monkeypatch.setattr(pdfium.PdfPage, "close", close)
    gen = open_sources([corpus / "pages" / "multipage.pdf"], CFG).pages()
    assert renders == []  # nothing rendered before the first next()
    for expected in range(1, 7):
        page = next(gen)
        assert page.ref.page == expected and renders == list(range(expected))
        live.append(opened[0] - closed[0])
    assert live == [0] * 6  # no page object alive while the consumer holds a page
    assert next(gen, None) is None


def test_long_pdf_memory_stays_bounded(corpus: Path, tmp_path: Path) -> None:
    """PDFium keeps parsed objects until close: the source reopens, so RSS stays flat."""
    src = pdfium.PdfDocument(corpus / "pages" / "multipage.pdf")
    dst = pdfium.PdfDocument.new()
    while len(dst) < 600:
        dst.import_pages(src, [0, 2, 3, 4, 5])  # each copy has its own image streams
    path = tmp_path / "long.pdf"
    dst.save(path)
    dst.close()
    src.close()

    # Measured in a fresh process: here, the heap freed by building the PDF would hide it.
    script = (
        "import os, sys\n"
        "from orchestrator.config import SourceConfig\n"
        "from orchestrator.stages.sources import open_sources\n"
        "def rss():\n"
        "    with open('/proc/self/statm') as fh:\n"
        "        return int(fh.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1e6\n"
        "marks = {}\n"
        "for page in open_sources([sys.argv[1]], SourceConfig(dpi=20)).pages():\n"
        "    assert page.pixels is not None, page.error\n"
        "    if page.ref.page in (150, 600):\n"
        "        marks[page.ref.page] = rss()\n"
        "print(marks[600] - marks[150])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    growth = float(done.stdout.strip())
    # Without reopening, RSS grows by ~75 MB over these 450 pages (measured).
    assert growth < 25, f"RSS grew by {growth:.0f} MB over 450 pages"


def test_pdf_reopen_keeps_pages_identical(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = corpus / "pages" / "multipage.pdf"
    plain = _pages([path], SourceConfig(dpi=50))
    opens = [0]
    real_open = PdfSource._open

    def counting(self: PdfSource) -> tuple[object, str]:
        opens[0] += 1
        return real_open(self)

    monkeypatch.setattr(sources_mod, "PDF_REOPEN_PAGES", 2)
    monkeypatch.setattr(PdfSource, "_open", counting)
    again = _pages([path], SourceConfig(dpi=50), skip=lambda ref: ref.page == 2)
    assert opens[0] == 3  # pages 1,3 | 4,5 | 6
    assert [p.ref.page for p in again] == [1, 3, 4, 5, 6]
    for page in again:
        reference = plain[page.ref.page - 1].pixels
        assert page.pixels is not None and reference is not None
        assert np.array_equal(page.pixels, reference)


def test_pdf_pixel_limit(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_render(*args: object, **kwargs: object) -> None:
        raise AssertionError("an over-limit page was rendered")

    # hugemono: 8400 x 8400 pt (a 35000 x 35000 JBIG2) = 23334 x 23334 px at 200 dpi.
    with monkeypatch.context() as m:
        m.setattr(pdfium.PdfPage, "render", no_render)
        (huge,) = _pages([corpus / "bad" / "hugemono.pdf"])
        assert huge.error == (
            "page is 23334 x 23334 px at 200 dpi, over the limit of 200000000 pixels "
            "(sources.max_pixels)"
        )
        # enormous: 2160 x 2160 pt = 6000 x 6000 px = 36 MP: under the default, over 30 MP.
        (limited,) = _pages([corpus / "bad" / "enormous.pdf"], SourceConfig(max_pixels=30_000_000))
        assert limited.error is not None and "6000 x 6000 px at 200 dpi" in limited.error
    (enormous,) = _pages([corpus / "bad" / "enormous.pdf"])
    assert enormous.error is None and enormous.pixels is not None
    assert enormous.pixels.shape == (6000, 6000, 3)


def test_bad_pdfs_give_clear_errors_never_exceptions(corpus: Path, tmp_path: Path) -> None:
    (invalid,) = _pages([corpus / "bad" / "invalid.pdf"])
    assert invalid.ref.page == 1 and invalid.pixels is None
    assert invalid.error == "cannot open PDF: Failed to load document (PDFium: Data format error)."
    truncated = tmp_path / "truncated.pdf"
    truncated.write_bytes((corpus / "pages" / "cardinal.pdf").read_bytes()[:2000])
    cut = _pages([truncated])
    assert cut, "a truncated PDF yields at least its error page"
    for page in cut:
        assert (page.error is None) != (page.pixels is None), page
    for name in ("blank.pdf", "no_contents.pdf", "trivial.pdf", "kcs.pdf"):
        (page,) = _pages([corpus / "bad" / name])
        assert page.error is None and page.pixels is not None, name


def test_a_page_that_fails_to_render_does_not_stop_the_document(
    corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = pdfium.PdfPage.render
    calls = [0]

    def flaky(self: pdfium.PdfPage, *args: object, **kwargs: object) -> object:
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("boom")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pdfium.PdfPage, "render", flaky)
    pages = _pages([corpus / "pages" / "cardinal.pdf"])
    assert [p.ref.page for p in pages] == [1, 2, 3, 4]
    assert pages[1].error == "cannot render page: boom"
    assert all(p.pixels is not None for p in (pages[0], pages[2], pages[3]))


def test_a_pdf_whose_count_lies_does_not_give_an_error_row_per_declared_page(
    corpus: Path, tmp_path: Path
) -> None:
    """One real page under a /Count of 1,000,000: the real page, a few error pages, then
    one error page for the rest, in well under a second (not 999,999 error rows)."""
    import itertools
    import time

    data = (corpus / "pages" / "c03-29.pdf").read_bytes()
    assert data.count(b"/Count 1 ") == 1
    lying = tmp_path / "lying.pdf"
    lying.write_bytes(data.replace(b"/Count 1 ", b"/Count 1000000 "))
    start = time.monotonic()
    pages = list(itertools.islice(open_sources([lying], CFG).pages(), 100))
    assert time.monotonic() - start < 5
    assert len(pages) <= 2 + sources_mod.PDF_LOAD_FAILURES_BEFORE_PROBE
    assert pages[0].pixels is not None and pages[0].error is None
    assert all(p.error is not None for p in pages[1:])
    last = pages[-1].error or ""
    assert f"pages {len(pages)}-1000000 not read" in last and "/Count" in last


def test_a_damaged_run_of_pages_does_not_end_the_document(
    corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages that fail to load in a row, with good pages after them: every page is read."""
    path = corpus / "pages" / "multipage.pdf"
    monkeypatch.setattr(sources_mod, "PDF_LOAD_FAILURES_BEFORE_PROBE", 2)
    real = pdfium.PdfDocument.__getitem__

    def damaged(self: pdfium.PdfDocument, index: int) -> object:
        if index in (1, 2, 3):
            raise pdfium.PdfiumError("Failed to load page.")
        return real(self, index)

    monkeypatch.setattr(pdfium.PdfDocument, "__getitem__", damaged)
    pages = _pages([path])
    assert [p.ref.page for p in pages] == [1, 2, 3, 4, 5, 6]
    assert [p.error is None for p in pages] == [True, False, False, False, True, True]


def test_pdf_skip_and_load_page(corpus: Path) -> None:
    path = corpus / "pages" / "cardinal.pdf"
    source = str(path.resolve())
    pages = _pages([path], skip=lambda ref: ref.page in (1, 3))
    assert [p.ref.page for p in pages] == [2, 4]
    again = load_page(PageRef(source, 2), CFG).pixels
    assert again is not None and pages[0].pixels is not None
    assert np.array_equal(again, pages[0].pixels)
    assert load_page(PageRef(source, 9), CFG).error == "PDF has 4 page(s), no page 9"
    assert "not found" in (load_page(PageRef("/no/such.pdf", 1), CFG).error or "")


def test_pdfium_is_used_under_one_lock(corpus: Path) -> None:
    # Two threads rendering at once must not crash PDFium (it is not thread-safe).
    from concurrent.futures import ThreadPoolExecutor

    path = str((corpus / "pages" / "cardinal.pdf").resolve())
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: load_page(PageRef(path, n % 4 + 1), CFG), range(12)))
    assert all(r.pixels is not None for r in results)


# ---------------------------------------------------------------------------- shards


def _image_table(corpus: Path) -> tuple[pa.Table, list[bytes | None]]:
    files = ["linn.png", "typewriter.png", "baiona.png"]
    cells: list[dict[str, object] | None] = []
    expected: list[bytes | None] = []
    for i in range(10):
        if i == 4:
            cells.append({"bytes": None, "path": "lost.png"})
            expected.append(None)
        elif i == 7:
            cells.append(None)
            expected.append(None)
        else:
            data = (corpus / "pages" / files[i % 3]).read_bytes()
            cells.append({"bytes": data, "path": files[i % 3]})
            expected.append(data)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {"image": pa.array(cells, type=image_type), "text": [f"row {i}" for i in range(10)]}
    )
    return table, expected


def _write_shards(corpus: Path, folder: Path) -> tuple[dict[str, Path], list[bytes | None]]:
    table, expected = _image_table(corpus)
    stream, ipc_file, parquet = folder / "stream.arrow", folder / "file.arrow", folder / "x.parquet"
    with pa.OSFile(str(stream), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=3):
            w.write_batch(batch)
    with pa.OSFile(str(ipc_file), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        for batch in table.to_batches(max_chunksize=4):
            w.write_batch(batch)
    pq.write_table(table, parquet, row_group_size=3)
    return {"stream": stream, "file": ipc_file, "parquet": parquet}, expected


@pytest.fixture
def no_temp_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Fail on any tempfile use; a private temp dir and cwd must stay empty."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the product path must not create temp files")

    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile",
                 "SpooledTemporaryFile", "TemporaryDirectory"):
        monkeypatch.setattr(tempfile, name, refuse)
    # Private dirs: the shared /tmp and the checkout see other processes' files.
    private_tmp, private_cwd = tmp_path / "private-tmp", tmp_path / "private-cwd"
    private_tmp.mkdir()
    private_cwd.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    monkeypatch.chdir(private_cwd)
    yield
    assert os.listdir(private_tmp) == [] and os.listdir(private_cwd) == []


@pytest.mark.parametrize("kind", ["stream", "file", "parquet"])
def test_shards_yield_identical_bytes_without_temp_files(
    corpus: Path, tmp_path: Path, kind: str, request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sources_mod, "PARQUET_BATCH_ROWS", 2)  # batches inside row groups
    shards, expected = _write_shards(corpus, tmp_path)
    request.getfixturevalue("no_temp_files")
    path = shards[kind]
    source = str(path.resolve())
    pages = _pages([path])
    assert [p.ref for p in pages] == [PageRef(source, i + 1) for i in range(10)]
    for page, data in zip(pages, expected, strict=True):
        assert page.pixels is None
        if data is None:
            assert page.data is None and page.error is not None
            assert "has no image bytes" in page.error
        else:
            assert page.error is None and page.data == data
    assert "lost.png" in (pages[4].error or "")
    # One row again, and a skip set of done rows.
    assert load_page(PageRef(source, 6), CFG).data == expected[5]
    assert load_page(PageRef(source, 11), CFG).error == "shard has 10 row(s), no page 11"
    rest = _pages([path], skip=lambda ref: ref.page <= 6)
    assert [p.ref.page for p in rest] == [7, 8, 9, 10]


def test_parquet_row_groups_that_are_done_are_not_read(
    corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shards, _ = _write_shards(corpus, tmp_path)
    reads: list[int] = []
    real = pq.ParquetFile.iter_batches

    def counting(self: pq.ParquetFile, *args: object, **kwargs: object) -> object:
        groups = kwargs.get("row_groups")
        assert isinstance(groups, list)
        reads.extend(groups)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    pages = _pages([shards["parquet"]], skip=lambda ref: ref.page <= 7)
    assert [p.ref.page for p in pages] == [8, 9, 10]
    assert reads == [2, 3]  # row groups of 3: rows 1-6 are groups 0-1, never read


def test_shard_column_variants_and_errors(corpus: Path, tmp_path: Path) -> None:
    data = (corpus / "pages" / "baiona.png").read_bytes()
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"image": pa.array([data, b""], type=pa.large_binary())}), plain)
    pages = _pages([plain])
    assert pages[0].data == data and pages[1].error is not None
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"picture": [data]}), other)
    (page,) = _pages([other])
    assert page.error is not None and "sources.image_column" in page.error
    assert _pages([other], SourceConfig(image_column="picture"))[0].data == data
    broken = tmp_path / "broken.arrow"
    broken.write_bytes(b"ARROW1\x00\x00garbage")
    (page,) = _pages([broken])
    assert page.error is not None and page.error.startswith("cannot read Arrow shard")


def test_shards_in_folders_and_count_pages(corpus: Path, tmp_path: Path) -> None:
    _write_shards(corpus, tmp_path)
    shutil.copy(corpus / "pages" / "cardinal.pdf", tmp_path / "c.pdf")
    opened = open_sources([tmp_path], CFG)
    assert [Path(s).name for s in opened.sources] == [
        "c.pdf", "file.arrow", "stream.arrow", "x.parquet"
    ]
    assert opened.count_pages() == 4 + 30
    assert len(list(opened.pages())) == 34
