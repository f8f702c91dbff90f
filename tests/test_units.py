"""Units and their Parquet files, without Ray: planning, reading, the schema, atomic
writes, resume checks and import into SQLite."""

from __future__ import annotations

import io
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from orchestrator.config import FolioConfig
from orchestrator.engines import parquet_out, storage
from orchestrator.engines.units import Document, Unit, plan_units, read_unit, unit_name
from orchestrator.errors import ConfigError, SinkError
from orchestrator.types import (
    LineText,
    Origin,
    PageOutcome,
    PageRef,
    RecognitionResult,
    Region,
    Task,
    TextFormat,
)

SOURCES = FolioConfig().sources


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (value, value, value)).save(buffer, format="PNG")
    return buffer.getvalue()


def _shard(path: Path, groups: list[int]) -> list[bytes]:
    """A Hugging Face style Parquet shard (image: struct<bytes, path>) with row groups of
    the given sizes; returns each row's bytes."""
    cells = [_png(i) for i in range(sum(groups))]
    kind = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    with pq.ParquetWriter(path, pa.schema([("image", kind)])) as writer:
        row = 0
        for size in groups:
            batch = [{"bytes": c, "path": f"p{row + i}.png"}
                     for i, c in enumerate(cells[row:row + size])]
            writer.write_table(pa.table({"image": pa.array(batch, type=kind)}))
            row += size
    return cells


def test_unit_names_are_fixed_by_document_and_range() -> None:
    name = unit_name("/data/a/scan.pdf", 1, 64)
    assert name == unit_name("/data/a/scan.pdf", 1, 64)
    assert name.startswith("scan-") and name.endswith(".p000001-000064.parquet")
    assert name != unit_name("/data/b/scan.pdf", 1, 64)  # same file name, other folder
    assert name != unit_name("/data/a/scan.pdf", 65, 128)


def test_a_pdf_is_cut_into_page_ranges_read_lazily(corpus_dir: Path) -> None:
    doc = Document(str(corpus_dir / "pages" / "multipage.pdf"), "pdf")
    units = plan_units(doc, SOURCES, 4)
    assert [(u.first, u.last) for u in units] == [(1, 4), (5, 6)]
    pages = list(read_unit(units[1], SOURCES))
    assert [p.ref.page for p in pages] == [5, 6]
    assert all(p.error is None and p.pixels is not None for p in pages)


def test_parquet_units_are_whole_row_groups(tmp_path: Path) -> None:
    shard = tmp_path / "train-00000.parquet"
    cells = _shard(shard, [3, 3, 2])
    doc = Document(str(shard), "parquet")
    assert [(u.first, u.last) for u in plan_units(doc, SOURCES, 4)] == [(1, 3), (4, 6), (7, 8)]
    units = plan_units(doc, SOURCES, 6)
    assert [(u.first, u.last) for u in units] == [(1, 6), (7, 8)]
    pages = list(read_unit(units[1], SOURCES))
    assert [p.ref.page for p in pages] == [7, 8]
    assert [p.data for p in pages] == cells[6:8]  # the row's bytes as stored, undecoded


def test_a_unit_ends_whole_when_its_source_breaks_off(tmp_path: Path) -> None:
    shard = tmp_path / "s.parquet"
    _shard(shard, [2, 2])
    (unit,) = plan_units(Document(str(shard), "parquet"), SOURCES, 4)
    shard.write_bytes(shard.read_bytes()[:200])  # truncated after planning
    pages = list(read_unit(unit, SOURCES))
    assert [p.ref.page for p in pages] == [1, 2, 3, 4]
    assert pages[0].error is not None and "cannot read Parquet shard" in pages[0].error
    assert all(p.error is not None and "not read after page 1" in p.error for p in pages[1:])


def test_a_missing_path_is_one_error_unit() -> None:
    (unit,) = plan_units(Document("/nowhere/x.pdf", "error", "file not found: x"), SOURCES, 8)
    (page,) = read_unit(unit, SOURCES)
    assert (page.ref.page, page.error) == (1, "file not found: x")


def _outcome(source: str, page: int) -> PageOutcome:
    title = Region(0, "title", Task.TEXT, 0.9, (1.5, 2.25, 100.0, 20.0))
    figure = Region(1, "figure", Task.SKIP, 0.8, (0.0, 30.0, 50.0, 80.0),
                    polygon=((0.0, 30.0), (50.0, 30.0), (50.0, 80.0)))
    block = Region(2, "text", Task.TEXT, 0.0, (3.0, 90.0, 40.0, 99.0), origin=Origin.LINES)
    read = RecognitionResult(
        text="Title", stats={"model": "m", "latency_s": 0.25},
        lines=[LineText((1.5, 2.25, 60.0, 19.0), "Title", 0.98),
               LineText((61.0, 2.0, 99.0, 19.0), "x", 0.2, low_confidence=True)],
        confidence=0.97, text_format=TextFormat.PLAIN)
    failed = RecognitionResult(text=None, error="recognition failed: boom")
    return PageOutcome(PageRef(source, page), "ok", None, 200, 100,
                       [(title, read), (figure, None), (block, failed)],
                       {"read_s": 0.01, "decode_s": 0.02, "recognize_s": 0.5}, rotation=90)


def test_a_page_survives_the_parquet_schema_unchanged() -> None:
    unit = Unit("/d/a.pdf", "pdf", 3, 4)
    pages = [_outcome("/d/a.pdf", 4), PageOutcome(PageRef("/d/a.pdf", 3), "error",
                                                  "cannot render page: x", None, None, [])]
    table = parquet_out.unit_table(unit, pages)
    assert table.schema.equals(parquet_out.SCHEMA)  # metadata aside
    assert table.column("page").to_pylist() == [3, 4]  # in page order
    back = [parquet_out.row_outcome(row) for row in table.to_pylist()]
    assert back == sorted(pages, key=lambda o: o.ref.page)


def test_a_unit_file_is_written_only_whole() -> None:
    with pytest.raises(SinkError, match="not whole"):
        parquet_out.unit_table(Unit("/d/a.pdf", "pdf", 1, 3),
                               [_outcome("/d/a.pdf", 1), _outcome("/d/a.pdf", 3)])


def test_write_import_and_import_again(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    parquet_out.open_output(out, 2, {"sources": {"dpi": 200}}, {"engine": "ray"})
    for first in (1, 3):
        unit = Unit("/d/a.pdf", "pdf", first, first + 1)
        parquet_out.write_unit(out, unit, [_outcome("/d/a.pdf", p) for p in (first, first + 1)])
    assert not list((tmp_path / "out" / storage.TEMP_DIR).iterdir())  # renamed, none left
    assert parquet_out.done_units(out) == {unit_name("/d/a.pdf", 1, 2),
                                           unit_name("/d/a.pdf", 3, 4)}
    db = tmp_path / "x.db"
    for _ in range(2):
        summary = parquet_out.import_output(out, db)
        assert (summary.files, summary.pages, summary.ok) == (2, 4, 4)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM pages").fetchone() == (4,)
        assert conn.execute("SELECT count(*) FROM regions").fetchone() == (12,)
        assert conn.execute("SELECT count(*) FROM lines").fetchone() == (8,)
        assert conn.execute("SELECT count(*) FROM runs").fetchone() == (2,)


def test_an_output_resumes_only_with_its_unit_size(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    parquet_out.open_output(out, 4, {}, {})
    parquet_out.open_output(out, 4, {}, {})  # the same size: fine
    with pytest.raises(ConfigError, match="unit_pages = 4"):
        parquet_out.open_output(out, 8, {}, {})


def test_a_unit_file_of_another_schema_version_is_refused(tmp_path: Path) -> None:
    table = parquet_out.unit_table(Unit("/d/a.pdf", "pdf", 1, 1), [_outcome("/d/a.pdf", 1)])
    meta = {**table.schema.metadata, b"folio.schema_version": b"99"}
    with pytest.raises(SinkError, match="schema version 99"):
        parquet_out.check_table("x.parquet", table.replace_schema_metadata(meta))


def _folio(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("args", "message"), [
    (("run", "x.png"), "give --db"),
    (("run", "x.png", "--engine", "ray", "--db", "a.db"), "give --out"),
    (("run", "x.png", "--engine", "ray", "--out", "o", "--limit", "3"), "not supported by the Ray"),
    (("run", "x.png", "--engine", "ray", "--out", "zz://b/o"), "Protocol not known: zz"),
    (("import", "/nowhere/out", "--db", "a.db"), "is not a folio output"),
])
def test_usage_errors_are_one_line_and_exit_2(args: tuple[str, ...], message: str) -> None:
    proc = _folio(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_ray_config_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"ray\.unit_pages"):
        FolioConfig().override({"ray.unit_pages": 0})
    with pytest.raises(ConfigError, match=r"ray\.address"):
        FolioConfig().override({"ray.address": "somewhere"})
    cfg = FolioConfig().override({"ray.vllm_urls": ["http://a:8012", "http://b:8012"]})
    assert cfg.ray.vllm_urls == ("http://a:8012", "http://b:8012")
