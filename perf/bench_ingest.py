"""Arrow/Parquet shard ingest: pages/s and MB/s of encoded bytes out of a shard.

Builds shards of N rows (default 20,000) in a temp dir from real corpus images -- the
three corpus PNGs as they are, plus grayscale JPEGs (quality 75) of the corpus PDF pages
rendered at 100 dpi -- with
an HF ``datasets``-style column ``image: struct<bytes: binary, path: string>``, in three
layouts: Arrow IPC stream (what ``datasets`` writes), Arrow IPC file, Parquet (pyarrow's
default snappy compression; row groups of 1000). Every row gets an 8-byte trailer so that
no two rows are equal (else Parquet dictionary-encodes the repeats). Then
times reading every page's bytes (no decoding) with:

- folio: ``open_sources([shard]).pages()`` (memory-mapped, buffer slicing),
- per-batch ``to_pylist()``: ``column.to_pylist()`` per record batch, then the dicts,
- naive per-row: ``table.slice(i, 1).to_pylist()`` for every row.

The shard files are written then read warm (in the page cache). Run::

    .venv/bin/python perf/bench_ingest.py [--rows 20000] [--naive-rows 5000]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from corpus import CORPUS_PAGES
from PIL import Image

from orchestrator.config import SourceConfig
from orchestrator.stages.sources import open_sources

CORPUS = CORPUS_PAGES
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def corpus_images() -> list[tuple[str, bytes]]:
    images = [(p.name, p.read_bytes()) for p in sorted(CORPUS.glob("*.png"))]
    cfg = SourceConfig(dpi=100)
    for page in open_sources(sorted(CORPUS.glob("*.pdf")), cfg).pages():
        if page.pixels is None:
            continue
        buf = io.BytesIO()
        gray = Image.fromarray(page.pixels[:, :, ::-1]).convert("L")
        gray.save(buf, format="JPEG", quality=75)
        images.append((f"{Path(page.ref.source).stem}-{page.ref.page}.jpg", buf.getvalue()))
    return images


SCHEMA = pa.schema([("image", IMAGE_TYPE), ("id", pa.int64())])
BATCH_ROWS = 1000  # rows per record batch / Parquet row group (datasets writes 1000)


def batches(images: list[tuple[str, bytes]], rows: int) -> Iterator[pa.RecordBatch]:
    for start in range(0, rows, BATCH_ROWS):
        ids = range(start, min(rows, start + BATCH_ROWS))
        # An 8-byte trailer (ignored by PNG/JPEG decoders) makes every row unique, as in a
        # real dataset: Parquet must not dictionary-encode 23 repeated images.
        cells = [
            {"bytes": images[i % len(images)][1] + i.to_bytes(8, "little"),
             "path": images[i % len(images)][0]}
            for i in ids
        ]
        yield pa.record_batch(
            [pa.array(cells, type=IMAGE_TYPE), pa.array(list(ids), type=pa.int64())],
            schema=SCHEMA,
        )


def write_shard(
    layout: str, images: list[tuple[str, bytes]], rows: int, folder: Path, compression: str
) -> Path:
    """One shard, written batch by batch (memory stays at one batch)."""
    if layout == "parquet":
        path = folder / "shard.parquet"
        with pq.ParquetWriter(path, SCHEMA, compression=compression) as pw:
            for batch in batches(images, rows):
                pw.write_batch(batch, row_group_size=BATCH_ROWS)
        return path
    path = folder / f"{layout}.arrow"
    new = pa.ipc.new_stream if layout == "arrow-stream" else pa.ipc.new_file
    with pa.OSFile(str(path), "wb") as sink, new(sink, SCHEMA) as writer:
        for batch in batches(images, rows):
            writer.write_batch(batch)
    return path


def read_table(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        return pq.read_table(path)
    with pa.memory_map(str(path)) as source:
        head = source.read(6)
        source.seek(0)
        if head == b"ARROW1":
            return pa.ipc.open_file(source).read_all()
        return pa.ipc.open_stream(source).read_all()


def folio_reader(path: Path) -> tuple[int, int]:
    pages = nbytes = 0
    for page in open_sources([path], SourceConfig()).pages():
        pages += 1
        nbytes += len(page.data or b"")
    return pages, nbytes


def batch_pylist_reader(path: Path) -> tuple[int, int]:
    pages = nbytes = 0
    for batch in read_table(path).to_batches():
        for cell in batch.column(0).to_pylist():
            pages += 1
            nbytes += len(cell["bytes"])
    return pages, nbytes


def naive_reader(path: Path, limit: int) -> tuple[int, int]:
    table = read_table(path)
    pages = nbytes = 0
    for i in range(min(limit, table.num_rows)):
        row = table.slice(i, 1).to_pylist()[0]
        pages += 1
        nbytes += len(row["image"]["bytes"])
    return pages, nbytes


def timed(fn: object, *args: object) -> tuple[float, int, int]:
    start = time.perf_counter()
    pages, nbytes = fn(*args)  # type: ignore[operator]
    return time.perf_counter() - start, pages, nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--naive-rows", type=int, default=5_000,
                        help="rows the naive per-row reader reads (its rate is per row)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N")
    parser.add_argument("--parquet-compression", default="snappy", help="snappy (default), none")
    parser.add_argument("--layouts", default="arrow-stream,arrow-file,parquet")
    args = parser.parse_args()

    images = corpus_images()
    mean_kb = sum(len(images[i % len(images)][1]) for i in range(args.rows)) / args.rows / 1024
    print(f"{args.rows} rows from {len(images)} corpus images, mean encoded page {mean_kb:.0f} KiB")
    for layout in args.layouts.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            path = write_shard(layout, images, args.rows, Path(tmp), args.parquet_compression)
            size_mb = path.stat().st_size / 1e6
            results = {}
            for name, fn, extra in (
                ("folio", folio_reader, ()),
                ("per-batch to_pylist", batch_pylist_reader, ()),
                ("naive per-row to_pylist", naive_reader, (args.naive_rows,)),
            ):
                best = min(
                    (timed(fn, path, *extra) for _ in range(args.repeat)), key=lambda r: r[0]
                )
                results[name] = best
        note = f", {args.parquet_compression}" if layout == "parquet" else ""
        print(f"\n{layout} ({size_mb:,.0f} MB{note}):")
        for name, (seconds, pages, nbytes) in results.items():
            print(f"  {name:26s} {pages / seconds:12,.0f} pages/s "
                  f"{nbytes / seconds / 1e6:10,.0f} MB/s  ({pages} pages in {seconds:.3f} s)")
        folio_rate = results["folio"][1] / results["folio"][0]
        for name in ("per-batch to_pylist", "naive per-row to_pylist"):
            seconds, pages, _ = results[name]
            print(f"  folio / {name:24s} {folio_rate / (pages / seconds):8.1f}x")


if __name__ == "__main__":
    main()
