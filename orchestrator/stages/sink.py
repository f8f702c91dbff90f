"""The SQLite sink: one writer thread, batched transactions, exactly-once pages.

Every page is written in one transaction together with its regions and their text lines:
the page row is upserted (its id stays stable across runs), its old regions and lines are
deleted and the new ones inserted. A re-run never duplicates a page, and a process killed
at any instant leaves each page either whole or absent. Pages reach the database through
a bounded queue drained by one writer thread that commits every ``sink.batch_rows`` rows
(pages + regions + lines) or every ``sink.flush_interval_s`` seconds, whichever comes
first; never a commit per row.

Tables: ``runs``, ``documents``, ``pages``, ``regions`` (one row per region: label, task,
origin ``layout``/``lines``, box, text, text format, confidence, recogniser stats) and
``lines`` (one row per text line: its region, box, text, score, low-confidence flag).

Usage::

    with SQLiteSink(Path("out.db"), cfg.sink) as sink:
        run_id = sink.start_run(cfg.to_dict(), manifest, sources.sources)
        done = sink.done_pages()                       # resume: pages already 'ok'
        for outcome in pipeline(sources.pages(skip=done.__contains__)):
            sink.submit(outcome)                       # blocks while the queue is full
        sink.finish_run(run_id, {"pages": n})          # flushes first
    # close() flushes, joins the writer and re-raises its failure as SinkError

    sink.write_batch(outcomes)                         # synchronous, for tests/benchmarks
    run_stats(Path("out.db"))                          # counts per status, regions
"""

from __future__ import annotations

import contextlib
import json
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from orchestrator.config import SinkConfig
from orchestrator.errors import NotAFolioDatabase, SinkError
from orchestrator.types import LineText, PageOutcome, PageRef, RecognitionResult, Region

SCHEMA_VERSION = 2
BUSY_TIMEOUT_MS = 30_000
STAGE_TIMINGS = ("read_s", "decode_s", "lines_s", "layout_s", "crop_s", "recognize_s")
REGION_STATS = (
    "model", "prompt_tokens", "completion_tokens", "finish_reason", "latency_s", "ttft_s",
    "tpot_s",
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL DEFAULT 'running',
    config TEXT NOT NULL,
    manifest TEXT NOT NULL,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS documents (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL UNIQUE,
    run_id INTEGER REFERENCES runs(id)
);
CREATE TABLE IF NOT EXISTS pages (
    id INTEGER PRIMARY KEY,
    document_id INTEGER NOT NULL REFERENCES documents(id),
    page INTEGER NOT NULL,
    run_id INTEGER REFERENCES runs(id),
    status TEXT NOT NULL CHECK (status IN ('ok', 'error')),
    error TEXT,
    width INTEGER,
    height INTEGER,
    rotation INTEGER NOT NULL DEFAULT 0,
    read_s REAL,
    decode_s REAL,
    lines_s REAL,
    layout_s REAL,
    crop_s REAL,
    recognize_s REAL,
    written_at TEXT NOT NULL,
    UNIQUE (document_id, page)
);
CREATE TABLE IF NOT EXISTS regions (
    page_id INTEGER NOT NULL REFERENCES pages(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    label TEXT NOT NULL,
    task TEXT NOT NULL,
    score REAL,
    x0 REAL, y0 REAL, x1 REAL, y1 REAL,
    polygon TEXT,
    origin TEXT NOT NULL DEFAULT 'layout',
    text TEXT,
    text_format TEXT,
    confidence REAL,
    error TEXT,
    model TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    finish_reason TEXT,
    latency_s REAL,
    ttft_s REAL,
    tpot_s REAL,
    PRIMARY KEY (page_id, idx)
);
CREATE INDEX IF NOT EXISTS pages_run ON pages(run_id, status);
""" + """
CREATE TABLE IF NOT EXISTS lines (
    page_id INTEGER NOT NULL REFERENCES pages(id) ON DELETE CASCADE,
    region_idx INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    x0 REAL, y0 REAL, x1 REAL, y1 REAL,
    text TEXT,
    score REAL,
    low_confidence INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (page_id, region_idx, idx)
) WITHOUT ROWID;
"""
# Version 1 databases gain the text lines and the per-region fields in place; their pages
# keep what they had (no lines) until a run rewrites them.
_MIGRATE_1_TO_2 = """
ALTER TABLE runs ADD COLUMN status TEXT NOT NULL DEFAULT 'running';
UPDATE runs SET status = 'finished' WHERE finished_at IS NOT NULL;
ALTER TABLE pages ADD COLUMN lines_s REAL;
ALTER TABLE regions ADD COLUMN origin TEXT NOT NULL DEFAULT 'layout';
ALTER TABLE regions ADD COLUMN text_format TEXT;
ALTER TABLE regions ADD COLUMN confidence REAL;
"""

_UPSERT_PAGE = """
INSERT INTO pages (document_id, page, run_id, status, error, width, height, rotation,
                   read_s, decode_s, lines_s, layout_s, crop_s, recognize_s, written_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (document_id, page) DO UPDATE SET
    run_id = excluded.run_id, status = excluded.status, error = excluded.error,
    width = excluded.width, height = excluded.height, rotation = excluded.rotation,
    read_s = excluded.read_s, decode_s = excluded.decode_s, lines_s = excluded.lines_s,
    layout_s = excluded.layout_s, crop_s = excluded.crop_s,
    recognize_s = excluded.recognize_s, written_at = excluded.written_at
RETURNING id
"""
_INSERT_REGION = """
INSERT INTO regions (page_id, idx, label, task, score, x0, y0, x1, y1, polygon, origin, text,
                     text_format, confidence, error, model, prompt_tokens, completion_tokens,
                     finish_reason, latency_s, ttft_s, tpot_s)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_INSERT_LINE = """
INSERT INTO lines (page_id, region_idx, idx, x0, y0, x1, y1, text, score, low_confidence)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

_STOP = object()  # queue marker: commit what is pending, then end the writer thread
_FLUSH = object()  # queue marker: commit what is pending now


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with folio's pragmas."""
    try:
        if readonly:
            conn = _connect_readonly(path)
        else:
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        raise SinkError(f"cannot open database {path}: {exc}") from exc
    return conn


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """``mode=ro``; on read-only media, where a WAL database's -shm file cannot be
    created, ``immutable=1`` (no writer can be active there to change it under us)."""
    uri = path.resolve().as_uri()
    conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
    except sqlite3.OperationalError:
        conn.close()
        conn = sqlite3.connect(f"{uri}?mode=ro&immutable=1", uri=True, isolation_level=None,
                               check_same_thread=False)
    return conn


def open_existing(path: Path) -> sqlite3.Connection:
    """A read-only connection to an existing folio database.

    Raises ``NotAFolioDatabase`` for a missing file, a file that is not SQLite, or an
    SQLite database without folio's tables.
    """
    path = Path(path)
    if not path.is_file():
        raise NotAFolioDatabase(f"database not found: {path}")
    try:
        conn = connect(path, readonly=True)
    except SinkError as exc:
        raise NotAFolioDatabase(f"{path} is not a folio database ({exc.__cause__ or exc})") from exc
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise NotAFolioDatabase(f"{path} is not a folio database ({exc})") from exc
    if not {"documents", "pages", "regions"} <= tables:
        conn.close()
        what = "an empty file" if not tables else "an SQLite database without folio's tables"
        raise NotAFolioDatabase(f"{path} is not a folio database ({what})")
    return conn


def ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version not in (0, 1, SCHEMA_VERSION):
        raise SinkError(
            f"{path} has schema version {version}; this folio writes version {SCHEMA_VERSION}"
        )
    if version == 0:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        if tables - {"runs", "documents", "pages", "regions", "lines"}:
            raise SinkError(f"{path} is an SQLite database, but not a folio one")
        conn.executescript(SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
    elif version == 1:
        conn.executescript(
            "BEGIN IMMEDIATE;" + _MIGRATE_1_TO_2 + SCHEMA
            + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
        )


class _Writer:
    """Holds the statements and the document-id cache of one connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.doc_ids: dict[str, int] = {}

    def document_ids(self, sources: Sequence[str], run_id: int | None) -> None:
        missing = [s for s in dict.fromkeys(sources) if s not in self.doc_ids]
        if not missing:
            return
        cur = self.conn.cursor()
        cur.executemany(
            "INSERT INTO documents (source, run_id) VALUES (?, ?) ON CONFLICT (source) DO NOTHING",
            [(s, run_id) for s in missing],
        )
        for chunk_start in range(0, len(missing), 500):
            chunk = missing[chunk_start : chunk_start + 500]
            marks = ",".join("?" * len(chunk))
            for doc_id, source in cur.execute(
                f"SELECT id, source FROM documents WHERE source IN ({marks})", chunk
            ):
                self.doc_ids[source] = doc_id

    def write(self, outcomes: Sequence[PageOutcome], run_id: int | None) -> int:
        """Write outcomes in the caller's open transaction; returns rows written."""
        self.document_ids([o.ref.source for o in outcomes], run_id)
        cur = self.conn.cursor()
        now = _now()
        rows = 0
        for o in outcomes:
            t = o.timings
            (page_id,) = cur.execute(
                _UPSERT_PAGE,
                (
                    self.doc_ids[o.ref.source], o.ref.page, run_id, o.status, o.error,
                    o.width, o.height, o.rotation,
                    *(t.get(name) for name in STAGE_TIMINGS), now,
                ),
            ).fetchone()
            cur.execute("DELETE FROM lines WHERE page_id = ?", (page_id,))
            cur.execute("DELETE FROM regions WHERE page_id = ?", (page_id,))
            if o.regions:
                cur.executemany(
                    _INSERT_REGION, [_region_row(page_id, r, res) for r, res in o.regions]
                )
                lines = [_line_row(page_id, r.index, i, line)
                         for r, res in o.regions if res is not None
                         for i, line in enumerate(res.lines)]
                if lines:
                    cur.executemany(_INSERT_LINE, lines)
            rows += outcome_rows(o)
        return rows


def _region_row(page_id: int, region: Region, result: RecognitionResult | None
                ) -> tuple[Any, ...]:
    x0, y0, x1, y1 = region.bbox
    polygon = None if region.polygon is None else json.dumps([list(p) for p in region.polygon])
    stats = result.stats if result is not None else {}
    return (
        page_id, region.index, region.label, str(region.task), float(region.score),
        float(x0), float(y0), float(x1), float(y1), polygon, str(region.origin),
        None if result is None else result.text,
        None if result is None or result.text is None else str(result.text_format),
        None if result is None else result.confidence,
        None if result is None else result.error,
        *(stats.get(k) for k in REGION_STATS),
    )


def outcome_rows(outcome: PageOutcome) -> int:
    """Rows one page writes: the page, its regions and their lines."""
    return 1 + len(outcome.regions) + sum(
        len(res.lines) for _, res in outcome.regions if res is not None)


def _line_row(page_id: int, region_idx: int, idx: int, line: LineText) -> tuple[Any, ...]:
    x0, y0, x1, y1 = line.bbox
    return (page_id, region_idx, idx, float(x0), float(y0), float(x1), float(y1), line.text,
            line.score, int(line.low_confidence))


class SQLiteSink:
    """Stores page outcomes in SQLite through one batching writer thread.

    Thread-safe ``submit``; ``write_batch`` writes synchronously on the caller's thread.
    A failure of the writer thread is kept and raised (as ``SinkError``) by the next
    ``submit``, ``flush``, ``finish_run`` or ``close``.
    """

    def __init__(self, path: Path, cfg: SinkConfig | None = None) -> None:
        self.path = Path(path)
        self.cfg = cfg or SinkConfig()
        self.run_id: int | None = None
        self.commits = 0  # transactions committed by the writer thread and write_batch
        self.rows_written = 0
        self._conn = connect(self.path)
        try:
            ensure_schema(self._conn, self.path)
        except sqlite3.Error as exc:
            self._conn.close()
            raise SinkError(f"cannot create the schema in {self.path}: {exc}") from exc
        self._direct = _Writer(self._conn)
        self._direct_lock = threading.Lock()  # the caller-side connection, one user at a time
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, self.cfg.queue_pages))
        self._cond = threading.Condition()
        self._submitted = 0
        self._committed = 0
        self._error: BaseException | None = None
        self._closed = False
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- run bookkeeping

    def start_run(
        self, config: dict[str, Any], manifest: dict[str, Any], sources: Sequence[str]
    ) -> int:
        """Record a run and its documents; returns the run id used for every page."""
        with self._direct_lock, self._transaction(self._conn):
            cur = self._conn.execute(
                "INSERT INTO runs (started_at, config, manifest) VALUES (?, ?, ?)",
                (_now(), _json(config), _json(manifest)),
            )
            run_id = cur.lastrowid
            assert run_id is not None
            self._direct.document_ids(list(sources), run_id)
        self.run_id = run_id
        return run_id

    def done_pages(self) -> set[PageRef]:
        """Pages stored with status 'ok' (any run): what a resumed run skips."""
        # One string object per document, shared by all its PageRefs (1M pages fit).
        with self._direct_lock:
            sources = dict(self._conn.execute("SELECT id, source FROM documents"))
            rows = self._conn.execute("SELECT document_id, page FROM pages WHERE status = 'ok'")
            return {PageRef(sources[doc_id], page) for doc_id, page in rows}

    def finish_run(self, run_id: int, summary: dict[str, Any], status: str = "finished"
                   ) -> None:
        """Flush pending pages, then record the run's end, status (``finished`` or
        ``interrupted``) and summary."""
        self.flush()
        with self._direct_lock, self._transaction(self._conn):
            self._conn.execute(
                "UPDATE runs SET finished_at = ?, status = ?, summary = ? WHERE id = ?",
                (_now(), status, _json(summary), run_id),
            )

    def discard_run(self, run_id: int) -> None:
        """Forget a run that wrote no page (a re-run with nothing left to do): its row goes;
        documents it first saw keep their pages' rows and lose only the reference."""
        self.flush()
        with self._direct_lock, self._transaction(self._conn):
            self._conn.execute("UPDATE documents SET run_id = NULL WHERE run_id = ?", (run_id,))
            self._conn.execute("DELETE FROM runs WHERE id = ?", (run_id,))

    # -------------------------------------------------------------- writing

    def write_batch(self, outcomes: Sequence[PageOutcome]) -> None:
        """Write outcomes now, in one transaction, on the caller's thread."""
        if not outcomes:
            return
        with self._direct_lock, self._transaction(self._conn):
            rows = self._direct.write(outcomes, self.run_id)
        with self._cond:
            self.rows_written += rows

    def queued(self) -> int:
        """Pages waiting for the writer thread now."""
        return self._queue.qsize()

    def submit(self, outcome: PageOutcome) -> None:
        """Queue one page for the writer thread; blocks while the queue is full."""
        self._raise_if_failed()
        if self._closed:
            raise SinkError("submit() after close()")
        if self._thread is None:
            self._start_writer()
        with self._cond:
            self._submitted += 1
        self._put(outcome)

    def _put(self, item: Any) -> None:
        while True:
            try:
                self._queue.put(item, timeout=0.2)
                return
            except queue.Full:
                self._raise_if_failed()
                if self._thread is not None and not self._thread.is_alive():
                    raise SinkError("the sink writer thread is not running") from None

    def flush(self) -> None:
        """Wait until everything submitted so far is committed (or the writer failed)."""
        if self._thread is None:
            return
        self._put(_FLUSH)  # commit the partial batch now, not at the flush interval
        with self._cond:
            while self._committed < self._submitted and self._error is None:
                self._cond.wait(timeout=0.5)
                if not self._thread.is_alive() and self._committed < self._submitted:
                    break
        self._raise_if_failed()
        if self._committed < self._submitted:
            raise SinkError("the sink writer thread stopped before writing every page")

    def close(self) -> None:
        """Flush, stop the writer thread, close the database; re-raise a writer failure."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._thread is not None:
                while self._thread.is_alive():
                    try:
                        self._queue.put(_STOP, timeout=0.2)
                        break
                    except queue.Full:
                        continue
                self._thread.join()
            self._raise_if_failed()
        finally:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA optimize")
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:  # do not hide the original exception behind a sink failure
            with contextlib.suppress(SinkError):
                self.close()

    # -------------------------------------------------------------- internals

    def _connect(self) -> sqlite3.Connection:
        """The writer thread's connection (a hook: tests trace its statements)."""
        return connect(self.path)

    @contextlib.contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise SinkError(f"cannot start a transaction on {self.path}: {exc}") from exc
        try:
            yield
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise SinkError(f"writing to {self.path} failed: {exc}") from exc
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise SinkError(f"commit to {self.path} failed: {exc}") from exc
        with self._cond:
            self.commits += 1

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            error = self._error
            if isinstance(error, SinkError):
                raise SinkError(str(error)) from error
            raise SinkError(f"the sink writer thread failed: {error!r}") from error

    def _start_writer(self) -> None:
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run_writer, name="folio-sink", daemon=True
                )
                self._thread.start()

    def _run_writer(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect()
            writer = _Writer(conn)
            self._writer_loop(writer, conn)
        except BaseException as exc:  # kept and re-raised by submit/flush/close
            with self._cond:
                self._error = exc
                self._cond.notify_all()
            self._drain()
        finally:
            if conn is not None:
                conn.close()

    def _writer_loop(self, writer: _Writer, conn: sqlite3.Connection) -> None:
        batch_rows = self.cfg.batch_rows
        interval = self.cfg.flush_interval_s
        pending: list[PageOutcome] = []
        rows = 0
        deadline = 0.0
        stop = False
        while not stop:
            timeout = None if not pending else max(0.0, deadline - time.monotonic())
            try:
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            flush = item is _FLUSH
            if item is _STOP:
                stop = True
            elif item is not None and not flush:
                if not pending:
                    deadline = time.monotonic() + interval
                pending.append(item)
                rows += outcome_rows(item)
            if pending and (
                stop or flush or rows >= batch_rows or time.monotonic() >= deadline
            ):
                with self._transaction(conn):
                    writer.write(pending, self.run_id)
                with self._cond:
                    self._committed += len(pending)
                    self.rows_written += rows
                    self._cond.notify_all()
                pending, rows = [], 0

    def _drain(self) -> None:
        """After a failure: keep emptying the queue so no submitter blocks forever."""
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if item is _STOP:
                return


def run_stats(db: Path | sqlite3.Connection, run_id: int | None = None) -> dict[str, Any]:
    """Counts for a database or one run: pages per status, regions, region errors."""
    conn = db if isinstance(db, sqlite3.Connection) else connect(Path(db), readonly=True)
    try:
        where, args = ("WHERE p.run_id = ?", (run_id,)) if run_id is not None else ("", ())
        pages = dict(
            conn.execute(f"SELECT p.status, COUNT(*) FROM pages p {where} GROUP BY p.status", args)
        )
        regions, region_errors = conn.execute(
            "SELECT COUNT(*), COALESCE(SUM(r.error IS NOT NULL), 0) FROM regions r "
            f"JOIN pages p ON p.id = r.page_id {where}",
            args,
        ).fetchone()
        documents = conn.execute(
            f"SELECT COUNT(DISTINCT p.document_id) FROM pages p {where}", args
        ).fetchone()[0]
        return {
            "documents": documents,
            "pages": sum(pages.values()),
            "pages_ok": pages.get("ok", 0),
            "pages_error": pages.get("error", 0),
            "regions": regions,
            "region_errors": region_errors,
        }
    finally:
        if conn is not db:
            conn.close()
