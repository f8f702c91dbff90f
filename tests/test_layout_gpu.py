"""The GPU-resident layout stage, run on CPU tensors: the same code as on CUDA except the
decoder (OpenCV here, nvJPEG there) and the streams.

It must find the regions the host path finds (DALI decode + ``LayoutModel.detect``) on
real pages, keep batches in order through its threads, and fail bad pages alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from layout_fixtures import load_bgr, model_input
from triton_fixtures import png_header

from orchestrator.config import FolioConfig
from orchestrator.errors import ConfigError, LayoutError, PageDecodeError, PixelLimitExceeded
from orchestrator.stages.decode import Decoder
from orchestrator.stages.layout import LayoutModel, layout_result
from orchestrator.stages.layout_gpu import (
    DaliDecoder,
    GpuLayoutStage,
    LayoutBatch,
    Preprocessor,
    TorchDecoder,
    gpu_resident_enabled,
)
from orchestrator.stages.postprocess import iou_matrix
from orchestrator.types import EncodedPage, LayoutResult, PageRef


@pytest.fixture(scope="module")
def cfg(model_dir: Path) -> FolioConfig:
    return FolioConfig().override({
        "layout.model_dir": str(model_dir), "layout.precision": "fp32", "layout.batch_size": 2,
        "decode.device": "cpu", "decode.orient": False, "decode.batch_size": 2,
        "layout.gpu_resident": "on",
    })


@pytest.fixture(scope="module")
def model(cfg: FolioConfig) -> LayoutModel:
    return LayoutModel(cfg.layout, device="cpu")


@pytest.fixture(scope="module")
def stage(cfg: FolioConfig, model: LayoutModel) -> GpuLayoutStage:
    return GpuLayoutStage(cfg, device="cpu", keep_pages=True, model=model)


@pytest.fixture(scope="module")
def pages(corpus_dir: Path) -> list[bytes | np.ndarray]:
    """PNG bytes, a JPEG, and a rendered PDF page (BGR pixels), as sources yield them."""
    from orchestrator.config import SourceConfig
    from orchestrator.stages.sources import open_sources

    folder = corpus_dir / "pages"
    ok, jpeg = cv2.imencode(".jpg", load_bgr(folder / "baiona.png"),
                            [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    pdf = next(iter(open_sources([folder / "cardinal.pdf"], SourceConfig()).pages()))
    assert pdf.pixels is not None
    return [(folder / "linn.png").read_bytes(), jpeg.tobytes(), pdf.pixels,
            (folder / "typewriter.png").read_bytes()]


def _host_path(cfg: FolioConfig, model: LayoutModel, items: list[bytes | np.ndarray]
               ) -> list[LayoutResult]:
    """The existing in-process path: DALI decode on the CPU, then LayoutModel.detect."""
    decoder = Decoder(cfg.decode, cfg.sources)
    encoded = [EncodedPage(PageRef("page", i), data=item if isinstance(item, bytes) else None,
                           pixels=None if isinstance(item, bytes) else item)
               for i, item in enumerate(items)]
    decoded = []
    for start in range(0, len(encoded), cfg.decode.batch_size):
        decoded += decoder.decode(encoded[start:start + cfg.decode.batch_size])
    dets = model.detect(np.stack([d.model_input for d in decoded]),
                        [(d.height, d.width) for d in decoded])
    return [layout_result(det, model.labels, cfg.layout, d.width, d.height)
            for det, d in zip(dets, decoded, strict=True)]


def _same_regions(got: LayoutResult, want: LayoutResult) -> None:
    assert (got.width, got.height) == (want.width, want.height)
    assert [r.label for r in got.regions] == [r.label for r in want.regions]
    a = np.array([r.bbox for r in got.regions]).reshape(-1, 4)
    b = np.array([r.bbox for r in want.regions]).reshape(-1, 4)
    assert np.diag(iou_matrix(a, b)).min() > 0.98
    np.testing.assert_allclose([r.score for r in got.regions],
                               [r.score for r in want.regions], atol=0.02)


def test_selection_follows_the_config(cfg: FolioConfig) -> None:
    auto = cfg.override({"layout.gpu_resident": "auto"})
    assert gpu_resident_enabled(auto, "cuda") and not gpu_resident_enabled(auto, "cpu")
    assert gpu_resident_enabled(cfg, "cpu")  # "on"
    assert not gpu_resident_enabled(cfg.override({"layout.gpu_resident": "off"}), "cuda")
    assert not gpu_resident_enabled(cfg.override({"layout.backend": "triton"}), "cuda")


def test_device_input_equals_the_dali_model_input(cfg: FolioConfig, corpus_dir: Path) -> None:
    """Torch resize + normalise of the decoded page against DALI's and OpenCV's: at most one
    uint8 step apart on a few pixels (rounding), the same on average."""
    path = corpus_dir / "pages" / "typewriter.png"
    data = path.read_bytes()
    (page,) = TorchDecoder(cfg.decode, cfg.sources.max_pixels, torch.device("cpu")).decode([data])
    assert isinstance(page, torch.Tensor) and page.dtype == torch.uint8
    bgr = load_bgr(path)
    assert torch.equal(page, torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1))
    row = torch.empty((3, cfg.decode.input_height, cfg.decode.input_width))
    Preprocessor(cfg.decode, torch.device("cpu"))(page, row)
    (dali,) = Decoder(cfg.decode, cfg.sources).decode([EncodedPage(PageRef("p", 1), data=data)])
    assert not isinstance(dali, Exception)
    one_step = 1.0 / (255 * min(cfg.decode.std))
    for reference in (dali.model_input, model_input(bgr, cfg.layout)):
        diff = np.abs(row.numpy() - reference)
        assert diff.max() <= one_step + 1e-4
        assert diff.mean() < 1e-3


def test_stage_finds_the_regions_of_the_host_path(
    cfg: FolioConfig, model: LayoutModel, stage: GpuLayoutStage, pages: list[bytes | np.ndarray]
) -> None:
    want = _host_path(cfg, model, pages)
    got: list[LayoutResult] = []
    for start in range(0, len(pages), 2):
        batch = stage.detect(pages[start:start + 2])
        for result in batch.results:
            assert isinstance(result, LayoutResult)
            got.append(result)
    assert sum(len(r.regions) for r in want) > 10
    for g, w in zip(got, want, strict=True):
        _same_regions(g, w)


def test_run_overlaps_batches_in_order_and_fails_bad_pages_alone(
    stage: GpuLayoutStage, pages: list[bytes | np.ndarray]
) -> None:
    bad = [b"not an image at all", b"", png_header(30_000, 30_000)]
    items = [pages[0], bad[0], pages[1], bad[1], pages[2], bad[2], pages[3]]
    batches = [items[i:i + 2] for i in range(0, len(items), 2)]
    sequential = [stage.detect(b) for b in batches]
    overlapped = list(stage.run(iter(batches)))
    assert len(overlapped) == len(batches)
    flat = [r for b in overlapped for r in b.results]
    assert isinstance(flat[1], PageDecodeError) and isinstance(flat[3], PageDecodeError)
    assert isinstance(flat[5], PixelLimitExceeded)
    for one, other in zip(sequential, overlapped, strict=True):
        for a, b in zip(one.results, other.results, strict=True):
            if isinstance(a, LayoutResult):
                assert isinstance(b, LayoutResult)
                assert [r.bbox for r in a.regions] == [r.bbox for r in b.regions]
            else:
                assert type(a) is type(b) and str(a) == str(b)
    # Kept pages: the decoded page, RGB, on the stage's device; none for failed pages.
    first = overlapped[0].images[0]
    assert first is not None and first.dtype == torch.uint8 and first.shape[0] == 3
    linn = flat[0]
    assert isinstance(linn, LayoutResult)
    assert (first.shape[1], first.shape[2]) == (linn.height, linn.width)
    assert overlapped[0].images[1] is None
    assert all(isinstance(r, LayoutResult) for r in (flat[0], flat[2], flat[4], flat[6]))


def _layout_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("folio-layout-")]


def test_run_stops_its_threads_when_abandoned_or_when_the_input_fails(
    stage: GpuLayoutStage, pages: list[bytes | np.ndarray]
) -> None:
    def endless() -> Iterator[list[bytes | np.ndarray]]:
        while True:
            yield [pages[3]]

    results = stage.run(endless())
    first = next(results)
    assert isinstance(first, LayoutBatch) and isinstance(first.results[0], LayoutResult)
    results.close()  # the caller stops early
    assert not _layout_threads()

    def failing() -> Iterator[list[bytes | np.ndarray]]:
        yield [pages[3]]
        raise OSError("the shard went away")

    with pytest.raises(LayoutError, match="the shard went away"):
        list(stage.run(failing()))
    assert not _layout_threads()
    with pytest.raises(LayoutError, match=r"over layout\.batch_size"):
        list(stage.run([pages[:3]]))


def test_dali_decoder_gives_the_torch_decoders_inputs(
    cfg: FolioConfig, pages: list[bytes | np.ndarray]
) -> None:
    """decode.gpu_decoder = "dali" (here DALI's CPU graph): the same pages and model inputs
    as the torch decoder, within one uint8 step of rounding."""
    device = torch.device("cpu")
    shape = (2, 3, cfg.decode.input_height, cfg.decode.input_width)
    dali = DaliDecoder(cfg.decode, cfg.sources.max_pixels, device, batch_size=2)
    torch_dec = TorchDecoder(cfg.decode, cfg.sources.max_pixels, device)
    one_step = 1.0 / (255 * min(cfg.decode.std))
    for batch in (pages[:2], [pages[2], b"garbage"]):
        a, b = torch.empty(shape), torch.empty(shape)
        got = dali.decode_into(batch, a, keep_pages=True)
        want = torch_dec.decode_into(batch, b, keep_pages=True)
        assert got.rows == want.rows and got.sizes == want.sizes
        assert [type(e) for e in got.errors] == [type(e) for e in want.errors]
        rows = sum(r is not None for r in got.rows)
        assert (a[:rows] - b[:rows]).abs().max() <= one_step + 1e-4
        for x, y in zip(got.images, want.images, strict=True):
            assert (x is None) == (y is None)
            if x is not None and y is not None:
                assert x.shape == y.shape
                assert (x.int() - y.int()).abs().float().mean() < 1.0  # JPEG IDCTs differ


def test_cuda_only_settings_are_refused_on_the_cpu(cfg: FolioConfig, model: LayoutModel) -> None:
    with pytest.raises(ConfigError, match="cuda_graph"):
        GpuLayoutStage(cfg.override({"layout.cuda_graph": True}), device="cpu", model=model)
    with pytest.raises(ConfigError, match=r"decode\.gpu_decoder"):
        cfg.override({"decode.gpu_decoder": "nvdec"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_a_cuda_stage_without_cuda_is_a_config_error(cfg: FolioConfig) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        GpuLayoutStage(cfg, device="cuda")


def test_jpeg_routing_and_fallbacks_of_the_batch_decoder(
    cfg: FolioConfig, pages: list[bytes | np.ndarray], corpus_dir: Path
) -> None:
    """On CUDA plain JPEGs go to nvJPEG in one call per batch; PNGs and EXIF-turned JPEGs
    to OpenCV; a batch nvJPEG refuses is retried page by page, and a page it refuses alone
    is OpenCV's. The batch decoder is stood in for here by OpenCV behind the same call,
    refusing what it cannot read (and one planted page), as nvJPEG raises RuntimeError."""
    import io

    from PIL import Image

    decoder = TorchDecoder(cfg.decode, cfg.sources.max_pixels, torch.device("cpu"))
    calls: list[int] = []
    refused = pages[1]  # a good JPEG the stand-in refuses, as nvJPEG refuses CMYK JPEGs

    def batch_decoder(encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        calls.append(len(encoded))
        out = []
        for t in encoded:
            data = t.numpy().tobytes()
            bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if bgr is None or data == refused:
                raise RuntimeError("Error while decoding JPEG images")
            out.append(torch.from_numpy(bgr[:, :, ::-1].copy()).permute(2, 0, 1))
        return out

    decoder.batch_decoder = batch_decoder
    bgr = load_bgr(corpus_dir / "pages" / "typewriter.png")
    jpeg = cv2.imencode(".jpg", bgr)[1].tobytes()
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: shown after a quarter turn clockwise
    Image.fromarray(bgr[:, :, ::-1]).save(buffer, "JPEG", exif=exif)
    turned = buffer.getvalue()
    truncated = jpeg[: len(jpeg) // 3]

    out = decoder.decode([jpeg, pages[0], turned, jpeg])
    assert calls == [2]  # the two plain JPEGs, in one call
    assert all(isinstance(o, torch.Tensor) for o in out)
    h, w = bgr.shape[:2]
    assert out[0].shape == out[3].shape == (3, h, w)
    assert out[2].shape == (3, w, h)  # OpenCV applied the EXIF turn

    calls.clear()
    out = decoder.decode([jpeg, refused, truncated])
    # The batch fails; page by page, the refused JPEG falls back to OpenCV, and the truncated
    # one, which neither reads, fails alone.
    assert calls == [3, 1, 1, 1]
    assert isinstance(out[0], torch.Tensor) and isinstance(out[1], torch.Tensor)
    assert out[1].shape == decoder.decode([refused])[0].shape
    assert isinstance(out[2], PageDecodeError) and "truncated" in str(out[2])


@pytest.mark.slow
def test_folio_run_with_the_gpu_resident_stage_stores_what_the_host_path_stores(
        cfg: FolioConfig, corpus_dir: Path, tmp_path: Path) -> None:
    """``layout.gpu_resident`` selects the stage for a whole run (auto on CUDA, on here):
    a page read from its bytes, a page the orientation probe turns upright (sent as the
    upright pixels) and rendered PDF pages (some turned) get the regions, lines and texts
    of the default path, and the run records which layout stage it used."""
    import json
    import sqlite3

    from orchestrator.engines.pipeline import GpuResidentLayout, InProcessLayout, Pipeline

    turned = tmp_path / "turned.png"
    cv2.imwrite(str(turned), cv2.rotate(load_bgr(corpus_dir / "pages" / "typewriter.png"),
                                        cv2.ROTATE_90_CLOCKWISE))
    sources = [corpus_dir / "pages" / "typewriter.png", turned, corpus_dir / "pages" /
               "cardinal.pdf"]
    stored: dict[str, list[tuple[object, ...]]] = {}
    for mode, backend in (("on", GpuResidentLayout), ("off", InProcessLayout)):
        run_cfg = cfg.override({"layout.gpu_resident": mode, "decode.orient": True})
        pipeline = Pipeline(run_cfg)
        assert isinstance(pipeline.layout, backend)
        db = tmp_path / f"{mode}.db"
        try:
            summary = pipeline.run([str(s) for s in sources], db)
        finally:
            pipeline.close()
        assert summary.errors == 0, summary.first_errors
        conn = sqlite3.connect(db)
        stored[mode] = conn.execute(
            "SELECT r.label, r.x0, r.y0, r.x1, r.y1, coalesce(r.text, ''), p.rotation "
            "FROM regions r JOIN pages p ON p.id = r.page_id JOIN documents d "
            "ON d.id = p.document_id ORDER BY d.source, p.page, r.idx").fetchall()
        manifest = json.loads(conn.execute("SELECT manifest FROM runs").fetchone()[0])
        assert manifest["layout"]["backend"] == backend.name
        conn.close()
    on, off = stored["on"], stored["off"]
    assert len(on) == len(off) > 10
    # pages turned upright (the turned PNG, cardinal.pdf's turned pages) went as pixels
    assert {row[6] for row in on} > {0}
    assert [row[6] for row in on] == [row[6] for row in off]
    assert [row[0] for row in on] == [row[0] for row in off]
    boxes_on = np.array([row[1:5] for row in on], dtype=np.float64)
    boxes_off = np.array([row[1:5] for row in off], dtype=np.float64)
    assert np.diag(iou_matrix(boxes_on, boxes_off)).min() > 0.98
    assert [row[5] for row in on] == [row[5] for row in off]
