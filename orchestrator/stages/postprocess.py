"""Layout post-processing: raw PP-PicoDet outputs -> boxes in page pixels, reading order.

Pure numpy, no Python loop over boxes or box pairs: per page it loops over the four
detection levels only; NMS and containment work on IoU / intersection matrices.

For each page and level (stride s, grid ``ceil(H/s) x ceil(W/s)``, anchor centres
``((j + 0.5) s, (i + 0.5) s)``):

1. the anchors whose best class score reaches the lowest class threshold are kept, at
   most ``top_k_per_level`` of them (the highest-scoring);
2. only those anchors' box distributions are decoded: softmax over the 8 bins of each
   side, expectation times the stride gives the distances left, top, right, bottom;
3. every (anchor, class) pair whose score reaches that class's threshold is a candidate.

Then, over all levels: the best ``max_candidates`` candidates at most go through
class-aware greedy NMS (``nms``) and containment filtering (a box lying ``containment``
or more inside a higher-scoring box of the same task is dropped); the survivors are
rescaled from the model's input size to the page, clipped to the page, stripped of empty
boxes and sorted into reading order (``reading_order``).

``orchestrator.stages.postprocess_torch`` is the same algorithm on tensors (any device, the whole
batch at once); both share ``plan_outputs`` and ``reading_order`` and one test suite.

Usage::

    dets = postprocess(raw_outputs, [(height, width)], cfg.layout, labels)
    keep = nms(boxes, scores, iou_threshold=0.5, classes=classes)
    order = reading_order(dets[0].boxes, page_width=width, cfg=cfg.layout)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from orchestrator.config import LayoutConfig
from orchestrator.errors import ConfigError, LayoutError
from orchestrator.types import Detections

__all__ = [
    "DEFAULT_TASK",
    "OutputPlan",
    "anchor_centers",
    "class_thresholds",
    "containment_matrix",
    "decode_distances",
    "empty_detections",
    "iou_matrix",
    "label_task",
    "nms",
    "page_detections",
    "plan_outputs",
    "postprocess",
    "reading_order",
    "suppress_contained",
]

FloatArray = npt.NDArray[np.floating]
IntArray = npt.NDArray[np.integer]

# A heading is read in the column holding at least this share of its width.
HEADING_SPAN = 0.5
# The task of a label that cfg.label_tasks does not name.
DEFAULT_TASK = "text"
_EPS = np.float32(1e-9)


def label_task(label: str, cfg: LayoutConfig) -> str:
    """The task ``cfg.label_tasks`` gives a label (``DEFAULT_TASK`` when unnamed)."""
    return cfg.label_tasks.get(label, DEFAULT_TASK)


def class_thresholds(cfg: LayoutConfig, labels: Sequence[str]) -> npt.NDArray[np.float32]:
    """Per-class score thresholds: ``score_threshold`` overridden by ``class_score_thresholds``.

    A label in ``class_score_thresholds`` that the model does not have is a ConfigError
    (a typo would otherwise be ignored silently).
    """
    thresholds = np.full(len(labels), cfg.score_threshold, dtype=np.float32)
    index = {label: i for i, label in enumerate(labels)}
    for label, value in cfg.class_score_thresholds.items():
        if label not in index:
            raise ConfigError(
                f"layout.class_score_thresholds: unknown label {label!r} "
                f"(the model's labels: {', '.join(labels)})"
            )
        thresholds[index[label]] = value
    return thresholds


@functools.lru_cache(maxsize=32)
def anchor_centers(input_height: int, input_width: int, stride: int) -> npt.NDArray[np.float64]:
    """(N, 2) anchor centres x, y of one level, row-major over a ceil(H/s) x ceil(W/s) grid."""
    rows = -(-input_height // stride)
    cols = -(-input_width // stride)
    yy, xx = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    centers = np.stack([(xx.ravel() + 0.5) * stride, (yy.ravel() + 0.5) * stride], axis=1)
    centers = centers.astype(np.float64)
    centers.setflags(write=False)
    return centers


def decode_distances(
    distribution: FloatArray, stride: float | FloatArray
) -> npt.NDArray[np.float64]:
    """(n, 4 * bins) logits -> (n, 4) distances left, top, right, bottom in input pixels.

    ``stride``: one number, or one per row (rows gathered from several levels).
    """
    n, width = distribution.shape
    logits = np.asarray(distribution, dtype=np.float64).reshape(n, 4, width // 4)
    logits = logits - logits.max(axis=2, keepdims=True)
    weights = np.exp(logits)
    weights /= weights.sum(axis=2, keepdims=True)
    bins = np.arange(logits.shape[2], dtype=np.float64)
    distances: npt.NDArray[np.float64] = weights @ bins
    distances *= np.asarray(stride, dtype=np.float64).reshape(-1, 1)
    return distances


def iou_matrix(a: FloatArray, b: FloatArray) -> npt.NDArray[np.float32]:
    """(N, M) intersection over union of x0, y0, x1, y1 boxes (float32)."""
    inter = _intersection(a, b)
    union = np.add.outer(_area(a), _area(b))
    union -= inter
    np.maximum(union, _EPS, out=union)
    inter /= union
    return inter


def containment_matrix(a: FloatArray, b: FloatArray) -> npt.NDArray[np.float32]:
    """(N, M): the share of each box of ``b``'s area that lies inside each box of ``a``."""
    inter = _intersection(a, b)
    inter /= np.maximum(_area(b), _EPS)[None, :]
    return inter


def _intersection(a: FloatArray, b: FloatArray) -> npt.NDArray[np.float32]:
    # float32, contiguous coordinate rows and ufunc.outer: several times faster than float64
    # broadcasting over strided columns at the sizes NMS sees (10-1000 boxes). float32 IoU
    # is exact to ~1e-7, also for boxes in pixels of very large pages.
    ax0, ay0, ax1, ay1 = np.asarray(a, dtype=np.float32).reshape(-1, 4).T.copy()
    bx0, by0, bx1, by1 = np.asarray(b, dtype=np.float32).reshape(-1, 4).T.copy()
    w = np.minimum.outer(ax1, bx1)
    w -= np.maximum.outer(ax0, bx0)
    np.maximum(w, 0.0, out=w)
    h = np.minimum.outer(ay1, by1)
    h -= np.maximum.outer(ay0, by0)
    np.maximum(h, 0.0, out=h)
    w *= h
    return w


def _area(boxes: FloatArray) -> npt.NDArray[np.float32]:
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    area: npt.NDArray[np.float32] = np.maximum(b[:, 2] - b[:, 0], 0.0) * np.maximum(
        b[:, 3] - b[:, 1], 0.0
    )
    return area


def _upper(n: int) -> npt.NDArray[np.bool_]:
    """(n, n) mask of i < j: "ranked above" for boxes sorted best first (cached up to 512)."""
    if n <= 512:
        return _upper_cached(n)
    return np.triu(np.ones((n, n), dtype=bool), k=1)


@functools.lru_cache(maxsize=64)
def _upper_cached(n: int) -> npt.NDArray[np.bool_]:
    mask = np.triu(np.ones((n, n), dtype=bool), k=1)
    mask.setflags(write=False)
    return mask


def _greedy_fixpoint(suppresses: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Kept mask of greedy suppression, given ``suppresses[i, j]`` for i ranked above j.

    ``suppresses`` must be strictly upper triangular (rank order). Greedy keeps j iff no
    *kept* i < j suppresses it; that recursion has one solution, reached by iterating
    ``keep = ~any_i(keep[i] & suppresses[i, j])`` from all-kept (Cluster-NMS, Zheng et al.
    2020): after t rounds the first t ranks are final, and it stops as soon as a round
    changes nothing, usually after 2-4 matrix passes.
    """
    n = suppresses.shape[0]
    keep = np.ones(n, dtype=bool)
    for _ in range(n + 1):
        new_keep = ~(suppresses & keep[:, None]).any(axis=0)
        if np.array_equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def nms(
    boxes: FloatArray,
    scores: FloatArray,
    iou_threshold: float,
    classes: IntArray | None = None,
) -> npt.NDArray[np.intp]:
    """Greedy NMS via an IoU matrix; indices of the kept boxes, highest score first.

    A box is suppressed by a kept higher-scoring box whose IoU with it is above
    ``iou_threshold``; with ``classes`` only boxes of the same class suppress each other.
    Equal scores rank by index. Exactly the result of the classic sequential loop.
    """
    scores = np.asarray(scores)
    order = np.argsort(-scores, kind="stable")
    if order.size == 0:
        return order.astype(np.intp)
    ranked = np.asarray(boxes)[order]
    over = iou_matrix(ranked, ranked) > iou_threshold
    if classes is not None:
        c = np.asarray(classes)[order]
        over &= c[:, None] == c[None, :]
    over &= _upper(order.size)
    keep = _greedy_fixpoint(over)
    kept: npt.NDArray[np.intp] = order[keep]
    return kept


def suppress_contained(
    boxes: FloatArray, groups: IntArray, containment: float
) -> npt.NDArray[np.bool_]:
    """Kept mask for boxes ranked best first: drop a box lying ``containment`` or more
    inside a better-ranked box of the same group (task). ``containment > 1`` keeps all."""
    n = len(boxes)
    if n == 0 or containment > 1.0:
        return np.ones(n, dtype=bool)
    inside = containment_matrix(boxes, boxes) >= containment
    g = np.asarray(groups)
    inside &= g[:, None] == g[None, :]
    inside &= _upper(n)
    dropped: npt.NDArray[np.bool_] = inside.any(axis=0)
    return ~dropped


def reading_order(boxes: FloatArray, page_width: int, cfg: LayoutConfig,
                  headings: npt.NDArray[np.bool_] | None = None,
                  furniture: npt.NDArray[np.bool_] | None = None) -> npt.NDArray[np.intp]:
    """Permutation that puts boxes (x0, y0, x1, y1) in column-aware reading order.

    Boxes wider than ``cfg.column_max_width`` of the page are full-width blocks: sorted top
    to bottom, they cut the page into bands (a narrow box belongs to the band its vertical
    centre falls in). Within a band, boxes are grouped into columns by their horizontal
    extent (neighbours may overlap by ``cfg.column_overlap`` of the page width); columns are
    read left to right, each top to bottom. Each full-width block follows the band above it.

    ``headings`` marks heading boxes. A narrow heading does not shape the columns: it joins
    the column of its band that holds most of its width, and is read there in its place
    from the top, so it stays with the block below it even when its box starts across the
    gutter. A heading that no column holds half of (a title over two columns) is read as a
    full-width block.

    ``furniture`` marks running headers, footers and page numbers: whatever their width,
    they are read in their vertical place as full-width blocks, so a running header over
    two columns does not merge them.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = b.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.intp)
    width = float(max(page_width, 1))
    wide = (b[:, 2] - b[:, 0]) > cfg.column_max_width * width
    if furniture is not None:
        wide |= np.asarray(furniture, dtype=bool)
    placed = np.zeros(n, dtype=bool) if headings is None else np.asarray(headings) & ~wide
    primary, column = _bands_and_columns(b, wide, placed, width, cfg)
    if placed.any():
        spanning = _place_headings(b, np.flatnonzero(placed), primary, column, placed)
        if spanning.size:  # read as full-width blocks: the bands change, so sweep again
            wide[spanning] = True
            placed[spanning] = False
            primary, column = _bands_and_columns(b, wide, placed, width, cfg)
            _place_headings(b, np.flatnonzero(placed), primary, column, placed)
    order: npt.NDArray[np.intp] = np.lexsort((b[:, 0], b[:, 1], column, primary)).astype(np.intp)
    return order


def _bands_and_columns(b: npt.NDArray[np.float64], wide: npt.NDArray[np.bool_],
                       placed: npt.NDArray[np.bool_], width: float, cfg: LayoutConfig
                       ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Each box's band key and column number (0 for full-width blocks and for the
    ``placed`` boxes, which ``_place_headings`` puts in a column afterwards)."""
    n = b.shape[0]
    cy = (b[:, 1] + b[:, 3]) / 2.0
    # Band of each narrow box = how many full-width blocks lie above its centre.
    wide_cy = np.sort(cy[wide])
    band = np.searchsorted(wide_cy, cy, side="right")
    # Full-width block k (top to bottom) reads after band k: key 2k + 1; band b: key 2b.
    wide_rank = np.empty(n, dtype=np.int64)
    wide_idx = np.flatnonzero(wide)
    wide_rank[wide_idx] = np.argsort(np.argsort(cy[wide_idx], kind="stable"), kind="stable")
    primary = np.where(wide, 2 * wide_rank + 1, 2 * band).astype(np.int64)

    # Columns: sweep narrow boxes by x0 within each band; a column starts where a box's x0
    # passes the running right edge of those before it. Offsetting each band by more than
    # the page width makes one global sweep restart at every band.
    column = np.zeros(n, dtype=np.int64)
    narrow = np.flatnonzero(~wide & ~placed)
    if narrow.size:
        offset = primary[narrow] * (2.0 * width + 1.0)
        x0 = b[narrow, 0] + offset
        x1 = b[narrow, 2] + offset
        sweep = np.lexsort((x0, primary[narrow]))
        x0s, x1s = x0[sweep], x1[sweep]
        reach = np.maximum.accumulate(x1s)
        starts = np.ones(sweep.size, dtype=bool)
        starts[1:] = x0s[1:] > reach[:-1] - cfg.column_overlap * width
        column[narrow[sweep]] = np.cumsum(starts)
    return primary, column


def _place_headings(b: npt.NDArray[np.float64], headings: npt.NDArray[np.intp],
                    primary: npt.NDArray[np.int64], column: npt.NDArray[np.int64],
                    placed: npt.NDArray[np.bool_]) -> npt.NDArray[np.intp]:
    """Put each heading in the column of its band that holds the most of its width (in
    place, in ``column``); returns the headings no column holds half of."""
    members = np.flatnonzero(~placed & (column > 0))
    spanning: list[int] = []
    for h in headings.tolist():  # a handful per page
        same_band = members[primary[members] == primary[h]]
        best, best_overlap = 0, 0.0
        for col in np.unique(column[same_band]).tolist():
            boxes = same_band[column[same_band] == col]
            left, right = b[boxes, 0].min(), b[boxes, 2].max()
            overlap = min(right, b[h, 2]) - max(left, b[h, 0])
            if overlap > best_overlap:
                best, best_overlap = col, overlap
        if best and best_overlap >= HEADING_SPAN * (b[h, 2] - b[h, 0]):
            column[h] = best
        elif best:
            spanning.append(h)
        else:  # a band of headings only: a column of its own
            column[h] = int(column.max()) + 1
    return np.asarray(spanning, dtype=np.intp)


def empty_detections() -> Detections:
    return Detections(
        boxes=np.zeros((0, 4), dtype=np.float32),
        scores=np.zeros(0, dtype=np.float32),
        classes=np.zeros(0, dtype=np.int32),
    )


@dataclass(frozen=True, slots=True)
class OutputPlan:
    """What both post-processing implementations derive from the config, labels and output
    shapes, after checking they fit together (``plan_outputs``)."""

    levels: int
    batch: int
    num_classes: int
    thresholds: npt.NDArray[np.float32]  # per class
    min_threshold: float
    class_task: npt.NDArray[np.int64]  # per class: index of its task (containment groups)
    centers: tuple[npt.NDArray[np.float64], ...]  # per level: (N, 2) anchor centres x, y


def plan_outputs(
    shapes: Sequence[Sequence[int]],
    page_sizes: Sequence[tuple[int, int]],
    cfg: LayoutConfig,
    labels: Sequence[str],
) -> OutputPlan:
    """Check the raw outputs' shapes against the config and labels; the shared constants.

    ``shapes``: the shape of each raw output, in manifest order (scores, then distributions).
    """
    if cfg.top_k_per_level < 1 or cfg.max_candidates < 1:
        raise ConfigError("layout.top_k_per_level and layout.max_candidates must be >= 1")
    levels = len(shapes) // 2
    if levels == 0 or len(shapes) != 2 * levels:
        raise LayoutError(f"expected score and box outputs per level, got {len(shapes)} outputs")
    if len(cfg.strides) != levels:
        raise LayoutError(
            f"layout.strides has {len(cfg.strides)} entries but the model has {levels} levels"
        )
    batch = int(shapes[0][0])
    if len(page_sizes) != batch:
        raise LayoutError(f"{len(page_sizes)} page sizes for a batch of {batch}")
    num_classes = int(shapes[0][-1])
    if num_classes != len(labels):
        raise LayoutError(f"the model has {num_classes} classes but {len(labels)} labels")

    thresholds = class_thresholds(cfg, labels)
    task_names = sorted({label_task(label, cfg) for label in labels})
    class_task = np.array([task_names.index(label_task(lb, cfg)) for lb in labels], np.int64)
    centers = []
    for level, stride in enumerate(cfg.strides):
        c = anchor_centers(cfg.input_height, cfg.input_width, stride)
        if c.shape[0] != int(shapes[level][1]):
            raise LayoutError(
                f"level {level}: {shapes[level][1]} anchors, but a "
                f"{cfg.input_height}x{cfg.input_width} input at stride {stride} has {c.shape[0]}"
            )
        centers.append(c)
    return OutputPlan(
        levels=levels,
        batch=batch,
        num_classes=num_classes,
        thresholds=thresholds,
        min_threshold=float(thresholds.min()),
        class_task=class_task,
        centers=tuple(centers),
    )


def page_detections(
    boxes: FloatArray,
    scores: FloatArray,
    classes: IntArray,
    width: int,
    cfg: LayoutConfig,
) -> Detections:
    """One page's final boxes (page pixels) in reading order, as float32/int32 arrays."""
    order = reading_order(boxes, width, cfg)
    return Detections(
        boxes=np.ascontiguousarray(np.asarray(boxes)[order], dtype=np.float32),
        scores=np.ascontiguousarray(np.asarray(scores)[order], dtype=np.float32),
        classes=np.ascontiguousarray(np.asarray(classes)[order], dtype=np.int32),
    )


def postprocess(
    raw: Sequence[npt.NDArray[np.floating]],
    page_sizes: Sequence[tuple[int, int]],
    cfg: LayoutConfig,
    labels: Sequence[str],
) -> list[Detections]:
    """Raw model outputs for a batch -> one ``Detections`` per page, in reading order.

    ``raw``: the model's outputs in manifest order, the per-level class scores (B, N, C)
    (sigmoid applied) then the per-level box distributions (B, N, 4 * bins).
    ``page_sizes``: (height, width) of each page in pixels. Boxes come back in page pixels.
    """
    arrays = [np.asarray(r) for r in raw]
    plan = plan_outputs([a.shape for a in arrays], page_sizes, cfg, labels)
    score_maps = arrays[: plan.levels]
    dist_maps = arrays[plan.levels :]
    num_classes, thresholds = plan.num_classes, plan.thresholds

    results: list[Detections] = []
    for page, (height, width) in enumerate(page_sizes):
        rows_l, centers_l, strides_l, scores_l, classes_l = [], [], [], [], []
        for level, stride in enumerate(cfg.strides):
            level_scores = score_maps[level][page]
            # Anchors with any class at or above the lowest threshold: one flat comparison
            # (a max over the short class axis costs several times more).
            hits = np.flatnonzero(level_scores >= plan.min_threshold)
            if hits.size == 0:
                continue
            idx = np.unique(hits // num_classes)
            if idx.size > cfg.top_k_per_level:
                best = level_scores[idx].max(axis=1)
                idx = np.sort(idx[np.argpartition(-best, cfg.top_k_per_level - 1)
                                  [: cfg.top_k_per_level]])
            scores = level_scores[idx]
            anchor, cls = np.nonzero(scores >= thresholds)
            if anchor.size == 0:
                continue
            rows_l.append(dist_maps[level][page][idx[anchor]])
            centers_l.append(plan.centers[level][idx[anchor]])
            strides_l.append(np.full(anchor.size, stride, dtype=np.float64))
            scores_l.append(scores[anchor, cls])
            classes_l.append(cls)
        if not rows_l:
            results.append(empty_detections())
            continue
        # One decode for all levels' candidates.
        dist = decode_distances(np.concatenate(rows_l), np.concatenate(strides_l))
        ctr = np.concatenate(centers_l)
        boxes = np.concatenate([ctr - dist[:, :2], ctr + dist[:, 2:]], axis=1)
        scores = np.concatenate(scores_l).astype(np.float32)
        classes = np.concatenate(classes_l)
        if scores.size > cfg.max_candidates:  # bounds the n x n matrices below
            best = np.argpartition(-scores, cfg.max_candidates - 1)[: cfg.max_candidates]
            boxes, scores, classes = boxes[best], scores[best], classes[best]

        keep = nms(boxes, scores, cfg.nms_iou, classes)
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        kept = suppress_contained(boxes, plan.class_task[classes], cfg.containment)
        boxes, scores, classes = boxes[kept], scores[kept], classes[kept]

        scale = np.array(
            [width / cfg.input_width, height / cfg.input_height] * 2, dtype=np.float64
        )
        boxes = boxes * scale
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0.0, float(width))
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0.0, float(height))
        solid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        results.append(page_detections(boxes[solid], scores[solid], classes[solid], width, cfg))
    return results
