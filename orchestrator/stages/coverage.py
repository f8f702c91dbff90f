"""Coverage: every text line on the page belongs to exactly one region.

The layout model's boxes decide structure (titles, tables, figures, columns); the page's
text lines, detected once in the decode stage, decide what is read. ``cover_page`` joins
the two:

1. each line goes to the region holding the largest share of its area (its box shrunk to
   about its ink, ``lines.core_inset``), when that share is at least ``lines.region_share``
   (equal shares: the smaller region), so a line nested in two boxes is read and stored
   once, and a word cut by a box edge is read whole;
2. a region whose task is ``skip`` (a figure) that holds lines is read as text when
   ``layout.figure_text`` is ``read``;
3. the lines no region holds are grouped into blocks (vertical proximity, a shared
   column) that become regions of their own, label ``text``, origin ``lines``;
4. ``abandon`` regions are dropped with their lines, and the rest is put in reading order.

All of it is array code over boxes; the only Python loops run over headings (a handful
per page) and over the label-propagation rounds of the block grouping.

Usage::

    layout = cover_page(layout, page.lines, cfg.lines, cfg.layout)
    rows = line_rows(boxes)    # lines in reading order, with their row numbers
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

from orchestrator.config import LayoutConfig, LinesConfig
from orchestrator.stages.postprocess import containment_matrix, reading_order
from orchestrator.types import LayoutResult, Origin, PageLines, Region, Task

COVERAGE_LABEL = "text"  # the label of a block made of lines no layout box holds
_SHARE_TIE = 1e-4  # shares this close are equal: the smaller region wins


def line_cores(line_boxes: npt.NDArray[np.floating], inset: float) -> npt.NDArray[np.float64]:
    """Line boxes shrunk by ``inset`` line heights on every side: about where the ink is."""
    b = np.array(line_boxes, dtype=np.float64).reshape(-1, 4)
    pad = inset * np.maximum(b[:, 3] - b[:, 1], 0.0)
    b[:, 0] += pad
    b[:, 1] += pad
    b[:, 2] -= pad
    b[:, 3] -= pad
    return b


def assign_lines(line_boxes: npt.NDArray[np.floating], region_boxes: npt.NDArray[np.floating],
                 min_share: float) -> npt.NDArray[np.int64]:
    """For each line (x0, y0, x1, y1), the position of the region holding the largest share
    of its area, at least ``min_share`` of it (equal shares: the smallest region); -1 when
    none does."""
    n = len(line_boxes)
    if n == 0 or len(region_boxes) == 0:
        return np.full(n, -1, dtype=np.int64)
    share = containment_matrix(region_boxes, line_boxes)  # (regions, lines)
    best = share.max(axis=0)
    r = np.asarray(region_boxes, dtype=np.float64).reshape(-1, 4)
    area = np.maximum(r[:, 2] - r[:, 0], 0.0) * np.maximum(r[:, 3] - r[:, 1], 0.0)
    tied = share >= (best - _SHARE_TIE)[None, :]
    owner = np.where(tied, area[:, None], np.inf).argmin(axis=0).astype(np.int64)
    owner[best < min_share] = -1
    return owner


def line_blocks(boxes: npt.NDArray[np.floating], gap: float, indent: float
                ) -> npt.NDArray[np.int64]:
    """Block number (0, 1, ...) of each line box: lines are in one block when a chain of
    neighbours joins them. Neighbours: one below the other with a gap of at most ``gap``
    line heights, sharing a column (x-ranges overlap, or left edges within ``indent`` line
    heights); or side by side on one row, at most ``indent`` line heights apart."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(b)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    x0, y0, x1, y1 = b.T
    height = np.maximum(y1 - y0, 1.0)
    h = np.minimum.outer(height, height)  # the smaller line's height per pair
    v_gap = np.maximum(y0[None, :] - y1[:, None], y0[:, None] - y1[None, :])
    h_gap = np.maximum(x0[None, :] - x1[:, None], x0[:, None] - x1[None, :])
    same_column = (h_gap < 0) | (np.abs(x0[:, None] - x0[None, :]) <= indent * h)
    stacked = (v_gap <= gap * h) & same_column
    same_row = (v_gap < -0.5 * h) & (h_gap <= indent * h)
    src, dst = np.nonzero(stacked | same_row)
    # Connected components: every line takes the smallest label among its neighbours,
    # then follows its label's label (pointer jumping), until nothing changes. Labels
    # only fall, and at the fixpoint neighbours agree, so each component has one label.
    label = np.arange(n)
    while True:
        new = label.copy()
        np.minimum.at(new, src, label[dst])
        new = new[new]
        if np.array_equal(new, label):
            break
        label = new
    _, block = np.unique(label, return_inverse=True)
    return block.astype(np.int64)


def line_rows(boxes: npt.NDArray[np.floating]
              ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.int64]]:
    """Lines (x0, y0, x1, y1) in reading order within one region: top to bottom, lines
    whose vertical centres lie within half a line height of each other form a row, read
    left to right. Returns the order and each ordered line's row number."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    n = len(b)
    if n == 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.int64)
    centre = (b[:, 1] + b[:, 3]) / 2
    height = np.maximum(b[:, 3] - b[:, 1], 1.0)
    by_centre = np.argsort(centre, kind="stable")
    starts = np.ones(n, dtype=bool)
    starts[1:] = np.diff(centre[by_centre]) >= 0.5 * height[by_centre[1:]]
    row_of = np.empty(n, dtype=np.int64)
    row_of[by_centre] = np.cumsum(starts) - 1
    order = np.lexsort((b[:, 0], row_of)).astype(np.intp)
    return order, row_of[order]


def _coverage_regions(lines: PageLines, loose: npt.NDArray[np.intp], cfg: LinesConfig
                      ) -> tuple[list[Region], npt.NDArray[np.int64]]:
    """Regions made of the lines ``loose`` (indices into ``lines``), and each loose
    line's block number."""
    boxes = lines.boxes[loose]
    block = line_blocks(boxes, cfg.block_gap, cfg.block_indent)
    regions: list[Region] = []
    for k in range(int(block.max()) + 1 if block.size else 0):
        members = block == k
        mb = boxes[members]
        regions.append(Region(
            index=-1, label=COVERAGE_LABEL, task=Task.TEXT,
            score=float(lines.scores[loose][members].mean()),
            bbox=(float(mb[:, 0].min()), float(mb[:, 1].min()),
                  float(mb[:, 2].max()), float(mb[:, 3].max())),
            origin=Origin.LINES,
        ))
    return regions, block


def cover_page(layout: LayoutResult, lines: PageLines | None, cfg: LinesConfig,
               layout_cfg: LayoutConfig) -> LayoutResult:
    """The page's final regions: lines assigned, blocks added for the lines no region
    holds, ``abandon`` regions dropped, reading order; ``line_region`` per line."""
    regions = list(layout.regions)
    n_lines = 0 if lines is None else len(lines)
    owner = np.full(n_lines, -1, dtype=np.int64)
    if lines is not None and n_lines and regions:
        region_boxes = np.array([r.bbox for r in regions], dtype=np.float64)
        owner = assign_lines(line_cores(lines.boxes, cfg.core_inset), region_boxes,
                             cfg.region_share)
    holds = np.bincount(owner[owner >= 0], minlength=len(regions)) if regions else np.zeros(0)
    if layout_cfg.figure_text == "read":
        regions = [dataclasses.replace(r, task=Task.TEXT)
                   if r.task is Task.SKIP and holds[i] else r for i, r in enumerate(regions)]
    if lines is not None:
        loose = np.flatnonzero(owner < 0)
        if loose.size:
            blocks, block = _coverage_regions(lines, loose, cfg)
            owner[loose] = len(regions) + block
            regions += blocks
    keep = np.array([r.task is not Task.ABANDON for r in regions], dtype=bool)
    kept = np.flatnonzero(keep)
    boxes = np.array([regions[i].bbox for i in kept], dtype=np.float64).reshape(-1, 4)
    headings = np.array([regions[i].label in layout_cfg.heading_labels for i in kept], bool)
    furniture = np.array([regions[i].label in layout_cfg.furniture_labels for i in kept], bool)
    order = kept[reading_order(boxes, layout.width, layout_cfg, headings=headings,
                               furniture=furniture)]
    new_index = np.full(len(regions), -1, dtype=np.int64)
    new_index[order] = np.arange(len(order))
    final = [dataclasses.replace(regions[i], index=k) for k, i in enumerate(order)]
    line_region = np.where(owner >= 0, new_index[np.maximum(owner, 0)], -1).astype(np.int32)
    return LayoutResult(width=layout.width, height=layout.height, regions=final,
                        layout_s=layout.layout_s, lines=lines, line_region=line_region)
