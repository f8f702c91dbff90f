"""The layout stage: TorchScript inference on a batch of pages, then post-processing.

``LayoutModel`` loads the artifact that ``orchestrator.models.artifacts`` built (checked against its
manifest) for the configured precision and runs batches of model inputs through it;
``layout_result`` turns one page's ``Detections`` into the ``LayoutResult`` the later
stages consume. Importing this module does not import torch or load anything: the Triton
python models import ``layout_result`` on their own.

Usage::

    model = LayoutModel(cfg.layout, device="cpu")          # or "cuda"
    dets = model.detect(batch, [(page.height, page.width) for page in pages])
    results = [layout_result(d, model.labels, cfg.layout, p.width, p.height)
               for d, p in zip(dets, pages)]
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestrator.config import LayoutConfig
from orchestrator.errors import ConfigError, LayoutError
from orchestrator.models.artifacts import artifact_path, load_manifest
from orchestrator.stages.postprocess import label_task, postprocess
from orchestrator.types import Detections, LayoutResult, Region, Task

__all__ = ["LayoutModel", "layout_result", "resolve_device", "resolve_precision"]


def resolve_device(device: str) -> str:
    """A torch device string: ``cpu``, ``cuda`` or ``cuda:N`` (``gpu`` means ``cuda``)."""
    device = device.strip().lower()
    if device == "gpu":
        return "cuda"
    if device == "cpu" or device == "cuda" or device.startswith("cuda:"):
        return device
    raise ConfigError(f"layout device must be cpu, gpu, cuda or cuda:N, got {device!r}")


def resolve_precision(precision: str, device: str) -> str:
    """``fp32`` or ``bf16``; ``auto`` is bf16 on a GPU, fp32 on the CPU."""
    if precision == "auto":
        return "bf16" if resolve_device(device).startswith("cuda") else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"layout.precision must be fp32|bf16|auto, got {precision!r}")
    return precision


# manifest["head"]["postprocess"]: how a model's raw outputs become detections.
DEFAULT_HEAD = "picodet"  # the CDLA PP-PicoDet: orchestrator.stages.postprocess
DOCLAYOUT_HEAD = "doclayout"  # an exported PP-DocLayoutV3: orchestrator.models.export_doclayout


def head_kind(manifest: dict[str, Any]) -> str:
    return str(manifest.get("head", {}).get("postprocess", DEFAULT_HEAD))


def postprocess_head(
    kind: str,
    raw: Sequence[npt.NDArray[np.float32]],
    page_sizes: Sequence[tuple[int, int]],
    cfg: LayoutConfig,
    labels: Sequence[str],
) -> list[Detections]:
    """Raw outputs -> ``Detections`` per page for the model head ``kind``."""
    if kind == DOCLAYOUT_HEAD:
        from orchestrator.models.export_doclayout import postprocess_doclayout

        return postprocess_doclayout(raw, page_sizes, cfg, labels)
    if kind != DEFAULT_HEAD:
        raise ConfigError(f"unknown layout model head {kind!r} in the model manifest")
    return list(postprocess(raw, page_sizes, cfg, labels))


class LayoutModel:
    """The TorchScript layout detector for one device and precision.

    ``forward`` returns the raw outputs (float32 numpy, manifest order); ``detect`` adds
    post-processing and returns one ``Detections`` per page, in reading order, in page
    pixels. Inputs are (B, 3, H, W) float32 batches, normalised as the manifest's
    ``input`` entry says; any batch size works.
    """

    def __init__(self, cfg: LayoutConfig, device: str = "cpu") -> None:
        import torch

        self.cfg = cfg
        self.device = resolve_device(device)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"layout device {device!r} requested but CUDA is not available")
        self.precision = resolve_precision(cfg.precision, self.device)
        self.manifest: dict[str, Any] = load_manifest(cfg.model_dir, verify=False)
        path = artifact_path(cfg.model_dir, self.manifest, self.precision)
        self.labels: tuple[str, ...] = tuple(str(label) for label in self.manifest["labels"])
        size = self.manifest["input"]
        self.input_shape: tuple[int, int, int] = (
            int(size["shape"][1]), int(size["height"]), int(size["width"])
        )
        if (cfg.input_height, cfg.input_width) != self.input_shape[1:]:
            raise ConfigError(
                f"layout.input_height/input_width {cfg.input_height}x{cfg.input_width} do not "
                f"match the model's input {self.input_shape[1]}x{self.input_shape[2]} "
                f"({cfg.model_dir})"
            )
        strides = self.manifest.get("head", {}).get("strides")
        if strides is not None and tuple(strides) != tuple(cfg.strides):
            raise ConfigError(
                f"layout.strides {tuple(cfg.strides)} do not match the model's {tuple(strides)}"
            )
        try:
            with warnings.catch_warnings():
                # torch 2.13 deprecates TorchScript; Triton's libtorch backend still runs it.
                warnings.filterwarnings(
                    "ignore", category=DeprecationWarning, message=r"`torch\.jit"
                )
                self._module = torch.jit.load(str(path), map_location=self.device).eval()
        except RuntimeError as exc:
            raise LayoutError(f"cannot load layout model {path}: {exc}") from exc
        if self.device == "cpu":
            # TorchScript's CPU fuser compiles fusion kernels during the first calls at each
            # new batch size (seconds each) for no steady-state gain on this model. The flag
            # is process-wide; folio runs no other TorchScript on the CPU.
            torch._C._jit_set_texpr_fuser_enabled(False)

    def forward(self, batch: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
        """Raw model outputs for a (B, 3, H, W) float32 batch, as float32 numpy arrays."""
        import torch

        array = np.asarray(batch)
        if array.ndim != 4 or tuple(array.shape[1:]) != self.input_shape:
            raise LayoutError(
                f"layout input must be (B, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(array.shape)}"
            )
        x = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)
        try:
            with torch.inference_mode():
                outputs = self._module(x)
                return [o.float().cpu().numpy() for o in outputs]
        except RuntimeError as exc:
            raise LayoutError(f"layout model failed on a batch of {len(array)}: {exc}") from exc

    @property
    def input_dtype(self) -> Any:
        """The torch dtype a device-resident input batch is built in: the model's own
        (a BF16 artifact's first op casts its input to BF16, so BF16 input skips a pass)."""
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def module(self) -> Any:
        """The loaded TorchScript module (on ``device``)."""
        return self._module

    def forward_tensors(self, batch: Any) -> list[Any]:
        """Raw outputs, as float32 tensors left on the device, for a (B, 3, H, W) tensor
        already on the model's device (float32, or ``input_dtype``)."""
        import torch

        if batch.dim() != 4 or tuple(batch.shape[1:]) != self.input_shape:
            raise LayoutError(
                f"layout input must be (B, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(batch.shape)}"
            )
        try:
            with torch.inference_mode():
                return list(self._module(batch))
        except RuntimeError as exc:
            raise LayoutError(f"layout model failed on a batch of {len(batch)}: {exc}") from exc

    def detect(
        self, batch: npt.NDArray[np.float32], page_sizes: Sequence[tuple[int, int]]
    ) -> list[Detections]:
        """One ``Detections`` per page; ``page_sizes`` are (height, width) in pixels."""
        if len(page_sizes) != len(batch):
            raise LayoutError(f"{len(page_sizes)} page sizes for a batch of {len(batch)}")
        return postprocess_head(
            head_kind(self.manifest), self.forward(batch), page_sizes, self.cfg, self.labels
        )

    def warmup(self, batch_size: int = 1) -> None:
        """Run a blank batch twice (TorchScript profiles, then optimises, on its first calls)."""
        blank = np.zeros((batch_size, *self.input_shape), dtype=np.float32)
        for _ in range(2):
            self.forward(blank)


def layout_result(
    det: Detections, labels: Sequence[str], cfg: LayoutConfig, width: int, height: int
) -> LayoutResult:
    """Regions of one page in the detections' (reading) order, every label included.

    Each label's task comes from ``cfg.label_tasks`` (labels it does not name are text);
    ``Region.index`` is the position among them. ``orchestrator.stages.coverage.cover_page`` then
    gives the page's text lines to them and drops ``abandon`` ones.
    """
    tasks = [Task(label_task(label, cfg)) for label in labels]
    regions: list[Region] = []
    for box, score, cls in zip(det.boxes.tolist(), det.scores.tolist(), det.classes.tolist(),
                               strict=True):
        task = tasks[cls]
        regions.append(
            Region(
                index=len(regions),
                label=labels[cls],
                task=task,
                score=float(score),
                bbox=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
            )
        )
    return LayoutResult(width=width, height=height, regions=regions)
