"""The SQLite sink: batching, resume (exactly-once pages), kill safety, failures."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from orchestrator.config import SinkConfig
from orchestrator.errors import SinkError
from orchestrator.stages.sink import SQLiteSink, run_stats
from orchestrator.types import (
    LineText,
    Origin,
    PageOutcome,
    PageRef,
    RecognitionResult,
    Region,
    Task,
)

REPO = Path(__file__).resolve().parents[1]


def outcome(
    source: str, page: int, n_regions: int, tag: str = "", status: str = "ok"
) -> PageOutcome:
    regions: list[tuple[Region, RecognitionResult | None]] = [
        (
            Region(i, "text", Task.TEXT, 0.9, (i * 10.0, 0.0, i * 10.0 + 5, 8.0)),
            RecognitionResult(
                text=f"{tag}p{page}r{i}",
                stats={"model": "m", "prompt_tokens": 3, "completion_tokens": i, "latency_s": 0.1},
            ),
        )
        for i in range(n_regions)
    ]
    return PageOutcome(
        ref=PageRef(source, page),
        status=status,
        error=None if status == "ok" else "bad page",
        width=100,
        height=200,
        regions=regions,
        timings={"read_s": 0.01, "decode_s": 0.02, "layout_s": 0.03, "recognize_s": 0.04},
    )


class TracedSink(SQLiteSink):
    """Counts the writer thread's COMMIT statements through SQLite's own trace hook."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.statements: list[str] = []
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _connect(self) -> sqlite3.Connection:
        conn = super()._connect()
        conn.set_trace_callback(self.statements.append)
        return conn

    @property
    def traced_commits(self) -> int:
        return sum(1 for s in self.statements if s.strip().upper() == "COMMIT")


def test_schema_and_pragmas(tmp_path: Path) -> None:
    db = tmp_path / "out.db"
    with SQLiteSink(db, SinkConfig()) as sink:
        run_id = sink.start_run(
            {"sources": {"dpi": 200}}, {"models": {"layout": "x"}}, ["/a", "/b"]
        )
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "documents", "pages", "regions", "lines"} <= tables
    assert [r[0] for r in conn.execute("SELECT source FROM documents ORDER BY id")] == ["/a", "/b"]
    config, manifest = conn.execute(
        "SELECT config, manifest FROM runs WHERE id=?", (run_id,)
    ).fetchone()
    assert json.loads(config) == {"sources": {"dpi": 200}}
    assert json.loads(manifest) == {"models": {"layout": "x"}}


def test_writer_batches_transactions(tmp_path: Path) -> None:
    cfg = SinkConfig(batch_rows=200, queue_pages=16, flush_interval_s=60.0)
    with TracedSink(tmp_path / "out.db", cfg) as sink:
        sink.start_run({}, {}, ["/doc"])
        for page in range(1, 101):
            sink.submit(outcome("/doc", page, 9))  # 10 rows per page
        sink.flush()
        assert sink.traced_commits == 5  # 1000 rows / 200, not 100 (per page) or 1000 (per row)
        assert sink.rows_written == 1000
    stats = run_stats(tmp_path / "out.db")
    assert stats["pages"] == 100 and stats["regions"] == 900 and stats["pages_ok"] == 100


def test_slow_run_is_committed_by_the_flush_interval(tmp_path: Path) -> None:
    db = tmp_path / "out.db"
    cfg = SinkConfig(batch_rows=10_000, flush_interval_s=0.1)
    with SQLiteSink(db, cfg) as sink:
        sink.start_run({}, {}, ["/doc"])
        sink.submit(outcome("/doc", 1, 3))
        reader = sqlite3.connect(db)
        deadline = time.monotonic() + 5
        while reader.execute("SELECT COUNT(*) FROM regions").fetchone()[0] < 3:
            assert time.monotonic() < deadline, "a lone page was never committed"
            time.sleep(0.05)
        reader.close()


def test_resubmitting_a_page_replaces_it(tmp_path: Path) -> None:
    db = tmp_path / "out.db"
    with SQLiteSink(db, SinkConfig()) as sink:
        first = sink.start_run({}, {}, ["/doc"])
        sink.write_batch([outcome("/doc", 1, 3, "a"), outcome("/doc", 2, 1, "a", status="error")])
        page_id = sqlite3.connect(db).execute("SELECT id FROM pages WHERE page=1").fetchone()[0]
        assert sink.done_pages() == {PageRef("/doc", 1)}  # error pages are retried
    with SQLiteSink(db, SinkConfig()) as sink:
        second = sink.start_run({}, {}, ["/doc"])
        sink.submit(outcome("/doc", 1, 2, "b"))
        sink.submit(outcome("/doc", 2, 2, "b"))
        sink.finish_run(second, {"pages": 2})
        assert sink.done_pages() == {PageRef("/doc", 1), PageRef("/doc", 2)}
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT COUNT(*) FROM pages").fetchone()[0] == 2
    assert conn.execute("SELECT COUNT(*) FROM documents").fetchone()[0] == 1
    rows = conn.execute(
        "SELECT p.id, p.run_id, r.idx, r.text FROM pages p JOIN regions r ON r.page_id = p.id "
        "WHERE p.page = 1 ORDER BY r.idx"
    ).fetchall()
    assert rows == [(page_id, second, 0, "bp1r0"), (page_id, second, 1, "bp1r1")]
    assert first != second
    summary, finished = conn.execute(
        "SELECT summary, finished_at FROM runs WHERE id=?", (second,)
    ).fetchone()
    assert json.loads(summary) == {"pages": 2} and finished


def test_region_columns(tmp_path: Path) -> None:
    db = tmp_path / "out.db"
    region = Region(0, "figure", Task.SKIP, 0.5, (1, 2, 3, 4), polygon=((1, 2), (3, 2), (3, 4)))
    result = RecognitionResult(
        text=None, error="rejected", stats={"model": "glm", "finish_reason": "length",
                                            "ttft_s": 0.2, "tpot_s": 0.01}
    )
    o = PageOutcome(PageRef("/d", 1), "ok", None, 10, 20, [(region, result)], {})
    with SQLiteSink(db, SinkConfig()) as sink:
        sink.start_run({}, {}, [])
        sink.write_batch([o])
    row = sqlite3.connect(db).execute(
        "SELECT label, task, score, x0, y0, x1, y1, polygon, text, error, model, finish_reason, "
        "ttft_s, tpot_s, prompt_tokens FROM regions"
    ).fetchone()
    assert row == ("figure", "skip", 0.5, 1.0, 2.0, 3.0, 4.0, "[[1, 2], [3, 2], [3, 4]]", None,
                   "rejected", "glm", "length", 0.2, 0.01, None)


def test_lines_are_stored_with_their_region_and_replaced_with_it(tmp_path: Path) -> None:
    db = tmp_path / "out.db"

    def page(tag: str, n_lines: int) -> PageOutcome:
        region = Region(0, "text", Task.TEXT, 0.9, (0, 0, 50, 40), origin=Origin.LINES)
        lines = [LineText((0, 10.0 * i, 50, 10.0 * i + 8), f"{tag}{i}", 0.2 + 0.2 * i,
                          low_confidence=i == 0) for i in range(n_lines)]
        result = RecognitionResult(text="\n".join(t.text or "" for t in lines), lines=lines,
                                   confidence=0.5)
        return PageOutcome(PageRef("/d", 1), "ok", None, 50, 40, [(region, result)],
                           {"lines_s": 0.25})

    with SQLiteSink(db, SinkConfig()) as sink:
        sink.start_run({}, {}, ["/d"])
        sink.write_batch([page("a", 3)])
        assert sink.rows_written == 1 + 1 + 3
        sink.write_batch([page("b", 2)])  # a re-run of the page replaces its lines
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT origin, confidence, text_format FROM regions").fetchone() == (
        "lines", 0.5, "plain")
    assert conn.execute("SELECT lines_s FROM pages").fetchone() == (0.25,)
    assert conn.execute(
        "SELECT region_idx, idx, y0, text, round(score, 2), low_confidence FROM lines "
        "ORDER BY idx").fetchall() == [(0, 0, 0.0, "b0", 0.2, 1), (0, 1, 10.0, "b1", 0.4, 0)]


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    """A database written before text lines were stored keeps its pages and gains the lines
    table and the new region fields; a resumed run goes on writing into it."""
    db = tmp_path / "old.db"
    v1 = sqlite3.connect(db)
    v1.executescript(V1_SCHEMA)
    v1.execute("INSERT INTO runs (started_at, config, manifest) VALUES ('t', '{}', '{}')")
    v1.execute("INSERT INTO documents (source, run_id) VALUES ('/d', 1)")
    v1.execute("INSERT INTO pages (document_id, page, run_id, status, written_at) "
               "VALUES (1, 1, 1, 'ok', 't')")
    v1.execute("INSERT INTO regions (page_id, idx, label, task, text) "
               "VALUES (1, 0, 'text', 'text', 'old text')")
    v1.commit()
    v1.close()
    with SQLiteSink(db, SinkConfig()) as sink:
        assert sink.done_pages() == {PageRef("/d", 1)}
        sink.start_run({}, {}, ["/d"])
        sink.write_batch([outcome("/d", 2, 1)])
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT text, origin FROM regions ORDER BY page_id").fetchall() == [
        ("old text", "layout"), ("p2r0", "layout")]
    assert conn.execute("SELECT COUNT(*) FROM lines").fetchone()[0] == 0


V1_SCHEMA = """
CREATE TABLE runs (id INTEGER PRIMARY KEY, started_at TEXT NOT NULL, finished_at TEXT,
    config TEXT NOT NULL, manifest TEXT NOT NULL, summary TEXT);
CREATE TABLE documents (id INTEGER PRIMARY KEY, source TEXT NOT NULL UNIQUE,
    run_id INTEGER REFERENCES runs(id));
CREATE TABLE pages (id INTEGER PRIMARY KEY, document_id INTEGER NOT NULL REFERENCES documents(id),
    page INTEGER NOT NULL, run_id INTEGER REFERENCES runs(id),
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')), error TEXT, width INTEGER,
    height INTEGER, rotation INTEGER NOT NULL DEFAULT 0, read_s REAL, decode_s REAL,
    layout_s REAL, crop_s REAL, recognize_s REAL, written_at TEXT NOT NULL,
    UNIQUE (document_id, page));
CREATE TABLE regions (page_id INTEGER NOT NULL REFERENCES pages(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL, label TEXT NOT NULL, task TEXT NOT NULL, score REAL,
    x0 REAL, y0 REAL, x1 REAL, y1 REAL, polygon TEXT, text TEXT, error TEXT, model TEXT,
    prompt_tokens INTEGER, completion_tokens INTEGER, finish_reason TEXT, latency_s REAL,
    ttft_s REAL, tpot_s REAL, PRIMARY KEY (page_id, idx));
CREATE INDEX pages_run ON pages(run_id, status);
PRAGMA user_version = 1;
"""


def test_concurrent_submitters(tmp_path: Path) -> None:
    db = tmp_path / "out.db"
    with SQLiteSink(db, SinkConfig(batch_rows=50, queue_pages=4)) as sink:
        sink.start_run({}, {}, [])

        def work(t: int) -> None:
            for page in range(1, 51):
                sink.submit(outcome(f"/doc{t}", page, 2))

        threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert run_stats(db) == {
        "documents": 4, "pages": 200, "pages_ok": 200, "pages_error": 0, "regions": 400,
        "region_errors": 0,
    }


def test_writer_failure_is_raised_not_swallowed(tmp_path: Path) -> None:
    db = tmp_path / "out.db"
    bad = outcome("/doc", 2, 1)
    bad.status = "maybe"  # violates the CHECK constraint inside the writer thread
    sink = SQLiteSink(db, SinkConfig(batch_rows=1, queue_pages=1))
    sink.start_run({}, {}, [])
    sink.submit(outcome("/doc", 1, 1))
    sink.submit(bad)
    with pytest.raises(SinkError, match="CHECK constraint"):
        for page in range(3, 200):  # the failure surfaces on a later submit at the latest
            sink.submit(outcome("/doc", page, 1))
    with pytest.raises(SinkError):
        sink.close()
    # The failed batch is rolled back; what was committed before stays.
    assert run_stats(db)["pages"] >= 1
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM pages WHERE page=2").fetchone()[0] == 0


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    sqlite3.connect(db).execute("CREATE TABLE t (x)")
    with pytest.raises(SinkError, match="not a folio"):
        SQLiteSink(db, SinkConfig())


KILL_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from orchestrator.config import SinkConfig
    from orchestrator.stages.sink import SQLiteSink
    from orchestrator.types import PageOutcome, PageRef, RecognitionResult, Region, Task

    sink = SQLiteSink(Path(sys.argv[1]), SinkConfig(batch_rows=37, flush_interval_s=0.01))
    sink.start_run({}, {}, [])
    rnd = 0
    while True:  # rewrite every page forever, each round with a different region count
        for page in range(1, 41):
            n = (page + rnd) % 7 + 1
            regions = [
                (Region(i, "text", Task.TEXT, 1.0, (0, 0, 1, 1)),
                 RecognitionResult(text=f"{rnd}:{i}"))
                for i in range(n)
            ]
            sink.submit(PageOutcome(PageRef("/doc", page), "ok", None, 1, 1, regions))
        rnd += 1
        if rnd == 3:
            print("ready", flush=True)
    """
)


def test_sigkill_leaves_whole_pages(tmp_path: Path) -> None:
    db = tmp_path / "killed.db"
    script = tmp_path / "writer.py"
    script.write_text(KILL_WRITER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(db), str(REPO)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        # Wait (on a loaded machine too) until round 2 is on disk, then kill mid-write.
        reader = sqlite3.connect(db, timeout=30)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            (latest,) = reader.execute(
                "SELECT MAX(CAST(substr(text, 1, instr(text, ':') - 1) AS INTEGER)) FROM regions"
            ).fetchone()
            if latest is not None and latest >= 2:
                break
            time.sleep(0.05)
        reader.close()
        time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    pages = conn.execute("SELECT id, page FROM pages").fetchall()
    assert len(pages) == 40
    rounds = set()
    for page_id, page in pages:
        texts = [t for (t,) in conn.execute(
            "SELECT text FROM regions WHERE page_id=? ORDER BY idx", (page_id,))]
        rnd = int(texts[0].split(":")[0])
        rounds.add(rnd)
        # Every region of a page comes from the same round, and all of them are there.
        assert texts == [f"{rnd}:{i}" for i in range((page + rnd) % 7 + 1)]
    assert max(rounds) >= 2
    # The killed database resumes normally.
    with SQLiteSink(db, SinkConfig()) as sink:
        sink.start_run({}, {}, [])
        sink.submit(outcome("/doc", 1, 1))
    assert conn.execute("SELECT COUNT(*) FROM pages").fetchone()[0] == 40
