"""The `folio` command line as a user meets it: version, usage errors, clear messages for
bad files and settings (one line on stderr, exit code 2), never a traceback."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from orchestrator import cli

REPO = Path(__file__).resolve().parents[1]
FOLIO = [sys.executable, "-m", "orchestrator.cli"]


def folio(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FOLIO, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """The single stderr line of a usage/config error (exit 2), checked for ``words``."""
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("folio: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def test_version() -> None:
    proc = folio("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"folio {metadata.version('folio-ocr')}"


@pytest.mark.parametrize("args,words", [
    (["run"], ["required", "SOURCE", "folio run --help"]),
    (["run", "x.png", "--db", "x.db", "--dpi", "high"], ["--dpi", "invalid int"]),
    (["frobnicate"], ["invalid choice", "frobnicate"]),
    (["models", "build", "--wheel"], ["--wheel", "expected one argument"]),
    (["repo", "build"], ["--target"]),
])
def test_usage_errors_are_one_line(args: list[str], words: list[str]) -> None:
    one_line_error(folio(*args), *words)


@pytest.mark.parametrize("module,command", [
    ("orchestrator.serving.serve", "serve"),
    ("orchestrator.serving.triton_repo", "repo"),
    ("orchestrator.models.export_doclayout", "models export-layout"),
])
def test_a_command_that_cannot_load_fails_loudly(
    module: str, command: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A subcommand whose module does not import is an error naming it, for any command
    (here `folio export --help`), not a CLI that silently lacks the command."""
    monkeypatch.setitem(sys.modules, module, None)  # the next import raises ImportError
    assert cli.main(["export", "--help"]) == cli.EXIT_UNEXPECTED
    err = capsys.readouterr().err
    assert f"the `folio {command}` command cannot be loaded" in err and module in err


# --- configuration --------------------------------------------------------------------


def test_config_that_is_a_folder_or_not_utf8(tmp_path: Path, corpus_dir: Path) -> None:
    page = corpus_dir / "pages" / "linn.png"
    one_line_error(folio("run", page, "--db", tmp_path / "a.db", "--config", tmp_path),
                   "is a folder")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[sources]\n# résolution\ndpi = 300\n'.encode("latin-1"))
    one_line_error(folio("run", page, "--db", tmp_path / "a.db", "--config", latin1),
                   "not UTF-8")
    assert not (tmp_path / "a.db").exists()


@pytest.mark.parametrize("toml,key", [
    ("[decode]\nthreads = 0\n", "decode.threads"),
    ("[layout]\nmax_candidates = 0\n", "layout.max_candidates"),
    ("[layout]\nthreads = -1\n", "layout.threads"),
])
def test_bad_numbers_are_rejected_before_any_page(tmp_path: Path, corpus_dir: Path,
                                                  toml: str, key: str) -> None:
    """Values no stage can run with stop the run up front (exit 2), instead of becoming
    an error row per page (or a traceback from torch)."""
    config = tmp_path / "folio.toml"
    config.write_text(toml, encoding="utf-8")
    db = tmp_path / "out.db"
    one_line_error(folio("run", corpus_dir / "pages" / "linn.png", "--db", db,
                         "--config", config), key)
    assert not db.exists()


# --- databases ------------------------------------------------------------------------


def _not_folio_files(tmp_path: Path) -> dict[str, Path]:
    files = {"random bytes": tmp_path / "random.db", "0-byte file": tmp_path / "empty.db",
             "another SQLite database": tmp_path / "other.db"}
    files["random bytes"].write_bytes(os.urandom(4096))
    files["0-byte file"].write_bytes(b"")
    with sqlite3.connect(files["another SQLite database"]) as conn:
        conn.execute("CREATE TABLE pages (x)")  # even a table called pages
    return files


def test_show_and_export_refuse_a_file_that_is_not_a_folio_database(tmp_path: Path) -> None:
    for what, path in _not_folio_files(tmp_path).items():
        before = path.read_bytes()
        shown = folio("show", path, "1", "--out", tmp_path / "page.png")
        one_line_error(shown, str(path), "is not a folio database")
        exported = folio("export", path, "--format", "jsonl", "--out", tmp_path / "x.jsonl")
        one_line_error(exported, str(path), "is not a folio database")
        assert path.read_bytes() == before, what  # looked at, never written


def test_an_unwritable_db_path_is_a_usage_error(tmp_path: Path, corpus_dir: Path) -> None:
    page = corpus_dir / "pages" / "linn.png"
    a_file = tmp_path / "a file"
    a_file.write_text("not a folder")
    one_line_error(folio("run", page, "--db", a_file / "out.db"), "is a file, not a folder")
    one_line_error(folio("run", page, "--db", tmp_path), "is a folder")


def _read_only_mount(source: Path, target: Path, command: list[str]
                     ) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with ``source`` bind-mounted read-only at ``target`` (a private mount
    namespace, as root or in a user namespace); skip where neither is allowed."""
    script = ('mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && shift 2 && '
              'exec "$@"')
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("unshare(1) is not installed: no read-only mount to test with")
    flags = ["-m"] if os.geteuid() == 0 else ["-r", "-m"]
    probe = subprocess.run([unshare, *flags, "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here: {probe.stderr.decode().strip()}")
    return subprocess.run([unshare, *flags, "--propagation", "private", "sh", "-c", script,
                           "sh", str(source), str(target), *command],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


def test_db_on_read_only_media(tmp_path: Path, corpus_dir: Path) -> None:
    """A finished database on read-only media exports (opened read-only); a run that
    would write there stops with a usage error before reading any page."""
    from orchestrator.config import SinkConfig
    from orchestrator.stages.sink import SQLiteSink
    from orchestrator.types import PageOutcome, PageRef, RecognitionResult, Region, Task

    media = tmp_path / "media"
    media.mkdir()
    db = media / "done.db"
    region = (Region(0, "text", Task.TEXT, 0.9, (1.0, 2.0, 30.0, 40.0)),
              RecognitionResult(text="read-only words"))
    with SQLiteSink(db, SinkConfig()) as sink:  # WAL mode, as every folio database
        sink.start_run({}, {}, ["/scan.png"])
        sink.write_batch([PageOutcome(PageRef("/scan.png", 1), "ok", None, 100, 200, [region])])
    assert sorted(p.name for p in media.iterdir()) == ["done.db"]  # closed cleanly
    mount = tmp_path / "mnt"
    mount.mkdir()
    out = tmp_path / "out.jsonl"
    proc = _read_only_mount(media, mount, [*FOLIO, "export", str(mount / "done.db"),
                                           "--format", "jsonl", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "read-only words" in out.read_text(encoding="utf-8")
    proc = _read_only_mount(media, mount, [*FOLIO, "run", str(corpus_dir / "pages" / "linn.png"),
                                           "--db", str(mount / "done.db")])
    one_line_error(proc, "not writable")


# --- `folio run` flags, each with its effect ---------------------------------------------


def test_run_flags_reach_the_run(tmp_path: Path, corpus_dir: Path, model_dir: Path) -> None:
    """--dpi, --device, --precision, --batch-size and --max-pixels through the CLI: stored
    in the run's config, and the page rendered at the asked resolution (one PDF page)."""
    import json
    import math

    import pypdfium2 as pdfium

    pdf = corpus_dir / "pages" / "c03-29.pdf"
    with pdfium.PdfDocument(pdf) as doc:
        width_pt, height_pt = doc[0].get_size()
    db = tmp_path / "flags.db"
    proc = folio("run", pdf, "--db", db, "--dpi", "100", "--device", "cpu",
                 "--precision", "bf16", "--batch-size", "1", "--max-pixels", "50000000",
                 "--lines-workers", "2", "--model-dir", model_dir, "--no-progress", "--json",
                 timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with sqlite3.connect(db) as conn:
        config, manifest = (json.loads(v) for v in conn.execute(
            "SELECT config, manifest FROM runs").fetchone())
        size = conn.execute("SELECT width, height FROM pages").fetchone()
    assert config["sources"]["dpi"] == 100 and config["sources"]["max_pixels"] == 50_000_000
    assert config["decode"]["device"] == "cpu" and manifest["decode_device"] == "cpu"
    assert config["layout"]["precision"] == "bf16" and config["layout"]["batch_size"] == 1
    assert config["lines"]["workers"] == 2
    assert manifest["lines"]["engine"] == "openvino" and manifest["lines"]["device"] == "cpu"
    assert size == (math.ceil(width_pt * 100 / 72), math.ceil(height_pt * 100 / 72))

    small = size[0] * size[1] - 1  # one pixel under the page: the page is refused
    proc = folio("run", pdf, "--db", tmp_path / "limit.db", "--dpi", "100",
                 "--max-pixels", str(small), "--no-progress", timeout=600)
    assert proc.returncode == 3, proc.stderr[-2000:]
    with sqlite3.connect(tmp_path / "limit.db") as conn:
        (error,) = conn.execute("SELECT error FROM pages").fetchone()
    assert f"over the limit of {small} pixels" in error


def test_run_device_gpu_without_cuda_is_a_usage_error(tmp_path: Path, corpus_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --device gpu is a valid request")
    proc = folio("run", corpus_dir / "pages" / "linn.png", "--db", tmp_path / "x.db",
                 "--device", "gpu", "--no-progress")
    one_line_error(proc, "CUDA is not available")
