"""The values that flow between stages.

sources -> ``EncodedPage`` -> decode (+ text lines) -> ``DecodedPage`` -> layout ->
``LayoutResult`` -> coverage (lines to regions) -> crop -> ``RegionTask`` -> recognize ->
``RecognitionResult`` -> sink.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

UInt8Array = npt.NDArray[np.uint8]
Float32Array = npt.NDArray[np.float32]
Int32Array = npt.NDArray[np.int32]


class Task(enum.StrEnum):
    """What the recognition stage does with a region."""

    TEXT = "text"
    TABLE = "table"
    FORMULA = "formula"
    SKIP = "skip"  # kept as a region, no text (figures)
    ABANDON = "abandon"  # dropped before recognition, with its text lines

    @property
    def recognized(self) -> bool:
        return self in (Task.TEXT, Task.TABLE, Task.FORMULA)


class Origin(enum.StrEnum):
    """Where a region comes from."""

    LAYOUT = "layout"  # a box the layout model found
    LINES = "lines"  # a block of the page's text lines that no layout box holds


@dataclass(slots=True)
class PageLines:
    """The text lines detected on a page, in page pixels of the upright page.

    ``quads`` are the detector's quadrilaterals (corners clockwise from top left, so a
    skewed line stays tight); ``boxes`` their axis-aligned bounds.
    """

    quads: Float32Array  # (N, 4, 2) x, y
    scores: Float32Array  # (N,) the detector's confidence

    def __len__(self) -> int:
        return int(self.quads.shape[0])

    @property
    def boxes(self) -> Float32Array:
        """(N, 4) x0, y0, x1, y1."""
        if len(self) == 0:
            return np.zeros((0, 4), np.float32)
        return np.concatenate([self.quads.min(axis=1), self.quads.max(axis=1)], axis=1)

    @staticmethod
    def empty() -> PageLines:
        return PageLines(np.zeros((0, 4, 2), np.float32), np.zeros(0, np.float32))


@dataclass(frozen=True, slots=True, order=True)
class PageRef:
    """Identity of one page: its document (file path, or shard path) and 1-based number.

    For Arrow/Parquet shards the shard is the document and ``page`` is row + 1.
    """

    source: str
    page: int

    def __str__(self) -> str:
        return f"{self.source}#{self.page}"


@dataclass(slots=True)
class EncodedPage:
    """A page as it comes out of a source, before decoding.

    Exactly one of ``data`` (encoded image bytes), ``pixels`` (an already-rendered
    HWC uint8 BGR bitmap, from a PDF) or ``error`` (why the source could not produce
    the page) is set.
    """

    ref: PageRef
    data: bytes | None = None
    pixels: UInt8Array | None = None
    error: str | None = None
    read_s: float = 0.0


@dataclass(slots=True)
class DecodedPage:
    """A decoded page: the full-resolution image for cropping plus the model input."""

    ref: PageRef
    image: UInt8Array  # HWC uint8 BGR, full resolution
    model_input: Float32Array  # CHW float32, normalised, at the layout model's size
    read_s: float = 0.0
    decode_s: float = 0.0
    rotation: int = 0  # degrees the source was turned clockwise to make it upright
    lines: PageLines | None = None  # text lines on the upright page (None: not detected)
    lines_s: float = 0.0  # seconds spent detecting them (and turning the page upright)

    @property
    def width(self) -> int:
        return int(self.image.shape[1])

    @property
    def height(self) -> int:
        return int(self.image.shape[0])


@dataclass(slots=True)
class Detections:
    """Raw post-processed detections of one page, in reading order, page pixels."""

    boxes: Float32Array  # (N, 4) x0, y0, x1, y1
    scores: Float32Array  # (N,)
    classes: Int32Array  # (N,)


@dataclass(frozen=True, slots=True)
class Region:
    index: int  # position in reading order, 0-based
    label: str
    task: Task
    score: float
    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in page pixels
    polygon: tuple[tuple[float, float], ...] | None = None
    origin: Origin = Origin.LAYOUT


@dataclass(slots=True)
class LayoutResult:
    """The regions of one page in reading order.

    Straight from the layout stage it holds every detected region, ``abandon`` ones
    included; ``orchestrator.stages.coverage.cover_page`` then gives each text line to one region
    (``line_region``), adds blocks for the lines no region holds, drops abandoned regions
    and puts the rest in reading order (``Region.index``).
    """

    width: int
    height: int
    regions: list[Region]
    layout_s: float = 0.0
    lines: PageLines | None = None
    line_region: Int32Array | None = None  # (N,) each line's region index, -1: none
    # The page on the layout device, (3, H, W) uint8 RGB (a torch tensor), where the
    # GPU-resident stage kept it for a recogniser that reads region crops; else None.
    page_pixels: Any = None


@dataclass(slots=True)
class LineCrop:
    """One text line of a region: its box and, for recognisers that read lines, its pixels."""

    bbox: tuple[float, float, float, float]  # x0, y0, x1, y1 in page pixels
    image: UInt8Array | None = None  # HWC uint8 BGR, straightened; None: not cut
    row: int = 0  # the row of the region it sits in: a row's lines read left to right


@dataclass(slots=True)
class RegionTask:
    """One region to recognise: its crop (recognisers that read regions) and its lines,
    in reading order (cut out for recognisers that read lines)."""

    ref: PageRef
    region: Region
    image: UInt8Array | None  # HWC uint8 BGR crop of the region; None: lines only
    lines: list[LineCrop] = field(default_factory=list)
    # The crop on the layout device instead of ``image`` ((3, h, w) uint8 RGB, a torch
    # tensor), for the recogniser to fit and encode there (orchestrator.stages.crop_gpu).
    device_image: Any = None

    @property
    def task(self) -> Task:
        return self.region.task


@dataclass(slots=True)
class LineText:
    """One text line as stored: box, text and the recogniser's confidence.

    ``text`` and ``score`` are None where the recogniser reads whole regions (vLLM): the
    line's box comes from the page's detection, the text from the region.
    """

    bbox: tuple[float, float, float, float]
    text: str | None = None
    score: float | None = None
    low_confidence: bool = False  # read, but below recognize.min_line_score


class TextFormat(enum.StrEnum):
    """How a region's text is written."""

    PLAIN = "plain"  # lines of text (rapidocr, also for table and formula regions)
    MARKDOWN = "markdown"
    HTML = "html"  # tables from a VLM
    LATEX = "latex"  # formulas from a VLM


@dataclass(slots=True)
class RecognitionResult:
    """The text of one region, or why there is none.

    ``lines`` are the region's text lines in reading order; ``confidence`` the
    character-weighted mean of their scores (None when the recogniser gives none).
    ``stats`` carries what the recogniser measured (model, prompt_tokens,
    completion_tokens, finish_reason, latency_s, ttft_s, tpot_s); keys are optional.
    """

    text: str | None
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    lines: list[LineText] = field(default_factory=list)
    confidence: float | None = None
    text_format: TextFormat = TextFormat.PLAIN


@dataclass(slots=True)
class PageOutcome:
    """Everything the sink stores for one page."""

    ref: PageRef
    status: str  # "ok" | "error"
    error: str | None
    width: int | None
    height: int | None
    regions: list[tuple[Region, RecognitionResult | None]]
    # Seconds per stage: read_s, decode_s, lines_s, layout_s, crop_s, recognize_s.
    timings: dict[str, float] = field(default_factory=dict)
    rotation: int = 0  # degrees the source was turned clockwise; boxes are on the turned page
