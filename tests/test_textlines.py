"""Page-level text-line detection (``orchestrator.stages.textlines``) against rapidocr's own
pre-processing, on a real page."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from layout_fixtures import load_bgr
from rapidocr.ch_ppocr_det.utils import DetPreProcess

from orchestrator.config import LinesConfig
from orchestrator.stages.textlines import LineDetector


def test_the_page_is_normalised_in_float32_to_rapidocrs_values(corpus_dir: Path) -> None:
    """rapidocr's defaults normalise the page in float64 and copy it back; the detector's
    pre-processing stays in float32 and feeds the model the same input, bit for bit."""
    detector = LineDetector(LinesConfig())
    det = detector._detector()
    image = load_bgr(corpus_dir / "pages" / "typewriter.png")
    ours = det.get_preprocess()
    stock = DetPreProcess(det.limit_side_len, det.limit_type, [float(v) for v in det.mean],
                          [float(v) for v in det.std])  # lists, as rapidocr's config has them
    resized = ours.resize(image)
    assert ours.normalize(resized).dtype == np.float32
    assert stock.normalize(resized).dtype == np.float64
    want, got = stock(image), ours(image)
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want)
    lines = detector.detect(image)
    assert len(lines) > 10
