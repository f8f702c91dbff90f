"""The values that flow between stages.

sources -> ``EncodedPage`` -> decode -> ``DecodedPage`` -> layout -> ``LayoutResult``
-> crop -> ``RegionTask`` -> recognize -> ``RecognitionResult`` -> sink.
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
    ABANDON = "abandon"  # dropped before recognition (headers, footers by default)

    @property
    def recognized(self) -> bool:
        return self in (Task.TEXT, Task.TABLE, Task.FORMULA)


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


@dataclass(slots=True)
class LayoutResult:
    """The regions of one page in reading order (abandoned regions excluded)."""

    width: int
    height: int
    regions: list[Region]
    layout_s: float = 0.0


@dataclass(slots=True)
class RegionTask:
    """One region crop to recognise."""

    ref: PageRef
    region: Region
    image: UInt8Array  # HWC uint8 BGR crop

    @property
    def task(self) -> Task:
        return self.region.task


@dataclass(slots=True)
class RecognitionResult:
    """The text of one region, or why there is none.

    ``stats`` carries what the recogniser measured (model, prompt_tokens,
    completion_tokens, finish_reason, latency_s, ttft_s, tpot_s); keys are optional.
    """

    text: str | None
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PageOutcome:
    """Everything the sink stores for one page."""

    ref: PageRef
    status: str  # "ok" | "error"
    error: str | None
    width: int | None
    height: int | None
    regions: list[tuple[Region, RecognitionResult | None]]
    # Seconds per stage: read_s, decode_s, layout_s, crop_s, recognize_s.
    timings: dict[str, float] = field(default_factory=dict)
    rotation: int = 0  # degrees the source was turned clockwise; boxes are on the turned page
