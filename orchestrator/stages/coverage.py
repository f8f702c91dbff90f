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
4. a region whose lines are interrupted by another region's lines (a heading inside a text
   box, a box nested in a larger one) is split there, so each piece is read in its place;
5. ``abandon`` regions are dropped with their lines, and the rest is put in reading order,
   each region placed by where its lines are (the layout box where it holds none).

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


def interruptions(line_boxes: npt.NDArray[np.floating], owner: npt.NDArray[np.int64],
                  region_boxes: npt.NDArray[np.floating]) -> npt.NDArray[np.int64]:
    """Each line's piece of its region: regions are cut where another region's lines lie
    between two of their rows. Region S interrupts region R when S's lines are mostly
    within R's horizontal extent and lie, all of them, between R's lines (some of R's above,
    some below, none level with S's). Returns, per line, 0 for the top piece of its region
    and k for the piece below the k-th cut (-1 where ``owner`` is -1)."""
    b = np.asarray(line_boxes, dtype=np.float64).reshape(-1, 4)
    piece = np.where(owner >= 0, 0, -1).astype(np.int64)
    n_regions = len(region_boxes)
    if n_regions < 2 or not (owner >= 0).any():
        return piece
    rb = np.asarray(region_boxes, dtype=np.float64).reshape(-1, 4)
    cy = (b[:, 1] + b[:, 3]) / 2.0
    # Each region's lines: vertical extent of their centres and horizontal extent.
    top, bottom = _extent(cy, cy, owner, n_regions)
    left, right = _extent(b[:, 0], b[:, 2], owner, n_regions)
    has_lines = np.isfinite(top)
    # S within R horizontally: at least half of S's lines' width inside R's box.
    overlap = (np.minimum(right[None, :], rb[:, 2:3]) - np.maximum(left[None, :], rb[:, 0:1]))
    within = overlap >= 0.5 * np.maximum(right - left, 1.0)[None, :]  # (R, S)
    candidates = within & has_lines[None, :] & has_lines[:, None]
    candidates &= (top[None, :] > top[:, None]) & (bottom[None, :] < bottom[:, None])
    np.fill_diagonal(candidates, False)
    for r in np.flatnonzero(candidates.any(axis=1)).tolist():  # a few regions per page
        mine = np.flatnonzero(owner == r)
        cuts = [float(top[s]) for s in np.flatnonzero(candidates[r]).tolist()
                if not ((cy[mine] >= top[s]) & (cy[mine] <= bottom[s])).any()]
        if cuts:
            piece[mine] = np.searchsorted(np.unique(cuts), cy[mine])
    return piece


def _split_regions(regions: list[Region], owner: npt.NDArray[np.int64],
                   piece: npt.NDArray[np.int64], line_boxes: npt.NDArray[np.floating]
                   ) -> tuple[list[Region], npt.NDArray[np.int64]]:
    """``regions`` with each cut region replaced by its pieces (same label and task, the
    region's horizontal extent, its lines' vertical extent); ``owner`` renumbered."""
    cut = np.zeros(len(regions), dtype=bool)
    cut[owner[piece > 0]] = True
    if not cut.any():
        return regions, owner
    b = np.asarray(line_boxes, dtype=np.float64).reshape(-1, 4)
    out: list[Region] = []
    new_owner = owner.copy()
    for i, region in enumerate(regions):
        if not cut[i]:
            new_owner[owner == i] = len(out)
            out.append(region)
            continue
        for k in np.unique(piece[owner == i]).tolist():
            members = (owner == i) & (piece == k)
            new_owner[members] = len(out)
            out.append(dataclasses.replace(
                region, polygon=None,
                bbox=(region.bbox[0], float(b[members, 1].min()),
                      region.bbox[2], float(b[members, 3].max()))))
    return out, new_owner


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
    if lines is not None and n_lines:
        region_boxes = np.array([r.bbox for r in regions], dtype=np.float64).reshape(-1, 4)
        piece = interruptions(lines.boxes, owner, region_boxes)
        regions, owner = _split_regions(regions, owner, piece, lines.boxes)
    keep = np.array([r.task is not Task.ABANDON for r in regions], dtype=bool)
    kept = np.flatnonzero(keep)
    boxes = _ordering_boxes(regions, owner, None if lines is None else lines.boxes)[kept]
    headings = np.array([regions[i].label in layout_cfg.heading_labels for i in kept], bool)
    furniture = np.array([regions[i].label in layout_cfg.furniture_labels for i in kept], bool)
    order = kept[reading_order(boxes, layout.width, layout_cfg, headings=headings,
                               furniture=furniture)]
    new_index = np.full(len(regions), -1, dtype=np.int64)
    new_index[order] = np.arange(len(order))
    final = [dataclasses.replace(regions[i], index=k) for k, i in enumerate(order)]
    line_region = np.where(owner >= 0, new_index[np.maximum(owner, 0)], -1).astype(np.int32)
    return LayoutResult(width=layout.width, height=layout.height, regions=final,
                        layout_s=layout.layout_s, lines=lines, line_region=line_region,
                        page_pixels=layout.page_pixels)


def _ordering_boxes(regions: list[Region], owner: npt.NDArray[np.int64],
                    line_boxes: npt.NDArray[np.floating] | None) -> npt.NDArray[np.float64]:
    """The boxes reading order sorts: a region's horizontal extent, and vertically where its
    lines are (a layout box often reaches above or below the text it holds, past a
    neighbour's); the layout box of a region without lines."""
    boxes = np.array([r.bbox for r in regions], dtype=np.float64).reshape(-1, 4)
    if line_boxes is None or not (owner >= 0).any():
        return boxes
    b = np.asarray(line_boxes, dtype=np.float64).reshape(-1, 4)
    top, bottom = _extent(b[:, 1], b[:, 3], owner, len(regions))
    has = np.isfinite(top)
    boxes[has, 1] = top[has]
    boxes[has, 3] = bottom[has]
    return boxes


def _extent(low: npt.NDArray[np.float64], high: npt.NDArray[np.float64],
            owner: npt.NDArray[np.int64], n_regions: int
            ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Per region, the least ``low`` and the greatest ``high`` over the lines it holds
    (``owner``; -1: none); inf and -inf for a region without lines."""
    held = owner >= 0
    least = np.full(n_regions, np.inf)
    greatest = np.full(n_regions, -np.inf)
    np.minimum.at(least, owner[held], low[held])
    np.maximum.at(greatest, owner[held], high[held])
    return least, greatest
