"""Orientation: pages turned by 90/180/270 degrees are found and turned upright."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from orchestrator.config import DecodeConfig, LinesConfig, SourceConfig
from orchestrator.stages.decode import Decoder
from orchestrator.stages.orient import OrientationDetector, rotate_clockwise
from orchestrator.stages.textlines import LineDetector
from orchestrator.types import EncodedPage, PageRef, UInt8Array

_LINES = LineDetector(LinesConfig())


def _verdict(detector: OrientationDetector, page: UInt8Array) -> int:
    return detector.detect(page, _LINES.detect(page))


@pytest.fixture(scope="module", params=["auto", "fp32"])
def detector(request: pytest.FixtureRequest) -> OrientationDetector:
    """The default (BF16 probe reads where the CPU has it) and the fp32 reference."""
    return OrientationDetector(DecodeConfig(orient_precision=request.param))


@pytest.mark.parametrize("name", ["typewriter.png", "baiona.png"])
@pytest.mark.parametrize("turned", [0, 90, 180, 270])
def test_detects_how_far_a_page_is_turned(detector: OrientationDetector, corpus_dir: Path,
                                          name: str, turned: int) -> None:
    upright = cv2.imread(str(corpus_dir / "pages" / name))
    page = rotate_clockwise(upright, turned)
    assert (_verdict(detector, page) + turned) % 360 == 0


def test_a_page_without_text_is_left_alone(detector: OrientationDetector) -> None:
    assert _verdict(detector, np.full((1100, 850, 3), 255, np.uint8)) == 0


def test_decoder_turns_pages_upright_and_says_so(corpus_dir: Path) -> None:
    upright = cv2.imread(str(corpus_dir / "pages" / "typewriter.png"))
    sideways = rotate_clockwise(upright, 90)
    decoder = Decoder(DecodeConfig(device="cpu"), SourceConfig())
    out, = decoder.decode([EncodedPage(ref=PageRef("t", 1), pixels=sideways)])
    assert not isinstance(out, Exception)
    assert out.rotation == 270
    assert np.array_equal(out.image, upright)
    reference, = decoder.decode([EncodedPage(ref=PageRef("u", 1), pixels=upright)])
    assert not isinstance(reference, Exception) and reference.rotation == 0
    assert np.allclose(out.model_input, reference.model_input)
    # The lines of the turned page are those of the upright page (found on it, not turned
    # from the sideways page's boxes, which split its 17 lines into 30).
    assert out.lines is not None and reference.lines is not None
    assert len(out.lines) == len(reference.lines) > 10
    assert np.array_equal(out.lines.boxes, reference.lines.boxes)
    off = Decoder(DecodeConfig(device="cpu", orient=False), SourceConfig())
    unturned, = off.decode([EncodedPage(ref=PageRef("t", 1), pixels=sideways)])
    assert not isinstance(unturned, Exception) and unturned.rotation == 0


def test_the_turned_reading_is_skipped_when_the_page_reads_well_as_it_stands(
    corpus_dir: Path
) -> None:
    detector = OrientationDetector(DecodeConfig())
    reads: list[int] = []
    score = detector._score

    def counted(crops: list[np.ndarray]) -> float:
        reads.append(len(crops))
        return score(crops)

    detector._score = counted  # type: ignore[method-assign]
    upright = cv2.imread(str(corpus_dir / "pages" / "typewriter.png"))
    assert _verdict(detector, upright) == 0
    assert reads == [3]  # the three probe lines, as they stand only
    reads.clear()
    assert _verdict(detector, rotate_clockwise(upright, 180)) == 180
    assert reads == [3, 3]  # read poorly as they stand: read turned too


def test_lines_of_a_batch_detected_at_once_are_those_found_one_by_one(corpus_dir: Path
                                                                      ) -> None:
    """``lines.workers``: the pages of a decode batch are detected (and turned) in threads
    of their own; each page gets the lines, rotation and pixels it gets alone, in order."""
    upright = cv2.imread(str(corpus_dir / "pages" / "typewriter.png"))
    small = cv2.imread(str(corpus_dir / "pages" / "baiona.png"))
    pages = [EncodedPage(ref=PageRef(f"p{i}", 1), pixels=image) for i, image in enumerate(
        [rotate_clockwise(upright, 90), small, upright, rotate_clockwise(small, 180)])]
    cfg = DecodeConfig(device="cpu", batch_size=4)
    one = Decoder(cfg, SourceConfig(), LinesConfig())
    many = Decoder(cfg, SourceConfig(), LinesConfig(workers=3))
    try:
        alone = one.decode(pages)
        together = many.decode(pages)
        assert many._line_pool is not None and len(many._line_pool._threads) == 3
    finally:
        many.close()
    assert [p.ref for p in together] == [p.ref for p in pages]
    assert [getattr(p, "rotation", None) for p in together] == [270, 0, 0, 180]
    for a, b in zip(alone, together, strict=True):
        assert not isinstance(a, Exception) and not isinstance(b, Exception)
        assert a.lines is not None and b.lines is not None and len(b.lines) > 10
        assert np.array_equal(a.lines.quads, b.lines.quads)
        assert np.array_equal(a.image, b.image)
