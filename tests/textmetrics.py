"""Text accuracy measures used by the tests and perf/bench_accuracy.py, and the truth
they are measured against."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any


def word_f1(found: str, expected: str) -> float:
    """F1 over the multisets of lower-case words."""
    a = Counter(re.findall(r"\w+", found.lower()))
    b = Counter(re.findall(r"\w+", expected.lower()))
    common = sum((a & b).values())
    if not common:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(b.values())
    return 2 * precision * recall / (precision + recall)


def edit_distance(found: str, expected: str) -> float:
    """Levenshtein distance between the whitespace-normalised texts, over the longer one's
    length: 0 is identical, 1 nothing in common."""
    from rapidfuzz.distance import Levenshtein

    a, b = " ".join(found.split()), " ".join(expected.split())
    return float(Levenshtein.normalized_distance(a, b))


def column_order(page: Any) -> str:
    """The text layer's lines (as pdfium splits them) read column by column: the lines
    wider than half the page above every narrower line first (the running header), then
    the columns left to right (intervals covered by the narrower lines' horizontal extents),
    each top to bottom. The rest (lines in no column or set vertically: the printer's slug
    in the margin) stay last, as in the stream."""
    import pypdfium2.raw as pdfium_c

    textpage = page.get_textpage()
    height = page.get_height()
    width = page.get_width()
    lines: list[tuple[float, float, float, str]] = []  # x0, x1, top, text
    vertical: list[str] = []
    chars: list[str] = []
    x0 = x1 = top = bottom = 0.0
    n = textpage.count_chars()
    for k in range(n + 1):  # one past the end: the last line's end
        ch = chr(pdfium_c.FPDFText_GetUnicode(textpage.raw, k)) if k < n else "\n"
        if ch in "\r\n":
            text = "".join(chars).strip()
            if text and bottom - top > x1 - x0:
                vertical.append(text)
            elif text:
                lines.append((x0, x1, top, text))
            chars = []
            continue
        if ch.strip():
            left, lower, right, upper = textpage.get_charbox(k)
            if not "".join(chars).strip():
                x0, x1, top, bottom = left, right, height - upper, height - lower
            x0, x1 = min(x0, left), max(x1, right)
            top, bottom = min(top, height - upper), max(bottom, height - lower)
        chars.append(ch)
    wide = [line for line in lines if line[1] - line[0] > width / 2]
    narrow = [line for line in lines if line[1] - line[0] <= width / 2]
    columns: list[list[float]] = []
    for a, b, _, _ in sorted(narrow):
        if columns and a <= columns[-1][1]:
            columns[-1][1] = max(columns[-1][1], b)
        else:
            columns.append([a, b])
    first_narrow = min((line[2] for line in narrow), default=height)

    def key(line: tuple[float, float, float, str]) -> tuple[int, int, float]:
        if line in wide and line[2] < first_narrow:
            return (0, 0, line[2])
        column = next((i for i, (a, b) in enumerate(columns) if a <= line[0] <= b), None)
        return (1, column, line[2]) if column is not None else (2, 0, line[2])

    return "\n".join([line[3] for line in sorted(lines, key=key)] + vertical)
