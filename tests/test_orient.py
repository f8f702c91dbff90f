"""Orientation: pages turned by 90/180/270 degrees are found and turned upright."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from orchestrator.config import DecodeConfig, SourceConfig
from orchestrator.decode import Decoder
from orchestrator.orient import OrientationDetector, rotate_clockwise
from orchestrator.types import EncodedPage, PageRef


@pytest.fixture(scope="module")
def detector() -> OrientationDetector:
    return OrientationDetector(DecodeConfig())


@pytest.mark.parametrize("name", ["typewriter.png", "baiona.png"])
@pytest.mark.parametrize("turned", [0, 90, 180, 270])
def test_detects_how_far_a_page_is_turned(detector: OrientationDetector, corpus_dir: Path,
                                          name: str, turned: int) -> None:
    upright = cv2.imread(str(corpus_dir / "pages" / name))
    page = rotate_clockwise(upright, turned)
    assert (detector.detect(page) + turned) % 360 == 0


def test_a_page_without_text_is_left_alone(detector: OrientationDetector) -> None:
    assert detector.detect(np.full((1100, 850, 3), 255, np.uint8)) == 0


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
    off = Decoder(DecodeConfig(device="cpu", orient=False), SourceConfig())
    unturned, = off.decode([EncodedPage(ref=PageRef("t", 1), pixels=sideways)])
    assert not isinstance(unturned, Exception) and unturned.rotation == 0
