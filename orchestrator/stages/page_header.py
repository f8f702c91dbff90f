"""Page headers: an encoded page's size and kind, read before any pixel is decoded.

folio enforces its own explicit pixel limit (``sources.max_pixels``) from the header, so
no decoder ever sees a decompression bomb. This module needs only PIL, so every decode
path (DALI, OpenCV, nvJPEG) shares the one check.

Usage::

    width, height = check_encoded(data, cfg.sources.max_pixels)      # or a PageError
    header = read_header(data, cfg.sources.max_pixels)                # + format, EXIF turn
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from orchestrator.errors import PageDecodeError, PixelLimitExceeded

# folio enforces its own explicit limit (sources.max_pixels) from the header, so PIL's
# implicit one must not fire first with a different message.
Image.MAX_IMAGE_PIXELS = None

_EXIF_ORIENTATION = 0x0112
# What DALI's image decoder reads, as PIL names the formats (MPO: a JPEG with extra
# frames); anything else (GIF, ICO, PSD...) would fail inside the decoder with an opaque
# message.
DECODABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "TIFF", "JPEG2000", "BMP", "PPM", "WEBP"})


@dataclass(frozen=True, slots=True)
class PageHeader:
    width: int
    height: int
    format: str  # PIL's name: "JPEG", "PNG", "TIFF", ...
    # EXIF orientation (1 = as stored); decoders that ignore EXIF need 1.
    orientation: int = 1

    @property
    def plain_jpeg(self) -> bool:
        """A JPEG whose stored pixels are the page as shown (nvJPEG decodes it as is)."""
        return self.format == "JPEG" and self.orientation == 1


def read_header(data: bytes, max_pixels: int) -> PageHeader:
    """Size, format and EXIF orientation from the header, or the page's PageError."""
    if not data:
        raise PageDecodeError("file is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            kind = str(header.format)
            orientation = 1
            if kind == "JPEG":
                orientation = int(header.getexif().get(_EXIF_ORIENTATION, 1))
    except UnidentifiedImageError as exc:
        raise PageDecodeError(
            f"not a recognised image format ({len(data)} bytes, starts with {data[:8]!r})"
        ) from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise PageDecodeError(f"unreadable image header: {exc}") from exc
    if kind not in DECODABLE_FORMATS:
        raise PageDecodeError(
            f"{kind} images are not supported (folio decodes JPEG, PNG, TIFF, JPEG 2000, BMP, "
            "PNM and WebP); convert the file"
        )
    if width * height > max_pixels:
        raise PixelLimitExceeded(
            f"image is {width} x {height} = {width * height:,} px, over the limit of "
            f"{max_pixels:,} px (sources.max_pixels)"
        )
    return PageHeader(width=width, height=height, format=kind, orientation=orientation)


def check_encoded(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Read the image header only; return (width, height) or raise a PageError."""
    header = read_header(data, max_pixels)
    return header.width, header.height
