"""Render the ``folio_layout`` Triton model repository for a target from one template set.

``model_repository/`` holds the source: ``*/config.pbtxt.in`` templates, the python models
(``*/1/model.py``) and ``targets.toml`` (the per-target backends, instance kinds and
dynamic-batching settings). ``build_repository`` renders one target:

- ``cpu``: every step on the python backend (DALI on the CPU, TorchScript FP32 through
  torch, the package's post-processing), KIND_CPU: for the tritonserver bundled in
  nvidia-pytriton (``folio serve``);
- ``gpu``: ``preprocess`` on the dali backend from a serialised ``model.dali`` (nvJPEG),
  ``layout`` on pytorch_libtorch with the BF16 TorchScript, ``postprocess`` on the python
  backend taking the raw outputs as GPU tensors (DLPack, ``FORCE_CPU_ONLY_INPUT_TENSORS``
  off) and post-processing them in torch there, all KIND_GPU: only boxes leave the GPU.
  For NGC ``tritonserver`` images (``deploy/docker-compose.yml``).

Usage::

    build_repository("cpu", Path("build/model_repository/cpu"))
    validate_repository(Path("build/model_repository/gpu"))      # raises ConfigError

    folio repo build --target gpu --out build/model_repository/gpu
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import string
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.config import FolioConfig, load_config
from orchestrator.errors import ConfigError, ModelArtifactError
from orchestrator.paths import cache_dir, template_root
from orchestrator.serving.triton_stages import (
    CONFIG_PARAMETER,
    DEFAULT_HEAD,
    POSTPROCESS_DEVICES,
    config_parameter,
)

log = logging.getLogger(__name__)

TEMPLATE_ROOT = template_root()
TARGETS = ("cpu", "gpu")
ENSEMBLE = "folio_layout"
STEPS = ("preprocess", "layout", "postprocess")
LAYOUT_INPUT = "MODEL_INPUT__0"
RAW_OUTPUT = "RAW__{}"  # libtorch's <name>__<index> convention, used on both targets
# The python backend hands a model GPU tensors only when this parameter says "no".
GPU_INPUT_PARAMETER = "FORCE_CPU_ONLY_INPUT_TENSORS"
ENSEMBLE_OUTPUTS = {"BOXES": ("TYPE_FP32", [-1, 4]),
                    "SCORES": ("TYPE_FP32", [-1]),
                    "CLASSES": ("TYPE_INT32", [-1])}


@dataclass(frozen=True, slots=True)
class StepSettings:
    """Instance group and dynamic batcher of one ensemble step."""

    kind: str
    instances: int
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int


@dataclass(frozen=True, slots=True)
class TargetSettings:
    """One row of ``model_repository/targets.toml``."""

    name: str
    description: str
    max_batch_size: int  # the ensemble's: the most pages one request may carry
    preprocess_backend: str
    layout_backend: str
    layout_precision: str
    decode_threads: int
    steps: Mapping[str, StepSettings]
    postprocess_device: str = "cpu"  # "gpu": torch on the raw outputs where they are


def default_out(target: str) -> Path:
    """Where ``folio repo build`` / ``folio serve`` render a target by default (the cache)."""
    return cache_dir() / "model_repository" / target


def load_targets(path: Path = TEMPLATE_ROOT / "targets.toml") -> dict[str, TargetSettings]:
    """Parse ``targets.toml`` into one ``TargetSettings`` per target."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    targets: dict[str, TargetSettings] = {}
    for name, row in data.items():
        steps = {
            step: StepSettings(
                kind=str(row[step]["kind"]),
                instances=int(row[step]["instances"]),
                max_batch_size=int(row[step].get("max_batch_size", row["max_batch_size"])),
                preferred_batch_sizes=tuple(int(b) for b in row[step]["preferred_batch_sizes"]),
                max_queue_delay_us=int(row[step]["max_queue_delay_us"]),
            )
            for step in STEPS
        }
        targets[name] = TargetSettings(
            name=name,
            description=str(row.get("description", "")),
            max_batch_size=int(row["max_batch_size"]),
            preprocess_backend=str(row["preprocess_backend"]),
            layout_backend=str(row["layout_backend"]),
            layout_precision=str(row["layout_precision"]),
            decode_threads=int(row.get("decode_threads", 1)),
            steps=steps,
            postprocess_device=str(row.get("postprocess_device", "cpu")),
        )
        if targets[name].postprocess_device not in POSTPROCESS_DEVICES:
            raise ConfigError(f"{path}: [{name}] postprocess_device must be cpu|gpu")
    return targets


@dataclass(frozen=True, slots=True)
class LayoutArtifacts:
    """What the repository needs from a layout model folder (``orchestrator.models.artifacts``)."""

    model_dir: Path
    manifest: dict[str, Any]
    labels: list[str]
    input_height: int
    input_width: int
    outputs: list[list[int]]  # per raw output, dims without the batch dimension
    files: dict[str, Path]  # precision -> TorchScript file

    @property
    def name(self) -> str:
        return str(self.manifest.get("model", self.model_dir.name))


def layout_artifacts(model_dir: Path) -> LayoutArtifacts:
    """Read (and sha256-verify) a layout model folder's manifest
    (``orchestrator.models.artifacts``)."""
    from orchestrator.models.artifacts import artifact_path, load_manifest

    manifest = dict(load_manifest(model_dir))
    try:
        labels = [str(label) for label in manifest["labels"]]
        height, width = int(manifest["input"]["height"]), int(manifest["input"]["width"])
        outputs = [
            [int(d) for d in out["shape"][1:]] if out.get("shape") else [-1, -1]
            for out in manifest.get("outputs") or [{} for _ in manifest["output_names"]]
        ]
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelArtifactError(
            f"layout manifest in {model_dir} lacks {exc}: rebuild the model artifacts"
        ) from exc
    files = {p: artifact_path(model_dir, manifest, p) for p in manifest["artifacts"]}
    return LayoutArtifacts(model_dir, manifest, labels, height, width, outputs, files)


# -- rendering ----------------------------------------------------------------------


def _pbtxt_string(value: str) -> str:
    # A JSON string literal is a valid protobuf text-format string.
    return json.dumps(value, ensure_ascii=False)


def _parameters(values: Mapping[str, str]) -> str:
    blocks = [
        f'  {{\n    key: "{key}"\n    value: {{ string_value: {_pbtxt_string(val)} }}\n  }}'
        for key, val in values.items()
    ]
    return ",\n".join(blocks)


def _tensor(name: str, dtype: str, dims: Sequence[int]) -> str:
    dims_text = ", ".join(str(d) for d in dims)
    return (f'  {{\n    name: "{name}"\n    data_type: {dtype}\n'
            f"    dims: [ {dims_text} ]\n  }}")


def template_values(
    target: TargetSettings, artifacts: LayoutArtifacts, cfg: FolioConfig
) -> dict[str, str]:
    """Every ``${name}`` the templates use, for one target."""
    size = (artifacts.input_height, artifacts.input_width)
    for section in (cfg.decode, cfg.layout):
        name = "decode" if section is cfg.decode else "layout"
        if (section.input_height, section.input_width) != size:
            raise ConfigError(
                f"{name}.input_height/width {section.input_height}x{section.input_width} "
                f"differ from the model's input {size[0]}x{size[1]} ({artifacts.model_dir})"
            )
    raw_names = [RAW_OUTPUT.format(i) for i in range(len(artifacts.outputs))]
    baked = config_parameter(cfg)
    labels = json.dumps(artifacts.labels)
    values: dict[str, str] = {
        "target": target.name,
        "max_batch_size": str(target.max_batch_size),
        "input_height": str(artifacts.input_height),
        "input_width": str(artifacts.input_width),
        "labels": _pbtxt_string(labels),
        "model_name": _pbtxt_string(artifacts.name),
        "preprocess_backend": target.preprocess_backend,
        "layout_backend": target.layout_backend,
        "layout_precision": target.layout_precision.upper(),
        "layout_outputs": ",\n".join(
            _tensor(name, "TYPE_FP32", dims)
            for name, dims in zip(raw_names, artifacts.outputs, strict=True)
        ),
        "postprocess_inputs": "".join(
            _tensor(name, "TYPE_FP32", dims) + ",\n"
            for name, dims in zip(raw_names, artifacts.outputs, strict=True)
        ),
        "layout_output_map": "\n".join(
            f'      output_map {{ key: "{name}" value: "{name.lower()}" }}' for name in raw_names
        ),
        "postprocess_input_map": "\n".join(
            f'      input_map {{ key: "{name}" value: "{name.lower()}" }}' for name in raw_names
        ),
    }
    for step in STEPS:
        s = target.steps[step]
        values[f"{step}_kind"] = s.kind
        values[f"{step}_max_batch_size"] = str(s.max_batch_size)
        values[f"{step}_instances"] = str(s.instances)
        values[f"{step}_preferred_batch_sizes"] = ", ".join(str(b) for b in s.preferred_batch_sizes)
        values[f"{step}_max_queue_delay_us"] = str(s.max_queue_delay_us)
    if target.preprocess_backend == "dali":
        pre = {"num_threads": str(target.decode_threads)}
    else:
        pre = {CONFIG_PARAMETER: baked, "threads": str(target.decode_threads)}
    if target.layout_backend == "python":
        lay = {CONFIG_PARAMETER: baked}
    else:
        lay = {"INFERENCE_MODE": "true"}
    values["preprocess_parameters"] = _parameters(pre)
    values["layout_parameters"] = _parameters(lay)
    head = str(artifacts.manifest.get("head", {}).get("postprocess", DEFAULT_HEAD))
    post = {CONFIG_PARAMETER: baked, "labels": labels, "postprocess": head,
            "postprocess_device": target.postprocess_device}
    if target.postprocess_device == "gpu":
        post[GPU_INPUT_PARAMETER] = "no"
    values["postprocess_parameters"] = _parameters(post)
    return values


def render_template(text: str, values: Mapping[str, str], *, source: str = "") -> str:
    try:
        return string.Template(text).substitute(values)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"template {source}: no value for {exc}") from exc


def build_repository(
    target: str,
    out: Path,
    *,
    cfg: FolioConfig | None = None,
    model_dir: Path | None = None,
    templates: Path = TEMPLATE_ROOT,
) -> Path:
    """Render ``target`` into ``out`` (replaced), validate it and return ``out``."""
    targets = load_targets(templates / "targets.toml")
    if target not in targets:
        raise ConfigError(f"unknown target {target!r}: choose one of {', '.join(targets)}")
    settings = targets[target]
    cfg = cfg or load_config(None)
    artifacts = layout_artifacts(model_dir or cfg.layout.model_dir)
    precision = settings.layout_precision
    if precision not in artifacts.files:
        raise ModelArtifactError(
            f"no {precision} TorchScript in {artifacts.model_dir} for the {target} target"
        )
    # The python layout step reads its precision from the baked config.
    cfg = cfg.override({"layout.precision": precision})
    values = template_values(settings, artifacts, cfg)

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide it from a container's server user
    try:
        for model in (ENSEMBLE, *STEPS):
            src = templates / model / "config.pbtxt.in"
            dst = staging / model / "config.pbtxt"
            dst.parent.mkdir(parents=True)
            dst.write_text(render_template(src.read_text(), values, source=str(src)))
            (staging / model / "1").mkdir()
        _populate_steps(settings, artifacts, cfg, templates, staging)
        validate_repository(staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built the %s model repository in %s", target, out)
    return out


def _populate_steps(
    settings: TargetSettings,
    artifacts: LayoutArtifacts,
    cfg: FolioConfig,
    templates: Path,
    root: Path,
) -> None:
    precision = settings.layout_precision
    if settings.preprocess_backend == "python":
        shutil.copy2(templates / "preprocess" / "1" / "model.py", root / "preprocess" / "1")
    elif settings.preprocess_backend == "dali":
        from dali_pipelines.layout_preprocess import serialize_pipeline

        serialize_pipeline(root / "preprocess" / "1" / "model.dali", cfg.decode,
                           settings.steps["preprocess"].max_batch_size)
    else:
        raise ConfigError(f"unsupported preprocess backend {settings.preprocess_backend!r}")

    layout_dir = root / "layout" / "1"
    if settings.layout_backend == "python":
        shutil.copy2(templates / "layout" / "1" / "model.py", layout_dir)
        # The model folder as orchestrator.stages.layout.LayoutModel expects it, with the one
        # artifact this target runs (the manifest trimmed to it).
        shutil.copy2(artifacts.files[precision], layout_dir / artifacts.files[precision].name)
        _write_manifest(artifacts, layout_dir, precision)
    elif settings.layout_backend == "pytorch":
        shutil.copy2(artifacts.files[precision], layout_dir / "model.pt")
        _write_manifest(artifacts, layout_dir, precision, file_name="model.pt")
    else:
        raise ConfigError(f"unsupported layout backend {settings.layout_backend!r}")
    shutil.copy2(templates / "postprocess" / "1" / "model.py", root / "postprocess" / "1")


def _write_manifest(
    artifacts: LayoutArtifacts, folder: Path, precision: str, *, file_name: str | None = None
) -> None:
    manifest = dict(artifacts.manifest)
    entry = dict(manifest["artifacts"][precision])
    if file_name is not None:
        entry["file"] = file_name
    manifest["artifacts"] = {precision: entry}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


# -- validation ---------------------------------------------------------------------


def load_model_config(path: Path) -> Any:
    """Parse a ``config.pbtxt`` into tritonclient's ``model_config_pb2.ModelConfig``."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), config)
    except text_format.ParseError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return config


def _tensor_types(tensors: Any) -> dict[str, tuple[int, list[int]]]:
    return {t.name: (t.data_type, list(t.dims)) for t in tensors}


def _dims_compatible(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def validate_repository(root: Path) -> dict[str, Any]:
    """Check a rendered repository structurally; raise ConfigError listing every problem.

    Parses every config into ``ModelConfig``; checks the ensemble's interface, that each
    step's mapped tensors exist with the same data type and compatible dims on both ends,
    that every ensemble output is produced, batch sizes agree, and each step has its
    model file. Returns the parsed configs by model name.
    """
    from tritonclient.grpc import model_config_pb2 as pb

    problems: list[str] = []
    configs: dict[str, Any] = {}
    for model in (ENSEMBLE, *STEPS):
        path = root / model / "config.pbtxt"
        if not path.is_file():
            problems.append(f"{model}: config.pbtxt missing")
            continue
        configs[model] = load_model_config(path)
        if configs[model].name != model:
            problems.append(f"{model}: config names the model {configs[model].name!r}")
    if problems:
        raise ConfigError("invalid model repository " + str(root) + ":\n  " + "\n  ".join(problems))

    ens = configs[ENSEMBLE]
    if ens.platform != "ensemble":
        problems.append(f"{ENSEMBLE}: platform is {ens.platform!r}, not 'ensemble'")
    inputs = _tensor_types(ens.input)
    if inputs != {"IMAGE": (pb.TYPE_UINT8, [-1])}:
        problems.append(f"{ENSEMBLE}: input must be IMAGE TYPE_UINT8 [-1], got {inputs}")
    elif not ens.input[0].allow_ragged_batch:
        problems.append(f"{ENSEMBLE}: IMAGE needs allow_ragged_batch")
    outputs = _tensor_types(ens.output)
    want = {k: (pb.DataType.Value(t), d) for k, (t, d) in ENSEMBLE_OUTPUTS.items()}
    if outputs != want:
        problems.append(f"{ENSEMBLE}: outputs must be {ENSEMBLE_OUTPUTS}, got {outputs}")
    try:
        labels = json.loads(ens.parameters["labels"].string_value)
        if not labels or not all(isinstance(x, str) for x in labels):
            raise ValueError
    except (KeyError, ValueError):
        problems.append(f"{ENSEMBLE}: parameters['labels'] must be a JSON list of names")

    # Ensemble tensors: name -> (data_type, dims) as produced so far.
    produced: dict[str, tuple[int, list[int]]] = {
        name: spec for name, spec in inputs.items()
    }
    steps = list(ens.ensemble_scheduling.step)
    if [s.model_name for s in steps] != list(STEPS):
        problems.append(f"{ENSEMBLE}: steps must be {STEPS}, got {[s.model_name for s in steps]}")
    for step in steps:
        cfg = configs.get(step.model_name)
        if cfg is None:
            continue
        if cfg.max_batch_size < ens.max_batch_size:
            problems.append(f"{step.model_name}: max_batch_size {cfg.max_batch_size} < "
                            f"ensemble's {ens.max_batch_size}")
        step_in = _tensor_types(cfg.input)
        step_out = _tensor_types(cfg.output)
        if set(step.input_map) != set(step_in):
            problems.append(f"{step.model_name}: input_map keys {sorted(step.input_map)} != "
                            f"model inputs {sorted(step_in)}")
        for key, tensor in step.input_map.items():
            if key not in step_in:
                continue
            if tensor not in produced:
                problems.append(f"{step.model_name}.{key}: ensemble tensor {tensor!r} is not "
                                "produced by an earlier step")
                continue
            (t_have, d_have), (t_want, d_want) = produced[tensor], step_in[key]
            if t_have != t_want or not _dims_compatible(d_have, d_want):
                problems.append(
                    f"{step.model_name}.{key}: gets {pb.DataType.Name(t_have)} {d_have} from "
                    f"{tensor!r}, wants {pb.DataType.Name(t_want)} {d_want}")
        for key, tensor in step.output_map.items():
            if key not in step_out:
                problems.append(f"{step.model_name}: output_map key {key!r} is not an output")
                continue
            produced[tensor] = step_out[key]
        model_dir = root / step.model_name / "1"
        backend = cfg.backend or cfg.platform
        expected = {"python": "model.py", "dali": "model.dali", "pytorch": "model.pt",
                    "pytorch_libtorch": "model.pt"}.get(backend)
        if expected is None:
            problems.append(f"{step.model_name}: unexpected backend {backend!r}")
        elif not (model_dir / expected).is_file():
            problems.append(f"{step.model_name}: {expected} missing in {model_dir}")
        if backend == "python" and CONFIG_PARAMETER not in cfg.parameters:
            problems.append(
                f"{step.model_name}: python step lacks parameters[{CONFIG_PARAMETER!r}]")
        device = cfg.parameters["postprocess_device"].string_value if (
            "postprocess_device" in cfg.parameters) else "cpu"
        if device == "gpu":
            gpu_inputs = (GPU_INPUT_PARAMETER in cfg.parameters
                          and cfg.parameters[GPU_INPUT_PARAMETER].string_value == "no")
            if not gpu_inputs:
                problems.append(f"{step.model_name}: postprocess_device gpu needs "
                                f"parameters[{GPU_INPUT_PARAMETER!r}] = \"no\"")
            if any(g.kind != pb.ModelInstanceGroup.KIND_GPU for g in cfg.instance_group):
                problems.append(f"{step.model_name}: postprocess_device gpu needs KIND_GPU")
    for name, spec in want.items():
        got = produced.get(name)
        if got is None:
            problems.append(f"{ENSEMBLE}: output {name} is produced by no step")
        elif got[0] != spec[0] or not _dims_compatible(got[1], spec[1]):
            problems.append(f"{ENSEMBLE}: output {name} produced as {got}, declared {spec}")
    if problems:
        raise ConfigError("invalid model repository " + str(root) + ":\n  " + "\n  ".join(problems))
    return configs


# -- CLI ----------------------------------------------------------------------------


def add_repo_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``folio repo build`` and ``folio repo check``; handler is ``args.handler``."""
    p = subparsers.add_parser("repo", help="build or check the folio_layout model repository")
    sub = p.add_subparsers(dest="repo_command", required=True)
    b = sub.add_parser("build", help="render the repository for a target",
                       description="Render model_repository/ for the gpu (NGC tritonserver: "
                       "DALI + libtorch) or cpu (bundled tritonserver: python backend) target.")
    b.add_argument("--target", choices=TARGETS, required=True)
    b.add_argument("--out", type=Path, default=None,
                   help="output folder (replaced; default: the cache's "
                   "model_repository/<target>)")
    b.add_argument("--model-dir", type=Path, default=None,
                   help="layout model artifacts (default: layout.model_dir)")
    b.add_argument("--config", type=Path, default=None, help="folio TOML config to bake in")
    b.set_defaults(handler=run_repo_build)
    c = sub.add_parser("check", help="validate a rendered repository structurally")
    c.add_argument("path", type=Path)
    c.set_defaults(handler=run_repo_check)


def run_repo_build(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    out = args.out or default_out(args.target)
    path = build_repository(args.target, out, cfg=cfg, model_dir=args.model_dir)
    print(path)
    return 0


def run_repo_check(args: argparse.Namespace) -> int:
    configs = validate_repository(args.path)
    print(f"{args.path}: ok ({', '.join(configs)})")
    return 0


def main_repo(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="folio")
    sub = parser.add_subparsers(dest="command", required=True)
    add_repo_parser(sub)
    args = parser.parse_args(["repo", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(f"folio: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main_repo())
