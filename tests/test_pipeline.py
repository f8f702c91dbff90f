"""Pipeline faults that the real stages cannot produce on demand: fakes say so in their names."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest

from orchestrator.config import FolioConfig
from orchestrator.engines.pipeline import Pipeline
from orchestrator.errors import LayoutError, PageError
from orchestrator.stages.recognize import RapidOCRRecognizer
from orchestrator.types import DecodedPage, EncodedPage, LayoutResult


class FakeLayoutThatFails:
    """Stands in for a layout backend: raises ``error`` from its ``fail_at``-th batch on."""

    name = "fake-failing"
    manifest: ClassVar[dict[str, Any]] = {}

    def __init__(self, error: BaseException, fail_at: int) -> None:
        self.error, self.fail_at, self.calls = error, fail_at, 0

    def detect(self, pages: Sequence[DecodedPage], encoded: Sequence[EncodedPage]
               ) -> list[LayoutResult | PageError]:
        self.calls += 1
        if self.calls >= self.fail_at:
            raise self.error
        return [LayoutResult(width=p.width, height=p.height, regions=[]) for p in pages]

    def close(self) -> None:
        pass


def _pipeline(layout: FakeLayoutThatFails) -> Pipeline:
    cfg = FolioConfig().override({"decode.device": "cpu", "decode.orient": False,
                                  "decode.batch_size": 1, "layout.batch_size": 1,
                                  "pipeline.queue_pages": 1})
    return Pipeline(cfg, layout=layout, recognizer=RapidOCRRecognizer(cfg.recognize))


def _statuses(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        return [r[0] for r in conn.execute("SELECT status FROM pages ORDER BY page")]


def test_a_layout_error_becomes_error_rows_and_the_run_goes_on(
    tmp_path: Path, corpus_dir: Path
) -> None:
    pipeline = _pipeline(FakeLayoutThatFails(LayoutError("model fell over"), fail_at=3))
    summary = pipeline.run([corpus_dir / "pages" / "multipage.pdf"], tmp_path / "f.db")
    assert summary.pages == 6 and summary.errors == 4 and summary.exit_code == 3
    assert _statuses(tmp_path / "f.db") == ["ok", "ok"] + ["error"] * 4


def test_a_crashing_stage_ends_the_run_instead_of_hanging(
    tmp_path: Path, corpus_dir: Path
) -> None:
    """A bug in a stage stops every other stage, even those blocked on full queues."""
    pipeline = _pipeline(FakeLayoutThatFails(RuntimeError("stage bug"), fail_at=2))
    raised: list[BaseException] = []

    def run() -> None:
        try:
            pipeline.run([corpus_dir / "pages" / "multipage.pdf"], tmp_path / "c.db")
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the run hung after a stage crashed"
    assert len(raised) == 1 and isinstance(raised[0], RuntimeError)
    assert _statuses(tmp_path / "c.db") == ["ok"]  # what finished before the crash is kept


# A recogniser stuck for good inside a native call that holds the GIL, as OpenVINO's
# first-call deadlock did: then no Python thread can run, so only a watchdog outside the
# interpreter can end the run. ctypes.PyDLL calls C without releasing the GIL.
_STALLED_RUN = """
import ctypes, sqlite3, sys, time
from pathlib import Path
from orchestrator.config import FolioConfig
from orchestrator.engines.pipeline import Pipeline
from orchestrator.types import RecognitionResult


class FakeRecognizerThatHangsHoldingTheGIL:
    name = "fake-hanging"

    def __init__(self) -> None:
        self.calls = 0

    def recognize(self, tasks):
        self.calls += 1
        if self.calls == 2:  # the second page never ends, once the first is committed
            # (with the GIL held for good, the sink's writer thread cannot commit either)
            while not sqlite3.connect(sys.argv[2]).execute(
                    "SELECT count(*) FROM pages WHERE status = 'ok'").fetchone()[0]:
                time.sleep(0.05)
            ctypes.PyDLL(None).pause()
        return [RecognitionResult(text="x") for _ in tasks]

    def close(self) -> None:
        pass


cfg = FolioConfig().override({"decode.device": "cpu", "decode.orient": False,
                              "recognize.workers": 1, "pipeline.stall_timeout_s": 4})
Pipeline(cfg, recognizer=FakeRecognizerThatHangsHoldingTheGIL()).run(
    [sys.argv[1]], Path(sys.argv[2]))
print("the run ended on its own")
"""


def test_a_run_that_stops_making_progress_exits_with_every_stack(
    tmp_path: Path, corpus_dir: Path
) -> None:
    db = tmp_path / "s.db"
    try:
        run = subprocess.run(
            [sys.executable, "-c", _STALLED_RUN, str(corpus_dir / "pages" / "multipage.pdf"),
             str(db)], capture_output=True, text=True, timeout=60,
            cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        pytest.fail("the stalled run was not ended by the watchdog")
    assert run.returncode == 1, run.stderr[-2000:]
    assert "the run ended on its own" not in run.stdout
    assert "Timeout (0:00:04)!" in run.stderr
    assert "in recognize" in run.stderr  # the stuck thread's stack is in the dump
    assert _statuses(db) == ["ok"]  # the page finished before the stall is kept


_SHARED_TIMER = """
import sys, time
from orchestrator.engines.pipeline import StallWatchdog

first, second = StallWatchdog(1.0), StallWatchdog(1.0)
with first:
    with second:
        pass
    if sys.argv[1] == "still-watched":
        time.sleep(5)  # the first run is still on: its stall must end the process
time.sleep(2)  # both ended: nothing may fire
print("survived")
"""


def test_runs_in_one_process_share_the_watchdog_until_the_last_ends() -> None:
    def run(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", _SHARED_TIMER, mode], capture_output=True,
                              text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])

    stalled = run("still-watched")
    assert stalled.returncode == 1 and "Timeout (0:00:01)!" in stalled.stderr
    assert "survived" not in stalled.stdout
    ended = run("both-ended")
    assert ended.returncode == 0 and "survived" in ended.stdout, ended.stderr
