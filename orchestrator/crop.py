"""Crop: cut each region to recognise out of the full-resolution page."""

from __future__ import annotations

import math

import cv2
import numpy as np

from orchestrator.config import CropConfig
from orchestrator.types import DecodedPage, LayoutResult, Region, RegionTask, UInt8Array

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


def region_tasks(page: DecodedPage, layout: LayoutResult, cfg: CropConfig) -> list[RegionTask]:
    """One task per region whose task is recognised (text, table, formula)."""
    tasks: list[RegionTask] = []
    for region in layout.regions:
        if not region.task.recognized:
            continue
        crop = crop_region(page.image, region, cfg)
        if crop is not None:
            tasks.append(RegionTask(ref=page.ref, region=region, image=crop))
    return tasks
