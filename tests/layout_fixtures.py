"""Helpers for the layout tests: corpus pages as model inputs, a pure-Python NMS reference.

Imported by ``test_layout.py`` and ``test_postprocess.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from orchestrator.config import REPO_ROOT, LayoutConfig
from orchestrator.models.artifacts import LAYOUT_WHEEL_NAME

LAYOUT_WHEEL = REPO_ROOT / "build" / "wheels" / LAYOUT_WHEEL_NAME
# Real pages: a two-column brochure (palette PNG), typewritten text, text with pictures.
PAGES = ("linn.png", "typewriter.png", "baiona.png")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def load_bgr(path: Path) -> np.ndarray:
    """HWC uint8 BGR, palette images converted through their palette (linn.png is 0/1)."""
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def model_input(bgr: np.ndarray, cfg: LayoutConfig) -> np.ndarray:
    """What the CDLA model expects (and the DALI decode stage produces): stretched bilinear
    resize to H x W, BGR, x / 255, ImageNet mean/std per channel, CHW float32."""
    resized = cv2.resize(bgr, (cfg.input_width, cfg.input_height), interpolation=cv2.INTER_LINEAR)
    norm = (resized.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(norm.transpose(2, 0, 1), dtype=np.float32)


def python_nms(
    boxes: Sequence[Sequence[float]],
    scores: Sequence[float],
    iou_threshold: float,
    classes: Sequence[int] | None = None,
) -> list[int]:
    """The textbook sequential greedy NMS, plain Python over box pairs (test reference)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept: list[int] = []
    for i in order:
        bi = boxes[i]
        suppressed = False
        for j in kept:
            if classes is not None and classes[i] != classes[j]:
                continue
            bj = boxes[j]
            w = max(0.0, min(bi[2], bj[2]) - max(bi[0], bj[0]))
            h = max(0.0, min(bi[3], bj[3]) - max(bi[1], bj[1]))
            inter = w * h
            union = (
                max(0.0, bi[2] - bi[0]) * max(0.0, bi[3] - bi[1])
                + max(0.0, bj[2] - bj[0]) * max(0.0, bj[3] - bj[1])
                - inter
            )
            if inter / max(union, 1e-9) > iou_threshold:
                suppressed = True
                break
        if not suppressed:
            kept.append(i)
    return kept


def random_boxes(
    rng: np.random.Generator, n: int, size: float = 1000.0, clustered: bool = True
) -> np.ndarray:
    """(n, 4) float boxes; clustered ones overlap heavily (like detector candidates)."""
    if clustered:
        centers = rng.uniform(0, size, (max(n // 6, 1), 2))
        pick = rng.integers(0, len(centers), n)
        cxcy = centers[pick] + rng.normal(0, size * 0.02, (n, 2))
    else:
        cxcy = rng.uniform(0, size, (n, 2))
    wh = rng.uniform(size * 0.03, size * 0.25, (n, 2))
    return np.concatenate([cxcy - wh / 2, cxcy + wh / 2], axis=1)


def corpus_pages_bgr(pages_dir: Path, dpi: int = 200) -> list[tuple[str, np.ndarray]]:
    """Every page of the corpus folder as (name, HWC uint8 BGR): images through their
    palette (``load_bgr``), PDFs rendered by folio's own source at ``dpi``."""
    from orchestrator.config import SourceConfig
    from orchestrator.stages.sources import open_sources

    pages: list[tuple[str, np.ndarray]] = []
    for page in open_sources([pages_dir], SourceConfig(dpi=dpi)).pages():
        assert page.error is None, f"{page.ref}: {page.error}"
        name = f"{Path(page.ref.source).name}#{page.ref.page}"
        if page.pixels is not None:
            pages.append((name, page.pixels))
        else:
            pages.append((name, load_bgr(Path(page.ref.source))))
    return pages
