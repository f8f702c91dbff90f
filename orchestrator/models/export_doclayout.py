"""Export a local PP-DocLayoutV3 checkpoint (transformers) to TorchScript for folio.

PP-DocLayoutV3 (the layout model GLM-OCR uses) is a DETR-style detector: a fixed set of
queries, each with class logits, a normalised (cx, cy, w, h) box and a pairwise
reading-order score. No weights can be fetched here, so the user supplies a local folder
(``config.json`` + ``model.safetensors``, optionally ``preprocessor_config.json``).

The exported module takes folio's standard layout input -- the DALI pipeline's output:
BGR, ``(x / 255 - mean) / std`` with ``decode.mean``/``decode.std``, NCHW float32 at
``decode.input_height x decode.input_width`` -- and converts it to what the checkpoint's
image processor expects (RGB, its own rescale/mean/std) inside the graph, so the same
``preprocess`` step and model repository serve it. It returns three float32 tensors::

    SCORES (B, Q, C)   sigmoid class scores
    BOXES  (B, Q, 4)   x0, y0, x1, y1, normalised to [0, 1] of the page
    ORDER  (B, Q)      reading-order rank of each query (0 first)

``postprocess_doclayout`` turns them into ``Detections`` exactly as transformers'
``PPDocLayoutV3ImageProcessor.post_process_object_detection`` selects boxes, in numpy.
A trace is valid only at the traced input size (800 x 800 by default); the batch is free.

Usage::

    export_doclayout(Path("PP-DocLayoutV3"), Path("build/models-doclayout"))
    folio models export-layout --from PP-DocLayoutV3 --out build/models-doclayout
    folio repo build --target cpu --model-dir build/models-doclayout \\
        --config doclayout.toml      # decode/layout input_height = input_width = 800
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from orchestrator.config import IMAGENET_MEAN, IMAGENET_STD, LayoutConfig
from orchestrator.errors import ConfigError, ModelArtifactError
from orchestrator.stages.layout import DOCLAYOUT_HEAD
from orchestrator.types import Detections

log = logging.getLogger(__name__)

MODEL_NAME = "layout_ppdoclayoutv3"
DEFAULT_SIZE = 800
OUTPUT_NAMES = ("scores", "boxes", "order")
EXPORT_TOLERANCE = 1e-3  # max abs difference of the FP32 trace to eager transformers


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ConfigError(
            "exporting PP-DocLayoutV3 needs transformers (pip install 'transformers==5.24.0')"
        ) from exc
    if not hasattr(transformers, "PPDocLayoutV3ForObjectDetection"):
        raise ConfigError(
            f"transformers {transformers.__version__} has no PP-DocLayoutV3: use >= 5.24"
        )
    return transformers


def _processor_settings(src: Path) -> dict[str, Any]:
    """Rescale factor and mean/std of the checkpoint's image processor (RGB order)."""
    settings: dict[str, Any] = {"rescale_factor": 1.0 / 255.0, "image_mean": [0.0, 0.0, 0.0],
                                "image_std": [1.0, 1.0, 1.0]}
    path = src / "preprocessor_config.json"
    if path.is_file():
        data = json.loads(path.read_text(encoding="utf-8"))
        for key in settings:
            if data.get(key) is not None:
                settings[key] = data[key]
        if data.get("do_normalize") is False:
            settings["image_mean"], settings["image_std"] = [0.0] * 3, [1.0] * 3
    return settings


def make_export_module(
    model: Any,
    *,
    folio_mean: Sequence[float] = IMAGENET_MEAN,
    folio_std: Sequence[float] = IMAGENET_STD,
    processor: dict[str, Any] | None = None,
) -> Any:
    """Wrap a ``PPDocLayoutV3ForObjectDetection`` behind folio's input and a tensor tuple."""
    import torch
    from torch import nn

    proc = processor or {"rescale_factor": 1.0 / 255.0, "image_mean": [0.0] * 3,
                         "image_std": [1.0] * 3}

    class DocLayoutExport(nn.Module):
        folio_mean: torch.Tensor
        folio_std: torch.Tensor
        proc_scale: torch.Tensor
        proc_mean: torch.Tensor
        proc_std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.model = model
            view = (1, 3, 1, 1)
            # folio input x = (bgr / 255 - mean) / std  ->  bgr / 255 = x * std + mean
            self.register_buffer("folio_mean", torch.tensor(folio_mean).view(view))
            self.register_buffer("folio_std", torch.tensor(folio_std).view(view))
            scale = float(proc["rescale_factor"]) * 255.0  # relative to [0, 1] pixels
            self.register_buffer("proc_scale", torch.tensor(scale))
            self.register_buffer("proc_mean", torch.tensor(proc["image_mean"]).view(view))
            self.register_buffer("proc_std", torch.tensor(proc["image_std"]).view(view))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            unit = x * self.folio_std + self.folio_mean  # BGR in [0, 1]
            rgb = unit.flip(1) * self.proc_scale
            pixels = (rgb - self.proc_mean) / self.proc_std
            out = self.model(pixel_values=pixels, return_dict=True)
            scores = out.logits.sigmoid()
            centre, size = out.pred_boxes.split(2, dim=-1)
            boxes = torch.cat([centre - 0.5 * size, centre + 0.5 * size], dim=-1)
            return scores.float(), boxes.float(), _order_ranks(out.order_logits).float()

    return DocLayoutExport().eval()


def _order_ranks(order_logits: Any) -> Any:
    """Reading-order rank per query (transformers' ``_get_order_seqs``)."""
    import torch

    scores = torch.sigmoid(order_logits)
    votes = scores.triu(diagonal=1).sum(dim=1) + (1.0 - scores.transpose(1, 2)).tril(
        diagonal=-1
    ).sum(dim=1)
    pointers = torch.argsort(votes, dim=1)
    # rank[pointers[i]] = i  <=>  rank = argsort(pointers)
    return torch.argsort(pointers, dim=1)


def export_doclayout(
    src: Path,
    out: Path,
    *,
    height: int = DEFAULT_SIZE,
    width: int = DEFAULT_SIZE,
    precisions: Sequence[str] = ("fp32", "bf16"),
    folio_mean: Sequence[float] = IMAGENET_MEAN,
    folio_std: Sequence[float] = IMAGENET_STD,
    model: Any = None,
) -> Path:
    """Trace the checkpoint in ``src`` (or an already built ``model``) into ``out``.

    Writes ``layout_ppdoclayoutv3_<precision>.pt`` and a ``manifest.json`` in the format
    of ``orchestrator.models.artifacts`` (labels, input, outputs, per-file sha256); returns the
    manifest path. The FP32 trace is checked against eager transformers at batch 1 and 2.
    """
    import torch

    from orchestrator.models.artifacts import MANIFEST_NAME, MANIFEST_VERSION, sha256_file
    from orchestrator.models.onnx_to_torch import CastIO, trace_module

    transformers = _require_transformers()
    start = time.perf_counter()
    src = Path(src)
    if model is None:
        if not (src / "config.json").is_file():
            raise ModelArtifactError(f"{src} is not a transformers checkpoint (no config.json)")
        model = transformers.PPDocLayoutV3ForObjectDetection.from_pretrained(
            str(src), local_files_only=True
        )
    model = model.float().eval()
    id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
    labels = [id2label[i] for i in range(len(id2label))]
    processor = _processor_settings(src)
    module = make_export_module(model, folio_mean=folio_mean, folio_std=folio_std,
                                processor=processor)
    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, height, width, generator=generator)

    with torch.no_grad():
        reference = module(example)
    artifacts: dict[str, dict[str, Any]] = {}
    checks: dict[str, Any] = {}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-") as tmp:
        staging = Path(tmp)
        for precision in precisions:
            if precision not in ("fp32", "bf16"):
                raise ConfigError(f"unknown precision {precision!r}: fp32 or bf16")
            wrapped = module if precision == "fp32" else CastIO(module, torch.bfloat16)
            traced = trace_module(wrapped, example)
            name = f"{MODEL_NAME}_{precision}.pt"
            torch.jit.save(traced, str(staging / name))
            loaded = torch.jit.load(str(staging / name), map_location="cpu")
            diff = _max_diff(loaded, example, reference)
            if precision == "fp32" and diff > EXPORT_TOLERANCE:
                raise ModelArtifactError(
                    f"FP32 TorchScript differs from eager transformers by {diff:.2e} "
                    f"(tolerance {EXPORT_TOLERANCE:.0e})"
                )
            checks[precision] = {"max_abs_diff_vs_eager_scores_boxes": diff,
                                 "batch_sizes_checked": [1, 2]}
            artifacts[precision] = {
                "file": name,
                "sha256": sha256_file(staging / name),
                "compute_dtype": "float32" if precision == "fp32" else "bfloat16",
                "io_dtype": "float32",
            }
        queries = int(reference[0].shape[1])
        classes = int(reference[0].shape[2])
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "model": MODEL_NAME,
            "architecture": "PP-DocLayoutV3 (transformers)",
            "source": {"checkpoint": str(src.resolve()) if src.exists() else str(src),
                       "transformers": metadata.version("transformers")},
            "labels": labels,
            "input": {
                "name": "pixel_values",
                "shape": [-1, 3, height, width],
                "height": height,
                "width": width,
                "dtype": "float32",
                "layout": "NCHW",
                "channel_order": "BGR",
                "resize": "stretch (no aspect keep), bilinear",
                "scale": 1.0 / 255.0,
                "mean": list(folio_mean),
                "std": list(folio_std),
                "converted_in_graph_to": {"channel_order": "RGB", **processor},
            },
            "outputs": [
                {"name": "scores", "shape": [-1, queries, classes]},
                {"name": "boxes", "shape": [-1, queries, 4]},
                {"name": "order", "shape": [-1, queries]},
            ],
            "output_names": list(OUTPUT_NAMES),
            "head": {
                "postprocess": DOCLAYOUT_HEAD,
                "scores": "(B, Q, C) sigmoid",
                "boxes": "(B, Q, 4) x0, y0, x1, y1 normalised to the page",
                "order": "(B, Q) reading-order rank",
            },
            "artifacts": artifacts,
            "checks": checks,
            "versions": {n: _version(n) for n in ("torch", "transformers", "numpy")},
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        for entry in artifacts.values():
            (staging / entry["file"]).replace(out / entry["file"])
        (staging / MANIFEST_NAME).replace(out / MANIFEST_NAME)
    log.info("PP-DocLayoutV3 exported in %.1f s: %s", time.perf_counter() - start, out)
    return out / MANIFEST_NAME


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "absent"


def _max_diff(traced: Any, example: Any, reference: Sequence[Any]) -> float:
    import torch

    worst = 0.0
    with torch.no_grad():
        for batch in (1, 2):
            outputs = traced(example[:batch])
            for out, ref in zip(outputs[:2], reference[:2], strict=True):
                worst = max(worst, float((out - ref[:batch]).abs().max()))
    return worst


def postprocess_doclayout(
    raw: Sequence[npt.NDArray[np.floating]],
    page_sizes: Sequence[tuple[int, int]],
    cfg: LayoutConfig,
    labels: Sequence[str],
) -> list[Detections]:
    """(scores, boxes, order) -> ``Detections`` per page, in the model's reading order.

    As transformers selects: the top Q (query, class) pairs by score, those at or above
    the class threshold (``layout.score_threshold`` / ``class_score_thresholds``), sorted
    by their query's reading-order rank; boxes scaled to the page and clipped.
    """
    scores_all, boxes_all, order_all = (np.asarray(r, dtype=np.float32) for r in raw[:3])
    thresholds = np.array(
        [cfg.class_score_thresholds.get(label, cfg.score_threshold) for label in labels],
        dtype=np.float32,
    )
    results: list[Detections] = []
    for scores, boxes, order, (height, width) in zip(
        scores_all, boxes_all, order_all, page_sizes, strict=True
    ):
        queries, classes = scores.shape
        flat = scores.reshape(-1)
        top = np.argsort(-flat, kind="stable")[:queries]
        query, label = np.divmod(top, classes)
        score = flat[top]
        keep = score >= thresholds[label]
        query, label, score = query[keep], label[keep], score[keep]
        rank = np.argsort(order[query], kind="stable")
        query, label, score = query[rank], label[rank], score[rank]
        scale = np.array([width, height, width, height], dtype=np.float32)
        page_boxes = boxes[query] * scale
        page_boxes = np.clip(page_boxes, 0, scale)
        results.append(Detections(
            boxes=np.ascontiguousarray(page_boxes, dtype=np.float32).reshape(-1, 4),
            scores=np.ascontiguousarray(score, dtype=np.float32),
            classes=np.ascontiguousarray(label, dtype=np.int32),
        ))
    return results


# -- CLI ----------------------------------------------------------------------------


def add_export_layout_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Register ``folio models export-layout`` under the ``models`` subcommands."""
    p = subparsers.add_parser(
        "export-layout", help="export a local PP-DocLayoutV3 checkpoint to TorchScript",
        description="Export a local PP-DocLayoutV3 (transformers) checkpoint to TorchScript "
        "with a manifest, for the folio_layout repository and the in-process path.")
    add_export_layout_arguments(p)


def add_export_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``folio models export-layout``; the handler is ``run_export_layout``."""
    parser.add_argument("--from", dest="src", type=Path, required=True,
                        help="local PP-DocLayoutV3 checkpoint folder (config.json, weights)")
    parser.add_argument("--out", type=Path, default=Path("build/models-doclayout"),
                        help="output folder for the TorchScript files and manifest.json")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE,
                        help="square input size to trace at (default 800)")
    parser.add_argument("--precision", action="append", choices=("fp32", "bf16"),
                        help="precisions to export (repeatable; default both)")
    parser.set_defaults(handler=run_export_layout)


def run_export_layout(args: argparse.Namespace) -> int:
    path = export_doclayout(args.src, args.out, height=args.size, width=args.size,
                            precisions=tuple(args.precision or ("fp32", "bf16")))
    print(path)
    print(f"serve it with decode.input_height = decode.input_width = {args.size} (and the "
          "same under [layout]) and --model-dir " + str(args.out))
    return 0


def main_export_layout(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="folio models export-layout",
                                     description="Export a local PP-DocLayoutV3 checkpoint "
                                     "to TorchScript for folio_layout.")
    add_export_layout_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(args.handler(args))
    except (ConfigError, ModelArtifactError) as exc:
        print(f"folio: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main_export_layout())
