"""``folio models export-layout``: a PP-DocLayoutV3 checkpoint (randomly initialised from a
config built here; no hub) -> TorchScript + manifest that the repository serves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from orchestrator.config import FolioConfig, LayoutConfig  # noqa: E402
from orchestrator.models.artifacts import load_manifest  # noqa: E402
from orchestrator.models.export_doclayout import (  # noqa: E402
    export_doclayout,
    make_export_module,
    postprocess_doclayout,
)
from orchestrator.serving.triton_repo import build_repository, load_model_config  # noqa: E402
from orchestrator.serving.triton_stages import LayoutStage, PostprocessStage  # noqa: E402

SIZE = 256
LABELS = ["text", "title", "table", "figure", "header"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = transformers.PPDocLayoutV3Config(
        num_queries=40, decoder_layers=2, id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)})
    model = transformers.PPDocLayoutV3ForObjectDetection(config).eval()
    folder = tmp_path_factory.mktemp("ppdoclayoutv3")
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0, 0, 0], "image_std": [1, 1, 1], "rescale_factor": 1 / 255}))
    return folder


@pytest.fixture(scope="module")
def exported(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exported")
    export_doclayout(checkpoint, out, height=SIZE, width=SIZE)
    return out


def _cfg(model_dir: Path) -> FolioConfig:
    return FolioConfig().override({
        "decode.input_height": SIZE, "decode.input_width": SIZE,
        "layout.input_height": SIZE, "layout.input_width": SIZE,
        "layout.model_dir": str(model_dir), "layout.score_threshold": 0.3,
    })


def test_manifest_and_trace_match_eager_transformers(checkpoint: Path, exported: Path) -> None:
    manifest = load_manifest(exported)  # verifies every sha256
    assert manifest["labels"] == LABELS
    assert (manifest["input"]["height"], manifest["input"]["width"]) == (SIZE, SIZE)
    assert set(manifest["artifacts"]) == {"fp32", "bf16"}
    assert manifest["head"]["postprocess"] == "doclayout"
    model = transformers.PPDocLayoutV3ForObjectDetection.from_pretrained(str(checkpoint)).eval()
    traced = torch.jit.load(str(exported / manifest["artifacts"]["fp32"]["file"]))
    x = torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scores, boxes, order = traced(x)  # batch 3: the trace (at batch 2) is batch-free
        # What the checkpoint's image processor would feed: RGB in [0, 1].
        bgr = x * torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) + torch.tensor(
            [0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        eager = model(pixel_values=bgr.flip(1))
    assert torch.allclose(scores, eager.logits.sigmoid(), atol=1e-4)
    centre, size = eager.pred_boxes.split(2, dim=-1)
    assert torch.allclose(boxes, torch.cat([centre - size / 2, centre + size / 2], -1), atol=1e-4)
    for row in order.long():
        assert sorted(row.tolist()) == list(range(row.numel()))


def _reference_postprocess(scores: Any, boxes: Any, order: Any, sizes: list[tuple[int, int]],
                           threshold: float) -> list[dict[str, Any]]:
    """transformers' post_process_object_detection selection, transcribed in torch."""
    results = []
    q, c = scores.shape[1:]
    top, index = torch.topk(scores.flatten(1), q, dim=-1)
    labels, query = index % c, index // c
    for b, (h, w) in enumerate(sizes):
        keep = top[b] >= threshold
        rank = order[b][query[b]][keep]
        _, idx = torch.sort(rank)
        scale = torch.tensor([w, h, w, h], dtype=torch.float32)
        results.append({"boxes": (boxes[b][query[b]][keep][idx] * scale).numpy(),
                        "labels": labels[b][keep][idx].numpy(),
                        "scores": top[b][keep][idx].numpy()})
    return results


def test_postprocess_selects_like_transformers(exported: Path) -> None:
    manifest = load_manifest(exported)
    traced = torch.jit.load(str(exported / manifest["artifacts"]["fp32"]["file"]))
    with torch.no_grad():
        scores, boxes, order = traced(torch.randn(2, 3, SIZE, SIZE))
    sizes = [(1100, 850), (600, 900)]
    ours = postprocess_doclayout([scores.numpy(), boxes.numpy(), order.numpy()], sizes,
                                 LayoutConfig(score_threshold=0.3), LABELS)
    ref = _reference_postprocess(scores, boxes, order, sizes, 0.3)
    assert sum(len(d.scores) for d in ours) > 0
    for b, (det, want, (h, w)) in enumerate(zip(ours, ref, sizes, strict=True)):
        scale = np.array([w, h, w, h], dtype=np.float32)
        # The same (class, score, box) selections; ties (one query, two classes, one
        # rank) may come in either order, so compare them as sorted tuples.
        got = sorted(zip(det.classes.tolist(), np.round(det.scores, 5).tolist(),
                         map(tuple, np.round(det.boxes, 1).tolist()), strict=True))
        exp = sorted(zip(want["labels"].tolist(), np.round(want["scores"], 5).tolist(),
                         map(tuple, np.round(np.clip(want["boxes"], 0, scale), 1).tolist()),
                         strict=True))
        assert got == exp
        # ... and in the model's reading order.
        page_boxes = np.clip(boxes[b].numpy() * scale, 0, scale)
        query = [int(np.abs(page_boxes - box).sum(axis=1).argmin()) for box in det.boxes]
        ranks = order[b].numpy()[query]
        assert (np.diff(ranks) >= 0).all()


def test_in_process_layout_model_runs_the_exported_head(exported: Path) -> None:
    """LayoutModel.detect dispatches on the manifest's head, as the Triton step does."""
    from orchestrator.stages.layout import LayoutModel

    cfg = _cfg(exported)
    model = LayoutModel(cfg.layout, device="cpu")
    batch = np.random.default_rng(3).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    sizes = [(1100, 850), (600, 900)]
    ours = model.detect(batch, sizes)
    expected = postprocess_doclayout(model.forward(batch), sizes, cfg.layout, LABELS)
    assert sum(len(d.scores) for d in ours) > 0
    for got, want in zip(ours, expected, strict=True):
        assert np.array_equal(got.boxes, want.boxes) and np.array_equal(got.classes, want.classes)


def test_repository_serves_the_exported_model(exported: Path, tmp_path: Path) -> None:
    cfg = _cfg(exported)
    for target in ("cpu", "gpu"):
        root = build_repository(target, tmp_path / target, cfg=cfg, model_dir=exported)
        post = load_model_config(root / "postprocess" / "config.pbtxt")
        assert post.parameters["postprocess"].string_value == "doclayout"
        layout = load_model_config(root / "layout" / "config.pbtxt")
        assert [list(o.dims) for o in layout.output] == [[40, 5], [40, 4], [40]]
    # The cpu target's python steps, run directly on the built repository's files.
    root = tmp_path / "cpu"
    stage = LayoutStage(cfg, root / "layout" / "1")
    raw = stage(np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32))
    dets = PostprocessStage(cfg, stage.labels, "doclayout")(raw, np.array([[1000, 700]] * 2))
    assert len(dets) == 2
    for det in dets:
        assert det.boxes.shape[1:] == (4,)
        assert (det.boxes[:, 2] <= 700).all() and (det.boxes[:, 3] <= 1000).all()


def test_cli_refuses_a_folder_without_a_checkpoint(tmp_path: Path) -> None:
    from orchestrator.models.export_doclayout import main_export_layout

    assert main_export_layout(["--from", str(tmp_path), "--out", str(tmp_path / "o")]) == 2


def test_export_module_wraps_any_model() -> None:
    """The wrapper's input conversion: folio's BGR ImageNet-normalised -> RGB [0, 1]."""
    seen: dict[str, Any] = {}

    class Fake(torch.nn.Module):
        def forward(self, pixel_values: Any, return_dict: bool = True) -> Any:
            seen["x"] = pixel_values
            b = pixel_values.shape[0]
            return type("Out", (), {"logits": torch.zeros(b, 2, 3),
                                    "pred_boxes": torch.full((b, 2, 4), 0.5),
                                    "order_logits": torch.zeros(b, 2, 2)})()

    module = make_export_module(Fake())
    rgb = torch.rand(1, 3, 8, 8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    folio_input = (rgb.flip(1) - mean) / std
    _, boxes, _ = module(folio_input)
    assert torch.allclose(seen["x"], rgb, atol=1e-6)
    assert torch.allclose(boxes[0, 0], torch.tensor([0.25, 0.25, 0.75, 0.75]))
