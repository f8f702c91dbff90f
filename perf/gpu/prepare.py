"""Write the inputs of the GPU run into one folder (default ``.gpu/`` at the repo root).

- ``pages/``: the corpus's pages as A4 300-dpi JPEGs (2480 x 3508, landscape pages
  3508 x 2480), the page fitted and centred on white: PDFs rendered by PDFium at the scale
  that fits, images resized to fit and re-encoded;
- ``models/``: copies of the layout model artifacts (``manifest.json`` and TorchScript),
  and the text-line detector's ONNX file with ``lines.json`` (its input size for an A4
  page at ``lines.side_px``, by rapidocr's own resize; its mean, std and pixel threshold),
  so ``perf/gpu/lines.py`` runs without rapidocr.

The folder travels to the GPU machine with the working tree (``perf/gpu/h200.sh`` reads
it); everything in it stays under ``--max-mib``.

Usage::

    .venv/bin/python perf/gpu/prepare.py                      # .gpu/pages, .gpu/models
    .venv/bin/python perf/gpu/prepare.py --out /tmp/gpu --count 4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # perf/: its helpers
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo: orchestrator

from corpus import CORPUS_PAGES

from orchestrator.config import REPO_ROOT, LayoutConfig, LinesConfig

A4_PX = (2480, 3508)  # 210 x 297 mm at 300 dpi
POINTS_PER_INCH = 72.0
DPI = 300
WHITE = 255


def canvas_for(width: float, height: float) -> tuple[int, int]:
    """(width, height) in pixels of the A4 sheet in the page's orientation."""
    return A4_PX if height >= width else (A4_PX[1], A4_PX[0])


def on_canvas(bgr: np.ndarray) -> np.ndarray:
    """The page fitted into A4 at 300 dpi (aspect kept) and centred on white."""
    h, w = bgr.shape[:2]
    cw, ch = canvas_for(w, h)
    scale = min(cw / w, ch / h)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    fitted = cv2.resize(bgr, (tw, th), interpolation=interp)
    canvas = np.full((ch, cw, 3), WHITE, dtype=np.uint8)
    y, x = (ch - th) // 2, (cw - tw) // 2
    canvas[y:y + th, x:x + tw] = fitted
    return canvas


def corpus_pages(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, BGR page) for every page of the corpus, PDFs rendered to fit A4 at 300 dpi."""
    import pypdfium2 as pdfium
    from PIL import Image

    for path in sorted(folder.iterdir()):
        suffix = path.suffix.lower()
        if suffix == ".pdf":
            pdf = pdfium.PdfDocument(str(path))
            try:
                for index in range(len(pdf)):
                    page = pdf[index]
                    w_pt, h_pt = page.get_size()
                    cw, ch = canvas_for(w_pt, h_pt)
                    scale = min(cw / w_pt, ch / h_pt)
                    bitmap = page.render(scale=scale)
                    rgb = np.asarray(bitmap.to_pil().convert("RGB"))
                    bitmap.close()
                    page.close()
                    yield f"{path.stem}-p{index + 1}", np.ascontiguousarray(rgb[:, :, ::-1])
            finally:
                pdf.close()
        elif suffix in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
            with Image.open(path) as image:
                rgb = np.asarray(image.convert("RGB"))  # palette pages through their palette
            yield path.stem, np.ascontiguousarray(rgb[:, :, ::-1])


def write_lines_model(models_dir: Path, side_px: int) -> None:
    """The text-line detector's ONNX file and what perf/gpu/lines.py needs to feed it."""
    from dataclasses import replace

    from orchestrator.stages.recognize import _rapidocr_models
    from orchestrator.stages.textlines import DET_MODEL, LineDetector

    cfg = replace(LinesConfig(), side_px=side_px)
    det = LineDetector(cfg)._detector()
    resized = det.get_preprocess().resize(np.zeros((A4_PX[1], A4_PX[0], 3), np.uint8))
    shutil.copy2(_rapidocr_models() / DET_MODEL, models_dir / DET_MODEL)
    (models_dir / "lines.json").write_text(json.dumps({
        "model": DET_MODEL, "side_px": cfg.side_px, "input_hw": list(resized.shape[:2]),
        "mean": [float(v) for v in det.mean], "std": [float(v) for v in det.std],
        "pixel_threshold": cfg.pixel_threshold}, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / ".gpu")
    parser.add_argument("--corpus", type=Path, default=CORPUS_PAGES)
    parser.add_argument("--model-dir", type=Path, default=LayoutConfig().model_dir)
    parser.add_argument("--count", type=int, default=22, help="pages to write")
    parser.add_argument("--quality", type=int, default=93,
                        help="JPEG quality (93: about 1.3 MB per corpus page)")
    parser.add_argument("--max-mib", type=float, default=55.0)
    parser.add_argument("--lines-side", type=int, default=LinesConfig().side_px,
                        help="lines.side_px for the detector's input size (a CPU dry run: "
                             "smaller)")
    args = parser.parse_args()

    pages_dir, models_dir = args.out / "pages", args.out / "models"
    for folder in (pages_dir, models_dir):
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
    written = 0
    for number, (name, bgr) in enumerate(corpus_pages(args.corpus), start=1):
        if written == args.count:
            break
        page = on_canvas(bgr)
        ok, jpeg = cv2.imencode(".jpg", page, [cv2.IMWRITE_JPEG_QUALITY, args.quality])
        if not ok:
            raise SystemExit(f"cannot encode {name}")
        (pages_dir / f"{number:02d}-{name}.jpg").write_bytes(jpeg.tobytes())
        written += 1
    for path in sorted(args.model_dir.iterdir()):
        if path.suffix in (".json", ".pt"):
            shutil.copy2(path, models_dir / path.name)
    write_lines_model(models_dir, args.lines_side)
    sizes = [p.stat().st_size for p in pages_dir.iterdir()]
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{written} pages in {pages_dir}: {sum(sizes) / 2**20:.1f} MiB, "
          f"{sum(sizes) / len(sizes) / 1e6:.2f} MB each on average "
          f"(min {min(sizes) / 1e6:.2f}, max {max(sizes) / 1e6:.2f})")
    print(f"models in {models_dir}: {', '.join(sorted(p.name for p in models_dir.iterdir()))}")
    print(f"total {total / 2**20:.1f} MiB in {args.out}")
    if written < args.count:
        raise SystemExit(f"only {written} pages in {args.corpus}, {args.count} asked for")
    if total > args.max_mib * 2**20:
        raise SystemExit(f"{args.out} holds {total / 2**20:.1f} MiB, over {args.max_mib} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
