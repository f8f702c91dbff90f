"""Decode: encoded page bytes (or rendered PDF pixels) -> ``DecodedPage``.

A thin stage over ``dali_pipelines.layout_preprocess``: it checks the page's size from
its header against ``sources.max_pixels`` before any pixel is decoded (no silent
decompression bomb), then runs the DALI pipeline, which returns both the layout-model
input and the full-resolution page kept for cropping (one decode per page). Then the
page's text lines are detected once and the page is turned upright.
"""

from __future__ import annotations

import concurrent.futures
import io
import re
import time
from collections.abc import Sequence

import numpy as np
from PIL import Image

from dali_pipelines.layout_preprocess import LayoutPreprocessor, PreprocessedPage
from orchestrator.config import DecodeConfig, LinesConfig, SourceConfig
from orchestrator.errors import PageDecodeError, PageError
from orchestrator.stages.orient import OrientationDetector, rotate_clockwise
from orchestrator.stages.page_header import check_encoded
from orchestrator.stages.textlines import LineDetector
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


_DALI_NOISE = ("Critical error", "Error in CPU operator", "Error in MIXED operator",
               "which was used", "Current pipeline object")


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(exc: Exception) -> str:
    """The reason in a DALI error: the text after its "encountered:" line, never the
    pipeline-definition stack frame (``File "...", line N`` and its code) it quotes, nor
    the terminal colour codes of the decoder's log lines."""
    text = _ANSI_ESCAPE.sub("", str(exc)).strip()
    _, found, reason = text.partition("encountered:")
    frame = False
    for raw in (reason if found else text).splitlines():
        line = raw.strip()
        if line.startswith('File "'):
            frame = True  # the next line is that frame's source code
            continue
        if frame:
            frame = False
            continue
        if line and not line.startswith(_DALI_NOISE):
            return line[:300]
    return type(exc).__name__


def decode_failure(data: bytes | None, exc: Exception) -> str:
    """Why an image failed to decode, in words.

    DALI's exception often says no more than "Failed to decode sample #0" (the codec's
    own reason goes to its log), so the bytes are opened with PIL, which names the fault
    ("image file is truncated (13 bytes not processed)"); DALI's line otherwise.
    """
    if data:
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
        except Exception as pil_exc:  # whatever PIL says is the reason we want
            return _first_line(pil_exc)
    return _first_line(exc)


class Decoder:
    """Decodes batches of pages; each page comes back decoded or as its PageError.

    After decoding, the page's text lines are detected (``orchestrator.stages.textlines``); they
    tell whether the page is turned (``orchestrator.stages.orient``). A turned page is turned
    upright and its lines detected again there, so every page's lines come from one
    detection on the upright page. Line detection runs when ``lines`` is given or
    orientation is on (``decode.orient``), with ``LinesConfig()`` defaults in the latter case;
    ``lines.workers`` pages of a batch at once.
    """

    def __init__(self, decode: DecodeConfig, sources: SourceConfig,
                 lines: LinesConfig | None = None) -> None:
        self._cfg = decode
        self._max_pixels = sources.max_pixels
        self.device = resolve_device(decode.device)
        self._encoded = LayoutPreprocessor(decode, device=self.device, keep_full=True)
        self._pixels = LayoutPreprocessor(
            decode, device=self.device, keep_full=True, encoded=False
        )
        self._orientation = OrientationDetector(decode) if decode.orient else None
        if lines is None and decode.orient:
            lines = LinesConfig()
        self._lines = (None if lines is None else LineDetector(
            lines, f"cuda:{decode.device_id}" if self.device == "gpu" else "cpu"))
        workers = 1 if lines is None else min(lines.workers, decode.batch_size)
        # The detectors and orientation probes keep one engine per thread: safe to share.
        self._line_pool = (concurrent.futures.ThreadPoolExecutor(
            workers, thread_name_prefix="folio-lines") if workers > 1 else None)

    @property
    def batch_size(self) -> int:
        return self._cfg.batch_size

    @property
    def lines_engine(self) -> dict[str, str] | None:
        """Where and how text lines are detected (for the run's manifest); None: not here."""
        lines = self._lines
        return None if lines is None else {"engine": lines.engine, "precision": lines.precision,
                                           "device": lines.device}

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
        done = [r for r in results if r is not None]
        if self._line_pool is None:
            return [self._upright(r) if isinstance(r, DecodedPage) else r for r in done]
        return list(self._line_pool.map(
            lambda r: self._upright(r) if isinstance(r, DecodedPage) else r, done))

    def close(self) -> None:
        """Stop the line-detection threads (a decoder with ``lines.workers`` > 1)."""
        if self._line_pool is not None:
            self._line_pool.shutdown(wait=True)

    def _upright(self, page: DecodedPage) -> DecodedPage:
        """Detect the page's text lines; turn a sideways or upside-down page upright with
        its lines, and redo its model input."""
        if self._lines is None:
            return page
        start = time.perf_counter()
        lines = self._lines.detect(page.image)
        rotation = 0 if self._orientation is None else self._orientation.detect(page.image,
                                                                               lines)
        if rotation:
            image = rotate_clockwise(page.image, rotation)
            (out,) = self._pixels.run([image])
            if not isinstance(out, Exception):  # pixels already decoded once: no failure
                page.image, page.model_input, page.rotation = image, out.model_input, rotation
                # Detected again on the upright page: on turned text the detector splits
                # and merges lines differently (a sideways typewritten page: 30 boxes for
                # its 17 lines), so turned boxes would read worse. Only turned pages pay.
                lines = self._lines.detect(image)
        page.lines = lines
        page.lines_s += time.perf_counter() - start
        return page

    @staticmethod
    def _to_page(
        page: EncodedPage, out: PreprocessedPage | Exception, decode_s: float
    ) -> DecodedPage | PageError:
        if isinstance(out, Exception):
            return PageDecodeError(f"cannot decode image: {decode_failure(page.data, out)}")
        assert out.image is not None  # keep_full=True
        return DecodedPage(
            ref=page.ref,
            image=out.image,
            model_input=out.model_input,
            read_s=page.read_s,
            decode_s=decode_s,
        )
