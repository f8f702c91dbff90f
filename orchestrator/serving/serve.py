"""Run the Triton server that ships inside the ``nvidia-pytriton`` wheel on a model repository.

The wheel carries a real ``tritonserver`` (2.51.0) with the python backend and python-backend
stubs for several Python versions. ``prepare_server_home`` copies it to the cache's
``tritonserver/`` (``orchestrator.paths``) once and puts this interpreter's stub into
``backends/python``; ``start_server`` runs it on 127.0.0.1 with the venv's ``bin`` first on
PATH, so the stub's embedded Python imports the installed ``orchestrator`` and
``dali_pipelines`` packages.

Usage::

    with start_server(Path("build/model_repository/cpu"), grpc_port=8001) as server:
        print(server.grpc_url)          # "127.0.0.1:8001"

    folio serve --target cpu                              # build the cpu repository, serve it
    folio serve --model-repository DIR --grpc-port 9001   # serve an existing repository
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from orchestrator.errors import ConfigError, LayoutServerUnavailable
from orchestrator.paths import cache_dir

log = logging.getLogger(__name__)

DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
DEFAULT_HOST = "127.0.0.1"
DEFAULT_READY_TIMEOUT_S = 180.0
DEFAULT_STOP_TIMEOUT_S = 30.0
# The python backend's shared-memory arena per model instance: one batch of 8 pages is
# 8 x 3 x 800 x 608 x 4 B = 47 MB of model input, so start at 64 MiB and grow by 64 MiB.
SHM_DEFAULT_BYTES = 64 * 1024 * 1024
SHM_GROWTH_BYTES = 64 * 1024 * 1024
_HOME_MARKER = ".folio-server-home"


@dataclass(frozen=True, slots=True)
class ServerPorts:
    """The three ports the server listens on, all on ``host``.

    Usage::

        ServerPorts()                                   # 8000 / 8001 / 8002
        ServerPorts(http=9000, grpc=9001, metrics=9002)
        ServerPorts.free()                              # three free ports (tests)
    """

    http: int = DEFAULT_HTTP_PORT
    grpc: int = DEFAULT_GRPC_PORT
    metrics: int = DEFAULT_METRICS_PORT
    host: str = DEFAULT_HOST

    @classmethod
    def free(cls, host: str = DEFAULT_HOST) -> ServerPorts:
        socks = []
        try:
            for _ in range(3):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((host, 0))
                socks.append(s)
            http, grpc, metrics = (s.getsockname()[1] for s in socks)
        finally:
            for s in socks:
                s.close()
        return cls(http=http, grpc=grpc, metrics=metrics, host=host)


def _pytriton_dir() -> Path:
    try:
        import pytriton
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError("nvidia-pytriton is not installed: pip install nvidia-pytriton") from exc
    return Path(pytriton.__file__).resolve().parent


def _libs_dir() -> Path:
    return _pytriton_dir().parent / "nvidia_pytriton.libs"


def default_server_home() -> Path:
    """The server's home in the cache (a copy of the wheel's ``tritonserver`` folder)."""
    return cache_dir() / "tritonserver"


def default_log_path(ports: ServerPorts) -> Path:
    return cache_dir() / "logs" / f"tritonserver-{ports.grpc}.log"


def prepare_server_home(dest: Path | None = None) -> Path:
    """Copy the wheel's ``tritonserver`` folder to ``dest`` with this Python's stub in place.

    Idempotent; the copy is made beside ``dest`` and renamed in, so concurrent callers
    never see half a folder.
    """
    dest = dest or default_server_home()
    marker = dest / _HOME_MARKER
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stamp = f"{_pytriton_dir()} {version}"
    if marker.is_file() and marker.read_text() == stamp:
        return dest
    source = _pytriton_dir() / "tritonserver"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ConfigError(f"nvidia-pytriton has no python-backend stub for Python {version}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tritonserver-", dir=dest.parent))
    try:
        staged = tmp / "home"
        shutil.copytree(source, staged, ignore=shutil.ignore_patterns("python_backend_stubs"))
        shutil.copy2(stub, staged / "backends" / "python" / "triton_python_backend_stub")
        (staged / _HOME_MARKER).write_text(stamp)
        if dest.exists():  # stale: move it aside (a running server keeps its open files)
            with contextlib.suppress(OSError):
                dest.rename(tmp / "stale")
        with contextlib.suppress(OSError):  # another process won the race: use theirs
            staged.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def server_environment(home: Path) -> dict[str, str]:
    """Environment for ``tritonserver``: bundled libs + this Python's lib dir, venv bin first."""
    env = dict(os.environ)
    lib_dirs = [str(_libs_dir())]
    py_lib = sysconfig.get_config_var("LIBDIR")
    if py_lib:
        lib_dirs.append(str(py_lib))
    if env.get("LD_LIBRARY_PATH"):
        lib_dirs.append(env["LD_LIBRARY_PATH"])
    env["LD_LIBRARY_PATH"] = os.pathsep.join(lib_dirs)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, env.get("PATH", "")])
    # The python models import the orchestrator package this process runs (the installed
    # wheel, or a checkout), whichever folder the server starts in.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    # One OpenMP/MKL pool per stub unless the caller says otherwise.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def shm_prefix(ports: ServerPorts) -> str:
    """This server's python-backend shared-memory name prefix (/dev/shm/<prefix>*).

    Unique per server, so the regions a killed server leaves behind can be found and
    removed (``TritonServerProcess.kill``) without touching another server's.
    """
    return f"folio_triton_{os.getpid()}_{ports.grpc}_{uuid.uuid4().hex[:8]}_"


def server_command(
    home: Path,
    model_repository: Path,
    ports: ServerPorts,
    *,
    shm_region_prefix: str | None = None,
    log_verbose: int = 0,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``tritonserver`` command line for ``model_repository``."""
    prefix = shm_region_prefix or shm_prefix(ports)
    return [
        str(home / "bin" / "tritonserver"),
        f"--model-repository={model_repository}",
        f"--backend-directory={home / 'backends'}",
        f"--cache-directory={home / 'caches'}",
        f"--http-address={ports.host}",
        f"--grpc-address={ports.host}",
        f"--metrics-address={ports.host}",
        f"--http-port={ports.http}",
        f"--grpc-port={ports.grpc}",
        f"--metrics-port={ports.metrics}",
        "--allow-gpu-metrics=false",
        "--model-control-mode=explicit",
        "--load-model=*",
        "--strict-readiness=true",
        "--exit-on-error=true",
        f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
        f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
        f"--backend-config=python,shm-region-prefix-name={prefix}",
        f"--log-verbose={log_verbose}",
        *extra_args,
    ]


class TritonServerProcess:
    """A running ``tritonserver``; stop it with ``stop()`` or by leaving the ``with`` block."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        ports: ServerPorts,
        model_repository: Path,
        log_path: Path,
        command: list[str],
        env: dict[str, str],
    ) -> None:
        self.process = process
        self.ports = ports
        self.model_repository = model_repository
        self.log_path = log_path
        self.command = command
        self._env = env

    @property
    def grpc_url(self) -> str:
        return f"{self.ports.host}:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://{self.ports.host}:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.ports.host}:{self.ports.metrics}/metrics"

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_running(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def is_ready(self) -> bool:
        """HTTP ``/v2/health/ready``: the server is up and every loaded model is ready."""
        try:
            with urllib.request.urlopen(f"{self.http_url}/v2/health/ready", timeout=2.0) as r:
                return int(r.status) == 200
        except (OSError, ValueError):  # refused, reset, 4xx/5xx (HTTPError is an OSError)
            return False

    def wait_ready(self, timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Block until the server and all its models are ready; raise if it dies or times out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.is_running():
                raise LayoutServerUnavailable(
                    f"tritonserver exited with code {self.process.returncode} while starting; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self.is_ready():
                return
            time.sleep(0.25)
        raise LayoutServerUnavailable(
            f"tritonserver not ready after {timeout_s:.0f} s; log {self.log_path}:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout_s: float = DEFAULT_STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait for a clean shutdown, SIGKILL the group after ``timeout_s``."""
        if self.is_running():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver pid %d ignored SIGTERM for %.0f s: killing",
                            self.pid, timeout_s)
                self.kill()
        self._reap_group()
        return int(self.process.returncode if self.process.returncode is not None else -9)

    def kill(self) -> None:
        """SIGKILL the server and its python-backend stubs (its own process group)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self._reap_group()

    def _reap_group(self) -> None:
        # Stubs exit on their own once the server is gone; make sure none lingers, and
        # remove the shared-memory regions a killed server leaves in /dev/shm.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        prefix = _shm_prefix_of(self.command)
        if prefix:
            for region in Path("/dev/shm").glob(f"{prefix}*"):
                region.unlink(missing_ok=True)

    def restart(self, ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S) -> None:
        """Start the same command again (after ``kill()`` or ``stop()``) on the same ports."""
        if self.is_running():
            raise RuntimeError("server is still running")
        self.process = _spawn(self.command, self._env, self.log_path)
        self.wait_ready(ready_timeout_s)

    def __enter__(self) -> TritonServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def _shm_prefix_of(command: Sequence[str]) -> str | None:
    flag = "--backend-config=python,shm-region-prefix-name="
    return next((arg[len(flag):] for arg in command if arg.startswith(flag)), None)


def _with_parent_death_signal(command: list[str]) -> list[str]:
    """``command`` run so that it gets SIGTERM when the process that started it dies (Linux
    PR_SET_PDEATHSIG, through util-linux's ``setpriv``), so a killed test run or CLI never
    leaves a server behind holding its ports. ``setpriv`` rather than a ``preexec_fn``:
    Python code between fork and exec in a process whose other threads hold locks (native
    thread pools of the stages) can hang the child before it ever runs the server."""
    setpriv = shutil.which("setpriv")
    if setpriv is None or not sys.platform.startswith("linux"):
        return command
    return [setpriv, "--pdeathsig", "TERM", "--", *command]


def _spawn(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            _with_parent_death_signal(command),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: Ctrl-C reaches us, and we stop it
        )


def start_server(
    model_repository: Path,
    *,
    ports: ServerPorts | None = None,
    home: Path | None = None,
    log_path: Path | None = None,
    log_verbose: int = 0,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> TritonServerProcess:
    """Start the bundled ``tritonserver`` on ``model_repository`` and wait until it is ready."""
    model_repository = model_repository.resolve()
    if not model_repository.is_dir():
        raise ConfigError(f"model repository not found: {model_repository}")
    ports = ports or ServerPorts()
    home = prepare_server_home(home)
    command = server_command(
        home, model_repository, ports, log_verbose=log_verbose, extra_args=extra_args
    )
    full_env = server_environment(home)
    if env:
        full_env.update(env)
    if log_path is None:
        log_path = default_log_path(ports)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")  # a fresh start gets a fresh log; restart() appends
    server = TritonServerProcess(
        _spawn(command, full_env, log_path), ports, model_repository, log_path, command, full_env
    )
    try:
        server.wait_ready(ready_timeout_s)
    except BaseException:
        server.kill()
        raise
    return server


def serve(
    model_repository: Path,
    ports: ServerPorts,
    *,
    log_verbose: int = 0,
    ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
) -> int:
    """Run the server in the foreground until SIGINT/SIGTERM; return its exit code."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: stopping tritonserver", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        log_path = default_log_path(ports)
        server = start_server(
            model_repository,
            ports=ports,
            log_path=log_path,
            log_verbose=log_verbose,
            ready_timeout_s=ready_timeout_s,
        )
        log.info(
            "tritonserver ready (pid %d): gRPC %s, HTTP %s, metrics %s; repository %s; log %s",
            server.pid, server.grpc_url, server.http_url, server.metrics_url,
            model_repository, log_path,
        )
        while not stop.is_set():
            if not server.is_running():
                log.error("tritonserver exited with code %s; log %s:\n%s",
                          server.process.returncode, log_path, server.log_tail())
                return int(server.process.returncode or 1)
            stop.wait(0.5)
        code = server.stop()
        log.info("tritonserver stopped (exit code %d)", code)
        return 0
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def add_serve_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``folio serve``; the handler is ``args.handler(args) -> int``."""
    p = subparsers.add_parser(
        "serve",
        help="run the bundled Triton server with the folio_layout ensemble",
        description="Start the tritonserver bundled in nvidia-pytriton on 127.0.0.1, "
        "wait until folio_layout is ready, stop cleanly on Ctrl-C / SIGTERM.",
    )
    p.add_argument("--target", choices=("cpu",), default="cpu",
                   help="repository target to build when --model-repository is not given "
                   "(the bundled server has only the python backend: cpu)")
    p.add_argument("--model-repository", type=Path, default=None,
                   help="serve this repository as is (default: build the target's into "
                   "the cache's model_repository/<target>)")
    p.add_argument("--model-dir", type=Path, default=None,
                   help="layout model artifacts for the build (default: layout.model_dir)")
    p.add_argument("--config", type=Path, default=None, help="folio TOML config baked into "
                   "the built repository")
    p.add_argument("--grpc-port", type=int, default=DEFAULT_GRPC_PORT)
    p.add_argument("--http-port", type=int, default=DEFAULT_HTTP_PORT)
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT)
    p.add_argument("--log-verbose", type=int, default=0)
    p.set_defaults(handler=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from orchestrator.config import load_config
    from orchestrator.serving.triton_repo import build_repository, default_out

    repo = args.model_repository
    if repo is None:
        cfg = load_config(getattr(args, "config", None))
        repo = build_repository(
            args.target, default_out(args.target), cfg=cfg, model_dir=args.model_dir
        )
    ports = ServerPorts(http=args.http_port, grpc=args.grpc_port, metrics=args.metrics_port)
    return serve(repo, ports, log_verbose=args.log_verbose)


def main_serve(argv: Sequence[str] | None = None) -> int:
    """``python -m orchestrator.serving.serve``: the serve command on its own."""
    parser = argparse.ArgumentParser(prog="folio")
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(sub)
    args = parser.parse_args(["serve", *(argv if argv is not None else sys.argv[1:])])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main_serve())
