"""Markdown from stored regions: what a reader of the result sees.

Regions come in reading order. Headings become ``## `` lines; a text region's lines are
joined into one paragraph (a word broken by an end-of-line hyphen is made whole again),
and lines that start with a bullet or a number become list items. Tables and formulas
read by a VLM are kept as it wrote them (HTML, LaTeX in ``$$``); read by rapidocr they
are plain text and say so. Figures are a placeholder, or a link to a crop written beside
the Markdown. Page furniture (headers, footers, page numbers) is stored like everything
else but left out here unless asked for.

Usage::

    md = page_markdown(regions)                               # one page
    md = page_markdown(regions, include_furniture=True,
                       figure_link=lambda region: f"figures/p1-{region.index}.png")
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from orchestrator.config import DEFAULT_FURNITURE_LABELS, DEFAULT_HEADING_LABELS
from orchestrator.types import RecognitionResult, Region, Task, TextFormat

FURNITURE_LABELS = frozenset(DEFAULT_FURNITURE_LABELS)
HEADING_LABELS = frozenset(DEFAULT_HEADING_LABELS)

# A list item: a bullet glyph; a number of one or two digits with "." or ")" (so a year,
# a street number or an area code at a line start is not taken for one); a letter or
# number in parentheses, or a letter with ")".
_BULLET = re.compile(r"^\s*([•·▪‣◦●○■□◆◇➢➤►\-–*])\s+(\S.*)$")
_NUMBERED = re.compile(r"^\s*([0-9]{1,2})[.)]\s+(\S.*)$")
_LETTERED = re.compile(r"^\s*(\([a-zA-Z0-9]{1,2}\)|[a-zA-Z]\))\s+(\S.*)$")
# A word broken at the line end: letters, a hyphen, then a lower-case continuation.
_HYPHEN_END = re.compile(r"(\w)[-\u00ad]$")


def _formula(text: str) -> str:
    body = text.strip()
    if body.startswith("$$") or body.startswith("\\[") or body.startswith("\\begin{"):
        return body
    if body.startswith("$") and body.endswith("$") and len(body) > 1:
        body = body.strip("$").strip()
    return f"$$\n{body}\n$$"


def join_lines(lines: Sequence[str]) -> str:
    """Lines of one paragraph as one line of text: joined by spaces, and a word hyphenated
    across a line end joined without its hyphen (when the next line goes on in lower case)."""
    out = ""
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if out and _HYPHEN_END.search(out) and line[:1].islower():
            out = out[:-1] + line
        elif out:
            out += " " + line
        else:
            out = line
    return out


def paragraphs(text: str) -> list[str]:
    """A text region's Markdown blocks: its lines joined into a paragraph, list items
    (bullet or numbered lines, with the lines that continue them) as a list."""
    blocks: list[str] = []
    para: list[str] = []
    items: list[tuple[str, list[str]]] = []  # (marker, lines)

    def flush_para() -> None:
        if para:
            blocks.append(join_lines(para))
            para.clear()

    def flush_items() -> None:
        if items:
            blocks.append("\n".join(f"{marker} {join_lines(body)}" for marker, body in items))
            items.clear()

    for line in text.splitlines():
        if not line.strip():
            flush_para()
            flush_items()
            continue
        bullet, numbered, lettered = (_BULLET.match(line), _NUMBERED.match(line),
                                      _LETTERED.match(line))
        if bullet or numbered or lettered:
            flush_para()
            if bullet:
                items.append(("-", [bullet.group(2)]))
            elif numbered:
                items.append((numbered.group(1) + ".", [numbered.group(2)]))
            else:
                assert lettered is not None  # Markdown has no lettered lists: keep the mark
                items.append(("-", [lettered.group(1) + " " + lettered.group(2)]))
        elif items:
            items[-1][1].append(line)
        else:
            para.append(line)
    flush_para()
    flush_items()
    return blocks


def _plain_block(kind: str, text: str) -> str:
    """A table or formula read as plain text: its rows as they were read, marked so."""
    return f"<!-- {kind} region, read as plain text -->\n```text\n{text.strip()}\n```"


def page_markdown(
    regions: Sequence[tuple[Region, RecognitionResult | None]],
    *,
    include_furniture: bool = False,
    figure_link: Callable[[Region], str | None] | None = None,
) -> str:
    """The page's regions, in reading order, as Markdown.

    ``figure_link``: the relative path of a figure's crop (None: no crop, a placeholder
    without a link is written instead).
    """
    blocks: list[str] = []
    for region, result in sorted(regions, key=lambda item: item[0].index):
        if region.label in FURNITURE_LABELS and not include_furniture:
            continue
        task = Task(region.task)
        if task is Task.ABANDON:
            continue
        text = ((result.text if result is not None else None) or "").strip()
        if region.label == "figure" or task is Task.SKIP:
            link = figure_link(region) if figure_link is not None else None
            blocks.append(f"![{region.label}]({link})" if link else f"*[{region.label}]*")
            if text:
                blocks.extend(paragraphs(text))
            continue
        if not text:
            continue
        # Read line by line (rapidocr): a table's or formula's structure is not in the text.
        by_lines = result is not None and result.text_format is TextFormat.PLAIN and any(
            line.text is not None for line in result.lines)
        if task is Task.FORMULA:
            blocks.append(_plain_block("formula", text) if by_lines else _formula(text))
        elif task is Task.TABLE:
            blocks.append(_plain_block("table", text) if by_lines else text)
        elif region.label in HEADING_LABELS:
            blocks.append("## " + " ".join(text.split()))
        else:
            blocks.extend(paragraphs(text))
    return "\n\n".join(blocks) + ("\n" if blocks else "")
