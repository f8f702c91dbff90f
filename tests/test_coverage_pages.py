"""Every word on the page, on real documents through the `folio` CLI: a form the layout
model calls a figure, text outside every layout box, words at box edges, page furniture,
and the lines stored with their boxes and scores.

Born-digital documents (their text layer is the truth) rendered at 150 dpi, and the scan
linn.png with its transcript.
"""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from textmetrics import column_order, edit_distance, word_f1

FOLIO = [sys.executable, "-m", "orchestrator.cli"]
pytestmark = pytest.mark.slow
FORM = "form_210966.pdf"
REGISTER = "federal-register-2020-17221.pdf"


def folio(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*FOLIO, *map(str, args)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, model_dir: Path
        ) -> tuple[Path, Path]:
    """One run over the two-page form (150 dpi) and linn.png; the database and its JSONL."""
    out = tmp_path_factory.mktemp("coverage")
    db = out / "folio.db"
    folio("run", corpus_dir / "accuracy" / FORM, corpus_dir / "pages" / "linn.png",
          "--db", db, "--dpi", "150", "--no-progress")
    jsonl = out / "pages.jsonl"
    folio("export", db, "--format", "jsonl", "--out", jsonl)
    return db, jsonl


def pages(jsonl: Path) -> dict[str, dict]:
    import json

    return {f"{Path(p['source']).name}#{p['page']}": p
            for p in map(json.loads, jsonl.read_text(encoding="utf-8").splitlines())}


def truth(corpus_dir: Path, page: int) -> str:
    pdf = pdfium.PdfDocument(str(corpus_dir / "accuracy" / FORM))
    try:
        return str(pdf[page - 1].get_textpage().get_text_range())
    finally:
        pdf.close()


def test_a_form_the_layout_model_calls_a_figure_keeps_its_words(
        run: tuple[Path, Path], corpus_dir: Path) -> None:
    """The form's body is one 'figure' to the layout model: its text is read and stored
    with the figure, and the page keeps what its text layer says."""
    _, jsonl = run
    for number in (1, 2):
        page = pages(jsonl)[f"{FORM}#{number}"]
        expected = truth(corpus_dir, number)
        figures = [r for r in page["regions"] if r["label"] == "figure" and r["text"]]
        assert figures, [r["label"] for r in page["regions"]]
        biggest = max(figures, key=lambda r: len(r["text"]))
        assert len(words(biggest["text"]) & words(expected)) >= 100
        text = "\n".join(r["text"] or "" for r in page["regions"])
        assert word_f1(text, expected) >= 0.96


def test_text_outside_every_layout_box_is_kept(run: tuple[Path, Path], corpus_dir: Path
                                               ) -> None:
    """linn.png's logo line has no layout box: it becomes a region of its own lines."""
    _, jsonl = run
    linn = pages(jsonl)["linn.png#1"]
    blocks = [r for r in linn["regions"] if r["origin"] == "lines"]
    assert blocks and all(r["label"] == "text" and r["lines"] for r in blocks)
    transcript = words((corpus_dir / "pages" / "linn.txt").read_text(encoding="utf-8"))
    found = set().union(*(words(r["text"] or "") for r in blocks))
    assert found and found <= transcript


def test_a_word_at_a_box_edge_is_read_whole(run: tuple[Path, Path], corpus_dir: Path) -> None:
    """Lines reaching past their layout box's edge are read from the line, not the box:
    their first and last words are whole words of the transcript."""
    _, jsonl = run
    linn = pages(jsonl)["linn.png#1"]
    transcript = words((corpus_dir / "pages" / "linn.txt").read_text(encoding="utf-8"))
    past_edge = []
    for region in linn["regions"]:
        x0, _, x1, _ = region["bbox"]
        for line in region["lines"]:
            if region["origin"] == "layout" and (line["bbox"][2] > x1 + 8
                                                 or line["bbox"][0] < x0 - 8):
                past_edge.append(line["text"])
    assert len(past_edge) >= 5, past_edge
    ends = [w for text in past_edge for w in (re.findall(r"\w+", text.lower())[:1]
                                              + re.findall(r"\w+", text.lower())[-1:])]
    whole = [w for w in ends if w in transcript]
    assert len(whole) >= 0.9 * len(ends), sorted(set(ends) - transcript)


def test_headers_and_footers_are_stored_and_left_out_of_markdown(
        run: tuple[Path, Path], tmp_path: Path) -> None:
    db, jsonl = run
    furniture = [(key, r) for key, p in pages(jsonl).items() for r in p["regions"]
                 if r["label"] in ("header", "footer") and r["text"]]
    assert furniture
    md_dir, with_dir = tmp_path / "md", tmp_path / "md-furniture"
    folio("export", db, "--format", "markdown", "--per", "document", "--out", md_dir)
    folio("export", db, "--format", "markdown", "--per", "document", "--include-furniture",
          "--out", with_dir)
    stem = Path(FORM).stem
    plain = (md_dir / f"{stem}.md").read_text(encoding="utf-8")
    full = (with_dir / f"{stem}.md").read_text(encoding="utf-8")
    for key, region in furniture:
        if key.startswith(FORM):
            line = region["text"].splitlines()[0]
            assert line not in plain and line in full
    assert plain.index("<!-- page 1 -->") < plain.index("<!-- page 2 -->")


def test_stored_lines_have_boxes_on_the_page_and_scores(run: tuple[Path, Path]) -> None:
    db, jsonl = run
    total = 0
    for page in pages(jsonl).values():
        assert page["schema_version"] == 2 and page["status"] == "ok"
        for region in page["regions"]:
            if region["text"]:
                assert region["lines"] and 0.0 <= region["confidence"] <= 1.0
                assert region["text_format"] == "plain"
            for line in region["lines"]:
                x0, y0, x1, y1 = line["bbox"]
                assert 0 <= x0 < x1 <= page["width"] and 0 <= y0 < y1 <= page["height"]
                assert 0.0 <= line["score"] <= 1.0
                assert line.get("low_confidence", False) == (line["score"] < 0.5)
                total += 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM lines").fetchone()[0] == total > 100
        # one region per line: no line box stored twice on a page
        assert conn.execute(
            "SELECT COUNT(*) FROM (SELECT page_id, x0, y0, x1, y1 FROM lines "
            "GROUP BY page_id, x0, y0, x1, y1 HAVING COUNT(*) > 1)").fetchone()[0] == 0


def test_markdown_figures_are_crops_or_placeholders_never_dead_links(
        run: tuple[Path, Path], tmp_path: Path) -> None:
    db, _ = run
    for figures in (False, True):
        out = tmp_path / f"md-{figures}"
        folio("export", db, "--format", "markdown", "--out", out,
              *(["--figures"] if figures else []))
        links = [(md, link) for md in out.glob("*.md")
                 for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md.read_text("utf-8"))]
        assert all((md.parent / link).is_file() for md, link in links), links
        assert bool(links) == figures
        if not figures:
            assert "*[figure]*" in "".join(md.read_text("utf-8") for md in out.glob("*.md"))


@pytest.fixture(scope="module")
def register(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, model_dir: Path
             ) -> dict[int, tuple[str, str]]:
    """Federal Register pages 2 and 3 (three columns, footnotes under them, a heading inside
    a text box the layout model found) rendered at 150 dpi and run through folio: per page,
    folio's text in reading order and the text layer's lines in column order."""
    out = tmp_path_factory.mktemp("register")
    pdf = pdfium.PdfDocument(str(corpus_dir / "accuracy" / REGISTER))
    truths: dict[int, str] = {}
    try:
        for number in (2, 3):
            page = pdf[number - 1]
            page.render(scale=150 / 72).to_pil().convert("RGB").save(out / f"p{number}.png")
            truths[number] = column_order(page)
    finally:
        pdf.close()
    db = out / "folio.db"
    folio("run", out / "p2.png", out / "p3.png", "--db", db, "--no-progress")
    conn = sqlite3.connect(db)
    found: dict[int, list[str]] = {}
    for source, text in conn.execute(
            "SELECT d.source, r.text FROM regions r JOIN pages p ON p.id = r.page_id "
            "JOIN documents d ON d.id = p.document_id WHERE r.text IS NOT NULL "
            "ORDER BY d.source, r.idx"):
        found.setdefault(int(Path(source).stem[1:]), []).append(text)
    conn.close()
    return {n: ("\n".join(found[n]), truths[n]) for n in (2, 3)}


def test_three_columns_read_column_by_column_with_their_footnotes(
        register: dict[int, tuple[str, str]]) -> None:
    """Reading order on running text: against the text layer's lines read column by column
    (footnotes under their column), folio's page text is within the 0.15 edit distance of a
    correct reading order (the text layer's own stream, which lists the footnotes first,
    is not one)."""
    for number, (found, truth) in register.items():
        assert edit_distance(found, truth) <= 0.15, (number, found[:2000])
        assert word_f1(found, truth) >= 0.96, number


def test_a_heading_inside_a_text_box_is_read_between_its_neighbours(
        register: dict[int, tuple[str, str]]) -> None:
    """Page 3: the layout model's text box runs from above the heading "Proposed Design
    Changes" to far below it; the heading is read after the line above it and before the
    paragraph it heads, as printed."""
    found, _ = register[3]
    flat = " ".join(found.split())
    heading = flat.index("Proposed Design Changes")
    assert flat.index("public notice and comment process.") < heading
    assert heading < flat.index("The FAA proposes mandating the")

