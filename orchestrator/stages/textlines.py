"""Text lines: found once per page, for orientation, coverage and recognition.

rapidocr's DB text detector (the PP-OCRv6 small det model in the rapidocr wheel) runs on
the whole page, scaled down so its long side is at most ``lines.side_px``; its
quadrilaterals come back in page pixels. rapidocr's resize and DB post-processing run on
the host; its forward pass (``lines.engine``) runs

- through OpenVINO on the CPU (BF16 where the CPU computes it natively): on a 1280 x 1664
  page one thread takes about 0.26 s in BF16, 0.54 s in OpenVINO fp32, 1.9 s in
  onnxruntime fp32, most of the detection's CPU;
- or in torch on a GPU (``TorchLineModel``: the ONNX graph through
  ``models.onnx_to_torch``): the resized page goes up as uint8, is normalised there with
  rapidocr's arithmetic, and only the probability map comes back, so the host keeps the
  resize and post-processing only. The same code runs on CPU tensors in the tests.

Usage::

    detector = LineDetector(cfg.lines)                  # or LineDetector(cfg.lines, "cuda:0")
    lines = detector.detect(page_bgr)                   # PageLines, page pixels
    upright = rotate_lines(lines, 90, height, width)    # the same lines, page turned 90 cw
    crop = line_image(page_bgr, upright.quads[0])       # one line, straightened
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.config import LinesConfig
from orchestrator.errors import ConfigError
from orchestrator.types import PageLines, UInt8Array

DET_MODEL = "PP-OCRv6_det_small.onnx"  # the detection model in the rapidocr wheel


def resolve_lines_engine(engine: str, device: str) -> str:
    """``lines.engine`` made concrete: "auto" is torch on a CUDA device, else OpenVINO."""
    if engine == "auto":
        return "torch" if device.startswith("cuda") else "openvino"
    if engine not in ("openvino", "torch"):
        raise ConfigError(f"lines.engine must be openvino|torch|auto, got {engine!r}")
    return engine


class LineDetector:
    """Detects the text lines of whole pages. Thread-safe: rapidocr's detector (its pre-
    and post-processing, and an OpenVINO request) once per calling thread; the torch model
    once, shared.

    ``device``: where the torch engine runs ("cpu", "cuda", "cuda:1"); the OpenVINO
    engine always runs on the CPU.
    """

    def __init__(self, cfg: LinesConfig, device: str = "cpu") -> None:
        from orchestrator.stages.recognize import resolve_rec_precision

        self._cfg = cfg
        self.engine = resolve_lines_engine(cfg.engine, device)
        if self.engine == "torch":
            # auto: BF16 on a GPU, as the layout model runs there; fp32 on the CPU.
            self.precision = (cfg.precision if cfg.precision != "auto"
                              else "bf16" if device.startswith("cuda") else "fp32")
        else:
            self.precision = resolve_rec_precision(cfg.precision, key="lines.precision")
        self.device = device if self.engine == "torch" else "cpu"
        self._local = threading.local()
        self._torch_model: TorchLineModel | None = None
        self._torch_lock = threading.Lock()

    def _shared_torch_model(self, det: Any, path: Path) -> TorchLineModel:
        with self._torch_lock:
            if self._torch_model is None:
                self._torch_model = TorchLineModel(path, self.device, self.precision,
                                                   det.mean, det.std)
            return self._torch_model

    def _detector(self) -> Any:
        det = getattr(self._local, "det", None)
        if det is None:
            from orchestrator.stages.recognize import (
                OpenVINOSession,
                _rapidocr_models,
                rapidocr_engine,
            )

            cfg = self._cfg
            path = _rapidocr_models() / DET_MODEL
            engine = rapidocr_engine(cfg.threads, {
                "Global.use_rec": False,
                "Det.model_path": str(path),
                "Det.limit_type": "max",
                "Det.limit_side_len": cfg.side_px,
                "Det.thresh": cfg.pixel_threshold,
                "Det.box_thresh": cfg.box_threshold,
                "Det.unclip_ratio": cfg.unclip_ratio,
                "Det.max_candidates": cfg.max_lines,
            })
            det = engine._load_det_model()
            # rapidocr keeps mean and std as lists that its pre-processing turns into
            # float64 arrays, so the whole page is normalised in float64 and copied back
            # to float32 (about 0.1 s a page); float32 ones keep the same arithmetic in
            # float32, with the same result here (0.5 and 0.5 are exact).
            det.mean = np.asarray(list(det.mean), dtype=np.float32)
            det.std = np.asarray(list(det.std), dtype=np.float32)
            # rapidocr keeps its pre- and post-processing; only the forward pass is swapped.
            if self.engine == "torch":
                model = self._shared_torch_model(det, path)
                det.session = model
                det.get_preprocess = model.host_preprocess(det)
            else:
                det.session = OpenVINOSession(path, cfg.threads, self.precision)
            self._local.det = det
        return det

    def detect(self, image: UInt8Array) -> PageLines:
        """The text lines of a page (HWC uint8 BGR), in its pixels, top to bottom."""
        out = self._detector()(image)
        if out.boxes is None or len(out.boxes) == 0:
            return PageLines.empty()
        quads = np.asarray(out.boxes, dtype=np.float32).reshape(-1, 4, 2)
        scores = np.asarray(out.scores, dtype=np.float32).reshape(-1)
        return PageLines(np.ascontiguousarray(quads), scores)


class TorchLineModel:
    """The detector's forward pass in torch on ``device``, standing in for rapidocr's
    session: it takes the page as rapidocr resized it, uint8 (1, H, W, 3) BGR, normalises it
    on the device with rapidocr's arithmetic (``x * (1/255) - mean) / std`` in float32,
    with the detector's ``mean`` and ``std``), runs the model in ``precision`` and returns
    the float32 probability map, the only thing that comes back to the host. Thread-safe:
    torch inference on one module."""

    def __init__(self, model_path: Path, device: str, precision: str,
                 mean: Any, std: Any) -> None:
        import onnx
        import torch

        from orchestrator.models.onnx_to_torch import OnnxGraphModule

        self._torch = torch
        self.device = torch.device(device)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
        module = OnnxGraphModule(onnx.load(str(model_path)), dynamic_batch=True)
        self._module = module.eval().to(device=self.device, dtype=self.dtype)
        self._mean, self._std = (
            torch.as_tensor(np.asarray(v, np.float32), device=self.device).view(1, 3, 1, 1)
            for v in (mean, std))

    @staticmethod
    def host_preprocess(det: Any) -> Any:
        """What replaces ``det.get_preprocess``: rapidocr's own resize (its ``DetPreProcess``,
        sizes to multiples of 32 within ``limit_side_len``), and no float page on the host."""
        from rapidocr.ch_ppocr_det.utils import DetPreProcess

        def make() -> Any:
            stock = DetPreProcess(det.limit_side_len, det.limit_type, det.mean, det.std)

            def resize_only(image: UInt8Array) -> np.ndarray | None:
                resized = stock.resize(image)
                return None if resized is None else np.ascontiguousarray(resized[None])

            return resize_only

        return make

    def normalised(self, pages: np.ndarray) -> Any:
        """(N, H, W, 3) uint8 -> the model's float32 (N, 3, H, W) input, on the device."""
        x = self._torch.from_numpy(pages).to(self.device)
        # rapidocr: (img.astype(float32) * (1 / 255) - mean) / std, then HWC -> CHW.
        return (x.permute(0, 3, 1, 2).float() * (1 / 255.0) - self._mean) / self._std

    def __call__(self, pages: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            (prob,) = self._module(self.normalised(pages).to(self.dtype))
            return prob.float().cpu().numpy()


def rotate_lines(lines: PageLines, degrees: int, height: int, width: int) -> PageLines:
    """The lines of a ``height`` x ``width`` page as they lie once the page is turned
    clockwise by ``degrees`` (a multiple of 90), corners still clockwise from top left."""
    turns = (degrees // 90) % 4
    if turns == 0 or len(lines) == 0:
        return lines
    x, y = lines.quads[:, :, 0], lines.quads[:, :, 1]
    if turns == 1:
        turned = np.stack([height - y, x], axis=2)
    elif turns == 2:
        turned = np.stack([width - x, height - y], axis=2)
    else:
        turned = np.stack([y, width - x], axis=2)
    # A rotation keeps the corners' clockwise order; start each quad at its top-left one.
    start = np.argmin(turned.sum(axis=2), axis=1)
    order = (start[:, None] + np.arange(4)[None, :]) % 4
    quads = np.take_along_axis(turned, order[:, :, None], axis=1)
    return PageLines(np.ascontiguousarray(quads, dtype=np.float32), lines.scores)


def line_image(page: UInt8Array, quad: np.ndarray) -> UInt8Array:
    """One line cut out of the page and straightened (rapidocr's perspective crop of its
    quad, as its own pipeline reads lines); vertical text is turned to read left to right."""
    from rapidocr.utils.process_img import get_rotate_crop_image

    points = np.array(quad, dtype=np.float32).reshape(4, 2)  # a copy: rapidocr may write it
    return np.ascontiguousarray(get_rotate_crop_image(page, points))
