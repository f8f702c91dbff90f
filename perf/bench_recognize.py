"""Recognition precision: CPU and text, on the corpus, in one run.

Decodes every corpus page once (with its text lines), lays it out and gives its lines to
its regions, then reads every region's lines through ``RapidOCRRecognizer.submit`` (the
pipeline's pool) at each of ``--precisions`` (default fp32,bf16); prints the recognition
CPU, the word F1 of each against the first (fp32: the reference numerics), linn.png's word
F1 against linn.txt, and the lines that differ.

    .venv/bin/python perf/bench_recognize.py [--precisions fp32,bf16] [--show-diffs N]
        [SOURCE...]
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import time

from corpus import CORPUS_PAGES, REPO

from orchestrator.config import FolioConfig
from orchestrator.engines.pipeline import InProcessLayout
from orchestrator.stages.coverage import cover_page
from orchestrator.stages.crop import region_tasks
from orchestrator.stages.decode import Decoder
from orchestrator.stages.recognize import RapidOCRRecognizer
from orchestrator.stages.sources import open_sources
from orchestrator.types import DecodedPage, LayoutResult

sys.path.insert(0, str(REPO / "tests"))
from textmetrics import word_f1


def laid_out(sources: list[str], cfg: FolioConfig) -> list[tuple[str, DecodedPage, LayoutResult]]:
    decoder = Decoder(cfg.decode, cfg.sources, cfg.lines)
    layout = InProcessLayout(cfg, "cpu")
    pages = []
    for encoded in open_sources(sources, cfg.sources).pages():
        (decoded,) = decoder.decode([encoded])
        assert not isinstance(decoded, Exception), decoded
        (result,) = layout.detect([decoded], [encoded])
        assert not isinstance(result, Exception), result
        result = cover_page(result, decoded.lines, cfg.lines, cfg.layout)
        pages.append((str(encoded.ref), decoded, result))
    return pages


def linn_f1(pages: list[tuple[str, DecodedPage, LayoutResult]], texts: list[str]) -> str:
    truth = CORPUS_PAGES / "linn.txt"
    scores = [word_f1(text, truth.read_text(encoding="utf-8"))
              for (ref, _, _), text in zip(pages, texts, strict=True) if "linn.png" in ref]
    return f"{scores[0]:.4f}" if scores and truth.exists() else "n/a"


def precisions(pages: list[tuple[str, DecodedPage, LayoutResult]], cfg: FolioConfig,
               names: list[str], show: int) -> None:
    tasks = [region_tasks(page, layout, cfg.crop) for _, page, layout in pages]
    texts: dict[str, list[str]] = {}
    for name in names:
        rec = RapidOCRRecognizer(dataclasses.replace(cfg.recognize, precision=name))
        try:
            rec.submit(tasks[0][:1]).result()  # warm-up: engines and compiled models
            cpu = time.process_time()
            futures = [rec.submit(t) for t in tasks]
            texts[name] = ["\n".join(r.text or "" for r in f.result()) for f in futures]
            cpu = time.process_time() - cpu
        finally:
            rec.close()
        words = sum(len(t.split()) for t in texts[name])
        print(f"precision {name:5s} recognition CPU {cpu:6.1f} s, {words} words, "
              f"linn F1 {linn_f1(pages, texts[name])}")
    reference = names[0]
    for name in names[1:]:
        f1 = word_f1("\n".join(texts[name]), "\n".join(texts[reference]))
        diffs = [line for a, b in zip(texts[reference], texts[name], strict=True)
                 for line in difflib.unified_diff(a.splitlines(), b.splitlines(),
                                                  lineterm="", n=0)
                 if line[:1] in "+-" and line[:3] not in ("+++", "---")]
        print(f"{name} vs {reference}: word F1 {f1:.4f}, {len(diffs) // 2} line pairs differ")
        for line in diffs[:show]:
            print("   ", line[:110])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="*", default=[str(CORPUS_PAGES)])
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--show-diffs", type=int, default=0, help="print N differing lines")
    args = parser.parse_args()
    cfg = FolioConfig()
    pages = laid_out(args.sources, cfg)
    print(f"{len(pages)} pages")
    precisions(pages, cfg, args.precisions.split(","), args.show_diffs)


if __name__ == "__main__":
    main()
