"""Operating a run: SIGINT/SIGTERM stop it cleanly, the metrics endpoint answers while it
runs, the summary and --json say what happened, a run with nothing to do leaves no trace,
the progress bar gets its total from the sources, logs can be JSON."""

from __future__ import annotations

import io
import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.cli import RunProgress
from orchestrator.config import SourceConfig
from orchestrator.stages.sources import open_sources

REPO = Path(__file__).resolve().parents[1]
FOLIO = [sys.executable, "-m", "orchestrator.cli"]
# A few real pages: enough that a run is still going when it is interrupted mid-way.
PAGES = ("typewriter.png", "linn.png", "baiona.png", "c03-29.pdf", "francais.pdf",
         "epson.pdf")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(corpus_dir: Path, db: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*FOLIO, "run", *(str(corpus_dir / "pages" / p) for p in PAGES), "--db", str(db),
         "--no-progress", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)


def pages_written(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM pages").fetchone()[0])
    except sqlite3.Error:
        return 0


def wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def pages_of(db: Path) -> list[tuple[str, int, int]]:
    """(source, page, regions) per stored page: the regions of each page are whole."""
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT d.source, p.page, (SELECT COUNT(*) FROM regions r WHERE r.page_id = p.id)"
            " FROM pages p JOIN documents d ON d.id = p.document_id ORDER BY 1, 2").fetchall()


@pytest.mark.slow
@pytest.mark.parametrize("sig,when", [
    (signal.SIGINT, "start-up"), (signal.SIGTERM, "start-up"),
    (signal.SIGINT, "mid-run"), (signal.SIGTERM, "mid-run"),
])
def test_a_signal_stops_the_run_cleanly_and_a_rerun_finishes(
        tmp_path: Path, corpus_dir: Path, model_dir: Path, sig: signal.Signals, when: str
) -> None:
    """Each case in a fresh process: no traceback, no abort, one line saying what happens,
    the summary, exit 128 + signal, the run marked interrupted, whole pages only; then the
    same command finishes the rest, every page once."""
    db = tmp_path / "run.db"
    proc = start(corpus_dir, db)
    try:
        if when == "start-up":
            time.sleep(1.0)  # models loading, no page read yet
        else:
            wait_for(lambda: pages_written(db) >= 1, 600, "the first page")
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "terminate called" not in err, err[-3000:]
    notices = [line for line in err.splitlines() if line.startswith("folio: ")]
    assert notices == [f"folio: {sig.name}: finishing the pages in flight (at most 10 s); "
                       "send it again to stop at once"], err[-3000:]
    assert f"[interrupted by {sig.name}]" in out
    with sqlite3.connect(db) as conn:
        status, finished, summary = conn.execute(
            "SELECT status, finished_at, summary FROM runs").fetchone()
    assert status == "interrupted" and finished
    assert json.loads(summary)["interrupted"] == sig.name
    before = pages_of(db)
    assert all(regions > 0 for _, _, regions in before)  # every stored page is whole
    rerun = subprocess.run([*FOLIO, "run", *(str(corpus_dir / "pages" / p) for p in PAGES),
                            "--db", str(db), "--no-progress", "--json"],
                           capture_output=True, text=True, timeout=900, cwd=REPO)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = pages_of(db)
    expected = open_sources([corpus_dir / "pages" / p for p in PAGES],
                            SourceConfig()).count_pages()
    assert len({(s, p) for s, p, _ in after}) == len(after) == expected
    assert set(before) <= set(after)


@pytest.mark.slow
def test_a_second_signal_exits_at_once(tmp_path: Path, corpus_dir: Path, model_dir: Path
                                       ) -> None:
    db = tmp_path / "run.db"
    proc = start(corpus_dir, db, "--config", str(_slow_drain(tmp_path)))
    try:
        wait_for(lambda: pages_written(db) >= 1, 600, "the first page")
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and time.monotonic() - started < 10, err[-3000:]
    assert "Traceback" not in err and "terminate called" not in err
    assert "folio: SIGINT again: stopping now" in err
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert all(regions > 0 for _, _, regions in pages_of(db))


def _slow_drain(tmp_path: Path) -> Path:
    config = tmp_path / "drain.toml"
    config.write_text("[pipeline]\ndrain_timeout_s = 120.0\n", encoding="utf-8")
    return config


@pytest.mark.slow
def test_metrics_are_served_on_loopback_while_the_run_lasts(
        tmp_path: Path, corpus_dir: Path, model_dir: Path) -> None:
    port = free_port()
    db = tmp_path / "run.db"
    proc = start(corpus_dir, db, "--metrics-port", str(port))
    url = f"http://127.0.0.1:{port}/metrics"

    def scrape() -> str:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode())
        except OSError:
            return ""

    try:
        wait_for(lambda: re.search(r'^folio_pages_total\{status="ok"\} [1-9]', scrape(), re.M),
                 600, "a scrape counting a written page")
        text = scrape()
        assert proc.poll() is None  # scraped during the run
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True,
                                   check=True).stdout
        bound = [line.split()[3] for line in listening.splitlines()[1:]
                 if line.split()[3].endswith(f":{port}")]
        assert bound == [f"127.0.0.1:{port}"]  # loopback only
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=180)
    for series in ('folio_stage_seconds_total{stage="recognize"}',
                   'folio_stage_seconds_total{stage="lines"}', 'folio_queue_depth{queue="decode"}',
                   'folio_queue_depth{queue="sink"}', "folio_pages_per_second",
                   "folio_regions_total", "folio_lines_total",
                   "folio_recognizer_retries_total", "folio_vllm_ttft_seconds_bucket"):
        assert series in text, series
    lines = re.search(r"^folio_lines_total (\S+)", text, re.M)
    assert lines is not None and float(lines.group(1)) > 10


def test_json_summary_lists_failed_pages_with_reasons(tmp_path: Path) -> None:
    db = tmp_path / "run.db"
    proc = subprocess.run([*FOLIO, "run", str(tmp_path / "missing.pdf"), "--db", str(db),
                           "--no-progress", "--json"], capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 3, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["errors"] == 1 and summary["ok"] == 0
    [failed] = summary["error_pages"]
    assert failed["page"] == 1 and failed["source"].endswith("missing.pdf")
    assert "not found" in failed["error"]
    assert summary["pages_per_s"] == 0  # a run of broken inputs does not look fast
    assert set(summary["stage_wall_s"]) >= {"read", "decode", "lines", "layout", "recognize"}
    text = subprocess.run([*FOLIO, "run", str(tmp_path / "missing.pdf"), "--db",
                           str(tmp_path / "b.db"), "--no-progress"], capture_output=True,
                          text=True, timeout=300, cwd=REPO).stdout
    assert "n/a (no page was read ok)" in text and "s CPU" in text


@pytest.mark.slow
def test_a_run_with_nothing_to_do_leaves_no_runs_row(tmp_path: Path, corpus_dir: Path,
                                                     model_dir: Path) -> None:
    db = tmp_path / "run.db"
    page = str(corpus_dir / "pages" / "typewriter.png")
    for _ in range(2):
        proc = subprocess.run([*FOLIO, "run", page, "--db", str(db), "--no-progress"],
                              capture_output=True, text=True, timeout=600, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 already done" in proc.stdout
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*), MIN(status) FROM runs").fetchone() == (1, "finished")
        assert conn.execute("SELECT COUNT(*) FROM pages").fetchone()[0] == 1


def test_the_progress_total_is_counted_from_the_sources(corpus_dir: Path) -> None:
    sources = open_sources([corpus_dir / "pages"], SourceConfig())
    progress = RunProgress(disable=False, file=io.StringIO())
    progress.count(sources)
    assert progress.wait_counted(60)
    assert progress.total == sources.count_pages() == 23
    progress.close()


def test_logs_can_be_json_lines(tmp_path: Path) -> None:
    proc = subprocess.run([*FOLIO, "--log-format", "json", "run", str(tmp_path / "none.png"),
                           "--db", str(tmp_path / "x.db"), "--no-progress", "--metrics-port",
                           str(free_port())], capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert any(r["message"].startswith("metrics on http://127.0.0.1:") and r["level"] == "INFO"
               and r["logger"] == "folio" for r in records), proc.stderr
