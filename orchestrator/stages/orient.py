"""Page orientation: how far a page's content is turned (0, 90, 180 or 270 degrees).

Scans come sideways or upside down (a /Rotate-less PDF of a rotated scan); the layout
and recognition models only read upright text. Two cheap signals decide:
- sideways or not: the page's text-line boxes (``orchestrator.stages.textlines``, detected once
  per page) are mostly taller than wide when the page lies on its side;
- upright or upside down: the recogniser is confident on upright lines and not on
  turned ones, so a few lines are read as they stand and, unless they read confidently,
  turned as well, and the scores compared.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from orchestrator.config import BF16_WIDTH_BUCKET_PX, DecodeConfig
from orchestrator.stages.textlines import rotate_lines
from orchestrator.types import PageLines, UInt8Array


def rotate_clockwise(image: UInt8Array, degrees: int) -> UInt8Array:
    """``image`` turned clockwise by a multiple of 90 degrees (a contiguous copy)."""
    turns = (degrees // 90) % 4
    if turns == 0:
        return image
    return np.ascontiguousarray(np.rot90(image, k=-turns))


class OrientationDetector:
    """Returns the clockwise rotation (0/90/180/270) that makes a page upright, from the
    text lines detected on the page as it stands."""

    def __init__(self, cfg: DecodeConfig) -> None:
        from orchestrator.stages.recognize import resolve_rec_precision

        self._cfg = cfg
        self._precision = resolve_rec_precision(cfg.orient_precision,
                                                key="decode.orient_precision")
        self._local = threading.local()

    def _recogniser(self) -> Any:
        rec = getattr(self._local, "rec", None)
        if rec is None:
            from orchestrator.stages.recognize import rapidocr_rec_engine

            rec = rapidocr_rec_engine(self._cfg.threads, self._precision, BF16_WIDTH_BUCKET_PX,
                                      {"Global.use_det": False})
            self._local.rec = rec
        return rec

    def _score(self, crops: list[UInt8Array]) -> float:
        rec = self._recogniser()
        scores = []
        for crop in crops:
            out = rec(crop, use_det=False, use_cls=False, use_rec=True)
            scores.append(float(out.scores[0]) if out.scores else 0.0)
        return float(np.mean(scores)) if scores else 0.0

    def detect(self, image: UInt8Array, lines: PageLines) -> int:
        """The rotation of ``image`` given its text ``lines`` (page pixels, as it stands)."""
        cfg = self._cfg
        boxes = lines.quads
        if len(boxes) == 0:
            return 0
        width = np.linalg.norm(boxes[:, 1] - boxes[:, 0], axis=1)
        height = np.linalg.norm(boxes[:, 3] - boxes[:, 0], axis=1)
        elongated = np.maximum(width, height) >= cfg.orient_line_aspect * np.minimum(width, height)
        tall = int(np.count_nonzero(elongated & (height > width)))
        wide = int(np.count_nonzero(elongated & (width > height)))
        if tall + wide < cfg.orient_min_lines:
            return 0  # too little text to tell: leave the page as it is
        rotation = 90 if tall > wide else 0
        view = image
        if rotation:
            # The same boxes, turned with the page: no second detection on the turned page.
            view = rotate_clockwise(image, 90)
            boxes = rotate_lines(lines, 90, image.shape[0], image.shape[1]).quads
        crops = self._line_crops(view, boxes)
        if not crops:
            return rotation
        upright = self._score(crops)
        if upright >= cfg.orient_confident:
            return rotation  # read well as it stands: a turned line never does
        turned = self._score([np.ascontiguousarray(c[::-1, ::-1]) for c in crops])
        if turned > upright + cfg.orient_margin:
            rotation += 180
        return rotation % 360

    def _line_crops(self, image: UInt8Array, boxes: np.ndarray) -> list[UInt8Array]:
        """The widest horizontal lines, trimmed in length."""
        cfg = self._cfg
        if len(boxes) == 0:
            return []
        x0 = boxes[:, :, 0].min(axis=1)
        x1 = boxes[:, :, 0].max(axis=1)
        y0 = boxes[:, :, 1].min(axis=1)
        y1 = boxes[:, :, 1].max(axis=1)
        horizontal = (x1 - x0) >= cfg.orient_line_aspect * (y1 - y0)
        order = [i for i in np.argsort(-(x1 - x0)) if horizontal[i]][: cfg.orient_lines]
        crops: list[UInt8Array] = []
        h, w = image.shape[:2]
        for i in order:
            top, bottom = max(0, int(y0[i])), min(h, int(np.ceil(y1[i])))
            left = max(0, int(x0[i]))
            # About one recogniser window (48 x 320 at its height): enough to judge by.
            length = int((bottom - top) * cfg.orient_crop_aspect)
            right = min(w, int(np.ceil(x1[i])), left + length)
            if bottom - top >= 4 and right - left >= 4:
                crops.append(np.ascontiguousarray(image[top:bottom, left:right]))
        return crops
