"""The Ray engine on a real local Ray: the same pages as in-process, exactly once after a
killed driver or a killed actor, through a real S3 server, bad inputs as error rows.

One Ray session for the module (2 CPUs, every server on 127.0.0.1); each run is a `folio
run --engine ray` subprocess joining it, so a run can be SIGKILLed and every wait has a
deadline. Pages are compared with an in-process `folio run` of the same documents.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.output.export import iter_pages

pytestmark = [pytest.mark.slow, pytest.mark.ray]

FOLIO = [sys.executable, "-m", "orchestrator.cli"]
RUN_TIMEOUT_S = 480  # one run of a dozen pages on a busy 2-core box, with margin
SUBSET = ("linn.png", "typewriter.png", "cardinal.pdf", "multipage.pdf")  # 12 pages
UNIT_PAGES = 2  # so multi-page PDFs are cut into several units
CONFIG = f"""
[ray]
unit_pages = {UNIT_PAGES}

[pipeline]
stall_timeout_s = {RUN_TIMEOUT_S}
"""


def folio(*args: str | Path, env: dict[str, str] | None = None,
          timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FOLIO, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def summary_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.stdout.strip(), proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def _rounded(box: Any) -> tuple[float, ...]:
    return tuple(round(float(v), 2) for v in box)


def pages_of(db: Path) -> dict[tuple[str, int], tuple[Any, ...]]:
    """Every page of a database by (file name, page): what a reader sees of it, boxes
    rounded as the JSONL export writes them."""
    conn = sqlite3.connect(db)
    try:
        out = {}
        for page in iter_pages(conn):
            regions = tuple(
                (r["label"], r["task"], r["origin"], tuple(round(v, 2) for v in r["bbox"]),
                 r["text"], tuple((_rounded(line["bbox"]), line["text"])
                                  for line in r["lines"]))
                for r in page["regions"])
            key = (page["source"].rsplit("/", 1)[-1], page["page"])
            out[key] = (page["status"], page["error"], page["width"], page["height"],
                        page["rotation"], regions)
        return out
    finally:
        conn.close()


def parquet_pages(out: Path) -> Counter[tuple[str, int]]:
    """How often each (source, page) occurs over every unit file of a local output."""
    seen: Counter[tuple[str, int]] = Counter()
    for path in out.glob("*.parquet"):
        table = pq.read_table(path, columns=["source", "page"])
        seen.update(zip(table.column("source").to_pylist(), table.column("page").to_pylist(),
                        strict=True))
    return seen


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "folio.toml"
    path.write_text(CONFIG, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, model_dir: Path,
              config_file: Path) -> dict[tuple[str, int], tuple[Any, ...]]:
    """The in-process pages of the subset: what every Ray run must reproduce."""
    db = tmp_path_factory.mktemp("ref") / "ref.db"
    proc = folio("run", *(corpus_dir / "pages" / name for name in SUBSET), "--db", db,
                 "--config", config_file, "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pages = pages_of(db)
    assert len(pages) == 12
    return pages


def ray_run(address: str, config: Path, out: str | Path, *sources: str | Path,
            env: dict[str, str] | None = None) -> list[str]:
    return [*FOLIO, "run", *map(str, sources), "--engine", "ray", "--ray-address", address,
            "--out", str(out), "--config", str(config), "--no-progress", "--json"]


def test_ray_run_gives_the_in_process_pages(
    ray_address: str, config_file: Path, reference: dict[tuple[str, int], tuple[Any, ...]],
    corpus_dir: Path, tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    sources = [corpus_dir / "pages" / name for name in SUBSET]
    command = ray_run(ray_address, config_file, out, *sources)
    proc = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = summary_of(proc)
    # linn, typewriter: one unit each; cardinal (4 pages) 2; multipage (6 pages) 3
    assert (summary["pages"], summary["units"], summary["units_written"]) == (12, 7, 7)
    assert set(parquet_pages(out).values()) == {1}  # each page once
    assert not (out / "_tmp").exists()

    db = tmp_path / "ray.db"
    for _ in range(2):  # importing again replaces, never duplicates
        imported = folio("import", out, "--db", db)
        assert imported.returncode == 0, imported.stderr
    assert pages_of(db) == reference
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM pages").fetchone() == (12,)
    shown = folio("show", db, f"{corpus_dir / 'pages' / 'linn.png'}#1", "--out",
                  tmp_path / "linn.png")
    assert shown.returncode == 0 and (tmp_path / "linn.png").stat().st_size > 0, shown.stderr

    # The same command again: every unit is complete, nothing is read or written again.
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}
    again = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed = summary_of(again)
    assert (resumed["pages"], resumed["units_skipped"], resumed["resumed"]) == (0, 7, 12)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")} == stamps


def _expected(reference: dict[tuple[str, int], tuple[Any, ...]], names: tuple[str, ...]
              ) -> dict[tuple[str, int], tuple[Any, ...]]:
    return {key: value for key, value in reference.items() if key[0] in names}


KILL_SET = ("multipage.pdf", "linn.png", "typewriter.png")  # 5 units, 8 pages


def test_a_killed_driver_then_a_rerun_gives_every_page_once(
    ray_address: str, config_file: Path, reference: dict[tuple[str, int], tuple[Any, ...]],
    corpus_dir: Path, tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    command = ray_run(ray_address, config_file, out,
                      *(corpus_dir / "pages" / name for name in KILL_SET))
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while not list(out.glob("*.parquet")):
            assert driver.poll() is None, driver.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "no unit was written in time"
            time.sleep(0.2)
        driver.send_signal(signal.SIGKILL)
    finally:
        driver.kill()
        driver.communicate(timeout=60)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.parquet")}
    assert 1 <= len(before) < 5, before  # killed mid-run

    again = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = summary_of(again)
    assert summary["units_skipped"] == len(before)
    assert summary["units_written"] == 5 - len(before)
    for name, stamp in before.items():  # complete units were not written again
        path = out / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp
    counts = parquet_pages(out)
    assert set(counts.values()) == {1} and len(counts) == 8
    db = tmp_path / "ray.db"
    assert folio("import", out, "--db", db).returncode == 0
    assert pages_of(db) == _expected(reference, KILL_SET)


def test_a_killed_recognition_actor_is_retried_without_loss(
    ray_address: str, config_file: Path, reference: dict[tuple[str, int], tuple[Any, ...]],
    corpus_dir: Path, tmp_path: Path,
) -> None:
    from ray._private import state

    def recognisers() -> dict[str, dict[str, Any]]:
        return {aid: info for aid, info in state.actors().items()
                if "RecognizeStage" in info["ActorClassName"] and info["State"] == "ALIVE"}

    out = tmp_path / "out"
    driver = subprocess.Popen(ray_run(ray_address, config_file, out,
                                      *(corpus_dir / "pages" / name for name in KILL_SET)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        # Once a unit is written the recogniser is busy with the next pages.
        while not (list(out.glob("*.parquet")) and recognisers()):
            assert driver.poll() is None, driver.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the run did not get going in time"
            time.sleep(0.2)
        ((victim, info),) = recognisers().items()
        written = len(list(out.glob("*.parquet")))
        # The actor's handles live in the driver's Ray Data internals, so ray.kill cannot
        # name it from here; its process is killed instead, as a crash or the OOM killer
        # would, which Ray handles the same way (restart the actor, retry its tasks).
        os.kill(int(info["Pid"]), signal.SIGKILL)
        stdout, stderr = driver.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        driver.kill()
    assert written < 5, "the run ended before the actor could be killed mid-run"
    assert driver.returncode == 0, stderr[-3000:]
    assert state.actors(actor_id=victim)["NumRestarts"] >= 1
    counts = parquet_pages(out)
    assert set(counts.values()) == {1} and len(counts) == 8
    assert json.loads(stdout.strip().splitlines()[-1])["pages"] == 8
    db = tmp_path / "ray.db"
    assert folio("import", out, "--db", db).returncode == 0
    assert pages_of(db) == _expected(reference, KILL_SET)


@pytest.fixture
def s3() -> Iterator[str]:
    """A local S3 (moto's server) on 127.0.0.1; yields its endpoint."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def test_pages_from_a_bucket_into_a_bucket(
    ray_address: str, config_file: Path, reference: dict[tuple[str, int], tuple[Any, ...]],
    corpus_dir: Path, tmp_path: Path, s3: str,
) -> None:
    import s3fs

    bucket = s3fs.S3FileSystem(key="testing", secret="testing", endpoint_url=s3)
    bucket.mkdir("folio-in")
    bucket.mkdir("folio-out")
    for name in ("linn.png", "multipage.pdf"):
        bucket.put_file(str(corpus_dir / "pages" / name), f"folio-in/pages/{name}")
    # A Hugging Face style shard: typewriter.png's bytes, then a row without an image.
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = [{"bytes": (corpus_dir / "pages" / "typewriter.png").read_bytes(),
              "path": "typewriter.png"}, None]
    pq.write_table(pa.table({"image": pa.array(cells, type=kind)}), tmp_path / "shard.parquet")
    bucket.put_file(str(tmp_path / "shard.parquet"), "folio-in/pages/shards/train-0.parquet")

    # Credentials and endpoint only through the standard variables.
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_ENDPOINT_URL": s3, "AWS_DEFAULT_REGION": "us-east-1"}
    command = ray_run(ray_address, config_file, "s3://folio-out/run", "s3://folio-in/pages/")
    proc = subprocess.run(command,
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env)
    assert proc.returncode == 3, proc.stderr[-3000:]  # the row without an image
    summary = summary_of(proc)
    assert (summary["pages"], summary["errors"], summary["units"]) == (9, 1, 5)
    names = [n.rsplit("/", 1)[-1] for n in bucket.ls("folio-out/run", refresh=True)]
    assert "_folio.json" in names and len([n for n in names if n.endswith(".parquet")]) == 5

    db = tmp_path / "s3.db"
    imported = folio("import", "s3://folio-out/run", "--db", db, env=env)
    assert imported.returncode == 0, imported.stderr
    pages = pages_of(db)
    assert set(pages) == {("linn.png", 1), *(("multipage.pdf", p) for p in range(1, 7)),
                          ("train-0.parquet", 1), ("train-0.parquet", 2)}
    for key in [("linn.png", 1), *(("multipage.pdf", p) for p in range(1, 7))]:
        assert pages[key] == reference[key]
    assert pages[("train-0.parquet", 1)] == reference[("typewriter.png", 1)]
    status, error, *_ = pages[("train-0.parquet", 2)]
    assert (status, error) == ("error", "row 1 has no image bytes")
    with sqlite3.connect(db) as conn:
        sources = {s for (s,) in conn.execute("SELECT source FROM documents")}
    assert sources == {"s3://folio-in/pages/linn.png", "s3://folio-in/pages/multipage.pdf",
                       "s3://folio-in/pages/shards/train-0.parquet"}


def test_bad_inputs_become_the_same_error_rows(
    ray_address: str, config_file: Path, corpus_dir: Path, tmp_path: Path,
) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image, only text\n", encoding="utf-8")
    sources = [corpus_dir / "bad", tmp_path / "empty.png", tmp_path / "notes.png",
               tmp_path / "missing.pdf"]
    in_process = folio("run", *sources, "--db", tmp_path / "a.db", "--config", config_file,
                       "--no-progress")
    assert in_process.returncode == 3, in_process.stderr[-3000:]
    proc = subprocess.run(ray_run(ray_address, config_file, tmp_path / "out", *sources),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert folio("import", tmp_path / "out", "--db", tmp_path / "b.db").returncode == 0
    expected = pages_of(tmp_path / "a.db")
    assert pages_of(tmp_path / "b.db") == expected
    errors = {key: value[1] for key, value in expected.items() if value[0] == "error"}
    assert errors[("empty.png", 1)] == "file is empty (0 bytes)"
    assert errors[("notes.png", 1)].startswith("not a recognised image format")
    assert errors[("missing.pdf", 1)].startswith("file not found")
    assert errors[("invalid.pdf", 1)].startswith("cannot open PDF")


def test_a_stage_that_cannot_start_ends_the_run_as_in_process(
    ray_address: str, config_file: Path, corpus_dir: Path, tmp_path: Path,
) -> None:
    command = ray_run(ray_address, config_file, tmp_path / "out",
                      corpus_dir / "pages" / "linn.png")
    proc = subprocess.run([*command, "--model-dir", str(tmp_path / "no-models")],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr[-3000:]  # ModelArtifactError, as in-process
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("folio: error: no layout model manifest at "), last
    assert not list((tmp_path / "out").glob("*.parquet"))


def _listening(pids: set[int]) -> list[str]:
    """The addresses the given processes listen on (TCP, IPv4 and IPv6)."""
    listening: dict[str, str] = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            raw = bytes.fromhex(fields[1].split(":")[0])
            if v6:  # four little-endian 32-bit words
                packed = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                address = socket.inet_ntop(socket.AF_INET6, packed)
            else:
                address = socket.inet_ntoa(raw[::-1])
            listening[fields[9]] = address
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in listening:
                        found.append(listening[link[8:-1]])
    return found


def _descendants(root: int) -> dict[int, str]:
    parents: dict[int, int] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                names[int(entry.name)] = stat[stat.index("(") + 1:stat.rindex(")")]
                parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, parent in parents.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return {pid: names[pid] for pid in tree if pid in names}


def _ray_processes() -> dict[int, str]:
    """The test Ray's processes: those ``ray start`` left (they name the cluster's session
    folder on their command line, or are its GCS and raylet) and everything they started."""
    roots = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                if b"/ray/session_" in cmdline or b"gcs_server" in cmdline:
                    roots.add(int(entry.name))
    processes: dict[int, str] = {}
    for root in roots:
        processes.update(_descendants(root))
    return processes


def test_the_test_ray_listens_on_127_0_0_1_only(ray_address: str) -> None:
    assert ray_address.startswith("127.0.0.1:")
    processes = _ray_processes()
    assert {"gcs_server", "raylet"} <= set(processes.values()), processes
    addresses = _listening(set(processes))
    assert len(addresses) >= 3, addresses  # GCS, raylet, object manager at least
    for address in addresses:
        ip = ipaddress.ip_address(address)
        mapped = getattr(ip, "ipv4_mapped", None)
        assert ip.is_loopback or (mapped is not None and mapped.is_loopback), address
