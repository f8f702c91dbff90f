"""Region crops cut, fitted and encoded on the device the page is on (vLLM recognition).

The device twin of ``crop.region_tasks`` + ``crop.encode_crop`` for a page that
the GPU-resident layout stage kept on the device ((3, H, W) uint8 RGB): each recognised
region is sliced with the crop stage's bounds (``crop.crop_bounds``: margin, clipping,
minimum side), padded white and shrunk to the profile's pixel budget exactly as
``encode_crop`` decides (``PixelBudget.pad_dims`` / ``fit``), then JPEG-encoded. On CUDA
the whole page's crops go through one batched ``torchvision.io.encode_jpeg`` call and
only the JPEG bytes cross to the host; on the CPU (tests, and the ``png`` image format,
which nvJPEG cannot write) OpenCV encodes the same pixels. A polygon region is masked on
the host by ``crop.crop_region`` after only its bounding crop is copied there.

Usage::

    crops = region_crops(page_tensor, layout, cfg.crop, profile)   # [(Region, CropImage)]
    encoded = to_encoded_crop(crops[0][1])                         # crop.EncodedCrop
"""

from __future__ import annotations

import base64
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from orchestrator.config import CropConfig
from orchestrator.stages.crop import EncodedCrop, crop_bounds, crop_region
from orchestrator.stages.profiles import ModelProfile
from orchestrator.types import LayoutResult, Region

__all__ = ["CropImage", "device_crop", "encode_crops", "fit_crop", "region_crops",
           "to_encoded_crop"]

_WHITE = 255  # padding: what a page background is


@dataclass(frozen=True, slots=True)
class CropImage:
    """One encoded crop and the size of the image inside it."""

    data: bytes
    mime: str  # "image/jpeg" | "image/png"
    width: int
    height: int
    image_tokens: int
    resized: bool
    padded: bool


def _area_weights(src: int, dst: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights (dst, k) of area resampling from ``src`` to ``dst`` < src
    pixels: output pixel j averages [j s, (j + 1) s) of the source, s = src / dst, each
    source pixel weighted by its overlap (OpenCV's INTER_AREA when shrinking)."""
    scale = src / dst
    k = math.ceil(scale) + 1
    start = torch.arange(dst, dtype=torch.float64, device=device) * scale
    idx = start.floor()[:, None] + torch.arange(k, dtype=torch.float64, device=device)
    overlap = torch.minimum(idx + 1, start[:, None] + scale) - torch.maximum(idx, start[:, None])
    weights = (overlap.clamp(min=0.0) / scale).to(torch.float32)
    return idx.clamp(max=src - 1).to(torch.long), weights


def _shrink_area(crop: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, h, w) uint8 -> (3, size) uint8 by separable area resampling."""
    x = crop.to(torch.float32)
    # Rows first: selecting whole rows is a cheap copy, and the column pass runs on fewer.
    for dim, dst in ((1, size[0]), (2, size[1])):
        idx, weights = _area_weights(x.shape[dim], dst, x.device)
        shape = [1, 1, 1]
        shape[dim] = dst
        x = sum(
            (x.index_select(dim, idx[:, j]) * weights[:, j].view(shape)
             for j in range(idx.shape[1])),
            torch.zeros((), device=x.device),
        )
    return x.round_().clamp_(0.0, 255.0).to(torch.uint8)


def fit_crop(crop: torch.Tensor, profile: ModelProfile) -> tuple[torch.Tensor, bool, bool]:
    """Pad (white) and shrink a (3, h, w) uint8 crop as ``encode_crop`` would; returns the
    fitted crop, whether it was padded and whether it was resized."""
    height, width = int(crop.shape[1]), int(crop.shape[2])
    budget = profile.budget
    padded = resized = False
    ph, pw = budget.pad_dims(height, width)
    if (ph, pw) != (height, width):
        crop = F.pad(crop, (0, pw - width, 0, ph - height), value=_WHITE)
        height, width, padded = ph, pw, True
    target = budget.fit(height, width)
    if target is not None:
        crop = _shrink_area(crop, target)
        resized = True
    return crop, padded, resized


def _encode_on_host(crops: Sequence[torch.Tensor], profile: ModelProfile) -> list[bytes]:
    out = []
    for crop in crops:
        bgr = np.ascontiguousarray(crop.flip(0).permute(1, 2, 0).cpu().numpy())
        if profile.image_format == "png":
            ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        else:
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, profile.jpeg_quality])
        if not ok:
            raise ValueError(f"could not encode a {bgr.shape[1]}x{bgr.shape[0]} crop")
        out.append(buf.tobytes())
    return out


def _encode_on_device(crops: Sequence[torch.Tensor], quality: int) -> list[bytes]:
    from torchvision.io import encode_jpeg  # the CUDA path only

    # nvJPEG encodes on its own stream without waiting for this one: finish the crops first.
    torch.cuda.current_stream(crops[0].device).synchronize()
    encoded = encode_jpeg([c.contiguous() for c in crops], quality=quality)
    # It hands the bytes back through the legacy default stream: wait for them as well.
    torch.cuda.synchronize(crops[0].device)
    return [bytes(e.cpu().numpy().tobytes()) for e in encoded]


def _polygon_crop(
    page: torch.Tensor, region: Region, bounds: tuple[int, int, int, int], cfg: CropConfig
) -> torch.Tensor | None:
    """A polygon region masked as ``crop.crop_region`` masks it, from its bounding crop."""
    x0, y0, x1, y1 = bounds
    host: npt.NDArray[np.uint8] = np.ascontiguousarray(
        page[:, y0:y1, x0:x1].flip(0).permute(1, 2, 0).cpu().numpy())
    assert region.polygon is not None
    shifted = dataclasses.replace(
        region,
        bbox=(region.bbox[0] - x0, region.bbox[1] - y0, region.bbox[2] - x0, region.bbox[3] - y0),
        polygon=tuple((x - x0, y - y0) for x, y in region.polygon),
    )
    masked = crop_region(host, shifted, cfg)
    if masked is None:
        return None
    return torch.from_numpy(np.ascontiguousarray(masked[:, :, ::-1])).permute(2, 0, 1).to(
        page.device)


def device_crop(page: torch.Tensor, region: Region, cfg: CropConfig) -> torch.Tensor | None:
    """A region's (3, h, w) uint8 crop of a (3, H, W) uint8 RGB page, on the page's device,
    with the crop stage's bounds (``crop.crop_bounds``); None where it is under
    ``cfg.min_side_px`` or its polygon leaves nothing, as ``crop.crop_region`` decides."""
    height, width = int(page.shape[1]), int(page.shape[2])
    bounds = crop_bounds(region.bbox, width, height, cfg.margin_px)
    x0, y0, x1, y1 = bounds
    if x1 - x0 < cfg.min_side_px or y1 - y0 < cfg.min_side_px:
        return None
    if region.polygon is None:
        return page[:, y0:y1, x0:x1]
    return _polygon_crop(page, region, bounds, cfg)


def encode_crops(crops: Sequence[torch.Tensor], profile: ModelProfile) -> list[CropImage]:
    """Crops fitted to ``profile``'s pixel budget and encoded in its format: one batched
    nvJPEG call for JPEG crops on CUDA, OpenCV on the host otherwise."""
    if not crops:
        return []
    kept = [fit_crop(crop, profile) for crop in crops]
    images = [image for image, _, _ in kept]
    on_device = images[0].device.type == "cuda" and profile.image_format == "jpeg"
    data = (_encode_on_device(images, profile.jpeg_quality) if on_device
            else _encode_on_host(images, profile))
    mime = "image/png" if profile.image_format == "png" else "image/jpeg"
    out = []
    for (image, padded, resized), blob in zip(kept, data, strict=True):
        h, w = int(image.shape[1]), int(image.shape[2])
        out.append(CropImage(data=blob, mime=mime, width=w, height=h,
                             image_tokens=profile.budget.image_tokens(h, w), resized=resized,
                             padded=padded))
    return out


def region_crops(
    page: torch.Tensor,
    layout: LayoutResult,
    cfg: CropConfig,
    profile: ModelProfile,
) -> list[tuple[Region, CropImage]]:
    """The encoded crop of every recognised region of a (3, H, W) uint8 RGB page, in
    reading order; regions under ``cfg.min_side_px`` are left out, as ``region_tasks``
    leaves them out."""
    kept: list[tuple[Region, torch.Tensor]] = []
    for region in layout.regions:
        if region.task.recognized and (crop := device_crop(page, region, cfg)) is not None:
            kept.append((region, crop))
    encoded = encode_crops([crop for _, crop in kept], profile)
    return [(region, image) for (region, _), image in zip(kept, encoded, strict=True)]


def to_encoded_crop(crop: CropImage) -> EncodedCrop:
    """The ``crop.EncodedCrop`` the vLLM client sends for this crop."""
    return EncodedCrop(
        data_url=f"data:{crop.mime};base64," + base64.b64encode(crop.data).decode("ascii"),
        width=crop.width,
        height=crop.height,
        image_tokens=crop.image_tokens,
        resized=crop.resized,
        padded=crop.padded,
    )

