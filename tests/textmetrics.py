"""Text accuracy measures used by the tests."""

from __future__ import annotations

import re
from collections import Counter


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
