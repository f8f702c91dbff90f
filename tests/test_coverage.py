"""Coverage: each text line belongs to one region; lines no region holds become blocks;
reading order places headings with their text."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.config import LayoutConfig, LinesConfig
from orchestrator.stages.coverage import (
    assign_lines,
    cover_page,
    line_blocks,
    line_cores,
    line_rows,
)
from orchestrator.stages.postprocess import reading_order
from orchestrator.stages.textlines import rotate_lines
from orchestrator.types import LayoutResult, Origin, PageLines, Region, Task


def lines_of(*boxes: tuple[float, float, float, float]) -> PageLines:
    quads = np.array([[[x0, y0], [x1, y0], [x1, y1], [x0, y1]] for x0, y0, x1, y1 in boxes],
                     np.float32).reshape(-1, 4, 2)
    return PageLines(quads, np.full(len(boxes), 0.9, np.float32))


def region(index: int, bbox: tuple[float, float, float, float], label: str = "text",
           task: Task = Task.TEXT) -> Region:
    return Region(index=index, label=label, task=task, score=0.8, bbox=bbox)


def test_a_line_goes_to_the_region_holding_most_of_it_ties_to_the_smaller() -> None:
    lines = np.array([[10, 10, 90, 20],     # inside both the letter and its letterhead
                      [10, 50, 90, 60],     # inside the letter only
                      [150, 10, 250, 20],   # 40% inside the letter: too little
                      [300, 10, 400, 20]], np.float64)  # outside every region
    regions = np.array([[0, 0, 190, 100], [5, 5, 95, 25]], np.float64)
    assert assign_lines(lines, regions, 0.5).tolist() == [1, 0, -1, -1]
    assert assign_lines(lines, regions, 0.3).tolist() == [1, 0, 0, -1]
    assert assign_lines(lines, np.zeros((0, 4)), 0.5).tolist() == [-1] * 4


def test_shares_are_measured_where_the_ink_is() -> None:
    """The detector's box is grown around the ink; a layout box hugs it."""
    line = np.array([[100, 100, 500, 140]], np.float64)  # 40 px tall, ink about 20 px
    tight = np.array([[110, 110, 490, 130]], np.float64)
    assert assign_lines(line, tight, 0.5).tolist() == [-1]  # 47% of the grown box
    assert assign_lines(line_cores(line, 0.25), tight, 0.5).tolist() == [0]


def test_lines_group_into_blocks_by_proximity_and_column() -> None:
    boxes = np.array([
        [100, 100, 400, 120], [100, 124, 380, 144], [120, 148, 400, 168],  # a paragraph
        [100, 400, 400, 420],                                             # far below it
        [600, 100, 900, 120], [600, 124, 900, 144],                       # the next column
        [920, 100, 980, 120],                                              # a label beside it
    ], np.float64)
    block = line_blocks(boxes, gap=1.2, indent=2.0)
    assert block[0] == block[1] == block[2]
    assert len({block[0], block[3], block[4]}) == 3
    assert block[4] == block[5] == block[6]  # on one row, one line height apart
    assert line_blocks(np.zeros((0, 4)), 1.2, 2.0).size == 0


def test_lines_in_a_region_read_by_rows() -> None:
    boxes = np.array([[200, 12, 300, 30], [0, 50, 100, 70], [0, 10, 100, 30]], np.float64)
    order, rows = line_rows(boxes)
    assert order.tolist() == [2, 0, 1] and rows.tolist() == [0, 0, 1]


def test_cover_page_keeps_every_line_once_and_drops_only_abandoned_text() -> None:
    lines = lines_of((110, 110, 390, 130),   # in the body
                     (110, 140, 390, 160),   # in the body
                     (110, 20, 390, 40),     # in the header, abandoned by config
                     (110, 300, 390, 320),   # in the figure
                     (110, 600, 390, 620),   # outside every box
                     (110, 630, 390, 650))   # ... the same block
    layout = LayoutResult(width=500, height=700, regions=[
        region(0, (100, 10, 400, 50), "header", Task.ABANDON),
        region(1, (100, 100, 400, 170)),
        region(2, (100, 250, 400, 400), "figure", Task.SKIP),
        region(3, (100, 450, 400, 500), "figure", Task.SKIP),  # a picture without text
    ])
    out = cover_page(layout, lines, LinesConfig(), LayoutConfig())
    assert [(r.index, r.label, r.task, r.origin) for r in out.regions] == [
        (0, "text", Task.TEXT, Origin.LAYOUT),
        (1, "figure", Task.TEXT, Origin.LAYOUT),   # holds text: read
        (2, "figure", Task.SKIP, Origin.LAYOUT),
        (3, "text", Task.TEXT, Origin.LINES),      # the lines no region holds
    ]
    assert out.line_region is not None
    assert out.line_region.tolist() == [0, 0, -1, 1, 3, 3]
    assert out.regions[3].bbox == (110.0, 600.0, 390.0, 650.0)
    skip = cover_page(layout, lines, LinesConfig(), LayoutConfig(figure_text="skip"))
    assert [r.task for r in skip.regions if r.label == "figure"] == [Task.SKIP, Task.SKIP]
    assert cover_page(layout, None, LinesConfig(), LayoutConfig()).line_region.size == 0


def test_a_heading_is_read_with_the_column_that_holds_it() -> None:
    """A right-column heading whose box starts across the gutter: the column sweep alone
    merged both columns into one and read them line by line across."""
    cfg = LayoutConfig()
    boxes = np.array([
        [100, 100, 500, 460],   # left column, top
        [100, 510, 500, 900],   # left column, bottom
        [560, 100, 1000, 460],  # right column, top
        [460, 480, 700, 500],   # heading of the right column's second block
        [560, 510, 1000, 900],  # right column, bottom
    ], np.float64)
    headings = np.array([False, False, False, True, False])
    assert reading_order(boxes, 1100, cfg).tolist() == [0, 2, 3, 1, 4]
    assert reading_order(boxes, 1100, cfg, headings=headings).tolist() == [0, 1, 2, 3, 4]


def test_a_title_over_two_columns_is_read_before_both() -> None:
    cfg = LayoutConfig()
    boxes = np.array([
        [350, 50, 750, 80],     # title centred over the gutter, narrower than the cut-off
        [100, 100, 500, 900],   # left column
        [560, 100, 1000, 900],  # right column
    ], np.float64)
    order = reading_order(boxes, 1100, cfg, headings=np.array([True, False, False]))
    assert order.tolist() == [0, 1, 2]


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_turned_lines_keep_their_corners_in_order(degrees: int) -> None:
    lines = lines_of((10, 20, 110, 40))
    turned = rotate_lines(lines, degrees, height=200, width=300)
    back = rotate_lines(turned, 360 - degrees, height=300 if degrees % 180 else 200,
                        width=200 if degrees % 180 else 300)
    assert np.allclose(back.quads, lines.quads)
    q = turned.quads[0]
    assert q[0].sum() == q.sum(axis=1).min()  # starts at the top-left corner


def test_a_running_header_over_two_columns_does_not_merge_them() -> None:
    cfg = LayoutConfig()
    boxes = np.array([
        [350, 20, 820, 40],     # running header across the left and middle columns
        [100, 100, 420, 500],   # left column, top
        [100, 520, 420, 900],   # left column, bottom
        [460, 100, 800, 480],   # middle column, top
        [460, 500, 800, 900],   # middle column, bottom
        [830, 100, 1180, 900],  # right column
    ], np.float64)
    # the header's box joins the left and middle columns into one, read across by height
    assert reading_order(boxes, 1275, cfg).tolist() == [0, 1, 3, 4, 2, 5]
    furniture = np.array([True] + [False] * 5)
    assert reading_order(boxes, 1275, cfg, furniture=furniture).tolist() == [0, 1, 2, 3, 4, 5]


def test_a_heading_inside_a_text_box_splits_it_and_is_read_in_its_place() -> None:
    """The layout model's text box runs over a heading it also found: the heading's line
    goes to the heading (the smaller box), the text box's lines above and below it become
    two pieces, and the page reads top piece, heading, bottom piece."""
    lines = lines_of((110, 110, 390, 130), (110, 140, 390, 160),    # text above
                     (110, 190, 250, 210),                          # the heading
                     (110, 240, 390, 260), (110, 270, 390, 290))    # text below
    layout = LayoutResult(width=500, height=700, regions=[
        region(0, (100, 100, 400, 300)),
        region(1, (105, 185, 255, 215), "title"),
    ])
    out = cover_page(layout, lines, LinesConfig(), LayoutConfig())
    assert [(r.label, r.bbox) for r in out.regions] == [
        ("text", (100.0, 110.0, 400.0, 160.0)),
        ("title", (105.0, 185.0, 255.0, 215.0)),
        ("text", (100.0, 240.0, 400.0, 290.0)),
    ]
    assert out.line_region is not None
    assert out.line_region.tolist() == [0, 0, 1, 2, 2]


def test_side_by_side_and_interleaved_regions_are_not_split() -> None:
    """A region is cut only where another's lines lie wholly between two of its rows:
    a caption beside a text box, and two boxes whose lines alternate, stay whole."""
    lines = lines_of((110, 110, 290, 130), (110, 170, 290, 190),    # text, left
                     (310, 140, 390, 160),                          # beside it, right
                     (102, 300, 398, 320), (102, 360, 398, 380),    # a big box
                     (120, 330, 380, 350), (120, 390, 380, 410))    # a box alternating
    layout = LayoutResult(width=500, height=700, regions=[
        region(0, (100, 100, 300, 200)),
        region(1, (305, 135, 395, 165), "figure_caption"),
        region(2, (100, 290, 400, 420)),
        region(3, (115, 325, 385, 415)),
    ])
    out = cover_page(layout, lines, LinesConfig(), LayoutConfig())
    assert len(out.regions) == 4
    assert out.line_region is not None
    held = out.line_region.tolist()
    assert held[0] == held[1] != held[2]
    assert held[3] == held[4] != held[5] == held[6]


def test_regions_are_ordered_where_their_lines_are() -> None:
    """Two boxes over one column: the first starts higher but holds only the column's last
    line (its box reaches up past the other's); the page reads the other's lines first."""
    lines = lines_of((110, 110, 390, 130), (110, 140, 390, 160), (110, 170, 390, 190),
                     (110, 200, 390, 240))
    layout = LayoutResult(width=500, height=700, regions=[
        region(0, (100, 98, 400, 245), "figure", Task.SKIP),
        region(1, (100, 100, 400, 195)),
    ])
    out = cover_page(layout, lines, LinesConfig(), LayoutConfig())
    assert [r.label for r in out.regions] == ["text", "figure"]
    assert out.line_region is not None
    assert out.line_region.tolist() == [0, 0, 0, 1]
