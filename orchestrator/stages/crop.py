"""Crop: cut what the recogniser reads out of the full-resolution page: each region's text
lines (rapidocr), or each region (a VLM), and fit and encode a region's crop for a
recogniser that reads images (``encode_crop``, ``encode_task_crop``)."""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from orchestrator.config import CropConfig
from orchestrator.errors import RecognitionError
from orchestrator.stages.coverage import line_rows
from orchestrator.stages.profiles import ModelProfile
from orchestrator.stages.textlines import line_image
from orchestrator.types import DecodedPage, LayoutResult, LineCrop, Region, RegionTask, UInt8Array

# White: what a page background is, so masked-out polygon corners read as paper.
_BACKGROUND = 255


def crop_bounds(
    bbox: tuple[float, float, float, float], width: int, height: int, margin: int
) -> tuple[int, int, int, int]:
    """Integer pixel bounds of a box grown by ``margin`` and clipped to the page."""
    x0, y0, x1, y1 = bbox
    return (
        max(0, math.floor(x0) - margin),
        max(0, math.floor(y0) - margin),
        min(width, math.ceil(x1) + margin),
        min(height, math.ceil(y1) + margin),
    )


def crop_region(image: UInt8Array, region: Region, cfg: CropConfig) -> UInt8Array | None:
    """The region's pixels (a view when it is a box, a masked copy for a polygon).

    Returns None when the clipped region is smaller than ``cfg.min_side_px``.
    """
    height, width = image.shape[:2]
    x0, y0, x1, y1 = crop_bounds(region.bbox, width, height, cfg.margin_px)
    if x1 - x0 < cfg.min_side_px or y1 - y0 < cfg.min_side_px:
        return None
    crop = image[y0:y1, x0:x1]
    if region.polygon is None:
        return crop
    mask = np.zeros(crop.shape[:2], dtype=np.uint8)
    points = np.round(np.asarray(region.polygon, dtype=np.float64) - (x0, y0)).astype(np.int32)
    cv2.fillPoly(mask, [points], 1)
    if cfg.margin_px:
        kernel = np.ones((2 * cfg.margin_px + 1, 2 * cfg.margin_px + 1), np.uint8)
        mask = cv2.dilate(mask, kernel)
    inside = np.asarray(mask, dtype=bool)
    masked = np.full_like(crop, _BACKGROUND)
    masked[inside] = crop[inside]
    return masked


def region_tasks(page: DecodedPage, layout: LayoutResult, cfg: CropConfig,
                 *, reads_lines: bool = True) -> list[RegionTask]:
    """One task per region whose task is recognised (text, table, formula), with its text
    lines in reading order (``layout`` as ``coverage.cover_page`` made it).

    ``reads_lines``: each line is cut out of the page for a recogniser that reads lines,
    and a region holding no line has nothing to read (no task); otherwise the region is
    cropped for a recogniser that reads regions, and its lines carry their boxes only:
    on the layout device where the GPU-resident stage kept the page there
    (``layout.page_pixels``; the task's ``device_image``), else from the host page.
    """
    line_boxes = None if layout.lines is None else layout.lines.boxes
    owner = layout.line_region
    tasks: list[RegionTask] = []
    for region in layout.regions:
        if not region.task.recognized:
            continue
        lines: list[LineCrop] = []
        if line_boxes is not None and owner is not None and layout.lines is not None:
            mine = np.flatnonzero(owner == region.index)
            order, rows = line_rows(line_boxes[mine])
            for i, row in zip(mine[order], rows, strict=True):
                box = line_boxes[i]
                image = line_image(page.image, layout.lines.quads[i]) if reads_lines else None
                lines.append(LineCrop(bbox=(float(box[0]), float(box[1]), float(box[2]),
                                            float(box[3])), image=image, row=int(row)))
        if reads_lines:
            if lines:
                tasks.append(RegionTask(ref=page.ref, region=region, image=None, lines=lines))
            continue
        if layout.page_pixels is not None:
            from orchestrator.stages.crop_gpu import device_crop  # torch: only on this path

            on_device = device_crop(layout.page_pixels, region, cfg)
            if on_device is not None:
                tasks.append(RegionTask(ref=page.ref, region=region, image=None, lines=lines,
                                        device_image=on_device))
            continue
        crop = crop_region(page.image, region, cfg)
        if crop is not None:
            tasks.append(RegionTask(ref=page.ref, region=region, image=crop, lines=lines))
    return tasks


# --- crop encoding, for a recogniser that reads region images (vLLM) -------------------


@dataclass(frozen=True, slots=True)
class EncodedCrop:
    """A crop as sent: its data URL and the size of the image inside it."""

    data_url: str
    width: int
    height: int
    image_tokens: int  # what the model spends on it (after the server's rounding)
    resized: bool
    padded: bool

    @property
    def nbytes(self) -> int:
        return len(self.data_url)


def encode_crop(image: UInt8Array, profile: ModelProfile) -> EncodedCrop:
    """Pad/resize only when needed, encode once, base64 once.

    ``image`` is an HWC uint8 BGR crop (grey HW and BGRA are accepted too). Padding is
    white; resizing uses area interpolation to exactly the size the server would pick.
    """
    if image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    height, width = int(image.shape[0]), int(image.shape[1])
    if height <= 0 or width <= 0:
        raise ValueError(f"empty crop ({width}x{height})")
    budget = profile.budget
    padded = False
    ph, pw = budget.pad_dims(height, width)
    if (ph, pw) != (height, width):
        image = cv2.copyMakeBorder(
            image, 0, ph - height, 0, pw - width, cv2.BORDER_CONSTANT, value=(255, 255, 255)
        )
        height, width, padded = ph, pw, True
    resized = False
    target = budget.fit(height, width)
    if target is not None:
        th, tw = target
        image = cv2.resize(image, (tw, th), interpolation=cv2.INTER_AREA)
        height, width, resized = th, tw, True
    if profile.image_format == "png":
        ok, buf = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        mime = "image/png"
    else:
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, profile.jpeg_quality])
        mime = "image/jpeg"
    if not ok:
        raise ValueError(f"could not encode a {width}x{height} crop as {profile.image_format}")
    data_url = f"data:{mime};base64," + base64.b64encode(buf.data).decode("ascii")
    return EncodedCrop(
        data_url=data_url,
        width=width,
        height=height,
        image_tokens=budget.image_tokens(height, width),
        resized=resized,
        padded=padded,
    )


Encoder = Callable[[UInt8Array, ModelProfile], EncodedCrop]


def encode_task_crop(task: RegionTask, profile: ModelProfile, encoder: Encoder = encode_crop
                     ) -> EncodedCrop:
    """A task's crop fitted and encoded for ``profile``: on the layout device where the crop
    is there (``device_image``, ``orchestrator.stages.crop_gpu``), else the host crop by
    ``encoder``."""
    if task.device_image is not None:
        from orchestrator.stages.crop_gpu import encode_crops, to_encoded_crop  # torch

        return to_encoded_crop(encode_crops([task.device_image], profile)[0])
    if task.image is None:
        raise RecognitionError("a region reached the vLLM recogniser without its crop")
    return encoder(task.image, profile)
