"""The one DALI pipeline of folio: page bytes -> decoded page + layout-model input.

encoded bytes -> decode (BGR) -> stretched resize to the model's H x W -> normalise ->
CHW float32, plus each page's original size and (optionally) the full-resolution decoded
page, kept for cropping so a page is decoded once.

The same definition runs CPU-only (``device_id=None``, ``decoder_device="cpu"``), with
nvJPEG (``decoder_device="mixed"``) on a GPU, inside the Triton python model, and is what
``serialize_pipeline`` writes as ``model.dali`` for Triton's DALI backend.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.pipeline import Pipeline

from orchestrator.config import DecodeConfig

# Tensor names shared with the Triton model configs: keep in step with model_repository/.
INPUT_ENCODED = "IMAGE"
INPUT_PIXELS = "PIXELS"
OUTPUT_MODEL_INPUT = "MODEL_INPUT"
OUTPUT_PAGE_SIZE = "PAGE_SIZE"
OUTPUT_PAGE_IMAGE = "PAGE_IMAGE"


@dataclass(slots=True)
class PreprocessedPage:
    model_input: npt.NDArray[np.float32]  # (3, H, W)
    height: int
    width: int
    image: npt.NDArray[np.uint8] | None  # (h, w, 3) BGR full resolution, when kept


@dataclass(slots=True)
class TensorPage:
    """A preprocessed page as torch tensors on the pipeline's device (CUDA or CPU)."""

    model_input: Any  # torch.Tensor (3, H, W) float32
    height: int
    width: int
    image: Any | None  # torch.Tensor (h, w, 3) uint8 BGR full resolution, when kept


def _to_torch(sample: Any, dtype: Any, device: Any) -> Any:
    """One DALI output sample as a torch tensor on ``device``; a GPU sample is copied
    device to device on torch's current stream, never through the host."""
    import torch
    from nvidia.dali.backend import TensorGPU

    if isinstance(sample, TensorGPU):
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(tuple(sample.shape()), dtype=dtype, device=device)
        feed_ndarray(sample, out, cuda_stream=torch.cuda.current_stream(out.device))
        return out
    return torch.from_numpy(np.array(sample, copy=True)).to(device)


@pipeline_def(enable_conditionals=False)
def _layout_graph(
    decoder_device: str,
    encoded: bool,
    keep_full: bool,
    height: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Any:
    if encoded:
        data = fn.external_source(name=INPUT_ENCODED, dtype=types.UINT8, ndim=1, no_copy=False)
        # BGR: the CDLA model was trained on OpenCV-loaded (BGR) pages.
        image = fn.decoders.image(data, device=decoder_device, output_type=types.BGR)
    else:
        image = fn.external_source(
            name=INPUT_PIXELS, dtype=types.UINT8, ndim=3, layout="HWC", no_copy=False
        )
        if decoder_device == "mixed":
            image = image.gpu()
    page_size = fn.slice(image.shape(dtype=types.INT32), 0, 2, axes=[0])
    # Stretched, no aspect keep, no antialias: the model's training-time cv2.resize.
    resized = fn.resize(
        image, resize_x=width, resize_y=height, interp_type=types.INTERP_LINEAR, antialias=False
    )
    model_input = fn.crop_mirror_normalize(
        resized,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[m * 255.0 for m in mean],
        std=[s * 255.0 for s in std],
    )
    if keep_full:
        return model_input, page_size, image
    return model_input, page_size


def build_layout_pipeline(
    *,
    batch_size: int,
    num_threads: int,
    device_id: int | None,
    cfg: DecodeConfig,
    decoder_device: str = "cpu",
    encoded: bool = True,
    keep_full: bool = True,
) -> Pipeline:
    """Build (not yet ``build()``-ed) the layout preprocessing pipeline.

    ``decoder_device`` is "cpu" (device_id None) or "mixed" (nvJPEG, needs device_id).
    Outputs, in order: MODEL_INPUT, PAGE_SIZE[, PAGE_IMAGE].
    """
    if decoder_device not in ("cpu", "mixed"):
        raise ValueError(f"decoder_device must be 'cpu' or 'mixed', got {decoder_device!r}")
    pipe: Pipeline = _layout_graph(
        decoder_device=decoder_device,
        encoded=encoded,
        keep_full=keep_full,
        height=cfg.input_height,
        width=cfg.input_width,
        mean=cfg.mean,
        std=cfg.std,
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=1,
        # The page size (a CPU shape) is read off a GPU image on the mixed path: a GPU->CPU
        # transition DALI supports only with the async, pipelined executor.
        exec_async=decoder_device == "mixed",
        exec_pipelined=decoder_device == "mixed",
    )
    return pipe


def serialize_pipeline(path: Path, cfg: DecodeConfig, max_batch_size: int) -> Path:
    """Write ``model.dali`` for Triton's DALI backend: nvJPEG decode on GPU 0.

    Serialising does not touch a GPU. The DALI backend feeds ``IMAGE`` and reads
    outputs by position; only MODEL_INPUT and PAGE_SIZE are served.
    """
    pipe = build_layout_pipeline(
        batch_size=max_batch_size,
        num_threads=cfg.threads,
        # None: defining the graph needs no CUDA here; the DALI backend sets each model
        # instance's device when it deserialises the pipeline.
        device_id=None,
        cfg=cfg,
        decoder_device="mixed",
        encoded=True,
        keep_full=False,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pipe.serialize(filename=str(path))
    return path


_Page = TypeVar("_Page", PreprocessedPage, TensorPage)


class LayoutPreprocessor:
    """Runs the pipeline over batches of pages, isolating bad samples.

    DALI fails a whole batch when one sample is bad; the batch is then re-run one
    sample at a time (on a fresh pipeline) so only the bad page gets the error.
    Thread-safe: one pipeline, one lock.
    """

    def __init__(
        self,
        cfg: DecodeConfig,
        *,
        device: str = "cpu",
        keep_full: bool = True,
        encoded: bool = True,
    ) -> None:
        self._cfg = cfg
        self._decoder_device = "mixed" if device == "gpu" else "cpu"
        self._device_id: int | None = cfg.device_id if device == "gpu" else None
        self._keep_full = keep_full
        self._encoded = encoded
        self._input_name = INPUT_ENCODED if encoded else INPUT_PIXELS
        self._lock = threading.Lock()
        self._pipe: Pipeline | None = None

    @property
    def max_batch_size(self) -> int:
        return self._cfg.batch_size

    def _pipeline(self) -> Pipeline:
        if self._pipe is None:
            pipe = build_layout_pipeline(
                batch_size=self._cfg.batch_size,
                num_threads=self._cfg.threads,
                device_id=self._device_id,
                cfg=self._cfg,
                decoder_device=self._decoder_device,
                encoded=self._encoded,
                keep_full=self._keep_full,
            )
            pipe.build()
            self._pipe = pipe
        return self._pipe

    def _run_batch(self, arrays: list[npt.NDArray[np.uint8]]) -> list[PreprocessedPage]:
        pipe = self._pipeline()
        pipe.feed_input(self._input_name, arrays)
        outputs = pipe.run()
        outputs = tuple(o.as_cpu() if hasattr(o, "as_cpu") else o for o in outputs)
        return self._host_pages(outputs, len(arrays))

    def _run_batch_tensors(self, arrays: list[npt.NDArray[np.uint8]]) -> list[TensorPage]:
        import torch

        pipe = self._pipeline()
        pipe.feed_input(self._input_name, arrays)
        model_input, sizes, *rest = pipe.run()
        device = (torch.device("cuda", self._cfg.device_id) if self._device_id is not None
                  else torch.device("cpu"))
        sizes = sizes.as_cpu() if hasattr(sizes, "as_cpu") else sizes
        pages: list[TensorPage] = []
        for i in range(len(arrays)):
            h, w = (int(v) for v in np.asarray(sizes[i]))
            pages.append(TensorPage(
                model_input=_to_torch(model_input[i], torch.float32, device),
                height=h,
                width=w,
                image=_to_torch(rest[0][i], torch.uint8, device) if self._keep_full else None,
            ))
        return pages

    def _host_pages(self, outputs: tuple[Any, ...], count: int) -> list[PreprocessedPage]:
        model_input = outputs[0]
        sizes = outputs[1]
        pages: list[PreprocessedPage] = []
        for i in range(count):
            h, w = (int(v) for v in np.asarray(sizes[i]))
            # Copies: DALI reuses its output buffers on the next run(), and these arrays
            # outlive it (queued for layout, kept for cropping).
            image = np.array(outputs[2][i], copy=True) if self._keep_full else None
            pages.append(
                PreprocessedPage(
                    model_input=np.array(model_input[i], copy=True), height=h, width=w,
                    image=image,
                )
            )
        return pages

    def run(
        self, items: Sequence[bytes | npt.NDArray[np.uint8]]
    ) -> list[PreprocessedPage | Exception]:
        """Preprocess up to ``max_batch_size`` pages; a failed page yields its exception."""
        return self._isolated(items, self._run_batch)

    def run_tensors(
        self, items: Sequence[bytes | npt.NDArray[np.uint8]]
    ) -> list[TensorPage | Exception]:
        """As ``run``, the outputs as torch tensors on the pipeline's device: on a GPU the
        decoded page and model input never visit the host."""
        return self._isolated(items, self._run_batch_tensors)

    def _isolated(
        self,
        items: Sequence[bytes | npt.NDArray[np.uint8]],
        run_batch: Callable[[list[npt.NDArray[np.uint8]]], Sequence[_Page]],
    ) -> list[_Page | Exception]:
        if len(items) > self._cfg.batch_size:
            raise ValueError(f"batch of {len(items)} exceeds batch_size {self._cfg.batch_size}")
        if not items:
            return []
        arrays = [
            np.frombuffer(item, dtype=np.uint8) if isinstance(item, bytes | bytearray | memoryview)
            else np.ascontiguousarray(item)
            for item in items
        ]
        with self._lock:
            try:
                return list(run_batch(arrays))
            except Exception:
                # A failed run can leave the pipeline unusable: rebuild, then isolate.
                self._pipe = None
            results: list[_Page | Exception] = []
            for array in arrays:
                try:
                    results.append(run_batch([array])[0])
                except Exception as exc:
                    self._pipe = None
                    results.append(exc)
            return results
