"""Page-level text-line detection (``orchestrator.stages.textlines``) against rapidocr's own
pre-processing, and its torch engine (the GPU's) against OpenVINO, on real pages."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from layout_fixtures import load_bgr
from rapidocr.ch_ppocr_det.utils import DetPreProcess

from orchestrator.config import DecodeConfig, LinesConfig, SourceConfig
from orchestrator.errors import ConfigError
from orchestrator.stages.decode import Decoder
from orchestrator.stages.textlines import LineDetector, resolve_lines_engine
from orchestrator.types import EncodedPage, PageRef


def test_the_page_is_normalised_in_float32_to_rapidocrs_values(corpus_dir: Path) -> None:
    """rapidocr's defaults normalise the page in float64 and copy it back; the detector's
    pre-processing stays in float32 and feeds the model the same input, bit for bit."""
    detector = LineDetector(LinesConfig())
    det = detector._detector()
    image = load_bgr(corpus_dir / "pages" / "typewriter.png")
    ours = det.get_preprocess()
    stock = DetPreProcess(det.limit_side_len, det.limit_type, [float(v) for v in det.mean],
                          [float(v) for v in det.std])  # lists, as rapidocr's config has them
    resized = ours.resize(image)
    assert ours.normalize(resized).dtype == np.float32
    assert stock.normalize(resized).dtype == np.float64
    want, got = stock(image), ours(image)
    assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want)
    lines = detector.detect(image)
    assert len(lines) > 10


def test_the_torch_engine_finds_the_same_lines_from_the_same_input(corpus_dir: Path) -> None:
    """``lines.engine = "torch"`` (the GPU's forward pass, on CPU tensors here): the page
    goes to the model as rapidocr resized it, in uint8, and is normalised there to the same
    float32 input, bit for bit; the model (the ONNX graph in torch) then finds the same
    lines as OpenVINO in fp32."""
    reference = LineDetector(replace(LinesConfig(), engine="openvino", precision="fp32"))
    on_torch = LineDetector(replace(LinesConfig(), engine="torch"))
    assert (on_torch.engine, on_torch.precision, on_torch.device) == ("torch", "fp32", "cpu")
    for name in ("typewriter.png", "baiona.png"):
        image = load_bgr(corpus_dir / "pages" / name)
        uploaded = on_torch._detector().get_preprocess()(image)
        assert uploaded.dtype == np.uint8 and uploaded.shape[-1] == 3
        model = on_torch._torch_model
        assert model is not None
        stock = reference._detector().get_preprocess()(image)
        assert np.array_equal(model.normalised(uploaded).cpu().numpy(), stock)
        want, got = reference.detect(image), on_torch.detect(image)
        assert len(got) == len(want) > 10
        np.testing.assert_allclose(got.quads, want.quads, atol=1.0)


def test_the_engine_follows_the_decode_device() -> None:
    """auto: torch (BF16) where pages are decoded on a GPU, OpenVINO on the CPU; nothing
    touches the device before the first page."""
    auto = LinesConfig()
    assert resolve_lines_engine(auto.engine, "cpu") == "openvino"
    on_gpu = LineDetector(auto, "cuda:1")
    assert (on_gpu.engine, on_gpu.precision, on_gpu.device) == ("torch", "bf16", "cuda:1")
    fp32 = LineDetector(replace(auto, precision="fp32"), "cuda:0")
    assert (fp32.engine, fp32.precision) == ("torch", "fp32")
    kept = LineDetector(replace(auto, engine="openvino", precision="fp32"), "cuda:0")
    assert (kept.engine, kept.device) == ("openvino", "cpu")
    with pytest.raises(ConfigError, match=r"lines\.engine"):
        resolve_lines_engine("tensorrt", "cpu")


def test_the_decode_stage_detects_on_the_torch_engine(corpus_dir: Path) -> None:
    """The decoder hands ``lines`` to the engine it names (torch on CPU tensors here); the
    page's lines are those of the OpenVINO fp32 engine."""
    page = EncodedPage(ref=PageRef("baiona", 1),
                       data=(corpus_dir / "pages" / "baiona.png").read_bytes())
    decoded = {}
    for engine in ("openvino", "torch"):
        decoder = Decoder(DecodeConfig(device="cpu", orient=False), SourceConfig(),
                          replace(LinesConfig(), engine=engine, precision="fp32"))
        (out,) = decoder.decode([page])
        assert not isinstance(out, Exception) and out.lines is not None
        decoded[engine] = out.lines
    assert len(decoded["torch"]) == len(decoded["openvino"]) > 10
    np.testing.assert_allclose(decoded["torch"].quads, decoded["openvino"].quads, atol=1.0)
