"""The folio_layout model repository, both targets, validated without a server.

The gpu target cannot run here (no GPU, no DALI/libtorch backends in the bundled
server), so it is checked structurally: every config parses into tritonclient's
``ModelConfig``, tensor names and types line up across the ensemble steps, the DALI
pipeline serialises, and the BF16 TorchScript that pytorch_libtorch would load runs with
the declared input and output shapes. The step classes behind the cpu target's python
models are exercised directly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from triton_fixtures import png_header

from orchestrator.config import FolioConfig
from orchestrator.errors import (
    ConfigError,
    LayoutError,
    PageDecodeError,
    PageError,
    PixelLimitExceeded,
)
from orchestrator.serving.triton_repo import (
    ENSEMBLE,
    STEPS,
    build_repository,
    load_model_config,
    load_targets,
    validate_repository,
)
from orchestrator.serving.triton_stages import (
    LayoutStage,
    PostprocessStage,
    PreprocessStage,
    config_parameter,
    error_from_message,
    format_error,
    stage_config,
)


@pytest.fixture(scope="module")
def repos(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("repos")
    return {t: build_repository(t, root / t, model_dir=model_dir) for t in ("cpu", "gpu")}


def test_both_targets_render_and_validate(repos: dict[str, Path]) -> None:
    for target, root in repos.items():
        configs = validate_repository(root)
        assert set(configs) == {ENSEMBLE, *STEPS}, target


def test_ensemble_interface_and_labels(repos: dict[str, Path], model_dir: Path) -> None:
    from tritonclient.grpc import model_config_pb2 as pb

    manifest = json.loads((model_dir / "manifest.json").read_text())
    for root in repos.values():
        ens = load_model_config(root / ENSEMBLE / "config.pbtxt")
        assert ens.platform == "ensemble"
        (image,) = ens.input
        assert (image.name, image.data_type, list(image.dims)) == ("IMAGE", pb.TYPE_UINT8, [-1])
        assert image.allow_ragged_batch
        outputs = {o.name: (o.data_type, list(o.dims)) for o in ens.output}
        assert outputs == {"BOXES": (pb.TYPE_FP32, [-1, 4]), "SCORES": (pb.TYPE_FP32, [-1]),
                           "CLASSES": (pb.TYPE_INT32, [-1])}
        assert json.loads(ens.parameters["labels"].string_value) == manifest["labels"]
        assert [s.model_name for s in ens.ensemble_scheduling.step] == list(STEPS)


def test_gpu_target_backends_kinds_and_files(repos: dict[str, Path]) -> None:
    from tritonclient.grpc import model_config_pb2 as pb

    root = repos["gpu"]
    pre = load_model_config(root / "preprocess" / "config.pbtxt")
    layout = load_model_config(root / "layout" / "config.pbtxt")
    post = load_model_config(root / "postprocess" / "config.pbtxt")
    assert (pre.backend, layout.backend, post.backend) == ("dali", "pytorch", "python")
    assert pre.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert layout.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    # Post-processing takes the raw outputs as GPU tensors and works on them there.
    assert post.instance_group[0].kind == pb.ModelInstanceGroup.KIND_GPU
    assert post.parameters["postprocess_device"].string_value == "gpu"
    assert post.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    dali = root / "preprocess" / "1" / "model.dali"
    assert dali.stat().st_size > 1000
    # The serialised graph decodes on the "mixed" device (nvJPEG) from external source IMAGE.
    blob = dali.read_bytes()
    assert b"IMAGE" in blob and b"mixed" in blob
    assert (root / "layout" / "1" / "model.pt").is_file()
    assert not (root / "preprocess" / "1" / "model.py").exists()
    targets = load_targets()
    assert list(layout.dynamic_batching.preferred_batch_size) == list(
        targets["gpu"].steps["layout"].preferred_batch_sizes)
    assert layout.max_batch_size == targets["gpu"].steps["layout"].max_batch_size


def test_gpu_layout_torchscript_matches_declared_tensors(repos: dict[str, Path]) -> None:
    """What pytorch_libtorch would run: BF16 inside, FP32 in and out, declared shapes."""
    import torch

    layout = load_model_config(repos["gpu"] / "layout" / "config.pbtxt")
    module = torch.jit.load(str(repos["gpu"] / "layout" / "1" / "model.pt"), map_location="cpu")
    dims = list(layout.input[0].dims)
    with torch.inference_mode():
        outputs = module(torch.zeros(2, *dims, dtype=torch.float32))
    assert len(outputs) == len(layout.output)
    for out, spec in zip(outputs, layout.output, strict=True):
        assert out.dtype == torch.float32
        assert list(out.shape) == [2, *spec.dims], spec.name


def test_cpu_target_is_python_everywhere_with_its_artifact(repos: dict[str, Path]) -> None:
    from tritonclient.grpc import model_config_pb2 as pb

    root = repos["cpu"]
    for step in STEPS:
        cfg = load_model_config(root / step / "config.pbtxt")
        assert cfg.backend == "python"
        assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
        assert (root / step / "1" / "model.py").is_file()
        assert cfg.dynamic_batching.max_queue_delay_microseconds > 0
    post = load_model_config(root / "postprocess" / "config.pbtxt")
    assert post.parameters["postprocess_device"].string_value == "cpu"
    assert "FORCE_CPU_ONLY_INPUT_TENSORS" not in post.parameters
    manifest = json.loads((root / "layout" / "1" / "manifest.json").read_text())
    assert list(manifest["artifacts"]) == ["fp32"]
    assert (root / "layout" / "1" / manifest["artifacts"]["fp32"]["file"]).is_file()
    # The python models are thin adapters over the package: no stage logic copied in.
    for step in STEPS:
        text = (root / step / "1" / "model.py").read_text()
        assert "from orchestrator.serving.triton_stages import" in text
        assert len(text.splitlines()) < 70


def test_validation_reports_mismatched_tensors(repos: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(repos["cpu"], broken)
    config = broken / "postprocess" / "config.pbtxt"
    text = config.read_text()
    # PAGE_SIZE arrives as INT32 [2] from preprocess; declare it FP32 here.
    head, _, tail = text.partition('name: "PAGE_SIZE"\n    data_type: TYPE_INT32')
    config.write_text(head + 'name: "PAGE_SIZE"\n    data_type: TYPE_FP32' + tail)
    with pytest.raises(ConfigError, match=r"postprocess\.PAGE_SIZE: gets TYPE_INT32"):
        validate_repository(broken)
    (broken / "layout" / "1" / "model.py").unlink()
    with pytest.raises(ConfigError, match=r"model\.py missing"):
        validate_repository(broken)
    # A gpu postprocess step that would be handed CPU tensors, or runs on a CPU instance.
    gpu = tmp_path / "gpu"
    shutil.copytree(repos["gpu"], gpu)
    config = gpu / "postprocess" / "config.pbtxt"
    text = config.read_text()
    config.write_text(text.replace('string_value: "no"', 'string_value: "yes"'))
    with pytest.raises(ConfigError, match="FORCE_CPU_ONLY_INPUT_TENSORS"):
        validate_repository(gpu)
    config.write_text(text.replace("KIND_GPU", "KIND_CPU"))
    with pytest.raises(ConfigError, match="needs KIND_GPU"):
        validate_repository(gpu)


def test_unknown_target_and_size_mismatch(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown target"):
        build_repository("tpu", tmp_path / "x", model_dir=model_dir)
    # Decode and layout sizes must agree (the config refuses otherwise) and match the
    # model's input (the build refuses otherwise).
    with pytest.raises(ConfigError, match="input_height"):
        FolioConfig().override({"decode.input_height": 640})
    cfg = FolioConfig().override({"decode.input_height": 640, "layout.input_height": 640})
    with pytest.raises(ConfigError, match="input"):
        build_repository("cpu", tmp_path / "y", cfg=cfg, model_dir=model_dir)
    assert not (tmp_path / "y").exists()


def test_baked_config_round_trips() -> None:
    cfg = FolioConfig().override({"sources.max_pixels": 1234, "layout.score_threshold": 0.4})
    model_config = {"parameters": {"folio_config": {"string_value": config_parameter(cfg)}}}
    back = stage_config(model_config)
    assert back.sources.max_pixels == 1234
    assert back.layout.score_threshold == 0.4
    assert back.decode == cfg.decode
    assert stage_config({}).sources.max_pixels == FolioConfig().sources.max_pixels


def test_error_messages_round_trip() -> None:
    for exc in (PageDecodeError("not an image"), PixelLimitExceeded("too big: 1 x 2")):
        message = f"in ensemble 'folio_layout', {format_error(exc)}"
        back = error_from_message(message)
        assert type(back) is type(exc) and str(back) == str(exc)
    assert isinstance(error_from_message("LayoutError: RuntimeError: boom"), LayoutError)
    assert error_from_message("something else") is None


def test_postprocess_stage_on_tensors_equals_numpy(corpus_dir: Path, model_dir: Path) -> None:
    """The gpu target's step (torch, here on CPU tensors as DLPack would hand them) gives the
    cpu target's boxes for the same raw outputs."""
    import torch

    cfg = FolioConfig().override({"sources.max_pixels": 50_000_000})
    pre = PreprocessStage(cfg, max_batch_size=2)
    names = ("linn.png", "typewriter.png")
    outs = pre([np.frombuffer((corpus_dir / "pages" / n).read_bytes(), np.uint8) for n in names])
    assert not any(isinstance(o, PageError) for o in outs)
    batch = np.stack([o[0] for o in outs if not isinstance(o, PageError)])
    sizes = np.stack([o[1] for o in outs if not isinstance(o, PageError)])
    layout = LayoutStage(cfg, model_dir)
    raw = layout(batch)
    on_cpu = PostprocessStage(cfg, layout.labels, device="cpu")
    on_gpu = PostprocessStage(cfg, layout.labels, device="gpu")
    want = on_cpu(raw, sizes)
    got = on_gpu([on_gpu.concatenate([torch.from_numpy(r[:1]), torch.from_numpy(r[1:])])
                  for r in raw], sizes)
    assert sum(len(d.boxes) for d in want) > 10
    for a, b in zip(want, got, strict=True):
        assert a.classes.tolist() == b.classes.tolist()
        np.testing.assert_allclose(a.boxes, b.boxes, atol=1e-3, rtol=0)
    with pytest.raises(ConfigError, match=r"must be cpu\|gpu"):
        PostprocessStage(cfg, layout.labels, device="tpu")


def test_preprocess_stage_isolates_bad_pages(corpus_dir: Path) -> None:
    cfg = FolioConfig().override({"sources.max_pixels": 50_000_000})
    stage = PreprocessStage(cfg, max_batch_size=4)
    path = corpus_dir / "pages" / "typewriter.png"
    good = np.frombuffer(path.read_bytes(), np.uint8)
    with Image.open(path) as image:
        width, height = image.size
    items = [good, np.frombuffer(b"not an image at all", np.uint8), np.zeros(0, np.uint8),
             np.frombuffer(png_header(10_000, 10_000), np.uint8), good]
    out = stage(items)
    assert isinstance(out[1], PageDecodeError)
    assert isinstance(out[2], PageDecodeError)
    assert isinstance(out[3], PixelLimitExceeded)
    for i in (0, 4):
        result = out[i]
        assert not isinstance(result, PageError)
        model_input, size = result
        assert model_input.shape == (3, cfg.decode.input_height, cfg.decode.input_width)
        assert size.dtype == np.int32
        assert size.tolist() == [height, width]
    # A truncated image passes the header check and fails in DALI, alone.
    truncated = good[: len(good) // 3]
    out = stage([good, truncated])
    assert not isinstance(out[0], PageError)
    assert isinstance(out[1], PageDecodeError)


_ORPHAN = """
import sys
from pathlib import Path
from orchestrator.serving.serve import _spawn
proc = _spawn(["sleep", "120"], {"PATH": "/usr/bin:/bin"}, Path(sys.argv[1]))
print(proc.pid, flush=True)
sys.stdin.read()
"""


def test_a_spawned_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    """A killed test run or CLI leaves no server behind holding its ports: what ``_spawn``
    starts gets SIGTERM when its parent dies (without Python code between fork and exec)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN, str(tmp_path / "log")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    # setpriv asks for the signal after its own exec and before it execs the command; a
    # parent killed before that asks is a parent no signal can follow, so wait for ``sleep``.
    started = time.monotonic() + 30
    while Path(f"/proc/{child}/comm").read_text().strip() != "sleep":
        assert time.monotonic() < started, "the spawned command never started"
        time.sleep(0.01)
    parent.send_signal(signal.SIGKILL)
    parent.wait(timeout=30)
    deadline = time.monotonic() + 30
    while True:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        status = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(
            f"/proc/{child}/stat").exists() else "X"
        if status == "Z":
            break  # dead, waiting to be reaped by init
        assert time.monotonic() < deadline, "the spawned process outlived its parent"
        time.sleep(0.1)
