"""The GPU-resident layout stage: encoded pages in, regions out, pixels never on the host.

Per batch of pages:

1. header checks (``orchestrator.stages.page_header``: size against ``sources.max_pixels``,
   format, EXIF orientation) before any pixel is decoded;
2. decoding on the device (``decode.gpu_decoder``): DALI's "mixed" nvJPEG decoder and its
   resize/normalise graph (``dali_pipelines.layout_preprocess``) where DALI is installed,
   else torchvision's batched nvJPEG for plain JPEGs; PNG, TIFF, EXIF-turned JPEGs and
   other formats are decoded by OpenCV on the CPU and uploaded as uint8 through pinned
   memory (never as float32);
3. stretched bilinear resize and normalisation on the device, into a preallocated batch
   buffer in the model's dtype (BF16 on a GPU): the DALI graph's arithmetic, with the same
   ``decode.mean``/``decode.std``;
4. the TorchScript model (``layout.cuda_graph``: replayed as a CUDA graph captured at
   ``layout.batch_size``), outputs left on the device;
5. post-processing in torch on the device (``orchestrator.stages.postprocess_torch``); only the
   final boxes cross to the host (an exported PP-DocLayoutV3 head goes to numpy: its
   outputs are a few hundred queries).

``run`` overlaps the batches in three threads, each on its own CUDA stream: decoding batch
n+1, the model on batch n, post-processing batch n-1 (the caller's thread).
``layout.batches_in_flight`` input buffers bound how far decoding runs ahead. On the CPU
the same code runs on CPU tensors (OpenCV decode, torch resize, the FP32 model), which is
how it is tested; ``detect`` is the same work for one batch, without threads.

Decoded pages can be kept on the device (``keep_pages=True``) as (3, H, W) uint8 RGB
tensors, for cropping there (``orchestrator.stages.crop_gpu``).

Usage::

    stage = GpuLayoutStage(cfg, device="cuda")
    for batch in stage.run(batches):                # each batch: a list of page bytes
        batch.results                               # LayoutResult or PageError per page
    batch = stage.detect(pages)                     # one batch, no overlap
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from orchestrator.config import DecodeConfig, FolioConfig
from orchestrator.errors import ConfigError, LayoutError, PageDecodeError, PageError
from orchestrator.stages import postprocess_torch
from orchestrator.stages.layout import (
    DEFAULT_HEAD,
    LayoutModel,
    head_kind,
    layout_result,
    postprocess_head,
    resolve_device,
)
from orchestrator.stages.page_header import read_header
from orchestrator.types import Detections, LayoutResult

__all__ = [
    "BatchWork",
    "DaliDecoder",
    "GpuLayoutStage",
    "LayoutBatch",
    "PageInput",
    "Preprocessor",
    "TorchDecoder",
    "gpu_resident_enabled",
    "make_decoder",
]

# A page as a source yields it: the file's bytes, or an HWC uint8 BGR bitmap (a PDF page).
PageInput = bytes | npt.NDArray[np.uint8]
# torch warns (once) that a tensor over immutable bytes must not be written; the encoded
# pages handed to nvJPEG never are.
warnings.filterwarnings("ignore", message="The given buffer is not writable",
                        category=UserWarning)
# How often a thread waiting on a queue checks that its peer is still alive.
_POLL_S = 0.2


def gpu_resident_enabled(cfg: FolioConfig, device: str) -> bool:
    """Whether ``layout.gpu_resident`` selects this stage for the layout ``device``."""
    if cfg.layout.backend != "inprocess" or cfg.layout.gpu_resident == "off":
        return False
    return cfg.layout.gpu_resident == "on" or resolve_device(device).startswith("cuda")


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:N`` (the current device): nvJPEG, streams and events want an
    index, and two spellings of one device must compare equal."""
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"layout device {device} requested but CUDA is not available")
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _dali_installed() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(slots=True)
class DecodedPages:
    """One batch after decoding: per page an error, or its row in the input buffer."""

    errors: list[PageError | None]
    rows: list[int | None]  # row of the page in the model-input buffer
    sizes: list[tuple[int, int]]  # (height, width) per page; (0, 0) for failed pages
    images: list[torch.Tensor | None]  # (3, H, W) uint8 RGB on the device, when kept


# --- decoding ---------------------------------------------------------------------------------


class Preprocessor:
    """Stretched bilinear resize + normalisation of one decoded page into a buffer row.

    The DALI graph's arithmetic (and OpenCV's, which trained the model): bilinear with
    half-pixel centres and no antialiasing, rounded to uint8 as their uint8 resize does,
    then BGR ``(x - 255 mean) / (255 std)`` per channel.
    """

    def __init__(self, cfg: DecodeConfig, device: torch.device) -> None:
        self.size = (cfg.input_height, cfg.input_width)
        view = (3, 1, 1)
        self._mean = torch.tensor([m * 255.0 for m in cfg.mean], device=device).view(view)
        self._std = torch.tensor([s * 255.0 for s in cfg.std], device=device).view(view)

    def __call__(self, page: torch.Tensor, out: torch.Tensor) -> None:
        """``page``: (3, H, W) uint8 RGB; ``out``: a (3, h, w) row of the batch buffer."""
        x = page.unsqueeze(0).to(torch.float32)
        x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False,
                          antialias=False)
        x = x.round_().clamp_(0.0, 255.0)[0].flip(0)  # RGB -> BGR, the model's order
        out.copy_((x - self._mean) / self._std)


def _decode_on_cpu(data: bytes) -> npt.NDArray[np.uint8]:
    """HWC uint8 BGR by OpenCV (EXIF orientation applied); PIL for what OpenCV cannot read."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if bgr is not None:
        return np.asarray(bgr, dtype=np.uint8)
    import io

    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, ValueError, SyntaxError) as exc:
        raise PageDecodeError(f"cannot decode image: {exc}") from exc
    return np.ascontiguousarray(rgb[:, :, ::-1])


class TorchDecoder:
    """Decodes pages to (3, H, W) uint8 RGB tensors on ``device``; torch resize/normalise.

    On CUDA, plain JPEGs go to torchvision's batched nvJPEG in one call (a batch it
    refuses is retried one page at a time, so a bad page fails alone); everything else is
    decoded by OpenCV on the CPU and uploaded as uint8 from pinned memory.
    """

    def __init__(self, cfg: DecodeConfig, max_pixels: int, device: torch.device) -> None:
        self.device = device
        self._max_pixels = max_pixels
        self._prep = Preprocessor(cfg, device)
        # torchvision's batched nvJPEG decoder, on CUDA (torchvision need not exist elsewhere).
        self.batch_decoder: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None
        if device.type == "cuda":
            import torchvision.io

            def nvjpeg(encoded: list[torch.Tensor]) -> list[torch.Tensor]:
                return list(torchvision.io.decode_jpeg(
                    encoded, mode=torchvision.io.ImageReadMode.RGB, device=device))

            self.batch_decoder = nvjpeg

    def _upload(self, bgr: npt.NDArray[np.uint8]) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(bgr))
        if self.device.type == "cuda":
            host = host.pin_memory()
        page = host.to(self.device, non_blocking=True)
        return page.permute(2, 0, 1).flip(0)  # HWC BGR -> CHW RGB (a view)

    def _nvjpeg(self, data: list[bytes]) -> list[torch.Tensor | PageError]:
        assert self.batch_decoder is not None
        # nvJPEG only reads these tensors: wrapping the immutable bytes saves a copy a page.
        encoded = [torch.frombuffer(d, dtype=torch.uint8) for d in data]
        try:
            return list(self.batch_decoder(encoded))
        except RuntimeError:
            if len(encoded) == 1:  # a JPEG nvJPEG refuses (CMYK, corrupt): OpenCV's turn
                return [self._cpu_fallback(data[0])]
        return [r for d in data for r in self._nvjpeg([d])]

    def _cpu_fallback(self, data: bytes) -> torch.Tensor | PageError:
        try:
            return self._upload(_decode_on_cpu(data))
        except PageError as exc:
            return exc

    def decode(self, items: Sequence[PageInput]) -> list[torch.Tensor | PageError]:
        results: list[torch.Tensor | PageError | None] = [None] * len(items)
        jpegs: list[int] = []
        jpeg_data: list[bytes] = []
        for i, item in enumerate(items):
            try:
                if isinstance(item, np.ndarray):
                    results[i] = self._upload(item)
                    continue
                header = read_header(item, self._max_pixels)
                if self.batch_decoder is not None and header.plain_jpeg:
                    jpegs.append(i)
                    jpeg_data.append(item)
                else:
                    results[i] = self._upload(_decode_on_cpu(item))
            except PageError as exc:
                results[i] = exc
        if jpegs:
            for i, page in zip(jpegs, self._nvjpeg(jpeg_data), strict=True):
                results[i] = page
        return [r if r is not None else PageDecodeError("no image") for r in results]

    def decode_into(
        self, items: Sequence[PageInput], buffer: torch.Tensor, keep_pages: bool
    ) -> DecodedPages:
        """Decode ``items`` and write their model inputs into ``buffer``'s first rows."""
        out = DecodedPages([], [], [], [])
        row = 0
        for page in self.decode(items):
            if isinstance(page, PageError):
                out.errors.append(page)
                out.rows.append(None)
                out.sizes.append((0, 0))
                out.images.append(None)
                continue
            self._prep(page, buffer[row])
            out.errors.append(None)
            out.rows.append(row)
            out.sizes.append((int(page.shape[1]), int(page.shape[2])))
            out.images.append(page if keep_pages else None)
            row += 1
        return out


class DaliDecoder:
    """DALI's decode + resize + normalise graph (``dali_pipelines``), outputs as tensors.

    On CUDA the graph decodes with nvJPEG ("mixed") and its outputs are copied device to
    device into the batch buffer; on the CPU it is DALI's CPU graph (tests).
    """

    def __init__(self, cfg: DecodeConfig, max_pixels: int, device: torch.device,
                 batch_size: int) -> None:
        from dali_pipelines.layout_preprocess import LayoutPreprocessor

        self.device = device
        self._max_pixels = max_pixels
        decode = dataclasses.replace(cfg, batch_size=batch_size, device_id=device.index or 0)
        kind = "gpu" if device.type == "cuda" else "cpu"
        self._encoded = LayoutPreprocessor(decode, device=kind, keep_full=True)
        self._pixels = LayoutPreprocessor(decode, device=kind, keep_full=True, encoded=False)

    def decode_into(
        self, items: Sequence[PageInput], buffer: torch.Tensor, keep_pages: bool
    ) -> DecodedPages:
        n = len(items)
        errors: list[PageError | None] = [None] * n
        outputs: list[Any] = [None] * n
        encoded = [i for i, item in enumerate(items) if not isinstance(item, np.ndarray)]
        pixels = [i for i, item in enumerate(items) if isinstance(item, np.ndarray)]
        good = []
        for i in encoded:
            item = items[i]
            try:
                if isinstance(item, bytes):
                    read_header(item, self._max_pixels)
                    good.append(i)
            except PageError as exc:
                errors[i] = exc
        for indices, runner in ((good, self._encoded), (pixels, self._pixels)):
            if indices:
                for i, page in zip(indices, runner.run_tensors([items[i] for i in indices]),
                                   strict=True):
                    if isinstance(page, Exception):
                        errors[i] = PageDecodeError(f"cannot decode image: {page}")
                    else:
                        outputs[i] = page
        out = DecodedPages([], [], [], [])
        row = 0
        for i in range(n):
            page = outputs[i]
            out.errors.append(errors[i])
            if page is None:
                out.rows.append(None)
                out.sizes.append((0, 0))
                out.images.append(None)
                continue
            buffer[row].copy_(page.model_input)
            out.rows.append(row)
            out.sizes.append((page.height, page.width))
            out.images.append(page.image.permute(2, 0, 1).flip(0) if keep_pages else None)
            row += 1
        return out


Decoder = TorchDecoder | DaliDecoder


def make_decoder(cfg: FolioConfig, device: torch.device) -> Decoder:
    """The decoder ``decode.gpu_decoder`` names for ``device`` (auto: DALI on CUDA when
    installed; on the CPU OpenCV, which is as fast as DALI there)."""
    choice = cfg.decode.gpu_decoder
    if choice == "auto":
        choice = "dali" if device.type == "cuda" and _dali_installed() else "torch"
    if choice == "dali":
        if not _dali_installed():
            raise ConfigError("decode.gpu_decoder = 'dali' but NVIDIA DALI is not installed")
        return DaliDecoder(cfg.decode, cfg.sources.max_pixels, device, cfg.layout.batch_size)
    return TorchDecoder(cfg.decode, cfg.sources.max_pixels, device)


# --- the model ---------------------------------------------------------------------------------


class ModelRunner:
    """The layout model on a batch buffer, eagerly or replayed as a CUDA graph.

    The graph is captured once at ``batch_size`` on a static input; a batch is copied in
    (a short one leaves stale rows, whose outputs are dropped) and the outputs are cloned
    out, since the next replay overwrites them.
    """

    def __init__(self, model: LayoutModel, batch_size: int, cuda_graph: bool) -> None:
        self.model = model
        self._graph: Any = None
        if not cuda_graph:
            return
        device = torch.device(model.device)
        if device.type != "cuda":
            raise ConfigError("layout.cuda_graph needs the layout model on a CUDA device")
        h, w = model.input_shape[1:]
        self._static_in = torch.zeros((batch_size, 3, h, w), dtype=model.input_dtype,
                                      device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.inference_mode(), torch.cuda.stream(side):
            # TorchScript profiles, then optimises, on its first calls: capture after them.
            for _ in range(3):
                model.module(self._static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode(), torch.cuda.graph(graph):
                self._static_out = list(model.module(self._static_in))
        except RuntimeError as exc:
            raise LayoutError(f"CUDA graph capture of the layout model failed: {exc}") from exc
        self._graph = graph

    def __call__(self, batch: torch.Tensor) -> list[torch.Tensor]:
        if self._graph is None:
            return self.model.forward_tensors(batch)
        n = batch.shape[0]
        if n > self._static_in.shape[0]:
            raise LayoutError(f"batch of {n} over the CUDA graph's {self._static_in.shape[0]}")
        with torch.inference_mode():
            self._static_in[:n].copy_(batch)
            self._graph.replay()
            return [o[:n].clone() for o in self._static_out]


# --- the stage ---------------------------------------------------------------------------------


@dataclass(slots=True)
class LayoutBatch:
    """One batch's outcome, in input order."""

    results: list[LayoutResult | PageError]
    images: list[torch.Tensor | None]  # decoded pages on the device (keep_pages), else None
    timings: dict[str, float] = field(default_factory=dict)  # host seconds per part


@dataclass(slots=True)
class BatchWork:
    """A batch between the parts: decoded into a buffer, then the model's raw outputs."""

    decoded: DecodedPages
    buffer: int
    raw: list[torch.Tensor] | None = None
    failure: str | None = None  # the whole batch failed here
    event: Any = None  # CUDA event: the last lane's work on this batch
    timings: dict[str, float] = field(default_factory=dict)


class _Lane:
    """A CUDA stream for one thread's work (nothing on the CPU)."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __enter__(self) -> _Lane:
        if self.stream is not None:
            self._ctx: Any = torch.cuda.stream(self.stream)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.stream is not None:
            self._ctx.__exit__(*exc)

    def wait(self, event: Any) -> None:
        if self.stream is not None and event is not None:
            self.stream.wait_event(event)

    def record(self) -> Any:
        if self.stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    def adopt(self, tensors: Iterable[torch.Tensor | None]) -> None:
        """Tensors allocated on another stream, used on this one from now on: the caching
        allocator must not hand their memory out again before this stream is done."""
        if self.stream is None:
            return
        for t in tensors:
            if t is not None:
                t.record_stream(self.stream)


class GpuLayoutStage:
    """Encoded pages -> ``LayoutResult`` per page, decode to boxes on one device."""

    def __init__(
        self,
        cfg: FolioConfig,
        device: str = "cuda",
        *,
        keep_pages: bool = False,
        model: LayoutModel | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = _indexed(torch.device(resolve_device(device)))
        self.model = model or LayoutModel(cfg.layout, device=str(self.device))
        if _indexed(torch.device(self.model.device)) != self.device:
            raise ConfigError(f"the layout model is on {self.model.device}, the stage on "
                              f"{self.device}")
        self.keep_pages = keep_pages
        self.batch_size = cfg.layout.batch_size
        self.head = head_kind(self.model.manifest)
        h, w = self.model.input_shape[1:]
        self._buffers = [
            torch.empty((self.batch_size, 3, h, w), dtype=self.model.input_dtype,
                        device=self.device)
            for _ in range(cfg.layout.batches_in_flight)
        ]
        self.decoder = make_decoder(cfg, self.device)
        self.runner = ModelRunner(self.model, self.batch_size, cfg.layout.cuda_graph)

    @property
    def labels(self) -> tuple[str, ...]:
        return self.model.labels

    # -- the three parts of a batch, each usable on its own (benchmarks time them) --

    def decode(self, pages: Sequence[PageInput], buffer: int = 0) -> BatchWork:
        if len(pages) > self.batch_size:
            raise LayoutError(f"batch of {len(pages)} over layout.batch_size {self.batch_size}")
        start = time.perf_counter()
        decoded = self.decoder.decode_into(pages, self._buffers[buffer], self.keep_pages)
        return BatchWork(decoded, buffer, timings={"decode_s": time.perf_counter() - start})

    def forward(self, work: BatchWork) -> BatchWork:
        start = time.perf_counter()
        rows = sum(r is not None for r in work.decoded.rows)
        if rows:
            try:
                work.raw = self.runner(self._buffers[work.buffer][:rows])
            except (LayoutError, RuntimeError) as exc:
                work.failure = f"layout failed: {exc}"
        work.timings["model_s"] = time.perf_counter() - start
        return work

    def postprocess(self, work: BatchWork) -> LayoutBatch:
        start = time.perf_counter()
        decoded = work.decoded
        sizes = [decoded.sizes[i] for i, r in enumerate(decoded.rows) if r is not None]
        dets: list[Detections] = []
        failure = work.failure
        if work.raw is not None and failure is None:
            try:
                dets = self._detections(work.raw, sizes)
            except (LayoutError, RuntimeError) as exc:
                failure = f"layout failed: {exc}"
        results: list[LayoutResult | PageError] = []
        per_page = (sum(work.timings.values()) + time.perf_counter() - start) / max(
            1, len(decoded.rows))
        found = iter(dets)
        for error, row, (height, width) in zip(decoded.errors, decoded.rows, decoded.sizes,
                                               strict=True):
            if error is not None:
                results.append(error)
            elif failure is not None or row is None:
                results.append(PageError(failure or "layout failed"))
            else:
                result = layout_result(next(found), self.labels, self.cfg.layout, width, height)
                result.layout_s = per_page
                results.append(result)
        work.timings["post_s"] = time.perf_counter() - start
        return LayoutBatch(results, decoded.images, dict(work.timings))

    def _detections(self, raw: list[torch.Tensor], sizes: list[tuple[int, int]]) -> list[
            Detections]:
        if self.head == DEFAULT_HEAD:
            return postprocess_torch.postprocess(raw, sizes, self.cfg.layout, self.labels)
        host = [o.float().cpu().numpy() for o in raw]
        return postprocess_head(self.head, host, sizes, self.cfg.layout, self.labels)

    # -- one batch, sequentially; a stream of batches, overlapped --

    def detect(self, pages: Sequence[PageInput]) -> LayoutBatch:
        """One batch, decode -> model -> post-processing in this thread."""
        return self.postprocess(self.forward(self.decode(pages)))

    def run(self, batches: Iterable[Sequence[PageInput]]) -> Iterator[LayoutBatch]:
        """Batches in, one ``LayoutBatch`` per batch out, in order; decoding, the model and
        post-processing of consecutive batches overlap (threads, one CUDA stream each)."""
        free: queue.Queue[tuple[int, Any]] = queue.Queue()
        for index in range(len(self._buffers)):
            free.put((index, None))
        to_model: queue.Queue[BatchWork | _End] = queue.Queue(maxsize=len(self._buffers))
        to_post: queue.Queue[BatchWork | _End] = queue.Queue(maxsize=1)
        stop = threading.Event()
        decode_lane, model_lane, post_lane = (_Lane(self.device) for _ in range(3))

        def decoder() -> None:
            end = _End()
            try:
                for pages in batches:
                    index, consumed = _take(free, stop, lambda: model_thread.is_alive())
                    with decode_lane:
                        decode_lane.wait(consumed)  # the model is done reading this buffer
                        work = self.decode(pages, index)
                        work.event = decode_lane.record()
                    _give(to_model, work, stop)
            except _Stopped:
                return
            except BaseException as exc:
                end.error = exc
            _give(to_model, end, stop, final=True)

        def modeller() -> None:
            while True:
                try:
                    work = _take(to_model, stop, decode_thread.is_alive)
                except _Stopped:
                    return
                if isinstance(work, _End):
                    _give(to_post, work, stop, final=True)
                    return
                with model_lane:
                    model_lane.wait(work.event)
                    self.forward(work)
                    work.event = model_lane.record()
                free.put((work.buffer, work.event))
                try:
                    _give(to_post, work, stop)
                except _Stopped:
                    return

        decode_thread = threading.Thread(target=decoder, name="folio-layout-decode",
                                         daemon=True)
        model_thread = threading.Thread(target=modeller, name="folio-layout-model", daemon=True)
        decode_thread.start()
        model_thread.start()
        try:
            while True:
                item = _take(to_post, stop, model_thread.is_alive)
                if isinstance(item, _End):
                    if item.error is not None:
                        raise LayoutError(f"layout stage input failed: {item.error}") from (
                            item.error)
                    return
                with post_lane:
                    post_lane.wait(item.event)
                    post_lane.adopt(item.raw or [])
                    batch = self.postprocess(item)
                    done = post_lane.record()
                # The caller uses the kept pages on its own stream.
                if self.device.type == "cuda":
                    current = torch.cuda.current_stream(self.device)
                    if done is not None:
                        current.wait_event(done)
                    for image in batch.images:
                        if image is not None:
                            image.record_stream(current)
                yield batch
        except _Stopped as exc:
            raise LayoutError("a layout stage thread ended without finishing") from exc
        finally:
            stop.set()
            decode_thread.join(timeout=_POLL_S * 10)
            model_thread.join(timeout=_POLL_S * 10)


class _End:
    """The end of the batches (``error``: why the input ended early)."""

    def __init__(self) -> None:
        self.error: BaseException | None = None


class _Stopped(Exception):
    """The run was abandoned (stop set) or a peer thread died."""


def _take(q: queue.Queue[Any], stop: threading.Event, peer_alive: Callable[[], bool]) -> Any:
    """The next item; raises ``_Stopped`` once ``stop`` is set or the producer died."""
    while not stop.is_set():
        try:
            return q.get(timeout=_POLL_S)
        except queue.Empty:
            if not peer_alive() and q.empty():
                raise _Stopped from None
    raise _Stopped


def _give(q: queue.Queue[Any], item: Any, stop: threading.Event, final: bool = False) -> None:
    """Put ``item``, waiting while the queue is full; gives up once ``stop`` is set."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            continue
    if not final:
        raise _Stopped

