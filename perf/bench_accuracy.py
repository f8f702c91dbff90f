"""How much of each page's text folio keeps, against the page's own text layer, beside
rapidocr's plain whole-page OCR of the same images, in one run.

Documents: the born-digital PDFs in ``corpus/accuracy/`` (their text layer is the truth),
rendered at ``--dpi`` (150) to PNG, and the scan ``pages/linn.png`` with its transcript
``linn.txt``. Sets: forms (form_*), three-column running text (the Federal Register,
first ``--register-pages``), dense tables (the NICS statistics and the precinct bulletin),
and the scan.

Per page: word F1 (multisets of lower-case words) and the normalised edit distance
(Levenshtein over whitespace-normalised text, divided by the longer length) of

- folio: ``folio run`` on the rendered images (in-process, default config), each page's
  stored region texts in reading order, every region included (headers and footers too);
- baseline: ``rapidocr.RapidOCR()`` with its defaults on the same images, its lines in
  its order (the plain whole-page OCR a user would otherwise run).

On the Federal Register pages the text layer's own order is not always the reading order:
pages 2 and 3 list every footnote of the page first, then the body. A page of running
text has more than one correct reading, so for these pages the benchmark also builds a
second one from the same text layer, its lines read column by column (``column_order``:
lines that span the page at its top first, then each column left to right, top to bottom,
footnotes under their column, from the text layer's own glyph boxes), and reports the
edit distance against it ("columns") and against whichever of the two orders is nearer
("nearer"), for both readers. The column order is a plain rule, right on pages of three
columns and wrong where a table spans the columns (page 6), which is why it is a second
truth and not a replacement for the stream.

Both read the same image files, after a one-page warm-up each; pages/s is the number of
pages over the run's wall time. Prints a line per page, then per set the mean of each
measure for both and the speed ratio.

    .venv/bin/python perf/bench_accuracy.py [--dpi 150] [--register-pages 3]
        [--limit N] [--set KEY=VALUE ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corpus import CORPUS_PAGES, REPO

sys.path.insert(0, str(REPO / "tests"))
from textmetrics import column_order, edit_distance, word_f1

ACCURACY = CORPUS_PAGES.parent / "accuracy"
SETS = {
    "forms": ("form_210966.pdf", "form_dd0293.pdf"),
    "three-column text": ("federal-register-2020-17221.pdf",),
    "tables": ("nics-background-checks-2015-11.pdf", "la-precinct-bulletin-2014-p1.pdf"),
    "scan (linn.png)": ("linn.png",),
}
REGISTER = "federal-register-2020-17221.pdf"


@dataclass
class Page:
    set: str
    name: str
    image: Path
    truth: str
    columns_truth: str | None = None  # the text layer's lines in column order
    scores: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)
    # who -> (F1, ED, ED against columns_truth, ED against the nearer order); nan: none

    def score(self, who: str, found: str) -> None:
        stream = edit_distance(found, self.truth)
        columns = (edit_distance(found, self.columns_truth)
                   if self.columns_truth is not None else float("nan"))
        self.scores[who] = (word_f1(found, self.truth), stream, columns,
                            min(stream, columns))


def render(out: Path, dpi: int, register_pages: int, limit: int | None,
           sets: list[str]) -> list[Page]:
    """Every page of the accuracy documents as a PNG in ``out``, with its text layer."""
    import pypdfium2 as pdfium

    pages: list[Page] = []
    for set_name, files in SETS.items():
        if sets and set_name not in sets:
            continue
        for file in files:
            if file == "linn.png":
                pages.append(Page(set_name, "linn.png", CORPUS_PAGES / "linn.png",
                                  (CORPUS_PAGES / "linn.txt").read_text(encoding="utf-8")))
                continue
            pdf = pdfium.PdfDocument(str(ACCURACY / file))
            count = min(len(pdf), register_pages) if file == REGISTER else len(pdf)
            for i in range(count):
                page = pdf[i]
                truth = page.get_textpage().get_text_range()
                image = out / f"{Path(file).stem}-p{i + 1:02d}.png"
                page.render(scale=dpi / 72).to_pil().convert("RGB").save(image)
                pages.append(Page(set_name, image.name, image, truth,
                                  column_order(page) if file == REGISTER else None))
            pdf.close()
    return pages[:limit] if limit else pages


def run_folio(pages: list[Page], work: Path, overrides: dict[str, Any]) -> float:
    """OCR the pages with folio; fills each page's scores; returns pages/s."""
    from orchestrator.config import FolioConfig
    from orchestrator.engines.pipeline import Pipeline

    cfg = FolioConfig().override(overrides)
    pipeline = Pipeline(cfg)
    try:
        pipeline.run([str(pages[0].image)], work / "warmup.db")
        db = work / "folio.db"
        summary = pipeline.run([str(p.image) for p in pages], db)
    finally:
        pipeline.close()
    assert summary.errors == 0, summary.first_errors
    conn = sqlite3.connect(db)
    texts: dict[str, list[str]] = {}
    for source, text in conn.execute(
            "SELECT d.source, r.text FROM regions r JOIN pages p ON p.id = r.page_id "
            "JOIN documents d ON d.id = p.document_id ORDER BY d.source, p.page, r.idx"):
        texts.setdefault(Path(source).name, []).append(text or "")
    conn.close()
    for page in pages:
        found = "\n".join(texts.get(page.image.name, []))
        page.score("folio", found)
    return len(pages) / summary.elapsed_s


def run_baseline(pages: list[Page]) -> float:
    """rapidocr's whole-page OCR at its defaults; fills each page's scores; returns pages/s."""
    import cv2
    from rapidocr import RapidOCR

    engine = RapidOCR(params={"Global.log_level": "error"})
    images = [cv2.imread(str(p.image)) for p in pages]
    engine(images[0])  # warm-up
    start = time.perf_counter()
    outputs = [engine(image) for image in images]
    elapsed = time.perf_counter() - start
    for page, out in zip(pages, outputs, strict=True):
        found = "\n".join(out.txts or ())
        page.score("rapidocr", found)
    return len(pages) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dpi", type=int, default=150)
    parser.add_argument("--register-pages", type=int, default=3,
                        help="Federal Register pages to use (it has 15)")
    parser.add_argument("--limit", type=int, help="only the first N pages (smoke test)")
    parser.add_argument("--sets", default="", help="comma-separated set names (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="folio config override, e.g. lines.side_px=1600")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = json.loads(value) if re.fullmatch(r"[-\d.]+|true|false", value) else value

    with tempfile.TemporaryDirectory(prefix="folio-accuracy-") as tmp:
        work = Path(tmp)
        sets = [name for name in args.sets.split(",") if name]
        unknown = set(sets) - set(SETS)
        if unknown:
            parser.error(f"unknown sets {sorted(unknown)}; the sets are {list(SETS)}")
        pages = render(work, args.dpi, args.register_pages, args.limit, sets)
        print(f"{len(pages)} pages at {args.dpi} dpi (linn.png as it is)")
        folio_rate = run_folio(pages, work, overrides)
        base_rate = run_baseline(pages)

    print(f"\n{'page':<44} {'folio F1':>9} {'ED':>6} {'rapidocr F1':>12} {'ED':>6}"
          f"   ED columns, nearer: folio | rapidocr")
    for p in pages:
        (f1, ed, ced, ned), (bf1, bed, bced, bned) = p.scores["folio"], p.scores["rapidocr"]
        extra = (f"   {ced:.3f} {ned:.3f} | {bced:.3f} {bned:.3f}"
                 if p.columns_truth is not None else "")
        print(f"{p.name:<44} {f1:>9.4f} {ed:>6.3f} {bf1:>12.4f} {bed:>6.3f}{extra}")
    print(f"\n{'set':<20} {'pages':>5} {'folio F1':>9} {'rapidocr F1':>12} "
          f"{'folio ED':>9} {'rapidocr ED':>12}   ED columns, nearer: folio | rapidocr")
    summary: dict[str, Any] = {"dpi": args.dpi, "sets": {}}
    for set_name in SETS:
        members = [p for p in pages if p.set == set_name]
        if not members:
            continue
        means = {who: [sum(p.scores[who][k] for p in members) / len(members)
                       for k in (0, 1, 2, 3)] for who in ("folio", "rapidocr")}
        ordered = all(p.columns_truth is not None for p in members)
        summary["sets"][set_name] = {"pages": len(members), **{
            who: m if ordered else m[:2] for who, m in means.items()}}
        extra = (f"   {means['folio'][2]:.3f} {means['folio'][3]:.3f} | "
                 f"{means['rapidocr'][2]:.3f} {means['rapidocr'][3]:.3f}" if ordered else "")
        print(f"{set_name:<20} {len(members):>5} {means['folio'][0]:>9.4f} "
              f"{means['rapidocr'][0]:>12.4f} {means['folio'][1]:>9.3f} "
              f"{means['rapidocr'][1]:>12.3f}{extra}")
    print(f"\nspeed: folio {folio_rate:.3f} pages/s, rapidocr whole-page {base_rate:.3f} pages/s: "
          f"{folio_rate / base_rate:.2f}x")
    summary.update(folio_pages_per_s=folio_rate, rapidocr_pages_per_s=base_rate)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
