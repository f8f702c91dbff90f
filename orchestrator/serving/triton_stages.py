"""The three steps of the ``folio_layout`` ensemble, as plain Python over numpy arrays.

The python models in ``model_repository/*/1/model.py`` are thin adapters: they move
tensors between Triton requests and these classes. The work itself is the package's own
code -- ``dali_pipelines.layout_preprocess`` (decode + resize + normalise),
``orchestrator.stages.layout.LayoutModel`` (the TorchScript model) and
``orchestrator.stages.postprocess.postprocess`` -- exactly what the in-process path runs, so the
two paths agree by construction and these classes are tested without a server.

Per-page failures travel as ``PageError`` objects; ``format_error`` turns one into the
message of that request's Triton error ("PixelLimitExceeded: image is ..."), and
``error_from_message`` (used by the client) turns the message back into the exception.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestrator.config import FolioConfig, load_config
from orchestrator.errors import (
    ConfigError,
    FolioError,
    LayoutError,
    PageDecodeError,
    PageError,
    PixelLimitExceeded,
)
from orchestrator.stages.layout import DEFAULT_HEAD
from orchestrator.types import Detections

log = logging.getLogger(__name__)

# The model-config parameter that carries the folio configuration baked in at build time.
CONFIG_PARAMETER = "folio_config"
# Where the postprocess step works on the raw outputs (its "postprocess_device" parameter).
POSTPROCESS_DEVICES = ("cpu", "gpu")
# Error classes a server-side message can name; the client maps them back.
_ERRORS: dict[str, type[FolioError]] = {
    cls.__name__: cls for cls in (PageDecodeError, PixelLimitExceeded, PageError, LayoutError)
}


def format_error(exc: BaseException) -> str:
    """The per-request error message: ``"<ErrorClass>: <first line of the message>"``."""
    name = type(exc).__name__
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{name}: {text}"


def error_from_message(message: str) -> FolioError | None:
    """The ``PageError`` a server message names (see ``format_error``), else None.

    Triton prefixes messages from ensemble steps with its own context, so the class name
    is looked for anywhere in the message; the longest match wins.
    """
    for name in sorted(_ERRORS, key=len, reverse=True):
        marker = f"{name}: "
        at = message.find(marker)
        if at >= 0:
            return _ERRORS[name](message[at + len(marker):].strip())
    return None


def config_parameter(cfg: FolioConfig) -> str:
    """The JSON that ``stage_config`` reads back: the sections the server steps use.

    ``layout.model_dir`` is left out: the layout step reads its artifact from its own
    version folder, and a path of the building machine would tie the repository to it.
    """
    data = cfg.to_dict()
    data["layout"].pop("model_dir", None)
    return json.dumps({k: data[k] for k in ("sources", "decode", "layout")}, sort_keys=True)


def is_client_error(exc: BaseException) -> bool:
    """Whether a step's failure is the request's fault (bytes that are not an image, a
    page over the pixel limit): Triton answers INVALID_ARG, not INTERNAL, so a client can
    tell it from a server fault."""
    return isinstance(exc, PageError)


def stage_config(model_config: Mapping[str, Any]) -> FolioConfig:
    """The ``FolioConfig`` baked into a model's config.pbtxt (defaults where absent)."""
    raw = model_config.get("parameters", {}).get(CONFIG_PARAMETER, {}).get("string_value")
    cfg = load_config(None)
    if not raw:
        return cfg
    data = json.loads(raw)
    flat = {
        f"{section}.{key}": value
        for section, values in data.items()
        for key, value in values.items()
    }
    return cfg.override(flat)


class PreprocessStage:
    """Encoded page bytes -> (model input CHW float32, [height, width] int32) or PageError.

    The size is checked from the image header against ``sources.max_pixels`` before
    anything is decoded; the DALI pipeline then runs on the CPU over the whole batch,
    falling back to one page at a time when a page fails, so one bad page fails alone.
    """

    def __init__(
        self, cfg: FolioConfig, *, max_batch_size: int, threads: int | None = None
    ) -> None:
        from dali_pipelines.layout_preprocess import LayoutPreprocessor

        decode = dataclasses.replace(
            cfg.decode,
            batch_size=max_batch_size,
            threads=threads or cfg.decode.threads,
        )
        self._max_pixels = cfg.sources.max_pixels
        self._batch_size = max_batch_size
        self._pre = LayoutPreprocessor(decode, device="cpu", keep_full=False)

    def __call__(
        self, items: Sequence[npt.NDArray[np.uint8]]
    ) -> list[tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]] | PageError]:
        from orchestrator.stages.decode import check_encoded, decode_failure

        results: list[tuple[npt.NDArray[np.float32], npt.NDArray[np.int32]] | PageError | None]
        results = [None] * len(items)
        good: list[int] = []
        for i, item in enumerate(items):
            try:
                check_encoded(np.ascontiguousarray(item, dtype=np.uint8).tobytes(),
                              self._max_pixels)
            except PageError as exc:
                results[i] = exc
                continue
            good.append(i)
        for start in range(0, len(good), self._batch_size):
            chunk = good[start:start + self._batch_size]
            outputs = self._pre.run([np.ascontiguousarray(items[i]) for i in chunk])
            for i, out in zip(chunk, outputs, strict=True):
                if isinstance(out, Exception):
                    data = np.ascontiguousarray(items[i], dtype=np.uint8).tobytes()
                    results[i] = PageDecodeError(
                        f"cannot decode image: {decode_failure(data, out)}")
                else:
                    results[i] = (
                        out.model_input,
                        np.array([out.height, out.width], dtype=np.int32),
                    )
        return [r for r in results if r is not None]


class LayoutStage:
    """Model input batch (B, 3, H, W) float32 -> the model's raw outputs, each (B, ...)."""

    def __init__(self, cfg: FolioConfig, model_dir: Path) -> None:
        import torch

        from orchestrator.stages.layout import LayoutModel

        # One stub process per step: its torch pool is layout.threads wide, as in-process.
        torch.set_num_threads(max(1, cfg.layout.threads))
        layout = dataclasses.replace(cfg.layout, model_dir=model_dir)
        self.model = LayoutModel(layout, device="cpu")
        self.labels: list[str] = list(self.model.labels)

    def __call__(self, batch: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
        return [np.ascontiguousarray(o, dtype=np.float32) for o in self.model.forward(batch)]


class PostprocessStage:
    """Raw outputs (each (B, ...)) + page sizes (B, 2) [h, w] -> one ``Detections`` per page.

    ``kind`` is the manifest's ``head.postprocess``: the default (CDLA PP-PicoDet) runs
    ``orchestrator.stages.postprocess.postprocess``; ``"doclayout"`` (an exported PP-DocLayoutV3)
    runs ``orchestrator.models.export_doclayout.postprocess_doclayout``. ``device`` is where the
    raw outputs are worked on: ``"cpu"`` (numpy arrays, no torch needed), or ``"gpu"``
    (torch tensors wherever Triton put them, taken through DLPack without a copy, and
    ``orchestrator.stages.postprocess_torch``: only the final boxes reach the host).
    """

    def __init__(
        self,
        cfg: FolioConfig,
        labels: Sequence[str],
        kind: str = DEFAULT_HEAD,
        device: str = "cpu",
    ) -> None:
        if device not in POSTPROCESS_DEVICES:
            raise ConfigError(f"postprocess device must be cpu|gpu, got {device!r}")
        self._cfg = cfg.layout
        self.labels = list(labels)
        self.kind = kind
        self.device = device

    def array(self, tensor: Any) -> Any:
        """A Triton input tensor as this stage works on it (numpy, or torch via DLPack)."""
        if self.device == "cpu":
            return tensor.as_numpy()
        from torch.utils.dlpack import from_dlpack

        return from_dlpack(tensor.to_dlpack())

    def concatenate(self, arrays: Sequence[Any]) -> Any:
        """Several requests' inputs as one batch, on the device they are on."""
        if self.device == "cpu":
            return np.concatenate(arrays)
        import torch

        return torch.cat(list(arrays))

    def __call__(self, raw: Sequence[Any], page_sizes: npt.NDArray[np.int32]) -> list[Detections]:
        from orchestrator.stages.layout import postprocess_head

        sizes = [(int(h), int(w)) for h, w in np.asarray(page_sizes).reshape(-1, 2)]
        if self.device == "gpu" and self.kind == DEFAULT_HEAD:
            import torch

            from orchestrator.stages import postprocess_torch

            tensors = [torch.as_tensor(r) for r in raw]
            return postprocess_torch.postprocess(tensors, sizes, self._cfg, self.labels)
        host = [r.float().cpu().numpy() if hasattr(r, "cpu") else np.asarray(r) for r in raw]
        return postprocess_head(self.kind, host, sizes, self._cfg, self.labels)


def read_labels(model_dir: Path) -> list[str]:
    """The class names from a layout model folder's manifest."""
    from orchestrator.models.artifacts import load_manifest

    return [str(label) for label in load_manifest(model_dir)["labels"]]
