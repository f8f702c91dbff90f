"""Layout post-processing in torch, on whatever device the model's outputs are on.

The algorithm of ``orchestrator.stages.postprocess`` (its docstring has the steps), computed
batch-wide with tensors so that on a GPU the raw outputs never leave the device: only the
final boxes of each page cross to the host, where the reading order (a sort of a few
dozen boxes) runs in numpy. Both implementations share ``plan_outputs`` (config checks,
per-class thresholds, anchor centres) and ``reading_order``, and one test suite checks
that they agree box for box.

Where the numpy version loops over pages, this one works on (pages x candidates) tensors
padded to the largest page's candidate count, so a batch costs a fixed handful of host
synchronisations: the candidate count, one per greedy-NMS round (usually 2-4) and the
final copy. Candidates keep the numpy version's order (level, anchor, class) and its
float64 box decoding and float32 IoU arithmetic, so equal scores rank the same way.

Usage::

    dets = postprocess(outputs, [(height, width)], cfg.layout, labels)   # tensors in
    keep = nms(boxes, scores, iou_threshold=0.5, classes=classes)         # 1-D indices
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from orchestrator.config import LayoutConfig
from orchestrator.stages.postprocess import (
    OutputPlan,
    anchor_centers,
    empty_detections,
    page_detections,
    plan_outputs,
)
from orchestrator.types import Detections

__all__ = [
    "containment_matrix",
    "greedy_fixpoint",
    "iou_matrix",
    "nms",
    "postprocess",
    "suppress_contained",
]

_EPS = 1e-9
# Pages whose (candidates x candidates) NMS matrices are built at once hold at most this
# many elements together (float32 IoU + a few boolean masks: ~0.5 GiB), so one page
# crowded with candidates does not multiply its matrices by the batch size.
_MATRIX_ELEMENTS = 1 << 26


def _area(boxes: torch.Tensor) -> torch.Tensor:
    b = boxes.to(torch.float32)
    return (b[..., 2] - b[..., 0]).clamp(min=0.0) * (b[..., 3] - b[..., 1]).clamp(min=0.0)


def _intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # float32 as in the numpy version: same rounding, so thresholds cut at the same boxes.
    a = a.to(torch.float32)
    b = b.to(torch.float32)
    w = torch.minimum(a[..., :, None, 2], b[..., None, :, 2])
    w = w - torch.maximum(a[..., :, None, 0], b[..., None, :, 0])
    w = w.clamp(min=0.0)
    h = torch.minimum(a[..., :, None, 3], b[..., None, :, 3])
    h = h - torch.maximum(a[..., :, None, 1], b[..., None, :, 1])
    h = h.clamp(min=0.0)
    return w * h


def iou_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., N, M) intersection over union of (..., N, 4) and (..., M, 4) boxes (float32)."""
    inter = _intersection(a, b)
    union = _area(a)[..., :, None] + _area(b)[..., None, :]
    union = (union - inter).clamp(min=_EPS)
    return inter / union


def containment_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(..., N, M): the share of each box of ``b``'s area that lies inside each box of ``a``."""
    return _intersection(a, b) / _area(b).clamp(min=_EPS)[..., None, :]


def _upper(n: int, device: torch.device) -> torch.Tensor:
    """(n, n) mask of i < j: "ranked above" for boxes sorted best first."""
    return torch.ones((n, n), dtype=torch.bool, device=device).triu(diagonal=1)


def greedy_fixpoint(suppresses: torch.Tensor, alive: torch.Tensor | None = None) -> torch.Tensor:
    """Kept mask of greedy suppression for (..., n, n) ``suppresses[i, j]``, i ranked above j.

    The same fixpoint as ``orchestrator.stages.postprocess._greedy_fixpoint`` (Cluster-NMS),
    for a batch of independent sets at once; ``alive`` (..., n) marks real entries (padding
    neither suppresses nor is kept). One host synchronisation per round.
    """
    n = suppresses.shape[-1]
    if alive is None:
        alive = torch.ones(suppresses.shape[:-1], dtype=torch.bool, device=suppresses.device)
    suppresses = suppresses & alive[..., :, None]
    keep = alive
    for _ in range(n + 1):
        new_keep = ~(suppresses & keep[..., :, None]).any(dim=-2) & alive
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    iou_threshold: float,
    classes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy NMS via an IoU matrix; indices of the kept boxes, highest score first.

    As ``orchestrator.stages.postprocess.nms``: equal scores rank by index; with ``classes`` only
    boxes of the same class suppress each other.
    """
    order = torch.argsort(-scores, stable=True)
    if order.numel() == 0:
        return order
    ranked = boxes[order]
    over = iou_matrix(ranked, ranked) > iou_threshold
    if classes is not None:
        c = classes[order]
        over &= c[:, None] == c[None, :]
    over &= _upper(order.numel(), boxes.device)
    return order[greedy_fixpoint(over)]


def suppress_contained(
    boxes: torch.Tensor, groups: torch.Tensor, containment: float
) -> torch.Tensor:
    """Kept mask for boxes ranked best first: drop a box lying ``containment`` or more
    inside a better-ranked box of the same group (task). ``containment > 1`` keeps all."""
    n = boxes.shape[0]
    if n == 0 or containment > 1.0:
        return torch.ones(n, dtype=torch.bool, device=boxes.device)
    inside = containment_matrix(boxes, boxes) >= containment
    inside &= groups[:, None] == groups[None, :]
    inside &= _upper(n, boxes.device)
    return ~inside.any(dim=0)


@functools.lru_cache(maxsize=32)
def _anchor_centers(height: int, width: int, stride: int, device: torch.device) -> torch.Tensor:
    return torch.tensor(anchor_centers(height, width, stride), device=device)


class _Constants:
    """The plan's numpy constants as tensors on the outputs' device."""

    def __init__(self, plan: OutputPlan, cfg: LayoutConfig, device: torch.device) -> None:
        self.thresholds = torch.tensor(plan.thresholds, device=device)
        self.class_task = torch.tensor(plan.class_task, device=device)
        self.centers = [_anchor_centers(cfg.input_height, cfg.input_width, s, device)
                        for s in cfg.strides]
        self.strides = [float(s) for s in cfg.strides]


def _select_candidates(
    scores_maps: Sequence[torch.Tensor],
    dist_maps: Sequence[torch.Tensor],
    plan: OutputPlan,
    consts: _Constants,
    cfg: LayoutConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per page: the (anchor, class) pairs over their class threshold, best first.

    Returns scores (B, K*C) sorted descending (padding -inf), the flat pair index of each,
    and per concatenated anchor slot its distribution row, centre and stride, plus the
    per-page count of real pairs.
    """
    batch = plan.batch
    scores_l, ok_l, dist_l, centers_l, strides_l = [], [], [], [], []
    for level, (s_map, d_map) in enumerate(zip(scores_maps, dist_maps, strict=True)):
        s_map = s_map.to(torch.float32)
        n = s_map.shape[1]
        best = s_map.amax(dim=2)
        k = min(cfg.top_k_per_level, n)
        if k < n:
            # The best k anchors, then back in anchor order (the numpy version's order).
            idx = torch.topk(best, k, dim=1, sorted=False).indices.sort(dim=1).values
        else:
            idx = torch.arange(n, device=s_map.device).expand(batch, n)
        anchor_ok = best.gather(1, idx) >= plan.min_threshold
        level_scores = s_map.gather(1, idx[:, :, None].expand(-1, -1, s_map.shape[2]))
        scores_l.append(level_scores)
        ok_l.append((level_scores >= consts.thresholds) & anchor_ok[:, :, None])
        dist_l.append(d_map.gather(1, idx[:, :, None].expand(-1, -1, d_map.shape[2])))
        centers_l.append(consts.centers[level][idx])
        strides_l.append(torch.full((k,), consts.strides[level], dtype=torch.float64,
                                    device=s_map.device))
    scores = torch.cat(scores_l, dim=1)
    ok = torch.cat(ok_l, dim=1)
    key = torch.where(ok, scores, torch.full_like(scores, float("-inf"))).flatten(1)
    # Stable: equal scores keep the (level, anchor, class) order, as numpy's stable argsort.
    ranked = torch.sort(key, dim=1, descending=True, stable=True)
    counts = ok.flatten(1).sum(dim=1)
    return (ranked.values, ranked.indices, torch.cat(dist_l, dim=1),
            torch.cat(centers_l, dim=1), torch.cat(strides_l), counts)


def _decode(
    dist_rows: torch.Tensor, centers: torch.Tensor, strides: torch.Tensor
) -> torch.Tensor:
    """(B, m, 4 * bins) logits at anchors ``centers`` (B, m, 2) -> (B, m, 4) boxes, float64."""
    b, m, width = dist_rows.shape
    logits = dist_rows.to(torch.float64).reshape(b, m, 4, width // 4)
    weights = torch.softmax(logits, dim=3)
    bins = torch.arange(width // 4, dtype=torch.float64, device=dist_rows.device)
    distances = (weights @ bins) * strides[:, :, None]
    return torch.cat([centers - distances[..., :2], centers + distances[..., 2:]], dim=2)


def _suppress(
    boxes: torch.Tensor,
    classes: torch.Tensor,
    groups: torch.Tensor,
    alive: torch.Tensor,
    cfg: LayoutConfig,
) -> torch.Tensor:
    """Kept mask (B, m) after class-aware greedy NMS and task-aware containment."""
    m = boxes.shape[1]
    upper = _upper(m, boxes.device)
    over = iou_matrix(boxes, boxes) > cfg.nms_iou
    over &= classes[:, :, None] == classes[:, None, :]
    over &= upper
    keep = greedy_fixpoint(over, alive)
    if cfg.containment > 1.0:
        return keep
    inside = containment_matrix(boxes, boxes) >= cfg.containment
    inside &= groups[:, :, None] == groups[:, None, :]
    inside &= upper
    inside &= keep[:, :, None] & keep[:, None, :]
    return keep & ~inside.any(dim=1)


def postprocess(
    raw: Sequence[torch.Tensor],
    page_sizes: Sequence[tuple[int, int]],
    cfg: LayoutConfig,
    labels: Sequence[str],
) -> list[Detections]:
    """Raw model outputs (tensors, any device) for a batch -> one ``Detections`` per page.

    The same contract as ``orchestrator.stages.postprocess.postprocess``: ``raw`` in manifest
    order (per-level class scores (B, N, C), then box distributions (B, N, 4 * bins)),
    ``page_sizes`` (height, width) per page; boxes come back in page pixels, in reading
    order, as numpy arrays.
    """
    plan = plan_outputs([tuple(r.shape) for r in raw], page_sizes, cfg, labels)
    device = raw[0].device
    consts = _Constants(plan, cfg, device)
    with torch.inference_mode():
        values, flat, dist_rows, centers, strides, counts = _select_candidates(
            raw[: plan.levels], raw[plan.levels :], plan, consts, cfg
        )
        m = min(int(counts.max()), cfg.max_candidates)  # host sync: the padded width
        if m == 0:
            return [empty_detections() for _ in page_sizes]
        scores, flat = values[:, :m], flat[:, :m]
        alive = torch.arange(m, device=device)[None, :] < counts.clamp(max=m)[:, None]
        slot = torch.div(flat, plan.num_classes, rounding_mode="floor")
        classes = flat - slot * plan.num_classes
        boxes = _decode(
            dist_rows.gather(1, slot[:, :, None].expand(-1, -1, dist_rows.shape[2])),
            centers.gather(1, slot[:, :, None].expand(-1, -1, 2)),
            strides[slot],
        )
        groups = consts.class_task[classes]
        chunk = max(1, _MATRIX_ELEMENTS // (m * m))
        kept = torch.cat([
            _suppress(boxes[i:i + chunk], classes[i:i + chunk], groups[i:i + chunk],
                      alive[i:i + chunk], cfg)
            for i in range(0, plan.batch, chunk)
        ])

        sizes = torch.tensor(page_sizes, dtype=torch.float64, device=device)  # (B, 2) h, w
        heights, widths = sizes[:, 0:1], sizes[:, 1:2]
        scale = torch.cat([widths / cfg.input_width, heights / cfg.input_height] * 2, dim=1)
        boxes = boxes * scale[:, None, :]
        limit = torch.cat([widths, heights] * 2, dim=1)[:, None, :]
        boxes = torch.minimum(boxes.clamp(min=0.0), limit)
        solid = (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        final = kept & solid
        # One device->host copy: page, box, score, class of every final box.
        page_ids = torch.arange(plan.batch, dtype=torch.float64, device=device)
        packed = torch.cat([
            page_ids[:, None, None].expand(-1, m, 1),
            boxes,
            scores.to(torch.float64)[..., None],
            classes.to(torch.float64)[..., None],
        ], dim=2)[final].cpu().numpy()

    page_of = packed[:, 0].astype(np.int64)
    starts = np.searchsorted(page_of, np.arange(plan.batch + 1))
    results: list[Detections] = []
    for page, (_, width) in enumerate(page_sizes):
        rows = packed[starts[page]:starts[page + 1]]
        if rows.shape[0] == 0:
            results.append(empty_detections())
            continue
        results.append(page_detections(
            rows[:, 1:5], rows[:, 5].astype(np.float32), rows[:, 6].astype(np.int64), width, cfg
        ))
    return results
