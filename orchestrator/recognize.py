"""Recognize: region crops in, text out.

One ``Recognizer`` interface; the embedded default runs rapidocr's PP-OCR ONNX models
in-process, ``orchestrator.recognize_vllm.VLLMRecognizer`` sends crops to a vLLM server.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from orchestrator.config import FolioConfig, RecognizeConfig
from orchestrator.types import RecognitionResult, RegionTask


@runtime_checkable
class Recognizer(Protocol):
    """Batch in, text out. Thread-safe: pipeline workers call it concurrently.

    Returns one result per task, in order. A region that fails gets a result with
    ``error`` set; only a failure of the recogniser as a whole raises.
    """

    name: str

    def recognize(self, tasks: Sequence[RegionTask]) -> list[RecognitionResult]: ...

    def close(self) -> None: ...


def rapidocr_engine(threads: int, params: dict[str, Any]) -> Any:
    """A rapidocr engine with folio's settings, plus ``params`` (rapidocr's dotted keys)."""
    from rapidocr import RapidOCR

    common = {
        # An empty detection on a blank region is normal, not a warning.
        "Global.log_level": "error",
        # Upright pages (the decode stage turns pages upright): the angle classifier
        # flips some lines into garbage.
        "Global.use_cls": False,
        "EngineConfig.onnxruntime.intra_op_num_threads": threads,
        "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        # rapidocr turns onnxruntime's arena off; with it on, recognition takes about 20%
        # less CPU (fewer page faults on every differently sized crop).
        "EngineConfig.onnxruntime.enable_cpu_mem_arena": True,
    }
    return RapidOCR(params={**common, **params})


class RapidOCRRecognizer:
    """The embedded default: rapidocr's PP-OCR ONNX models, in-process.

    Block crops go through detection + recognition; crops no taller than one text
    line go to recognition only. rapidocr engines keep per-call parameters as state
    and are not thread-safe, so each worker thread gets its own pair of engines.
    """

    name = "rapidocr"

    def __init__(self, cfg: RecognizeConfig) -> None:
        self._cfg = cfg
        self._local = threading.local()
        self.model = f"rapidocr-{_rapidocr_version()}:PP-OCRv6-small"

    def _engines(self) -> tuple[Any, Any]:
        engines = getattr(self._local, "engines", None)
        if engines is None:
            # Lines padded to the widest in a batch waste CPU; on CPU one line per
            # call is cheaper (measured: rec 2.2 s vs 2.8 s at rapidocr's batch of 6).
            batch = {"Rec.rec_batch_num": self._cfg.rec_batch_size}
            block = rapidocr_engine(self._cfg.threads, {
                **batch,
                # "max" caps the long side; the default "min" upscales crops 2-4x.
                "Det.limit_type": "max",
                "Det.limit_side_len": self._cfg.det_limit_side_len,
            })
            line = rapidocr_engine(self._cfg.threads, {**batch, "Global.use_det": False})
            engines = (block, line)
            self._local.engines = engines
        return engines

    def _one(self, task: RegionTask) -> RecognitionResult:
        block, line = self._engines()
        start = time.perf_counter()
        image = task.image
        if image.shape[0] <= self._cfg.single_line_max_height_px:
            out = line(image, use_det=False, use_cls=False, use_rec=True)
            lines = [t for t in (out.txts or ()) if t.strip()]
        else:
            out = block(image, use_det=True, use_cls=False, use_rec=True)
            lines = _lines_in_order(out.boxes, out.txts)
        return RecognitionResult(
            text="\n".join(lines),
            stats={"model": self.model, "latency_s": time.perf_counter() - start},
        )

    def recognize(self, tasks: Sequence[RegionTask]) -> list[RecognitionResult]:
        results: list[RecognitionResult] = []
        for task in tasks:
            try:
                results.append(self._one(task))
            except Exception as exc:
                results.append(RecognitionResult(text=None, error=f"{type(exc).__name__}: {exc}"))
        return results

    def close(self) -> None:
        self._local = threading.local()


def _lines_in_order(boxes: Any, txts: Sequence[str] | None) -> list[str]:
    """Text lines top to bottom; lines whose vertical centres overlap read left to right."""
    if boxes is None or not txts:
        return []
    arr = np.asarray(boxes, dtype=np.float32)  # (N, 4, 2)
    top = arr[:, :, 1].min(axis=1)
    bottom = arr[:, :, 1].max(axis=1)
    left = arr[:, :, 0].min(axis=1)
    centre = (top + bottom) / 2
    height = np.maximum(bottom - top, 1.0)
    order = np.argsort(centre, kind="stable")
    rows: list[list[int]] = []
    for i in order:
        if rows and abs(centre[i] - centre[rows[-1][-1]]) < 0.5 * height[i]:
            rows[-1].append(int(i))
        else:
            rows.append([int(i)])
    lines: list[str] = []
    for row in rows:
        words = [txts[i] for i in sorted(row, key=lambda j: left[j]) if txts[i].strip()]
        if words:
            lines.append(" ".join(words))
    return lines


def _rapidocr_version() -> str:
    from importlib.metadata import version

    return version("rapidocr")


def make_recognizer(cfg: FolioConfig) -> Recognizer:
    """The recogniser the config names."""
    if cfg.recognize.engine == "vllm":
        from orchestrator.recognize_vllm import VLLMRecognizer

        return VLLMRecognizer(cfg.vllm)
    return RapidOCRRecognizer(cfg.recognize)
