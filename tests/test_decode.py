"""Decode stage: the DALI pipeline on real pages, every input format, bad input."""

from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from dali_pipelines.layout_preprocess import LayoutPreprocessor
from orchestrator.config import DecodeConfig, SourceConfig
from orchestrator.errors import PageDecodeError, PixelLimitExceeded
from orchestrator.stages.decode import Decoder, check_encoded
from orchestrator.types import EncodedPage, PageRef


@pytest.fixture(scope="module")
def decoder() -> Decoder:
    return Decoder(DecodeConfig(device="cpu", batch_size=4), SourceConfig())


def _page(data: bytes, name: str = "x") -> EncodedPage:
    return EncodedPage(ref=PageRef(name, 1), data=data)


def _reference_input(bgr: np.ndarray, cfg: DecodeConfig) -> np.ndarray:
    """What the layout model was trained on: cv2 stretched resize, ImageNet norm, CHW."""
    resized = cv2.resize(bgr, (cfg.input_width, cfg.input_height), interpolation=cv2.INTER_LINEAR)
    norm = (resized.astype(np.float32) / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)
    return norm.transpose(2, 0, 1).astype(np.float32)


def test_palette_png_decodes_through_its_palette(decoder: Decoder, corpus_dir: Path) -> None:
    """linn.png stores 0/1 palette indices: decoded values must be the palette's colours."""
    data = (corpus_dir / "pages" / "linn.png").read_bytes()
    (page,) = decoder.decode([_page(data)])
    assert not isinstance(page, Exception)
    expected = cv2.cvtColor(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")),
                            cv2.COLOR_RGB2BGR)
    assert page.image.shape == (3300, 2550, 3)
    assert np.array_equal(page.image, expected)
    # Paper is white, ink is black: not the raw 0/1 indices.
    assert set(np.unique(page.image)) == {0, 255}


def test_model_input_matches_training_preprocessing(decoder: Decoder, corpus_dir: Path) -> None:
    data = (corpus_dir / "pages" / "baiona.png").read_bytes()
    (page,) = decoder.decode([_page(data)])
    assert not isinstance(page, Exception)
    reference = _reference_input(page.image, DecodeConfig())
    assert page.model_input.shape == reference.shape == (3, 800, 608)
    # Same interpolation family as cv2 (half-pixel centres, no antialias); rounding differs.
    assert np.abs(page.model_input - reference).mean() < 0.02


@pytest.mark.parametrize("fmt,mode", [
    ("JPEG", "RGB"), ("PNG", "1"), ("PNG", "L"), ("PNG", "P"), ("TIFF", "RGB"),
    ("WEBP", "RGB"), ("JPEG2000", "RGB"), ("BMP", "RGB"),
])
def test_every_supported_format_decodes(decoder: Decoder, corpus_dir: Path, fmt: str,
                                        mode: str) -> None:
    source = Image.open(corpus_dir / "pages" / "typewriter.png").convert("RGB")
    source = source.resize((source.width // 4, source.height // 4))
    buf = io.BytesIO()
    source.convert(mode).save(buf, fmt)
    (page,) = decoder.decode([_page(buf.getvalue())])
    assert not isinstance(page, Exception), page
    assert (page.width, page.height) == source.size
    expected = np.asarray(source.convert(mode).convert("RGB"))[:, :, ::-1].astype(np.int16)
    tolerance = 12 if fmt in ("JPEG", "WEBP", "JPEG2000") else 0
    assert np.abs(page.image.astype(np.int16) - expected).mean() <= tolerance


def test_bad_bytes_fail_alone_in_a_batch(decoder: Decoder, corpus_dir: Path) -> None:
    good = (corpus_dir / "pages" / "typewriter.png").read_bytes()
    jpeg = io.BytesIO()
    Image.open(corpus_dir / "pages" / "baiona.png").convert("RGB").save(jpeg, "JPEG")
    truncated_jpeg = jpeg.getvalue()[: len(jpeg.getvalue()) // 3]
    pages = [_page(good, "good"), _page(b"", "empty"), _page(b"this is text, not a png", "txt"),
             _page(good[: len(good) // 2], "truncated-png"), _page(truncated_jpeg, "trunc-jpg")]
    out = decoder.decode(pages)
    assert not isinstance(out[0], Exception)
    assert isinstance(out[1], PageDecodeError) and "empty" in str(out[1])
    assert isinstance(out[2], PageDecodeError) and "not a recognised image" in str(out[2])
    assert isinstance(out[3], PageDecodeError)
    # A truncated JPEG either fails cleanly or decodes to a full-size (partly grey) page.
    assert isinstance(out[4], PageDecodeError) or out[4].image.shape[:2] == (682, 640)
    # the reason in words: what is wrong with the bytes, not DALI's "Failed to decode"
    assert "truncated" in str(out[3]), str(out[3])
    if isinstance(out[4], PageDecodeError):
        assert "truncated" in str(out[4]), str(out[4])
    # The pipeline still works after failures.
    (again,) = decoder.decode([_page(good)])
    assert not isinstance(again, Exception)


def test_a_gif_named_png_gets_a_reason_not_a_stack_frame(decoder: Decoder,
                                                          corpus_dir: Path) -> None:
    gif = io.BytesIO()
    Image.open(corpus_dir / "pages" / "baiona.png").convert("RGB").save(gif, "GIF")
    good = (corpus_dir / "pages" / "typewriter.png").read_bytes()
    out = decoder.decode([_page(gif.getvalue(), "scan.png"), _page(good, "good")])
    assert isinstance(out[0], PageDecodeError)
    assert str(out[0]).startswith("GIF images are not supported"), str(out[0])
    assert 'File "' not in str(out[0]) and ".py" not in str(out[0])
    assert not isinstance(out[1], Exception)


def test_dali_errors_give_their_reason_not_the_quoted_frame() -> None:
    """DALI quotes the pipeline definition's stack frame before the reason; the page's
    error text is the reason."""
    from orchestrator.stages.decode import _first_line

    dali = ('Critical error in pipeline:\nError in CPU operator `nvidia.dali.fn.decoders.image`,'
            '\nwhich was used in the pipeline definition with the following traceback:\n\n'
            '  File "/x/dali_pipelines/layout_preprocess.py", line 56, in _layout_graph\n'
            '    image = fn.decoders.image(data, device=decoder_device)\n\nencountered:\n\n'
            'Unsupported image type\nCurrent pipeline object is no longer valid.')
    assert _first_line(RuntimeError(dali)) == "Unsupported image type"
    frame_only = dali.partition("encountered:")[0]
    assert _first_line(RuntimeError(frame_only)) == "RuntimeError"


def test_pixel_limit_is_checked_from_the_header_before_decoding() -> None:
    # A 40000 x 40000 PNG header with almost no data: decoding it would need 4.8 GB.
    buf = io.BytesIO()
    Image.new("1", (40000, 40000)).save(buf, "PNG")
    data = buf.getvalue()
    assert len(data) < 1_000_000
    with pytest.raises(PixelLimitExceeded, match="over the limit"):
        check_encoded(data, SourceConfig().max_pixels)
    small = Decoder(DecodeConfig(device="cpu"), SourceConfig(max_pixels=1000))
    (out,) = small.decode([_page(data)])
    assert isinstance(out, PixelLimitExceeded)


def test_rendered_pixels_take_the_same_pipeline(decoder: Decoder, corpus_dir: Path) -> None:
    bgr = cv2.imread(str(corpus_dir / "pages" / "baiona.png"))
    data = (corpus_dir / "pages" / "baiona.png").read_bytes()
    from_pixels, from_bytes = decoder.decode(
        [EncodedPage(ref=PageRef("p", 1), pixels=bgr), _page(data)]
    )
    assert not isinstance(from_pixels, Exception) and not isinstance(from_bytes, Exception)
    assert np.array_equal(from_pixels.image, from_bytes.image)
    assert np.allclose(from_pixels.model_input, from_bytes.model_input)


def test_preprocessor_batches_vary_in_size(corpus_dir: Path) -> None:
    pre = LayoutPreprocessor(DecodeConfig(batch_size=3), keep_full=False)
    data = (corpus_dir / "pages" / "typewriter.png").read_bytes()
    for n in (3, 1, 2):
        out = pre.run([data] * n)
        assert len(out) == n
        assert all(not isinstance(o, Exception) and o.image is None for o in out)


def test_decoded_pages_survive_later_batches(corpus_dir: Path) -> None:
    """DALI reuses its output buffers: a page queued for layout must not change under it."""
    decoder = Decoder(DecodeConfig(device="cpu", batch_size=2, orient=False), SourceConfig())
    pages = corpus_dir / "pages"
    first = decoder.decode([_page((pages / "typewriter.png").read_bytes())])[0]
    assert not isinstance(first, Exception)
    image, model_input = first.image.copy(), first.model_input.copy()
    for name in ("baiona.png", "typewriter.png", "baiona.png"):
        decoder.decode([_page((pages / name).read_bytes())])
        decoder.decode([EncodedPage(ref=PageRef("p", 1),
                                    pixels=cv2.imread(str(pages / name)))])
    assert np.array_equal(first.image, image)
    assert np.array_equal(first.model_input, model_input)
