"""folio_layout on the real Triton server bundled in nvidia-pytriton (cpu target), over gRPC.

One server for the module (free ports, its own log under build/logs). Checks: every corpus
page gives the in-process path's boxes (within 1 px) and classes; dynamic batching forms
batches > 1 under concurrent load; bad requests fail alone; a server killed and restarted
mid-run loses no page; ``folio serve`` starts, logs and stops on SIGINT.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from triton_fixtures import png_header

from client.pages import page_requests
from client.triton_layout import TritonLayoutBackend, TritonLayoutClient
from orchestrator.config import FolioConfig, TritonConfig
from orchestrator.errors import LayoutServerUnavailable, PageDecodeError, PixelLimitExceeded
from orchestrator.serving.serve import ServerPorts, TritonServerProcess, start_server
from orchestrator.serving.triton_repo import build_repository
from orchestrator.types import Detections, EncodedPage, PageRef

pytestmark = pytest.mark.triton
REPO = Path(__file__).resolve().parents[1]

BOX_TOLERANCE_PX = 1.0


@pytest.fixture(scope="module")
def server(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TritonServerProcess]:
    repo = build_repository("cpu", tmp_path_factory.mktemp("triton") / "cpu", model_dir=model_dir)
    ports = ServerPorts.free()
    with start_server(repo, ports=ports) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: TritonServerProcess) -> Iterator[TritonLayoutClient]:
    with TritonLayoutClient(TritonConfig(url=server.grpc_url, max_in_flight=8)) as c:
        yield c


@pytest.fixture(scope="module")
def pages(corpus_dir: Path) -> list[tuple[str, bytes]]:
    """Every corpus page: PNGs as they are, PDF pages rendered at 200 dpi as PNG."""
    items = page_requests(corpus_dir / "pages")
    assert len(items) >= 20
    return items


def inprocess(items: list[bytes], cfg: FolioConfig) -> list[Detections]:
    """The in-process path: the DALI decoder + LayoutModel + postprocess."""
    from orchestrator.stages.decode import Decoder
    from orchestrator.stages.layout import LayoutModel

    decoder = Decoder(cfg.decode, cfg.sources)
    model = LayoutModel(cfg.layout, device="cpu")
    out: list[Detections] = []
    for start in range(0, len(items), decoder.batch_size):
        chunk = items[start:start + decoder.batch_size]
        decoded = decoder.decode(
            [EncodedPage(PageRef("p", i), data=d) for i, d in enumerate(chunk)])
        for page in decoded:
            assert not isinstance(page, Exception), page
        batch = np.stack([p.model_input for p in decoded])  # type: ignore[union-attr]
        sizes = [(p.height, p.width) for p in decoded]  # type: ignore[union-attr]
        out.extend(model.detect(batch, sizes))
    return out


@pytest.fixture(scope="module")
def expected(pages: list[tuple[str, bytes]], model_dir: Path) -> list[Detections]:
    # The ensemble finds the layout of the image as sent; turning pages upright is the
    # orchestrator's job before it sends them (TritonLayoutBackend sends turned pixels).
    cfg = FolioConfig().override({"decode.device": "cpu", "decode.orient": False,
                                  "layout.model_dir": str(model_dir)})
    return inprocess([d for _, d in pages], cfg)


def assert_same(name: str, want: Detections, got: Detections | Exception) -> None:
    assert isinstance(got, Detections), f"{name}: {got!r}"
    assert got.boxes.shape == want.boxes.shape, f"{name}: {len(got.boxes)} != {len(want.boxes)}"
    assert np.array_equal(got.classes, want.classes), name
    if len(want.boxes):
        diff = float(np.abs(got.boxes - want.boxes).max())
        assert diff <= BOX_TOLERANCE_PX, f"{name}: boxes differ by {diff:.2f} px"


def test_every_corpus_page_matches_inprocess(
    client: TritonLayoutClient, pages: list[tuple[str, bytes]], expected: list[Detections]
) -> None:
    got = client.detect_many([d for _, d in pages])
    assert sum(len(e.boxes) for e in expected) > 2 * len(pages)  # real detections
    for (name, _), want, result in zip(pages, expected, got, strict=True):
        assert_same(name, want, result)
    assert client.labels[:3] == ["text", "title", "figure"]


def _batch_counts(client: TritonLayoutClient, model: str) -> dict[int, int]:
    stats = client.inference_statistics()
    for entry in stats["model_stats"]:
        if entry["name"] == model:
            return {int(b["batch_size"]): int(b["compute_infer"]["count"])
                    for b in entry.get("batch_stats", [])}
    raise AssertionError(f"no statistics for {model}")


def test_dynamic_batching_forms_batches(
    client: TritonLayoutClient, pages: list[tuple[str, bytes]]
) -> None:
    before = _batch_counts(client, "layout")
    small = sorted(pages, key=lambda p: len(p[1]))[:8]
    results = client.detect_many([d for _, d in small] * 2)  # 16 requests, 8 in flight
    assert all(isinstance(r, Detections) for r in results)
    after = _batch_counts(client, "layout")
    formed = {b: n - before.get(b, 0) for b, n in after.items() if n > before.get(b, 0)}
    assert any(b > 1 for b in formed), f"layout ran only batches of {formed}"
    assert sum(b * n for b, n in formed.items()) == 16


def test_bad_requests_fail_alone(
    client: TritonLayoutClient, pages: list[tuple[str, bytes]], expected: list[Detections]
) -> None:
    good = [(name, data, want) for (name, data), want in zip(pages, expected, strict=True)][:3]
    bad = [b"definitely not an image", b"", png_header(30_000, 30_000)]
    items = [good[0][1], bad[0], good[1][1], bad[1], bad[2], good[2][1]]
    before = _batch_counts(client, "preprocess")
    got = client.detect_many(items)
    after = _batch_counts(client, "preprocess")
    assert isinstance(got[1], PageDecodeError) and "not a recognised image" in str(got[1])
    assert isinstance(got[3], PageDecodeError) and "empty" in str(got[3])
    assert isinstance(got[4], PixelLimitExceeded) and "30000 x 30000" in str(got[4])
    for index, (name, _, want) in zip((0, 2, 5), good, strict=True):
        assert_same(name, want, got[index])
    # The six requests shared preprocess batches: the bad ones failed inside a batch.
    runs = sum(n - before.get(b, 0) for b, n in after.items())
    assert runs < len(items)
    # the server still serves
    assert_same(good[0][0], good[0][2], client.detect_many([good[0][1]])[0])


def test_bad_client_input_is_invalid_argument(server: TritonServerProcess,
                                              pages: list[tuple[str, bytes]]) -> None:
    """Bytes that are not an image, or a page over the pixel limit: INVALID_ARG (the
    request's fault), not INTERNAL (a server fault), so a client can tell them apart."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(server.grpc_url)

    def infer(data: bytes) -> Any:
        array = np.frombuffer(data, dtype=np.uint8).reshape(1, -1)
        image = grpcclient.InferInput("IMAGE", list(array.shape), "UINT8")
        image.set_data_from_numpy(array)
        return client.infer("folio_layout", [image], client_timeout=60)

    try:
        for bad, words in ((b"definitely not an image", "not a recognised image"),
                           (png_header(30_000, 30_000), "over the limit")):
            with pytest.raises(InferenceServerException) as caught:
                infer(bad)
            assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
            assert words in (caught.value.message() or "")
        assert infer(pages[0][1]).as_numpy("BOXES") is not None
    finally:
        client.close()


def test_folio_run_with_the_triton_layout_through_the_cli(
    server: TritonServerProcess, corpus_dir: Path, tmp_path: Path
) -> None:
    """`folio run --layout triton --triton-url` sends the pages to that server."""
    db = tmp_path / "folio.db"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(corpus_dir / "pages" / "linn.png"),
         "--db", str(db), "--layout", "triton", "--triton-url", server.grpc_url,
         "--no-progress"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with sqlite3.connect(db) as conn:
        manifest, config = conn.execute("SELECT manifest, config FROM runs").fetchone()
        regions = conn.execute("SELECT COUNT(*) FROM regions").fetchone()[0]
    layout = json.loads(manifest)["layout"]
    assert layout["backend"] == "triton" and layout["url"] == server.grpc_url
    assert json.loads(config)["triton"]["url"] == server.grpc_url
    assert regions >= 5


def test_a_wrong_triton_url_fails_in_seconds_with_exit_2(corpus_dir: Path, tmp_path: Path
                                                         ) -> None:
    url = f"127.0.0.1:{ServerPorts.free().grpc}"  # nobody listens there
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "run", str(corpus_dir / "pages" / "linn.png"),
         "--db", str(tmp_path / "x.db"), "--layout", "triton", "--triton-url", url,
         "--no-progress"], capture_output=True, text=True, timeout=45, cwd=REPO)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"folio: error: no Triton server answers at {url}")
    assert "--triton-url" in line
    assert elapsed < 30  # process start and imports included; the wait itself is 5 s


def test_a_built_repository_holds_no_path_of_the_build_machine(
    model_dir: Path, pages: list[tuple[str, bytes]], expected: list[Detections],
    tmp_path: Path,
) -> None:
    """`folio repo build`, then the folder moved elsewhere (as into a container): no file
    names the build machine's folders, and the moved repository serves the same boxes."""
    built = tmp_path / "built" / "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "repo", "build", "--target", "cpu",
         "--out", str(built), "--model-dir", str(model_dir)],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(built)
    moved = tmp_path / "elsewhere" / "repository"
    moved.parent.mkdir()
    built.rename(moved)
    machine = {str(p) for p in (tmp_path, model_dir, model_dir.resolve(), REPO, Path.home())}
    for path in moved.rglob("*"):
        if path.is_file() and path.suffix in (".pbtxt", ".py", ".json", ".toml"):
            text = path.read_text(encoding="utf-8")
            found = [m for m in machine if m in text]
            assert not found, f"{path.relative_to(moved)} names {found}"
    with start_server(moved, ports=ServerPorts.free()) as srv, \
            TritonLayoutClient(TritonConfig(url=srv.grpc_url)) as client:
        (got,) = client.detect_many([pages[0][1]])
    assert_same(pages[0][0], expected[0], got)


def test_pipeline_backend_matches_inprocess(
    server: TritonServerProcess, pages: list[tuple[str, bytes]], model_dir: Path
) -> None:
    """``folio run --layout triton``'s backend returns the in-process LayoutResult."""
    from orchestrator.engines.pipeline import InProcessLayout
    from orchestrator.stages.decode import Decoder

    cfg = FolioConfig().override({"decode.device": "cpu", "layout.model_dir": str(model_dir),
                                  "layout.backend": "triton", "triton.url": server.grpc_url})
    # cardinal.pdf: one page turned each way, so turned pixels are what gets sent.
    chosen = [(name, data) for name, data in pages if "cardinal" in name]
    encoded = [EncodedPage(PageRef(name, 1), data=data) for name, data in chosen]
    decoded = Decoder(cfg.decode, cfg.sources).decode(encoded)
    assert sorted(p.rotation for p in decoded) == [0, 90, 180, 270]  # type: ignore[union-attr]
    backend = TritonLayoutBackend(cfg)
    try:
        remote = backend.detect(decoded, encoded)  # type: ignore[arg-type]
    finally:
        backend.close()
    local = InProcessLayout(cfg, "cpu").detect(decoded, encoded)  # type: ignore[arg-type]
    for r, loc in zip(remote, local, strict=True):
        assert not isinstance(r, Exception) and not isinstance(loc, Exception)
        assert [x.label for x in r.regions] == [x.label for x in loc.regions]
        for a, b in zip(r.regions, loc.regions, strict=True):
            assert max(abs(p - q) for p, q in zip(a.bbox, b.bbox, strict=True)) <= 1.0


def test_unreachable_server_gives_layout_server_unavailable() -> None:
    port = ServerPorts.free().grpc
    with pytest.raises(LayoutServerUnavailable, match="no Triton server answers"):
        TritonLayoutClient(TritonConfig(url=f"127.0.0.1:{port}", ready_wait_s=1.0))


def test_server_gone_beyond_the_retry_budget_is_reported_per_page() -> None:
    import asyncio

    from client.triton_layout import AsyncTritonLayoutClient

    port = ServerPorts.free().grpc
    cfg = TritonConfig(url=f"127.0.0.1:{port}", ready_wait_s=1.5, timeout_s=1.0)

    async def run() -> list[Detections | Exception]:
        client = AsyncTritonLayoutClient(cfg)
        try:
            return await client.detect_many([b"page one", b"page two"])
        finally:
            await client.close()

    start = time.monotonic()
    results = asyncio.run(run())
    assert all(isinstance(r, LayoutServerUnavailable) for r in results), results
    assert "unavailable for 2 s" in str(results[0])
    assert time.monotonic() - start < 10


def test_server_killed_and_restarted_mid_run_loses_no_page(
    server: TritonServerProcess, pages: list[tuple[str, bytes]], expected: list[Detections]
) -> None:
    """Runs last in this module: it kills the module's server and brings it back."""
    cfg = TritonConfig(url=server.grpc_url, max_in_flight=2, ready_wait_s=90.0, timeout_s=30.0)
    order = sorted(range(len(pages)), key=lambda i: len(pages[i][1]))[:12] * 2
    with TritonLayoutClient(cfg) as client:
        futures = [client.submit(pages[i][1]) for i in order]
        deadline = time.monotonic() + 120
        while sum(f.done() for f in futures) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        finished_before_kill = sum(f.done() for f in futures)
        server.kill()
        assert not server.is_running()
        time.sleep(1.0)
        server.restart()
        results = [f.result(timeout=180) for f in futures]
    assert finished_before_kill < len(futures)  # the kill really was mid-run
    for i, result in zip(order, results, strict=True):
        assert_same(pages[i][0], expected[i], result)


def test_folio_serve_starts_and_stops_on_sigint(model_dir: Path, tmp_path: Path) -> None:
    """`folio serve` (the CLI) on a built repository: ready, then stopped by SIGINT."""
    repo = build_repository("cpu", tmp_path / "cpu", model_dir=model_dir)
    ports = ServerPorts.free()
    command = [sys.executable, "-m", "orchestrator.cli", "serve", "--model-repository", str(repo),
               "--grpc-port", str(ports.grpc), "--http-port", str(ports.http),
               "--metrics-port", str(ports.metrics)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=REPO)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "tritonserver ready" in line:
                break
        assert any(f"127.0.0.1:{ports.grpc}" in line for line in lines), "".join(lines)
        pid = int(lines[-1].split("(pid ")[1].split(")")[0])
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    assert "tritonserver stopped" in rest
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
