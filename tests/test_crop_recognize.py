"""Crop and recognize stages on real pages: lines found on the page, read per region."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from textmetrics import word_f1

from orchestrator.config import CropConfig, LayoutConfig, LinesConfig, RecognizeConfig
from orchestrator.errors import ConfigError, RecognitionError
from orchestrator.stages.coverage import cover_page
from orchestrator.stages.crop import crop_bounds, crop_region, region_tasks
from orchestrator.stages.recognize import (
    REC_MODEL,
    OpenVINOSession,
    RapidOCRRecognizer,
    Recognizer,
    _rapidocr_models,
    cpu_has_native_bf16,
    region_text,
    text_confidence,
)
from orchestrator.stages.textlines import LineDetector
from orchestrator.types import (
    DecodedPage,
    LayoutResult,
    LineCrop,
    PageRef,
    Region,
    RegionTask,
    Task,
)


def _region(index: int, bbox: tuple[float, float, float, float], task: Task = Task.TEXT,
            polygon: tuple[tuple[float, float], ...] | None = None) -> Region:
    return Region(index=index, label="text", task=task, score=0.9, bbox=bbox, polygon=polygon)


def test_crop_bounds_pad_and_clip() -> None:
    assert crop_bounds((10.2, 20.7, 50.5, 60.0), 100, 100, 4) == (6, 16, 55, 64)
    assert crop_bounds((-5, -5, 120, 130), 100, 80, 4) == (0, 0, 100, 80)


def test_polygon_crop_masks_outside_to_white() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    triangle = ((10.0, 10.0), (90.0, 10.0), (10.0, 90.0))
    region = _region(0, (10, 10, 90, 90), polygon=triangle)
    crop = crop_region(image, region, CropConfig(margin_px=0))
    assert crop is not None and crop.shape == (80, 80, 3)
    assert crop[5, 5].tolist() == [0, 0, 0]  # inside the triangle: page pixels
    assert crop[75, 75].tolist() == [255, 255, 255]  # outside: paper


@pytest.fixture(scope="module")
def linn_page(corpus_dir: Path) -> DecodedPage:
    """linn.png decoded, with its text lines found on the whole page."""
    image = cv2.imread(str(corpus_dir / "pages" / "linn.png"))
    page = DecodedPage(ref=PageRef("linn", 1), image=image,
                       model_input=np.zeros((3, 8, 8), np.float32))
    page.lines = LineDetector(LinesConfig()).detect(image)
    return page


def _linn_layout(page: DecodedPage, extra: list[Region] | None = None) -> LayoutResult:
    """linn.png cut by hand into a heading band, two column blocks and a bottom band
    (plus ``extra`` regions), then given its lines."""
    h, w = page.image.shape[:2]
    boxes = [(0, 0, w, h // 3), (0, h // 3, w // 2, 2 * h // 3), (w // 2, h // 3, w, 2 * h // 3),
             (0, 2 * h // 3, w, h)]
    regions = [_region(i, tuple(float(v) for v in box)) for i, box in enumerate(boxes)]
    layout = LayoutResult(width=w, height=h, regions=regions + (extra or []))
    return cover_page(layout, page.lines, LinesConfig(), LayoutConfig())


def _linn_tasks(page: DecodedPage, number: int = 1) -> list[RegionTask]:
    tasks = region_tasks(page, _linn_layout(page), CropConfig())
    for task in tasks:
        task.ref = PageRef("linn", number)
    return tasks


def test_region_tasks_carry_their_lines_cut_out_in_reading_order(linn_page: DecodedPage
                                                                 ) -> None:
    h, w = linn_page.image.shape[:2]
    figure = Region(4, "figure", Task.SKIP, 0.9, (10.0, 10.0, 60.0, 60.0))  # holds no line
    layout = _linn_layout(linn_page, [figure])
    tasks = region_tasks(linn_page, layout, CropConfig())
    assert len(tasks) == 4 and all(t.image is None for t in tasks)
    assert sum(len(t.lines) for t in tasks) == len(linn_page.lines or [])  # each line once
    for task in tasks:
        x0, y0, x1, y1 = task.region.bbox
        rows = [line.row for line in task.lines]
        assert rows == sorted(rows)  # top to bottom
        for line in task.lines:
            assert line.image is not None and line.image.shape[1] > line.image.shape[0]
            cx, cy = (line.bbox[0] + line.bbox[2]) / 2, (line.bbox[1] + line.bbox[3]) / 2
            assert x0 - 1 <= cx <= x1 + 1 and y0 - 1 <= cy <= y1 + 1
    # a recogniser that reads regions gets each region's crop and the lines' boxes only
    whole = region_tasks(linn_page, layout, CropConfig(margin_px=0), reads_lines=False)
    assert [t.region.index for t in whole] == [t.region.index for t in tasks]
    assert whole[0].image is not None and whole[0].image.shape[:2] == (h // 3, w)
    assert [ln.bbox for ln in whole[1].lines] == [ln.bbox for ln in tasks[1].lines]
    assert all(ln.image is None for t in whole for ln in t.lines)


def test_region_text_joins_a_row_with_spaces_and_rows_with_newlines() -> None:
    def crop(row: int) -> LineCrop:
        return LineCrop(bbox=(0.0, 0.0, 1.0, 1.0), row=row)
    lines = [crop(0), crop(0), crop(1), crop(2)]
    assert region_text(lines, ["Name:", "Ada", "  ", "Lovelace "]) == "Name: Ada\nLovelace"
    assert text_confidence([("abc", 1.0), ("a", 0.2), ("", 0.0)]) == pytest.approx(0.8)
    assert text_confidence([("", 0.9)]) is None


@pytest.fixture(scope="module")
def recognizer() -> RapidOCRRecognizer:
    return RapidOCRRecognizer(RecognizeConfig(threads=2))


def test_rapidocr_reads_the_linn_lines(recognizer: RapidOCRRecognizer, corpus_dir: Path,
                                       linn_page: DecodedPage) -> None:
    """Every line of the page read once, with its box and score, reads what linn.txt says."""
    assert isinstance(recognizer, Recognizer) and recognizer.reads_lines
    tasks = _linn_tasks(linn_page)
    results = recognizer.recognize(tasks)
    assert all(r.error is None for r in results)
    text = "\n".join(r.text or "" for r in results)
    expected = (corpus_dir / "pages" / "linn.txt").read_text(encoding="utf-8")
    assert word_f1(text, expected) >= 0.95
    assert results[0].stats["model"].startswith("rapidocr")
    for task, result in zip(tasks, results, strict=True):
        assert [ln.bbox for ln in result.lines] == [ln.bbox for ln in task.lines]
        assert all(ln.score is not None and 0.0 <= ln.score <= 1.0 for ln in result.lines)
        assert result.confidence is not None and 0.5 <= result.confidence <= 1.0
        assert all(ln.low_confidence == (ln.score is not None and ln.score < 0.5)
                   for ln in result.lines)


def test_low_confidence_lines_are_kept_and_flagged(linn_page: DecodedPage) -> None:
    """Nothing read is dropped: with the bar above every score, every line is flagged and
    the region's text is still all there."""
    strict = RapidOCRRecognizer(RecognizeConfig(min_line_score=1.0))
    task = _linn_tasks(linn_page)[0]
    [result] = strict.recognize([task])
    assert result.lines and all(ln.low_confidence for ln in result.lines)
    assert result.text and "LinnSequencer" in result.text


def test_a_failing_region_is_an_error_result_not_a_crash(recognizer: RapidOCRRecognizer) -> None:
    bad = RegionTask(ref=PageRef("x", 1), region=_region(0, (0, 0, 1, 1)), image=None,
                     lines=[LineCrop((0, 0, 1, 1), image=None)])
    blank = RegionTask(ref=PageRef("x", 1), region=_region(1, (0, 0, 10, 10)), image=None,
                       lines=[LineCrop((0, 0, 100, 30), np.full((30, 100, 3), 255, np.uint8))])
    out = recognizer.recognize([bad, blank])
    assert out[0].text is None and out[0].error and "without its pixels" in out[0].error
    assert out[1].error is None and out[1].text is not None and len(out[1].lines) == 1


def test_pooled_recognition_reads_what_the_inline_path_reads(linn_page: DecodedPage) -> None:
    """submit() spreads the lines over the pool; the text is the same."""
    rec = RapidOCRRecognizer(RecognizeConfig(workers=2))
    try:
        pages = [_linn_tasks(linn_page, number) for number in (1, 2, 3)]
        inline = [[r.text for r in rec.recognize(tasks)] for tasks in pages]
        futures = [rec.submit(tasks) for tasks in pages]
        pooled = [[r.text for r in f.result(timeout=300)] for f in futures]
    finally:
        rec.close()
    assert pooled == inline
    assert all(text for text in inline[0])


def test_pool_reads_the_lines_of_one_region_on_every_worker(linn_page: DecodedPage,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """One big region alone still keeps both workers busy: lines are separate jobs."""
    rec = RapidOCRRecognizer(RecognizeConfig(workers=2))
    threads: set[str] = set()
    read = rec._read

    def recording_read(image: np.ndarray | None) -> tuple[str, float]:
        threads.add(threading.current_thread().name)
        return read(image)

    monkeypatch.setattr(rec, "_read", recording_read)
    try:
        [block] = rec.submit(_linn_tasks(linn_page)[1:2]).result(timeout=300)
    finally:
        rec.close()
    assert block.error is None and block.text and block.text.count("\n") >= 5
    assert threads == {"folio-rapidocr-0", "folio-rapidocr-1"}


def test_pool_failures_stay_in_their_region_and_close_fails_what_is_left(
        linn_page: DecodedPage) -> None:
    rec = RapidOCRRecognizer(RecognizeConfig(workers=1))
    bad = RegionTask(ref=PageRef("x", 1), region=_region(0, (0, 0, 1, 1)), image=None,
                     lines=[LineCrop((0, 0, 1, 1), image=None)])
    empty = RegionTask(ref=PageRef("x", 1), region=_region(1, (0, 0, 10, 10)), image=None)
    out = rec.submit([bad, empty]).result(timeout=60)
    assert out[0].text is None and out[0].error
    assert out[1].error is None and out[1].text == "" and out[1].lines == []
    assert rec.submit([]).result(timeout=1) == []
    # one worker, many pages queued: closing must fail the unfinished ones, not hang them
    futures = [rec.submit(_linn_tasks(linn_page, number)) for number in range(6)]
    rec.close()
    outcomes = []
    for future in futures:
        try:
            future.result(timeout=60)
            outcomes.append("done")
        except RecognitionError:
            outcomes.append("failed")
    assert outcomes[-1] == "failed"
    with pytest.raises(RecognitionError):
        rec.submit([bad]).result(timeout=60)


def test_without_native_bf16_auto_is_fp32_and_bf16_is_refused() -> None:
    if cpu_has_native_bf16():
        pytest.skip("this CPU computes BF16 natively: auto is bf16 here (tested below)")
    assert RapidOCRRecognizer(RecognizeConfig(precision="auto")).precision == "fp32"
    with pytest.raises(ConfigError, match="native BF16"):
        RapidOCRRecognizer(RecognizeConfig(precision="bf16"))


def test_bf16_recognition_reads_linn_as_fp32_does(corpus_dir: Path,
                                                  linn_page: DecodedPage) -> None:
    """precision auto picks BF16 where the CPU computes it natively; BF16 reads the page
    as well as fp32."""
    fp32 = RapidOCRRecognizer(RecognizeConfig(precision="fp32"))
    assert fp32.precision == "fp32" and fp32.model.endswith(":rec-fp32")
    if not cpu_has_native_bf16():
        pytest.skip("no native BF16 on this CPU: the BF16 recogniser cannot be built here "
                    "(its refusal is tested above)")
    tasks = _linn_tasks(linn_page)
    bf16 = RapidOCRRecognizer(RecognizeConfig())  # the default, auto
    assert bf16.precision == "bf16" and bf16.model.endswith(":rec-bf16")
    try:
        read_fp32 = "\n".join(r.text or "" for r in fp32.recognize(tasks))
        results = bf16.submit(tasks).result(timeout=300)
    finally:
        bf16.close()
    assert all(r.error is None for r in results)
    read_bf16 = "\n".join(r.text or "" for r in results)
    expected = (corpus_dir / "pages" / "linn.txt").read_text(encoding="utf-8")
    assert word_f1(read_bf16, expected) >= 0.95
    assert word_f1(read_bf16, read_fp32) >= 0.98


def test_bf16_line_inputs_are_padded_to_the_width_bucket() -> None:
    if not cpu_has_native_bf16():
        pytest.skip("no native BF16 on this CPU: the BF16 session is never built here "
                    "(the refusal is tested above)")
    session = OpenVINOSession(_rapidocr_models() / REC_MODEL, threads=1, precision="bf16",
                              width_bucket=32)
    rng = np.random.default_rng(0)
    steps = {w: session(rng.standard_normal((1, 3, 48, w)).astype(np.float32)).shape[1]
             for w in (321, 352, 353)}
    assert steps[321] == steps[352] < steps[353]  # 321 and 352 both run at 352


_FIRST_CALLS_RACE = """
import sys, threading
import numpy as np
from orchestrator.stages.recognize import REC_MODEL, OpenVINOSession, _rapidocr_models

session = OpenVINOSession(_rapidocr_models() / REC_MODEL, threads=1, precision="bf16",
                          width_bucket=32)
threads = int(sys.argv[1])
ready = threading.Barrier(threads)

def first_calls() -> None:
    session.thread_request()  # compile first, so the first infer() calls line up
    ready.wait()
    session(np.zeros((1, 3, 48, 320), np.float32))

workers = [threading.Thread(target=first_calls) for _ in range(threads)]
for w in workers:
    w.start()
for w in workers:
    w.join()
"""


def test_bf16_first_calls_from_many_threads_do_not_deadlock() -> None:
    """Threads whose first OpenVINO infer() calls coincide: without the session's
    first-call lock, 1-2 of 10 fresh processes of 8 threads hung for good (the binding's
    lazy numpy-bridge static, entered with the GIL held). A stress test: each process is
    a fresh chance at the race, so a regression shows in most runs, not every one."""
    if not cpu_has_native_bf16():
        pytest.skip("no native BF16 on this CPU: the BF16 session is never built here")
    for _ in range(6):
        try:
            subprocess.run([sys.executable, "-c", _FIRST_CALLS_RACE, "8"], check=True,
                           timeout=60, cwd=Path(__file__).resolve().parents[1])
        except subprocess.TimeoutExpired:
            pytest.fail("threads' first OpenVINO calls deadlocked")
