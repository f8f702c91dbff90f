"""End to end through the `folio` CLI: real pages in, SQLite out, exports, faults, resume."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from textmetrics import word_f1

from orchestrator.config import FolioConfig

FOLIO = [sys.executable, "-m", "orchestrator.cli"]
pytestmark = pytest.mark.slow


def folio(*args: str | Path, timeout: float = 900, check: int | None = None,
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*FOLIO, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def page_rows(db: Path) -> list[tuple[str, int, str, str | None]]:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT d.source, p.page, p.status, p.error FROM pages p "
            "JOIN documents d ON d.id = p.document_id ORDER BY d.source, p.page"
        ).fetchall()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


@pytest.fixture(scope="session")
def corpus_run(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, model_dir: Path
               ) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One run over every real page in the corpus, shared by the checks below."""
    db = tmp_path_factory.mktemp("corpus") / "folio.db"
    proc = folio("run", corpus_dir / "pages", "--db", db, "--no-progress")
    return db, proc


def test_every_corpus_page_is_ok(corpus_run: tuple[Path, subprocess.CompletedProcess[str]],
                                 corpus_dir: Path) -> None:
    db, proc = corpus_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = page_rows(db)
    failed = [r for r in rows if r[2] != "ok"]
    assert not failed
    pdf_pages = {"cardinal.pdf": 4, "multipage.pdf": 6}
    by_source: dict[str, int] = {}
    for source, _, _, _ in rows:
        name = Path(source).name
        by_source[name] = by_source.get(name, 0) + 1
    expected = {p.name for p in (corpus_dir / "pages").iterdir() if p.suffix in (".png", ".pdf")}
    assert set(by_source) == expected
    for name, count in pdf_pages.items():
        assert by_source[name] == count
    assert "1 files skipped" in proc.stdout  # linn.txt
    assert "pages/s" in proc.stdout


def test_stage_times_are_work_not_queueing(
        corpus_run: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    """Recognition time per page is the thread-seconds spent on it. Pages overlap in the
    recogniser's queue, so counting each page's wait instead summed to 4x the run's
    length over 2 workers (92 s of "recognition" in a 22 s run)."""
    db, _ = corpus_run
    with sqlite3.connect(db) as conn:
        (summary,) = conn.execute("SELECT summary FROM runs ORDER BY id DESC LIMIT 1").fetchone()
        per_page = [r for (r,) in conn.execute("SELECT recognize_s FROM pages")]
    summary = json.loads(summary)
    workers = FolioConfig().recognize.workers
    recognize = summary["stage_wall_s"]["recognize"]
    assert 0 < recognize <= summary["elapsed_s"] * workers
    assert recognize == pytest.approx(sum(per_page), rel=1e-3, abs=1e-2)


def test_linn_text_matches_its_transcript(corpus_run: tuple[Path, subprocess.CompletedProcess[str]],
                                          corpus_dir: Path, tmp_path: Path) -> None:
    db, _ = corpus_run
    out = tmp_path / "pages.jsonl"
    folio("export", db, "--format", "jsonl", "--out", out, check=0)
    pages = {Path(p["source"]).name + f"#{p['page']}": p for p in read_jsonl(out)}
    linn = pages["linn.png#1"]
    assert (linn["width"], linn["height"]) == (2550, 3300)
    text = "\n".join(r["text"] or "" for r in linn["regions"])
    expected = (corpus_dir / "pages" / "linn.txt").read_text(encoding="utf-8")
    assert word_f1(text, expected) >= 0.95
    # Column-aware reading order: the left column's heading comes before the right one's.
    markdown = linn["markdown"]
    assert markdown.index("Recording a Sequence") < markdown.index("Creating a Song")
    assert markdown.index("Editing") < markdown.index("Composition Without Compromise")
    for region in linn["regions"]:
        x0, y0, x1, y1 = region["bbox"]
        assert 0 <= x0 < x1 <= 2550 and 0 <= y0 < y1 <= 3300
        assert region["task"] in ("text", "table", "formula", "skip")


def test_turned_pages_are_read_upright(
    corpus_run: tuple[Path, subprocess.CompletedProcess[str]], corpus_dir: Path, tmp_path: Path
) -> None:
    """cardinal.pdf holds linn.png turned four ways: every copy reads like linn.txt."""
    db, _ = corpus_run
    out = tmp_path / "pages.jsonl"
    folio("export", db, "--format", "jsonl", "--out", out, check=0)
    cardinal = [p for p in read_jsonl(out) if Path(p["source"]).name == "cardinal.pdf"]
    expected = (corpus_dir / "pages" / "linn.txt").read_text(encoding="utf-8")
    assert sorted(p["rotation"] for p in cardinal) == [0, 90, 180, 270]
    for page in cardinal:
        text = "\n".join(r["text"] or "" for r in page["regions"])
        assert word_f1(text, expected) >= 0.9, (page["page"], page["rotation"])
        assert (page["width"], page["height"]) == (1700, 2200)
    turned = next(p for p in cardinal if p["rotation"] in (90, 270))
    png = tmp_path / "turned.png"
    folio("show", db, f"{turned['source']}#{turned['page']}", "--out", png, check=0)
    with Image.open(png) as shown:
        assert shown.size == (1700, 2200)


def test_exports_and_show(corpus_run: tuple[Path, subprocess.CompletedProcess[str]],
                          tmp_path: Path) -> None:
    db, _ = corpus_run
    md_dir = tmp_path / "md"
    folio("export", db, "--format", "markdown", "--out", md_dir, "--compact",
          tmp_path / "compact.db", check=0)
    files = sorted(md_dir.glob("*.md"))
    assert len(files) == len(page_rows(db))
    assert any("LinnSequencer" in f.read_text(encoding="utf-8") for f in files)
    assert page_rows(tmp_path / "compact.db") == page_rows(db)
    png = tmp_path / "linn.png"
    source = next(s for s, *_ in page_rows(db) if s.endswith("linn.png"))
    folio("show", db, f"{source}#1", "--out", png, check=0)
    with Image.open(png) as shown:
        assert shown.size == (2550, 3300)


def test_rerun_resumes_without_duplicates(corpus_run: tuple[Path, subprocess.CompletedProcess[str]],
                                          corpus_dir: Path) -> None:
    db, _ = corpus_run

    def counts() -> tuple[int, int]:
        with sqlite3.connect(db) as conn:
            return (conn.execute("SELECT COUNT(*) FROM regions").fetchone()[0],
                    conn.execute("SELECT COUNT(*) FROM lines").fetchone()[0])

    before, stored = page_rows(db), counts()
    assert stored[1] > 500  # the corpus's text lines are stored
    proc = folio("run", corpus_dir / "pages", "--db", db, "--no-progress", "--json", check=0)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["pages"] == 0 and summary["resumed"] == len(before)
    assert page_rows(db) == before and counts() == stored


def _bad_inputs(root: Path, corpus_dir: Path) -> Path:
    """Every bad case in one folder tree, with awkward names."""
    bad = root / "bad inputs 'quoted' ünïcödé"
    bad.mkdir()
    for pdf in (corpus_dir / "bad").iterdir():
        shutil.copy(pdf, bad / pdf.name)
    (bad / "zero bytes.png").write_bytes(b"")
    (bad / "not an image.png").write_text("hello, I am text\n")
    jpeg = io.BytesIO()
    Image.open(corpus_dir / "pages" / "typewriter.png").convert("RGB").save(jpeg, "JPEG")
    (bad / "truncated.jpg").write_bytes(jpeg.getvalue()[:2000])
    (bad / "empty folder").mkdir()
    (bad / "empty folder" / "notes.txt").write_text("no images here")
    shutil.copy(corpus_dir / "pages" / "typewriter.png", bad / "good page ☃.png")
    return bad


def test_bad_inputs_become_error_rows_and_the_run_goes_on(
    tmp_path: Path, corpus_dir: Path, model_dir: Path
) -> None:
    bad = _bad_inputs(tmp_path, corpus_dir)
    db = tmp_path / "bad.db"
    proc = folio("run", bad, bad / "empty folder", tmp_path / "missing.pdf", "--db", db,
                 "--no-progress")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    rows = {(Path(s).name, p): (status, error) for s, p, status, error in page_rows(db)}
    assert rows[("good page ☃.png", 1)] == ("ok", None)
    expect_error = {
        "invalid.pdf": "PDF", "hugemono.pdf": "limit", "zero bytes.png": "empty",
        "not an image.png": "not a recognised image", "empty folder": "no images",
        "missing.pdf": "not found",
    }
    for name, words in expect_error.items():
        status, error = rows[(name, 1)]
        assert status == "error" and error and words.lower() in error.lower(), (name, error)
    # Truncated JPEG (2,000 of its bytes): an error row that says what is wrong with the
    # bytes, not a stack frame or the decoder's bare "Failed to decode sample".
    status, error = rows[("truncated.jpg", 1)]
    assert status == "error" and (error or "").startswith("cannot decode image:"), error
    assert "truncated" in (error or "") and 'File "' not in (error or ""), error
    # The valid-but-odd PDFs give an empty or normal result, never a crash.
    for name in ("blank.pdf", "no_contents.pdf", "trivial.pdf", "kcs.pdf", "enormous.pdf"):
        assert (name, 1) in rows


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    bad_cfg = tmp_path / "bad.toml"
    bad_cfg.write_text("[layout]\nnms_iou = 7\n")
    proc = folio("run", tmp_path, "--db", tmp_path / "x.db", "--config", bad_cfg)
    assert proc.returncode == 2 and "layout.nms_iou" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = folio("run", tmp_path, "--db", tmp_path / "x.db", "--config", tmp_path / "nope.toml")
    assert proc.returncode == 2 and "not found" in proc.stderr
    proc = folio("run", tmp_path, "--db", tmp_path / "x.db", "--model-dir", tmp_path)
    assert proc.returncode == 2 and "make models" in proc.stderr


def test_sigkill_midway_then_rerun_keeps_every_page_once(
    tmp_path: Path, corpus_dir: Path, model_dir: Path
) -> None:
    pages = corpus_dir / "pages"
    sources = [pages / "multipage.pdf", pages / "cardinal.pdf", pages / "typewriter.png"]
    db = tmp_path / "killed.db"
    proc = subprocess.Popen([*FOLIO, "run", *map(str, sources), "--db", str(db),
                             "--no-progress", "--sink-batch-rows", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    written = 0
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if db.exists():
            try:
                written = len(page_rows(db))
            except sqlite3.Error:
                continue
            if written >= 3:
                break
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = page_rows(db)
    assert 3 <= len(partial) < 11
    folio("run", *sources, "--db", db, "--no-progress", check=0)
    rows = page_rows(db)
    keys = [(s, p) for s, p, _, _ in rows]
    assert len(keys) == len(set(keys)) == 11  # 6 + 4 + 1 pages, each exactly once
    assert all(status == "ok" for _, _, status, _ in rows)
    with sqlite3.connect(db) as conn:
        dup = conn.execute(
            "SELECT COUNT(*) FROM (SELECT page_id, idx FROM regions GROUP BY page_id, idx "
            "HAVING COUNT(*) > 1)").fetchone()[0]
    assert dup == 0


def test_arrow_and_parquet_shards_without_temp_files(
    tmp_path: Path, corpus_dir: Path, model_dir: Path
) -> None:
    names = ["typewriter.png", "baiona.png"]
    images = [{"bytes": (corpus_dir / "pages" / n).read_bytes(), "path": n} for n in names]
    table = pa.table({"image": images, "id": [1, 2]})
    shards = tmp_path / "shards"
    shards.mkdir()
    with pa.OSFile(str(shards / "data-00000.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    pq.write_table(table, shards / "data-00001.parquet")
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_dir)}
    before = sorted(p.name for p in shards.iterdir())
    db = tmp_path / "shards.db"
    proc = folio("run", shards / "data-00000.arrow", shards / "data-00001.parquet", "--db", db,
                 "--no-progress", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # onnxruntime drops a 51-byte `.ses` session marker at import; nothing else may appear.
    assert [p.name for p in tmp_dir.iterdir() if p.name != ".ses"] == []
    assert sorted(p.name for p in shards.iterdir() if p.suffix != ".db") == before
    rows = page_rows(db)
    assert [(Path(s).name, p, st) for s, p, st, _ in rows] == [
        ("data-00000.arrow", 1, "ok"), ("data-00000.arrow", 2, "ok"),
        ("data-00001.parquet", 1, "ok"), ("data-00001.parquet", 2, "ok"),
    ]
