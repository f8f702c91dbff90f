"""SQLite sink: rows/s with batched transactions vs a commit per row, same data, one run.

Writes N pages x K regions (realistic text and vLLM stats) four ways into fresh
databases in a temp dir:

1. ``SQLiteSink.submit`` (the product path: writer thread, batches of sink.batch_rows),
2. ``SQLiteSink.write_batch`` in chunks of batch_rows pages (synchronous),
3. a commit per row with the sink's own pragmas (WAL, synchronous=NORMAL: no fsync per
   commit, so a commit costs only a WAL append),
4. a commit per row in WAL with synchronous=FULL (one fsync per commit),
5. a commit per row with SQLite's defaults (rollback journal, synchronous=FULL): what a
   naive "insert and commit inside the inference loop" writer does.

The per-row writers run the sink's own ``_Writer`` on an autocommit connection: the same
upsert/delete/insert statements, only each statement commits on its own. Run::

    .venv/bin/python perf/bench_sink.py [--pages 2000] [--regions 10] [--per-row-pages N]

By default every writer gets all the data; ``--per-row-pages`` limits the slow writers to
the first N pages (rates are per row, so the ratio stays like-for-like).
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

from orchestrator.config import SinkConfig
from orchestrator.stages.sink import SQLiteSink, _now, _Writer, ensure_schema
from orchestrator.types import PageOutcome, PageRef, RecognitionResult, Region, Task

WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dogs", "while", "folio", "reads",
    "scanned", "pages",
]


def make_data(pages: int, regions: int) -> list[PageOutcome]:
    out = []
    for p in range(pages):
        items: list[tuple[Region, RecognitionResult | None]] = []
        for i in range(regions):
            text = " ".join(WORDS[(p + i + k) % len(WORDS)] for k in range(30))  # ~170 chars
            items.append((
                Region(i, "text", Task.TEXT, 0.9, (10.0 * i, 20.0, 10.0 * i + 300, 60.0)),
                RecognitionResult(text=text, stats={
                    "model": "glm-ocr", "prompt_tokens": 812, "completion_tokens": 45,
                    "finish_reason": "stop", "latency_s": 0.41, "ttft_s": 0.12, "tpot_s": 0.006,
                }),
            ))
        out.append(PageOutcome(
            PageRef(f"/data/doc{p // 50:04d}.pdf", p % 50 + 1), "ok", None, 1700, 2200, items,
            {"read_s": 0.01, "decode_s": 0.02, "layout_s": 0.03, "crop_s": 0.001,
             "recognize_s": 0.5},
        ))
    return out


def rows_of(data: list[PageOutcome]) -> int:
    return sum(1 + len(o.regions) for o in data)


def bench_submit(path: Path, data: list[PageOutcome], cfg: SinkConfig) -> tuple[float, int]:
    start = time.perf_counter()
    with SQLiteSink(path, cfg) as sink:
        sink.start_run({}, {}, sorted({o.ref.source for o in data}))
        for o in data:
            sink.submit(o)
        sink.flush()
        commits = sink.commits
    return time.perf_counter() - start, commits


def bench_write_batch(path: Path, data: list[PageOutcome], cfg: SinkConfig) -> float:
    per_page = max(1, len(data[0].regions) + 1)
    chunk = max(1, cfg.batch_rows // per_page)
    start = time.perf_counter()
    with SQLiteSink(path, cfg) as sink:
        sink.start_run({}, {}, sorted({o.ref.source for o in data}))
        for i in range(0, len(data), chunk):
            sink.write_batch(data[i : i + chunk])
    return time.perf_counter() - start


def bench_per_row(path: Path, data: list[PageOutcome], pragmas: tuple[str, ...]) -> float:
    """Every statement its own transaction (autocommit), through the sink's own writer."""
    start = time.perf_counter()
    conn = sqlite3.connect(str(path), isolation_level=None)
    for pragma in pragmas:
        conn.execute(f"PRAGMA {pragma}")
    conn.execute("PRAGMA foreign_keys = ON")
    ensure_schema(conn, path)
    conn.execute(
        "INSERT INTO runs (started_at, config, manifest) VALUES (?, '{}', '{}')", (_now(),)
    )
    writer = _Writer(conn)
    for outcome in data:
        writer.write([outcome], 1)
    conn.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--regions", type=int, default=10)
    parser.add_argument("--per-row-pages", type=int, default=None)
    parser.add_argument("--batch-rows", type=int, default=SinkConfig().batch_rows)
    parser.add_argument("--dir", type=Path, default=None, help="where the databases go")
    args = parser.parse_args()

    cfg = SinkConfig(batch_rows=args.batch_rows)
    data = make_data(args.pages, args.regions)
    slow = data[: args.per_row_pages or args.pages]
    total, slow_rows = rows_of(data), rows_of(slow)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        t_submit, commits = bench_submit(folder / "submit.db", data, cfg)
        t_batch = bench_write_batch(folder / "batch.db", data, cfg)
        t_row_wal = bench_per_row(
            folder / "row_wal.db", slow, ("journal_mode = WAL", "synchronous = NORMAL")
        )
        t_row_full = bench_per_row(
            folder / "row_full.db", slow, ("journal_mode = WAL", "synchronous = FULL")
        )
        t_row_default = bench_per_row(folder / "row_default.db", slow, ())

    rates = {
        "sink submit (writer thread, batched)": total / t_submit,
        "sink write_batch (batched)": total / t_batch,
        "commit per row, WAL + synchronous=NORMAL": slow_rows / t_row_wal,
        "commit per row, WAL + synchronous=FULL": slow_rows / t_row_full,
        "commit per row, SQLite defaults (DELETE journal, FULL)": slow_rows / t_row_default,
    }
    print(f"data: {args.pages} pages x {args.regions} regions = {total} rows "
          f"(per-row writers: first {len(slow)} pages = {slow_rows} rows); "
          f"batch_rows={cfg.batch_rows}, {commits} writer commits")
    for name, rate in rates.items():
        print(f"  {name:58s} {rate:12,.0f} rows/s {1e6 / rate:8.1f} us/row")
    base = rates["sink submit (writer thread, batched)"]
    print(f"ratio batched (submit) / commit-per-row WAL+NORMAL : "
          f"{base / rates['commit per row, WAL + synchronous=NORMAL']:8.1f}x")
    print(f"ratio batched (submit) / commit-per-row WAL+FULL   : "
          f"{base / rates['commit per row, WAL + synchronous=FULL']:8.1f}x")
    print(f"ratio batched (submit) / commit-per-row defaults   : "
          f"{base / rates['commit per row, SQLite defaults (DELETE journal, FULL)']:8.1f}x")


if __name__ == "__main__":
    main()
