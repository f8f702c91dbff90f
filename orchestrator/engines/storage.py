"""Object storage: local paths and URIs (``s3://``, ``gs://``, ``hf://``...) behind one
interface, fsspec's.

fsspec rather than pyarrow.fs: one API for every store whose implementation is installed
(s3fs for S3, gcsfs for GCS, huggingface_hub for ``hf://``), and file objects with a
block cache, so PDFium and the Parquet reader read an object with a few ranged GETs
instead of downloading it or sending one request per small read. Credentials and
endpoint come from each implementation's standard environment (for S3 botocore's:
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``...).

Usage::

    fs, path = filesystem("s3://bucket/scans/")       # ConfigError when not installed
    with open_input("s3://bucket/scans/a.pdf") as fh:  # seekable, block-cached
        head = fh.read(16)
    write_atomic("s3://bucket/out", "x.parquet", data)  # one PUT; locally temp + rename
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError, SourceError

# A remote read fetches this much per request and keeps a few such blocks: a PDF's
# cross-reference table and the page it renders, or a Parquet footer and a row group's
# column chunk, arrive in a handful of GETs.
READ_BLOCK_BYTES = 4 * 1024 * 1024
TEMP_DIR = "_tmp"  # under a local output folder: readers skip names starting with "_"

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_uri(text: str | Path) -> bool:
    """Whether ``text`` names an object in a store (``s3://...``) rather than a local path
    (``file://`` counts as local)."""
    value = str(text)
    return bool(_URI.match(value)) and not value.startswith("file://")


def local_path(text: str | Path) -> Path:
    value = str(text)
    return Path(os.path.expanduser(value.removeprefix("file://")))


def filesystem(uri: str) -> tuple[Any, str]:
    """fsspec's filesystem for ``uri`` and the path inside it."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except ImportError as exc:  # e.g. gs:// without gcsfs
        raise ConfigError(f"cannot open {uri}: {exc}") from exc
    except ValueError as exc:  # an unknown protocol
        raise ConfigError(f"cannot open {uri}: {exc}") from exc
    return fs, path


def join(base: str, name: str) -> str:
    """``base`` (a folder path or URI) joined with a file name."""
    return f"{base.rstrip('/')}/{name}"


def open_input(uri: str) -> Any:
    """A seekable binary file object for reading ``uri``, with a block cache."""
    fs, path = filesystem(uri)
    try:
        return fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="blockcache")
    except FileNotFoundError as exc:
        raise SourceError(f"file not found: {uri}") from exc
    except OSError as exc:
        raise SourceError(f"cannot read {uri}: {exc}") from exc


def write_atomic(folder: str, name: str, data: bytes) -> None:
    """Write ``data`` as ``folder/name`` so that the name appears only with the whole
    content: in a store, one PUT (an object is never visible half written); on a local
    disk, a temporary file in ``folder/_tmp`` synced, then renamed over the name."""
    if is_uri(folder):
        fs, path = filesystem(join(folder, name))
        fs.pipe_file(path, data)
        return
    target = local_path(folder) / name
    temp_dir = local_path(folder) / TEMP_DIR
    temp_dir.mkdir(parents=True, exist_ok=True)
    temp = temp_dir / f"{name}.{uuid.uuid4().hex}"
    try:
        with temp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise


def read_bytes(uri: str) -> bytes:
    if not is_uri(uri):
        return local_path(uri).read_bytes()
    fs, path = filesystem(uri)
    data: bytes = fs.cat_file(path)
    return data


def exists(uri: str) -> bool:
    if not is_uri(uri):
        return local_path(uri).exists()
    fs, path = filesystem(uri)
    return bool(fs.exists(path))


def list_names(folder: str, suffix: str) -> list[str]:
    """Names of the files directly in ``folder`` ending with ``suffix`` (none when the
    folder does not exist), skipping names that start with ``_`` or ``.``."""
    if is_uri(folder):
        fs, path = filesystem(folder)
        try:
            entries = fs.ls(path, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        names = [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]
    else:
        base = local_path(folder)
        if not base.is_dir():
            return []
        names = [p.name for p in base.iterdir() if p.is_file()]
    return sorted(n for n in names if n.endswith(suffix) and not n.startswith(("_", ".")))


def remove_temporaries(folder: str) -> int:
    """Delete what interrupted local writes left in ``folder/_tmp``; returns files removed.
    (A store has none: its writes are single PUTs.)"""
    if is_uri(folder):
        return 0
    temp_dir = local_path(folder) / TEMP_DIR
    removed = 0
    if temp_dir.is_dir():
        for path in temp_dir.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
        with contextlib.suppress(OSError):
            temp_dir.rmdir()
    return removed
