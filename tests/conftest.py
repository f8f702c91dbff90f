"""Shared test fixtures: the corpus of real documents and the layout model artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# shared/ (the corpus) sits beside the checkout; the Makefile also finds it beside the
# clone's origin and passes it in FOLIO_SHARED.
CORPUS = Path(os.environ.get("FOLIO_SHARED") or REPO_ROOT.parent / "shared") / "corpus"
MODEL_DIR = REPO_ROOT / "build" / "models"
# folio's cache is the checkout's build/ (as under make), so default settings find the
# artifacts `make models` built, and servers and logs stay in the checkout.
os.environ.setdefault("FOLIO_CACHE_DIR", str(REPO_ROOT / "build"))


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The real documents beside the checkout (used in place, never copied in)."""
    assert (CORPUS / "pages").is_dir(), f"corpus not found at {CORPUS}"
    return CORPUS


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """Layout artifacts built by `make models` (make test depends on it)."""
    assert (MODEL_DIR / "manifest.json").is_file(), "run `make models` first"
    return MODEL_DIR
