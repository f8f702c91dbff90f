"""The GPU compose file as shipped: local-only binds unless told otherwise, every image
pinned to the versions folio's artifacts and flags were checked against, and vLLM's flags
read from the one launch script in deploy/vllm.

No Docker here: the file is parsed as YAML and compose's ``${VAR:-default}``
interpolation is applied by hand (the subset the file uses).
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
_VAR = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}`` / ``${VAR:-default}`` substitution, applied to every string."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})
    return data


def test_every_port_binds_to_localhost_unless_told_otherwise() -> None:
    services = compose()["services"]
    ports = [p for s in services.values() for p in s.get("ports", [])]
    assert len(ports) == 4
    assert all(p.startswith("127.0.0.1:") for p in ports), ports
    opened = compose({"FOLIO_BIND_ADDRESS": "0.0.0.0"})["services"]
    assert all(p.startswith("0.0.0.0:") for s in opened.values() for p in s["ports"])
    # the raw file: no port without an address in front
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    for service in raw.values():
        for port in service.get("ports", []):
            assert port.startswith("${FOLIO_BIND_ADDRESS:-127.0.0.1}:"), port


def _pinned(image: str) -> bool:
    name, _, tag = image.rpartition(":")
    return bool(name) and "/" not in tag and tag not in ("", "latest") and any(
        c.isdigit() for c in tag)


def test_every_image_is_pinned() -> None:
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    images = [s["image"] for s in raw.values()]
    images += [s["build"]["args"]["TRITON_IMAGE"] for s in raw.values() if "build" in s]
    assert len(images) == 3
    for image in images:
        assert "$" not in image, f"{image}: an environment variable could float it"
        assert _pinned(image), image
    dockerfile = (DEPLOY / "Dockerfile.triton").read_text()
    default = re.search(r"^ARG TRITON_IMAGE=(\S+)$", dockerfile, re.M)
    assert default and default.group(1) == raw["triton"]["build"]["args"]["TRITON_IMAGE"]


def test_the_backends_run_the_versions_folio_writes_for() -> None:
    """The DALI put into Triton's DALI backend is the release folio serialises model.dali
    with; the vLLM image is the release the launch flags are checked against."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    dali = next(d for d in project["dependencies"] if d.startswith("nvidia-dali"))
    dali_version = dali.split("==")[1]
    raw = yaml.safe_load(COMPOSE.read_text())["services"]
    package = raw["triton"]["build"]["args"]["DALI_PACKAGE"]
    assert re.fullmatch(r"nvidia-dali-cuda1\d0==" + re.escape(dali_version), package), package
    setup = (REPO / "tests" / "vllm" / "setup_venv.sh").read_text()
    vllm_version = re.search(r'^VLLM_VERSION="([\d.]+)"$', setup, re.M)
    assert vllm_version is not None
    assert raw["vllm"]["image"] == f"vllm/vllm-openai:v{vllm_version.group(1)}"


def test_vllm_flags_come_from_the_one_launch_script() -> None:
    service = compose()["services"]["vllm"]
    assert service["entrypoint"] == ["bash", "/opt/folio/vllm/serve_shared_gpu.sh"]
    assert "./vllm:/opt/folio/vllm:ro" in service["volumes"]
    assert "command" not in service  # no second copy of the flags
    assert not any("--" in str(v) for v in service["environment"].values())
    assert service["environment"]["VLLM_HOST"] == "0.0.0.0"  # inside the container only


@pytest.mark.parametrize("script", ["serve_shared_gpu.sh", "serve_dedicated_gpu.sh"])
def test_launch_scripts_listen_on_localhost_by_default(script: str) -> None:
    """On a bare host the scripts listen on 127.0.0.1 unless VLLM_HOST says otherwise."""
    source = (DEPLOY / "vllm" / script).read_text()
    source = source.replace('exec vllm serve "$MODEL" "${args[@]}" "$@"',
                            'printf "%s\\n" "${args[@]}"')

    def flags(env: dict[str, str]) -> list[str]:
        done = subprocess.run(["bash", "-c", source], capture_output=True, text=True,
                              check=True, env={"PATH": "/usr/bin:/bin", **env})
        return done.stdout.splitlines()

    default = flags({})
    assert default[default.index("--host") + 1] == "127.0.0.1"
    told = flags({"VLLM_HOST": "0.0.0.0"})
    assert told[told.index("--host") + 1] == "0.0.0.0"
