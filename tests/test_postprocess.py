"""Layout post-processing on synthetic arrays: decode, thresholds, NMS, containment, order.

One suite for both implementations: every test that runs the algorithm takes ``impl``,
the numpy version (``orchestrator.stages.postprocess``) or the torch one
(``orchestrator.stages.postprocess_torch``, here on CPU tensors) behind the same numpy interface.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from layout_fixtures import python_nms, random_boxes

from orchestrator.config import LayoutConfig
from orchestrator.errors import ConfigError, LayoutError
from orchestrator.stages import postprocess as numpy_impl
from orchestrator.stages import postprocess_torch as torch_impl
from orchestrator.stages.postprocess import anchor_centers, class_thresholds, reading_order
from orchestrator.types import Detections


def _t(array: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array))


def _torch_postprocess(
    raw: Sequence[np.ndarray], sizes: Sequence[tuple[int, int]], cfg: LayoutConfig,
    labels: Sequence[str],
) -> list[Detections]:
    return torch_impl.postprocess([_t(r) for r in raw], sizes, cfg, labels)


IMPLEMENTATIONS = {
    "numpy": numpy_impl,
    "torch": SimpleNamespace(
        postprocess=_torch_postprocess,
        nms=lambda boxes, scores, iou, classes=None: torch_impl.nms(
            _t(boxes), _t(scores), iou, None if classes is None else _t(classes)).numpy(),
        iou_matrix=lambda a, b: torch_impl.iou_matrix(_t(a), _t(b)).numpy(),
        suppress_contained=lambda boxes, groups, containment: torch_impl.suppress_contained(
            _t(boxes), _t(groups), containment).numpy(),
    ),
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
def impl(request: pytest.FixtureRequest) -> Any:
    """The post-processing implementation under test, with numpy in and out."""
    return IMPLEMENTATIONS[request.param]

LABELS = ("text", "title", "figure", "figure_caption", "table", "table_caption",
          "header", "footer", "reference", "equation")
CFG = LayoutConfig()
H, W = CFG.input_height, CFG.input_width
BINS = 8


def make_raw(
    objects: list[tuple[int, int, int, tuple[int, int, int, int], int, float]],
    batch: int = 1,
    background: float = 0.01,
) -> list[np.ndarray]:
    """Model outputs holding exactly the given objects.

    Each object: (page, level, anchor index, (left, top, right, bottom) in bins, class,
    score). A bin count k decodes to k * stride pixels (one-hot distribution logits).
    """
    scores, dists = [], []
    for stride in CFG.strides:
        n = anchor_centers(H, W, stride).shape[0]
        scores.append(np.full((batch, n, len(LABELS)), background, dtype=np.float32))
        dists.append(np.zeros((batch, n, 4 * BINS), dtype=np.float32))
    for page, level, anchor, sides, cls, score in objects:
        scores[level][page, anchor, cls] = score
        logits = np.full((4, BINS), -60.0, dtype=np.float32)
        logits[np.arange(4), list(sides)] = 60.0
        dists[level][page, anchor] = logits.reshape(-1)
    return scores + dists


def anchor_at(level: int, x: float, y: float) -> tuple[int, float, float]:
    """The anchor of ``level`` nearest (x, y) in model pixels, and its centre."""
    centers = anchor_centers(H, W, CFG.strides[level])
    i = int(np.argmin(np.abs(centers[:, 0] - x) + np.abs(centers[:, 1] - y)))
    return i, float(centers[i, 0]), float(centers[i, 1])


def expected_box(level: int, anchor: int, sides: tuple[int, int, int, int]) -> np.ndarray:
    stride = CFG.strides[level]
    cx, cy = anchor_centers(H, W, stride)[anchor]
    left, top, right, bottom = (s * stride for s in sides)
    return np.array([cx - left, cy - top, cx + right, cy + bottom])


# --- NMS ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 7, 60, 250])
@pytest.mark.parametrize("iou", [0.3, 0.5, 0.7])
def test_nms_equals_bruteforce_greedy(n: int, iou: float, impl: Any) -> None:
    rng = np.random.default_rng(n * 100 + int(iou * 10))
    for trial in range(5):
        boxes = random_boxes(rng, n, clustered=trial % 2 == 0)
        scores = rng.random(n)
        if trial == 4:
            scores = np.round(scores, 1)  # ties: rank by index in both
        got = impl.nms(boxes, scores, iou).tolist()
        assert got == python_nms(boxes.tolist(), scores.tolist(), iou)


@pytest.mark.parametrize("n", [5, 80, 300])
def test_class_aware_nms_equals_bruteforce(n: int, impl: Any) -> None:
    rng = np.random.default_rng(n)
    for _ in range(5):
        boxes = random_boxes(rng, n)
        scores = rng.random(n)
        classes = rng.integers(0, 3, n)
        got = impl.nms(boxes, scores, 0.5, classes).tolist()
        assert got == python_nms(boxes.tolist(), scores.tolist(), 0.5, classes.tolist())


def test_nms_chain_is_greedy_not_fast_nms(impl: Any) -> None:
    """A suppresses B, B would suppress C, but B is gone: greedy keeps A and C."""
    boxes = np.array([[0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]], dtype=float)
    scores = np.array([0.9, 0.8, 0.7])
    assert impl.iou_matrix(boxes, boxes)[0, 2] < 0.3 < impl.iou_matrix(boxes, boxes)[0, 1]
    assert impl.nms(boxes, scores, 0.3).tolist() == [0, 2]


def test_iou_matrix_values(impl: Any) -> None:
    a = np.array([[0, 0, 10, 10]], dtype=float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]], dtype=float)
    np.testing.assert_allclose(impl.iou_matrix(a, b)[0], [1.0, 50 / 150, 0.0, 0.0])


def test_suppress_contained_by_group_and_rank(impl: Any) -> None:
    boxes = np.array([[0, 0, 100, 100], [10, 10, 50, 50], [20, 20, 60, 60], [90, 90, 120, 120]],
                     dtype=float)
    # Ranked best first: box 1 lies inside box 0 (same group) -> dropped; box 2 is inside
    # box 0 but in another group -> kept; box 3 is only partly inside -> kept.
    keep = impl.suppress_contained(boxes, np.array([0, 0, 1, 0]), containment=0.9)
    assert keep.tolist() == [True, False, True, True]
    assert impl.suppress_contained(boxes, np.zeros(4, int), containment=1.1).all()


# --- decode, thresholds, NMS and containment through postprocess ------------------------------


def test_anchor_grid_matches_the_model_outputs() -> None:
    assert [anchor_centers(H, W, s).shape[0] for s in CFG.strides] == [7600, 1900, 475, 130]
    np.testing.assert_allclose(anchor_centers(H, W, 64)[11], [(1 + 0.5) * 64, (1 + 0.5) * 64])


def test_decodes_one_box_per_level_and_rescales_to_the_page(impl: Any) -> None:
    objects = []
    expected = []
    for level, (x, y) in enumerate([(100, 100), (400, 120), (150, 500), (420, 600)]):
        anchor, _, _ = anchor_at(level, x, y)
        sides = (2, 1, 3, 2)
        objects.append((0, level, anchor, sides, 0, 0.9))
        expected.append(expected_box(level, anchor, sides))
    page_h, page_w = 2 * H, 3 * W
    (det,) = impl.postprocess(make_raw(objects), [(page_h, page_w)], CFG, LABELS)
    assert len(det.boxes) == 4
    scale = np.array([3.0, 2.0, 3.0, 2.0])
    got = sorted(map(tuple, det.boxes.round(3).tolist()))
    want = sorted(map(tuple, (np.array(expected) * scale).round(3).tolist()))
    assert got == want
    assert det.boxes.dtype == np.float32 and det.scores.dtype == np.float32
    assert det.classes.dtype == np.int32


def test_boxes_are_clipped_to_the_page(impl: Any) -> None:
    anchor, _, _ = anchor_at(0, 4, 4)
    raw = make_raw([(0, 0, anchor, (7, 7, 2, 2), 0, 0.9)])
    (det,) = impl.postprocess(raw, [(H, W)], CFG, LABELS)
    assert det.boxes[0, 0] == 0.0 and det.boxes[0, 1] == 0.0


def test_per_class_thresholds(impl: Any) -> None:
    a, _, _ = anchor_at(1, 150, 150)
    b, _, _ = anchor_at(1, 450, 650)
    raw = make_raw([(0, 1, a, (2, 2, 2, 2), 1, 0.45), (0, 1, b, (2, 2, 2, 2), 0, 0.55)])
    (det,) = impl.postprocess(raw, [(H, W)], CFG, LABELS)
    assert det.classes.tolist() == [0]  # the title at 0.45 is under the 0.5 default
    cfg = dataclasses.replace(CFG, class_score_thresholds={"title": 0.4, "text": 0.6})
    (det,) = impl.postprocess(raw, [(H, W)], cfg, LABELS)
    assert det.classes.tolist() == [1]
    np.testing.assert_allclose(class_thresholds(cfg, LABELS)[:3], [0.6, 0.4, 0.5])
    with pytest.raises(ConfigError, match="titel"):
        impl.postprocess(raw, [(H, W)],
                         dataclasses.replace(CFG, class_score_thresholds={"titel": 0.4}), LABELS)


def test_nms_is_class_aware_and_containment_is_task_aware(impl: Any) -> None:
    a0, _, _ = anchor_at(0, 200, 200)
    a1 = a0 + 1  # the next anchor, 8 px right: nearly the same box
    a2, _, _ = anchor_at(0, 200, 400)
    objects = [
        (0, 0, a0, (4, 4, 4, 4), 0, 0.9),  # text
        (0, 0, a1, (4, 4, 4, 4), 0, 0.8),  # text, IoU ~0.78 with the first: suppressed
        (0, 0, a0, (4, 4, 4, 4), 4, 0.7),  # table, same box: other class, kept
        (0, 1, anchor_at(1, 200, 400)[0], (6, 6, 6, 6), 8, 0.95),  # reference (task text)
        (0, 0, a2, (2, 2, 2, 2), 1, 0.85),  # title (task text) inside the reference: dropped
        (0, 0, a2, (2, 2, 2, 2), 9, 0.8),  # equation (task formula) inside it: kept
    ]
    (det,) = impl.postprocess(make_raw(objects), [(H, W)], CFG, LABELS)
    assert sorted(det.classes.tolist()) == [0, 4, 8, 9]
    cfg = dataclasses.replace(CFG, containment=1.1)  # containment filter off
    (det,) = impl.postprocess(make_raw(objects), [(H, W)], cfg, LABELS)
    assert sorted(det.classes.tolist()) == [0, 1, 4, 8, 9]


def test_top_k_per_level_keeps_the_best_anchors(impl: Any) -> None:
    a, _, _ = anchor_at(0, 100, 100)
    b, _, _ = anchor_at(0, 400, 600)
    raw = make_raw([(0, 0, a, (2, 2, 2, 2), 0, 0.7), (0, 0, b, (2, 2, 2, 2), 0, 0.9)])
    (det,) = impl.postprocess(raw, [(H, W)], dataclasses.replace(CFG, top_k_per_level=1), LABELS)
    assert det.scores.tolist() == pytest.approx([0.9])


def test_batch_pages_are_independent_and_empty_pages_are_empty(impl: Any) -> None:
    a, _, _ = anchor_at(2, 300, 300)
    raw = make_raw([(1, 2, a, (1, 1, 1, 1), 2, 0.8)], batch=3)
    dets = impl.postprocess(raw, [(100, 100), (H, W), (50, 60)], CFG, LABELS)
    assert [len(d.boxes) for d in dets] == [0, 1, 0]
    assert dets[0].boxes.shape == (0, 4) and dets[0].classes.dtype == np.int32
    with pytest.raises(LayoutError):
        impl.postprocess(raw, [(H, W)], CFG, LABELS)
    with pytest.raises(LayoutError):
        impl.postprocess(raw, [(H, W)] * 3, CFG, LABELS[:5])


# --- reading order -------------------------------------------------------------------------


def two_column_page() -> tuple[np.ndarray, list[str], int]:
    """A 1000 px wide page: title, two columns, a full-width figure, two columns, footer."""
    named = {
        "title": (100, 50, 900, 120),
        "L1": (80, 150, 480, 300),
        "L2": (80, 320, 480, 500),
        "L3": (82, 520, 478, 600),
        "R1": (520, 150, 920, 260),
        "R2": (522, 280, 920, 420),
        "R3": (520, 440, 918, 610),
        "figure": (80, 640, 920, 900),
        "L4": (80, 930, 525, 1100),  # right edge crosses the gutter a little (detector slop)
        "R4": (510, 915, 920, 1000),
        "R5": (520, 1010, 920, 1150),
        "footer": (80, 1200, 920, 1240),
    }
    return np.array(list(named.values()), dtype=float), list(named), 1000


def test_reading_order_two_columns_left_first() -> None:
    boxes, names, width = two_column_page()
    rng = np.random.default_rng(0)
    for _ in range(5):
        perm = rng.permutation(len(boxes))
        order = reading_order(boxes[perm], width, CFG)
        assert [names[perm[i]] for i in order] == names


def test_reading_order_single_column_and_side_by_side_blocks() -> None:
    # Narrow blocks of one column: top to bottom.
    boxes = np.array([[100, 300, 500, 350], [100, 100, 500, 200], [110, 220, 480, 280]], float)
    assert reading_order(boxes, 1000, CFG).tolist() == [1, 2, 0]
    # Three columns, no full-width block.
    boxes = np.array([[700, 100, 950, 300], [50, 400, 300, 500], [380, 100, 620, 900],
                      [50, 100, 300, 350]], float)
    assert reading_order(boxes, 1000, CFG).tolist() == [3, 1, 2, 0]
    assert reading_order(np.zeros((0, 4)), 1000, CFG).tolist() == []


def test_max_candidates_bounds_nms_input(impl: Any) -> None:
    objects = []
    for k, (x, y) in enumerate([(100, 100), (300, 300), (500, 600)]):
        anchor, _, _ = anchor_at(0, x, y)
        objects.append((0, 0, anchor, (2, 2, 2, 2), 0, 0.6 + 0.1 * k))
    cfg = dataclasses.replace(CFG, max_candidates=2)
    (det,) = impl.postprocess(make_raw(objects), [(H, W)], cfg, LABELS)
    assert sorted(det.scores.tolist()) == pytest.approx([0.7, 0.8])


# --- the two implementations on the same crowded batch ------------------------------------


def crowded_raw(seed: int, pages: int, per_page: int, ties: bool) -> list[np.ndarray]:
    """``per_page * page`` random objects on page ``page`` (page 0 empty), all levels."""
    rng = np.random.default_rng(seed)
    objects = []
    for page in range(pages):
        for _ in range(per_page * page):
            level = int(rng.integers(0, len(CFG.strides)))
            anchor = int(rng.integers(0, anchor_centers(H, W, CFG.strides[level]).shape[0]))
            sides = tuple(int(v) for v in rng.integers(0, BINS, 4))
            score = round(float(rng.uniform(0.5, 1.0)), 1 if ties else 6)
            objects.append((page, level, anchor, sides, int(rng.integers(0, len(LABELS))),
                            score))
    return make_raw(objects, batch=pages)  # type: ignore[arg-type]


@pytest.mark.parametrize("ties", [False, True])
def test_torch_equals_numpy_on_crowded_batches(ties: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages with 0-600 candidates in one batch, scores tied or not, with and without the
    candidate cap, with NMS matrices built for all pages at once or one page at a time."""
    raw = crowded_raw(3, pages=5, per_page=150, ties=ties)
    sizes = [(H, W), (1000, 700), (3508, 2480), (H // 2, W // 3), (2000, 2000)]
    # With ties, the cap would cut through equal scores, where the two pick differently.
    caps = [CFG.max_candidates] if ties else [CFG.max_candidates, 250]
    for cap in caps:
        cfg = dataclasses.replace(CFG, max_candidates=cap)
        want = numpy_impl.postprocess(raw, sizes, cfg, LABELS)
        assert sum(len(d.boxes) for d in want) > 100
        for budget in (torch_impl._MATRIX_ELEMENTS, 1):
            monkeypatch.setattr(torch_impl, "_MATRIX_ELEMENTS", budget)
            got = _torch_postprocess(raw, sizes, cfg, LABELS)
            for page, (a, b) in enumerate(zip(want, got, strict=True)):
                assert b.classes.tolist() == a.classes.tolist(), (cap, budget, page)
                assert b.scores.tolist() == a.scores.tolist(), (cap, budget, page)
                np.testing.assert_allclose(b.boxes, a.boxes, atol=1e-3, rtol=0)
