"""Text lines: found once per page, for orientation, coverage and recognition.

rapidocr's DB text detector (the PP-OCRv6 small det model in the rapidocr wheel) runs on
the whole page, scaled down so its long side is at most ``lines.side_px``; its
quadrilaterals come back in page pixels. The model runs through OpenVINO (BF16 where the
CPU computes it natively): on a 1280 x 1664 page one thread takes about 0.26 s in BF16,
0.54 s in OpenVINO fp32, 1.9 s in onnxruntime fp32.

Usage::

    detector = LineDetector(cfg.lines)
    lines = detector.detect(page_bgr)                   # PageLines, page pixels
    upright = rotate_lines(lines, 90, height, width)    # the same lines, page turned 90 cw
    crop = line_image(page_bgr, upright.quads[0])       # one line, straightened
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from orchestrator.config import LinesConfig
from orchestrator.types import PageLines, UInt8Array

DET_MODEL = "PP-OCRv6_det_small.onnx"  # the detection model in the rapidocr wheel


class LineDetector:
    """Detects the text lines of whole pages. Thread-safe: one engine per calling thread."""

    def __init__(self, cfg: LinesConfig) -> None:
        from orchestrator.stages.recognize import resolve_rec_precision

        self._cfg = cfg
        self.precision = resolve_rec_precision(cfg.precision, key="lines.precision")
        self._local = threading.local()

    def _detector(self) -> Any:
        det = getattr(self._local, "det", None)
        if det is None:
            from orchestrator.stages.recognize import (
                OpenVINOSession,
                _rapidocr_models,
                rapidocr_engine,
            )

            cfg = self._cfg
            path = _rapidocr_models() / DET_MODEL
            engine = rapidocr_engine(cfg.threads, {
                "Global.use_rec": False,
                "Det.model_path": str(path),
                "Det.limit_type": "max",
                "Det.limit_side_len": cfg.side_px,
                "Det.thresh": cfg.pixel_threshold,
                "Det.box_thresh": cfg.box_threshold,
                "Det.unclip_ratio": cfg.unclip_ratio,
                "Det.max_candidates": cfg.max_lines,
            })
            det = engine._load_det_model()
            # rapidocr keeps mean and std as lists that its pre-processing turns into
            # float64 arrays, so the whole page is normalised in float64 and copied back
            # to float32 (about 0.1 s a page); float32 ones keep the same arithmetic in
            # float32, with the same result here (0.5 and 0.5 are exact).
            det.mean = np.asarray(list(det.mean), dtype=np.float32)
            det.std = np.asarray(list(det.std), dtype=np.float32)
            # rapidocr keeps its pre- and post-processing; only the forward pass is swapped.
            det.session = OpenVINOSession(path, cfg.threads, self.precision)
            self._local.det = det
        return det

    def detect(self, image: UInt8Array) -> PageLines:
        """The text lines of a page (HWC uint8 BGR), in its pixels, top to bottom."""
        out = self._detector()(image)
        if out.boxes is None or len(out.boxes) == 0:
            return PageLines.empty()
        quads = np.asarray(out.boxes, dtype=np.float32).reshape(-1, 4, 2)
        scores = np.asarray(out.scores, dtype=np.float32).reshape(-1)
        return PageLines(np.ascontiguousarray(quads), scores)


def rotate_lines(lines: PageLines, degrees: int, height: int, width: int) -> PageLines:
    """The lines of a ``height`` x ``width`` page as they lie once the page is turned
    clockwise by ``degrees`` (a multiple of 90), corners still clockwise from top left."""
    turns = (degrees // 90) % 4
    if turns == 0 or len(lines) == 0:
        return lines
    x, y = lines.quads[:, :, 0], lines.quads[:, :, 1]
    if turns == 1:
        turned = np.stack([height - y, x], axis=2)
    elif turns == 2:
        turned = np.stack([width - x, height - y], axis=2)
    else:
        turned = np.stack([y, width - x], axis=2)
    # A rotation keeps the corners' clockwise order; start each quad at its top-left one.
    start = np.argmin(turned.sum(axis=2), axis=1)
    order = (start[:, None] + np.arange(4)[None, :]) % 4
    quads = np.take_along_axis(turned, order[:, :, None], axis=1)
    return PageLines(np.ascontiguousarray(quads, dtype=np.float32), lines.scores)


def line_image(page: UInt8Array, quad: np.ndarray) -> UInt8Array:
    """One line cut out of the page and straightened (rapidocr's perspective crop of its
    quad, as its own pipeline reads lines); vertical text is turned to read left to right."""
    from rapidocr.utils.process_img import get_rotate_crop_image

    points = np.array(quad, dtype=np.float32).reshape(4, 2)  # a copy: rapidocr may write it
    return np.ascontiguousarray(get_rotate_crop_image(page, points))
