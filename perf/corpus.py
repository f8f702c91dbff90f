"""Where the benchmarks find the corpus of real documents (used in place, never copied in).

``FOLIO_SHARED`` (set by the Makefile, which also looks beside a clone's origin), else
``shared/`` beside the checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS_PAGES = Path(os.environ.get("FOLIO_SHARED") or REPO.parent / "shared") / "corpus" / "pages"
