"""Export (JSONL, Markdown, compact) and the ``show`` renderer."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.config import SinkConfig, SourceConfig
from orchestrator.errors import NotAFolioDatabase, SinkError, SourceError
from orchestrator.output.export import compact, export_jsonl, export_markdown, read_pages
from orchestrator.output.markdown import join_lines, page_markdown, paragraphs
from orchestrator.output.show import render_page, resolve_page
from orchestrator.stages.sink import SQLiteSink
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


@pytest.fixture
def corpus(corpus_dir: Path) -> Path:
    return corpus_dir


def R(index: int, label: str, task: Task, text: str | None, lines: list[LineText] | None = None,
      fmt: TextFormat = TextFormat.PLAIN, origin: Origin = Origin.LAYOUT, **stats: object):
    region = Region(index, label, task, 0.87654, (10.0 + index, 20.0, 110.5, 60.25),
                    origin=origin)
    result = None if text is None else RecognitionResult(
        text=text, stats=dict(stats), lines=lines or [], text_format=fmt,
        confidence=0.9 if lines else None)
    return region, result


def L(text: str | None, score: float | None = 0.99, low: bool = False) -> LineText:
    return LineText(bbox=(12.0, 21.0, 100.0, 30.5), text=text, score=score, low_confidence=low)


PAGE_REGIONS = [
    R(0, "title", Task.TEXT, "A  Title\n", [L("A  Title")]),
    R(1, "text", Task.TEXT, "First paragraph.", model="glm", prompt_tokens=5, ttft_s=0.1),
    R(2, "table", Task.TABLE, "<table><tr><td>1</td></tr></table>", fmt=TextFormat.HTML),
    R(3, "figure", Task.SKIP, None),
    R(4, "equation", Task.FORMULA, "E = mc^2", fmt=TextFormat.LATEX),
    R(5, "equation", Task.FORMULA, "$$x^2$$", fmt=TextFormat.LATEX),
    R(6, "text", Task.TEXT, None),
    R(7, "header", Task.TEXT, "Running head", [L("Running head")]),
    R(8, "text", Task.TEXT, "Kept outside\nevery box",
      [L("Kept outside"), L("every box", 0.3, True)], origin=Origin.LINES),
    R(9, "table", Task.TABLE, "a b\n1 2", [L("a b"), L("1 2")]),
]


def _db(tmp_path: Path, sources: dict[str, int]) -> Path:
    db = tmp_path / "out.db"
    with SQLiteSink(db, SinkConfig()) as sink:
        sink.start_run({"sources": {"dpi": 100}}, {}, list(sources))
        outcomes = []
        for source, pages in sources.items():
            for page in range(pages, 0, -1):  # written out of order on purpose
                outcomes.append(
                    PageOutcome(PageRef(source, page), "ok", None, 850, 1100,
                                PAGE_REGIONS, {"read_s": 0.5})
                )
        outcomes.append(PageOutcome(PageRef("/z/broken.pdf", 1), "error", "cannot open PDF: x",
                                    None, None, []))
        sink.write_batch(outcomes)
    return db


def test_page_markdown() -> None:
    md = page_markdown(PAGE_REGIONS)
    assert md == (
        "## A Title\n\nFirst paragraph.\n\n<table><tr><td>1</td></tr></table>\n\n"
        "*[figure]*\n\n$$\nE = mc^2\n$$\n\n$$x^2$$\n\nKept outside every box\n\n"
        "<!-- table region, read as plain text -->\n```text\na b\n1 2\n```\n"
    )
    assert "Running head" not in md  # furniture: stored, left out of Markdown by default
    with_furniture = page_markdown(PAGE_REGIONS, include_furniture=True)
    assert "Running head\n\nKept outside" in with_furniture
    linked = page_markdown(PAGE_REGIONS, figure_link=lambda r: f"figures/r{r.index}.png")
    assert "![figure](figures/r3.png)" in linked and "*[figure]*" not in linked
    assert page_markdown([]) == ""


def test_paragraphs_join_lines_mend_hyphens_and_make_lists() -> None:
    assert join_lines(["The recog-", "niser reads", "  whole lines."]) == (
        "The recogniser reads whole lines.")
    # a hyphen before a capital or a number is kept (a compound, a range)
    assert join_lines(["pre-", "Columbian 1990-", "2000"]) == "pre- Columbian 1990- 2000"
    text = ("It offers:\n• one\ncontinued here\n- two\n1. first\n2) second\n(a) lettered\n"
            "(818) 708-8131 is a phone number\n1984. A year, not an item")
    assert paragraphs(text) == [
        "It offers:",
        "- one continued here\n- two\n1. first\n2. second\n- (a) lettered "
        "(818) 708-8131 is a phone number 1984. A year, not an item",
    ]


def test_export_jsonl(tmp_path: Path) -> None:
    db = _db(tmp_path, {"/b/doc.pdf": 2, "/a/scan.png": 1})
    out = tmp_path / "out.jsonl"
    assert export_jsonl(db, out) == 4
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [(p["source"], p["page"]) for p in lines] == [
        ("/a/scan.png", 1), ("/b/doc.pdf", 1), ("/b/doc.pdf", 2), ("/z/broken.pdf", 1)
    ]
    first = lines[0]
    assert first["schema_version"] == 2
    keys = {"source", "page", "width", "height", "status", "error", "regions", "markdown"}
    assert keys <= set(first)
    assert (first["width"], first["height"]) == (850, 1100)
    assert (first["status"], first["error"]) == ("ok", None)
    assert first["timings"] == {"read_s": 0.5}
    regions = first["regions"]
    assert [r["index"] for r in regions] == list(range(len(PAGE_REGIONS)))
    assert regions[1] == {
        "index": 1, "label": "text", "task": "text", "origin": "layout",
        "bbox": [11.0, 20.0, 110.5, 60.25], "score": 0.8765, "text": "First paragraph.",
        "text_format": "plain", "confidence": None, "lines": [], "model": "glm",
        "prompt_tokens": 5, "ttft_s": 0.1,
    }
    assert regions[2]["text_format"] == "html"
    assert regions[3]["text"] is None and regions[3]["task"] == "skip"
    assert regions[3]["text_format"] is None
    block = regions[8]
    assert block["origin"] == "lines" and block["confidence"] == 0.9
    assert block["lines"] == [
        {"bbox": [12.0, 21.0, 100.0, 30.5], "text": "Kept outside", "score": 0.99},
        {"bbox": [12.0, 21.0, 100.0, 30.5], "text": "every box", "score": 0.3,
         "low_confidence": True},
    ]
    assert regions[7]["label"] == "header" and regions[7]["text"] == "Running head"
    assert first["markdown"] == page_markdown(PAGE_REGIONS)
    broken = lines[-1]
    assert broken["status"] == "error" and broken["error"] == "cannot open PDF: x"
    assert broken["regions"] == [] and broken["markdown"] == ""
    # export runs ANALYZE first
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM sqlite_stat1").fetchone()[0] > 0
    # the Python API reads the same objects
    assert [json.loads(json.dumps(p)) for p in read_pages(db)] == lines


def test_export_markdown_per_document_in_page_order(tmp_path: Path) -> None:
    db = _db(tmp_path, {"/x/doc.pdf": 3, "/y/scan.png": 1})
    out = tmp_path / "md"
    assert export_markdown(db, out, per="document") == 3
    assert sorted(p.name for p in out.iterdir()) == ["broken.md", "doc.md", "scan.md"]
    doc = (out / "doc.md").read_text(encoding="utf-8")
    marks = [doc.index(f"<!-- page {n} -->") for n in (1, 2, 3)]
    assert marks == sorted(marks) and doc.count("## A Title") == 3
    assert "Running head" not in doc
    with_furniture = tmp_path / "md2"
    export_markdown(db, with_furniture, per="document", include_furniture=True)
    assert (with_furniture / "doc.md").read_text(encoding="utf-8").count("Running head") == 3


def test_export_markdown_names_are_safe_and_unique(tmp_path: Path) -> None:
    db = _db(tmp_path, {"/x/scan.pdf": 2, "/y/scan.pdf": 1, "/w/ma page: <1>?.png": 1})
    out = tmp_path / "md"
    assert export_markdown(db, out) == 5
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "broken_p0001.md", "ma_page_1_p0001.md", "scan-2_p0001.md", "scan_p0001.md",
        "scan_p0002.md",
    ]
    assert (out / "scan_p0002.md").read_text(encoding="utf-8").startswith("## A Title\n\n")
    assert "page failed: cannot open PDF" in (out / "broken_p0001.md").read_text(encoding="utf-8")


def test_compact(tmp_path: Path) -> None:
    db = _db(tmp_path, {"/a.pdf": 3})
    out = tmp_path / "small.db"
    assert compact(db, out) == out.stat().st_size > 0
    conn = sqlite3.connect(out)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("SELECT COUNT(*) FROM regions").fetchone()[0] == 3 * len(PAGE_REGIONS)
    assert conn.execute("SELECT COUNT(*) FROM lines").fetchone()[0] == 3 * 6
    with pytest.raises(SinkError, match="exists"):
        compact(db, out)
    with pytest.raises(NotAFolioDatabase, match="not found"):
        export_jsonl(tmp_path / "missing.db", tmp_path / "x.jsonl")


# ---------------------------------------------------------------------------- show


def _show_db(tmp_path: Path, corpus: Path) -> tuple[Path, str, str]:
    pdf = tmp_path / "my doc.pdf"
    png = tmp_path / "scan.png"
    shutil.copy(corpus / "pages" / "cardinal.pdf", pdf)
    shutil.copy(corpus / "pages" / "baiona.png", png)
    db = tmp_path / "out.db"
    boxes = [
        (Region(0, "title", Task.TEXT, 0.9, (100, 100, 400, 200)), RecognitionResult("t")),
        (Region(1, "figure", Task.SKIP, 0.8, (50, 300, 600, 650)), None),
    ]
    with SQLiteSink(db, SinkConfig()) as sink:
        sink.start_run({"sources": {"dpi": 100}}, {}, [str(pdf), str(png)])
        sink.write_batch([
            PageOutcome(PageRef(str(pdf), 2), "ok", None, 1100, 850, boxes),
            PageOutcome(PageRef(str(png), 1), "ok", None, 640, 682, boxes),
        ])
    return db, str(pdf), str(png)


def test_resolve_page(tmp_path: Path, corpus: Path) -> None:
    db, pdf, png = _show_db(tmp_path, corpus)
    assert resolve_page(db, "1") == (pdf, 2)  # ".../my doc.pdf" < ".../scan.png"
    assert resolve_page(db, "2") == (png, 1)
    assert resolve_page(db, f"{pdf}#2") == (pdf, 2)
    assert resolve_page(db, "scan.png#1") == (png, 1)
    for bad in ("3", "0", "scan.png#7", "other.png#1", "nonsense"):
        with pytest.raises(SourceError):
            resolve_page(db, bad)


def test_render_page_draws_regions(tmp_path: Path, corpus: Path) -> None:
    db, pdf, _ = _show_db(tmp_path, corpus)
    out = tmp_path / "shown" / "page.png"
    render_page(db, pdf, 2, out, SourceConfig())  # the run's dpi (100) wins over 200
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (850, 1100, 3)  # landscape letter page at 100 dpi
    assert tuple(image[150, 100]) == (214, 39, 40)  # title box edge, title colour
    out2 = tmp_path / "png.png"
    render_page(db, None, 2, out2, SourceConfig())  # global page 2 = scan.png
    assert Image.open(out2).size == (640, 682)
