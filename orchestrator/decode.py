"""Decode: encoded page bytes (or rendered PDF pixels) -> ``DecodedPage``.

A thin stage over ``dali_pipelines.layout_preprocess``: it checks the page's size from
its header against ``sources.max_pixels`` before any pixel is decoded (no silent
decompression bomb), then runs the DALI pipeline, which returns both the layout-model
input and the full-resolution page kept for cropping (one decode per page).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from dali_pipelines.layout_preprocess import LayoutPreprocessor, PreprocessedPage
from orchestrator.config import DecodeConfig, SourceConfig
from orchestrator.errors import PageDecodeError, PageError
from orchestrator.orient import OrientationDetector, rotate_clockwise
from orchestrator.page_header import check_encoded
from orchestrator.types import DecodedPage, EncodedPage

__all__ = ["Decoder", "check_encoded", "resolve_device"]


def resolve_device(requested: str) -> str:
    """Map "auto" to "gpu" when CUDA is visible, else "cpu"."""
    if requested != "auto":
        return requested
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Critical error", "Error in CPU operator", "which was")):
            return line[:300]
    return text.splitlines()[0][:300] if text else type(exc).__name__


class Decoder:
    """Decodes batches of pages; each page comes back decoded or as its PageError."""

    def __init__(self, decode: DecodeConfig, sources: SourceConfig) -> None:
        self._cfg = decode
        self._max_pixels = sources.max_pixels
        self.device = resolve_device(decode.device)
        self._encoded = LayoutPreprocessor(decode, device=self.device, keep_full=True)
        self._pixels = LayoutPreprocessor(
            decode, device=self.device, keep_full=True, encoded=False
        )
        self._orientation = OrientationDetector(decode) if decode.orient else None

    @property
    def batch_size(self) -> int:
        return self._cfg.batch_size

    def decode(self, pages: Sequence[EncodedPage]) -> list[DecodedPage | PageError]:
        """Decode up to ``batch_size`` pages (none of them carrying a source error)."""
        results: list[DecodedPage | PageError | None] = [None] * len(pages)
        encoded_idx: list[int] = []
        pixel_idx: list[int] = []
        for i, page in enumerate(pages):
            if page.pixels is not None:
                pixel_idx.append(i)
                continue
            try:
                check_encoded(page.data or b"", self._max_pixels)
            except PageError as exc:
                results[i] = exc
                continue
            encoded_idx.append(i)
        for indices, runner in ((encoded_idx, self._encoded), (pixel_idx, self._pixels)):
            if not indices:
                continue
            start = time.perf_counter()
            items: list[bytes | np.ndarray] = []
            for i in indices:
                page = pages[i]
                items.append(page.pixels if page.pixels is not None else (page.data or b""))
            outputs = runner.run(items)
            per_page = (time.perf_counter() - start) / len(indices)
            for i, out in zip(indices, outputs, strict=True):
                results[i] = self._to_page(pages[i], out, per_page)
        return [self._upright(r) if isinstance(r, DecodedPage) else r
                for r in results if r is not None]

    def _upright(self, page: DecodedPage) -> DecodedPage:
        """Turn a sideways or upside-down page upright, and redo its model input."""
        if self._orientation is None:
            return page
        start = time.perf_counter()
        rotation = self._orientation.detect(page.image)
        if rotation:
            image = rotate_clockwise(page.image, rotation)
            (out,) = self._pixels.run([image])
            if isinstance(out, Exception):  # pragma: no cover - pixels already decoded once
                return page
            page.image, page.model_input, page.rotation = image, out.model_input, rotation
        page.decode_s += time.perf_counter() - start
        return page

    @staticmethod
    def _to_page(
        page: EncodedPage, out: PreprocessedPage | Exception, decode_s: float
    ) -> DecodedPage | PageError:
        if isinstance(out, Exception):
            return PageDecodeError(f"cannot decode image: {_first_line(out)}")
        assert out.image is not None  # keep_full=True
        return DecodedPage(
            ref=page.ref,
            image=out.image,
            model_input=out.model_input,
            read_s=page.read_s,
            decode_s=decode_s,
        )
