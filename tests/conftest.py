"""Shared test fixtures: the corpus of real documents, the layout model artifacts, and a
local Ray for the modules that run the Ray engine."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    """A Ray on this machine with its 2 CPUs, every server bound to 127.0.0.1.

    Started by ``ray start`` in a process of its own: forking Ray's servers from this
    long-lived test process, whose earlier tests leave native thread pools behind, can
    hang the child between fork and exec."""
    # Ray then takes 127.0.0.1 as the node address and binds its servers there (see
    # orchestrator.engines.ray_engine); set before ray is imported here too.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    ray_cli = str(Path(sys.executable).with_name("ray"))
    port = _free_port()
    subprocess.run([ray_cli, "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                    "--disable-usage-stats"], check=True, capture_output=True, timeout=180,
                   env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    address = f"127.0.0.1:{port}"
    try:
        ray.init(address=address, logging_level=logging.WARNING)
        yield address
    finally:
        ray.shutdown()
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, timeout=120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
