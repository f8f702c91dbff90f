"""Crop and recognize stages on real pages (layout-independent)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
from textmetrics import word_f1

from orchestrator.config import CropConfig, RecognizeConfig
from orchestrator.crop import crop_bounds, crop_region, region_tasks
from orchestrator.errors import ConfigError, RecognitionError
from orchestrator.recognize import (
    REC_MODEL,
    RapidOCRRecognizer,
    Recognizer,
    _lines_in_order,
    _OpenVINOBF16Session,
    _rapidocr_models,
    cpu_has_native_bf16,
)
from orchestrator.types import DecodedPage, LayoutResult, PageRef, Region, RegionTask, Task


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


def test_region_tasks_skip_figures_and_tiny_boxes() -> None:
    image = np.full((200, 200, 3), 255, np.uint8)
    page = DecodedPage(ref=PageRef("p", 1), image=image,
                       model_input=np.zeros((3, 8, 8), np.float32))
    layout = LayoutResult(width=200, height=200, regions=[
        _region(0, (10, 10, 100, 50)), _region(1, (10, 60, 100, 150), Task.SKIP),
        _region(2, (150, 150, 151, 151)), _region(3, (10, 160, 190, 190), Task.TABLE),
    ])
    tasks = region_tasks(page, layout, CropConfig(margin_px=0, min_side_px=4))
    assert [t.region.index for t in tasks] == [0, 3]
    assert tasks[1].task is Task.TABLE
    assert tasks[0].image.shape == (40, 90, 3)


def test_lines_are_read_top_to_bottom_left_to_right() -> None:
    def box(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
    boxes = np.array([box(200, 12, 300, 30), box(0, 50, 100, 70), box(0, 10, 100, 30)])
    assert _lines_in_order(boxes, ["right", "second", "left"]) == ["left right", "second"]


@pytest.fixture(scope="module")
def recognizer() -> RapidOCRRecognizer:
    return RapidOCRRecognizer(RecognizeConfig(threads=2))


def test_rapidocr_reads_the_linn_columns(recognizer: RapidOCRRecognizer,
                                         corpus_dir: Path) -> None:
    """Recognition alone, on hand-cut halves of the page, reads what linn.txt says."""
    image = cv2.imread(str(corpus_dir / "pages" / "linn.png"))
    h, w = image.shape[:2]
    assert isinstance(recognizer, Recognizer)
    tasks = [RegionTask(ref=PageRef("linn", 1), region=_region(i, box), image=image[y0:y1, x0:x1])
             for i, box in enumerate([(0, 0, w, h // 3), (0, h // 3, w // 2, 2 * h // 3),
                                      (w // 2, h // 3, w, 2 * h // 3), (0, 2 * h // 3, w, h)])
             for x0, y0, x1, y1 in [tuple(int(v) for v in box)]]
    results = recognizer.recognize(tasks)
    assert all(r.error is None for r in results)
    text = "\n".join(r.text or "" for r in results)
    expected = (corpus_dir / "pages" / "linn.txt").read_text(encoding="utf-8")
    assert word_f1(text, expected) >= 0.9
    assert results[0].stats["model"].startswith("rapidocr")


def test_a_failing_region_is_an_error_result_not_a_crash(recognizer: RapidOCRRecognizer) -> None:
    bad = RegionTask(ref=PageRef("x", 1), region=_region(0, (0, 0, 1, 1)),
                     image=np.zeros((0, 0, 3), np.uint8))
    good = RegionTask(ref=PageRef("x", 1), region=_region(1, (0, 0, 10, 10)),
                      image=np.full((100, 100, 3), 255, np.uint8))
    out = recognizer.recognize([bad, good])
    assert out[0].text is None and out[0].error
    assert out[1].error is None and out[1].text == ""


def _linn_tasks(corpus_dir: Path, page: int = 1) -> list[RegionTask]:
    """linn.png cut into a heading band, two column blocks and a one-line strip."""
    image = cv2.imread(str(corpus_dir / "pages" / "linn.png"))
    h, w = image.shape[:2]
    boxes = [(0, 0, w, h // 3), (0, h // 3, w // 2, 2 * h // 3), (w // 2, h // 3, w, 2 * h // 3),
             (0, 2 * h // 3, w, h)]
    tasks = [RegionTask(ref=PageRef("linn", page), region=_region(i, box),
                        image=image[box[1]:box[3], box[0]:box[2]])
             for i, box in enumerate(boxes)]
    # a crop no taller than one line goes to recognition only
    line = image[h // 3 + 40 : h // 3 + 90, 0 : w // 2]
    tasks.append(RegionTask(ref=PageRef("linn", page), region=_region(len(boxes), (0, 0, 1, 1)),
                            image=line))
    return tasks


def test_pooled_recognition_reads_what_the_inline_path_reads(corpus_dir: Path) -> None:
    """submit() spreads detections and lines over the pool; the text is the same."""
    rec = RapidOCRRecognizer(RecognizeConfig(workers=2))
    try:
        pages = [_linn_tasks(corpus_dir, page) for page in (1, 2, 3)]
        inline = [[r.text for r in rec.recognize(tasks)] for tasks in pages]
        futures = [rec.submit(tasks) for tasks in pages]
        pooled = [[r.text for r in f.result(timeout=300)] for f in futures]
    finally:
        rec.close()
    assert pooled == inline
    assert inline[0][4] and inline[0][4] in inline[0][1]  # the strip is a line of column 1
    expected = (corpus_dir / "pages" / "linn.txt").read_text(encoding="utf-8")
    assert word_f1("\n".join(t or "" for t in pooled[2][:4]), expected) >= 0.9


def test_pool_reads_the_lines_of_one_region_on_every_worker(corpus_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """One big region alone still keeps both workers busy: lines are separate jobs."""
    rec = RapidOCRRecognizer(RecognizeConfig(workers=2))
    threads: set[str] = set()
    read = rec._read

    def recording_read(image: np.ndarray, *, whole_crop: bool = False) -> tuple[str, float]:
        threads.add(threading.current_thread().name)
        return read(image, whole_crop=whole_crop)

    monkeypatch.setattr(rec, "_read", recording_read)
    try:
        [block] = rec.submit(_linn_tasks(corpus_dir)[:1]).result(timeout=300)
    finally:
        rec.close()
    assert block.error is None and block.text and block.text.count("\n") >= 5
    assert threads == {"folio-rapidocr-0", "folio-rapidocr-1"}


def test_pool_failures_stay_in_their_region_and_close_fails_what_is_left(
        corpus_dir: Path) -> None:
    rec = RapidOCRRecognizer(RecognizeConfig(workers=1))
    bad = RegionTask(ref=PageRef("x", 1), region=_region(0, (0, 0, 1, 1)),
                     image=np.zeros((0, 0, 3), np.uint8))
    blank = RegionTask(ref=PageRef("x", 1), region=_region(1, (0, 0, 10, 10)),
                       image=np.full((100, 100, 3), 255, np.uint8))
    out = rec.submit([bad, blank]).result(timeout=60)
    assert out[0].text is None and out[0].error
    assert out[1].error is None and out[1].text == ""
    assert rec.submit([]).result(timeout=1) == []
    # one worker, many pages queued: closing must fail the unfinished ones, not hang them
    futures = [rec.submit(_linn_tasks(corpus_dir, page)) for page in range(6)]
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
        rec.submit([blank]).result(timeout=60)


def test_bf16_recognition_reads_linn_as_fp32_does(corpus_dir: Path) -> None:
    """precision auto picks BF16 exactly where the CPU computes it natively; BF16 reads
    the page as well as fp32 (this box: AVX512-BF16, so the BF16 branch runs here)."""
    tasks = _linn_tasks(corpus_dir)
    fp32 = RapidOCRRecognizer(RecognizeConfig(precision="fp32"))
    assert fp32.precision == "fp32" and fp32.model.endswith(":rec-fp32")
    if not cpu_has_native_bf16():
        assert RapidOCRRecognizer(RecognizeConfig(precision="auto")).precision == "fp32"
        with pytest.raises(ConfigError, match="native BF16"):
            RapidOCRRecognizer(RecognizeConfig(precision="bf16"))
        pytest.skip("no native BF16 on this CPU: auto falls back to fp32 (checked); the BF16 "
                    "recognition path cannot run here")
    bf16 = RapidOCRRecognizer(RecognizeConfig())  # the default, auto
    assert bf16.precision == "bf16" and bf16.model.endswith(":rec-bf16")
    try:
        read_fp32 = "\n".join(r.text or "" for r in fp32.recognize(tasks[:4]))
        results = bf16.submit(tasks[:4]).result(timeout=300)
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
    session = _OpenVINOBF16Session(_rapidocr_models() / REC_MODEL, threads=1, width_bucket=32)
    rng = np.random.default_rng(0)
    steps = {w: session(rng.standard_normal((1, 3, 48, w)).astype(np.float32)).shape[1]
             for w in (321, 352, 353)}
    assert steps[321] == steps[352] < steps[353]  # 321 and 352 both run at 352


_FIRST_CALLS_RACE = """
import sys, threading
import numpy as np
from orchestrator.recognize import REC_MODEL, _OpenVINOBF16Session, _rapidocr_models

session = _OpenVINOBF16Session(_rapidocr_models() / REC_MODEL, threads=1, width_bucket=32)
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
