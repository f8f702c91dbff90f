"""The benchmarks in perf/ still run: each at a tiny size, checking what it prints.

These are not speed tests (no timing is asserted); they keep the scripts that produce
perf/RESULTS.md from drifting away from the code they measure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CORPUS, REPO_ROOT

PERF = REPO_ROOT / "perf"


def _run(script: str, *args: str, timeout: float = 600) -> str:
    env = {**os.environ, "FOLIO_SHARED": str(CORPUS.parent)}
    done = subprocess.run([sys.executable, str(PERF / script), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _ratios(out: str) -> list[float]:
    return [float(x) for x in re.findall(r"(\d+(?:\.\d+)?)x\b", out)]


def test_bench_sink_compares_batched_with_commit_per_row() -> None:
    out = _run("bench_sink.py", "--pages", "30", "--regions", "3")
    assert "30 pages x 3 regions = 120 rows" in out
    assert len(_ratios(out)) == 3 and all(r > 0 for r in _ratios(out))


def test_bench_postprocess_checks_both_nms_agree() -> None:
    out = _run("bench_postprocess.py", "--number", "2", "--repeats", "1")
    assert re.search(r"^postprocess, batch 8: +[\d.]+ ms/page", out, re.M), out
    assert re.search(r"ratio Python pairwise NMS / numpy NMS: +[\d.]+x", out), out


def test_bench_ingest_reads_every_layout() -> None:
    out = _run("bench_ingest.py", "--rows", "60", "--naive-rows", "20", "--repeat", "1")
    assert len(re.findall(r"^  folio +[\d,]+ pages/s .*\(60 pages in", out, re.M)) == 3, out


def test_bench_pipeline_runs_every_mode_on_the_same_pages(corpus_dir: Path) -> None:
    out = _run("bench_pipeline.py", "--pages", "1", str(corpus_dir / "pages" / "linn.png"))
    for mode in ("naive ", "naive-staged", "pipeline "):
        assert re.search(rf"^{mode}\s*1 pages in", out, re.M), out
    assert re.search(r"^work: [\d.]+ CPU-s/page; \d+-core ceiling", out, re.M), out
    assert len(_ratios(out)) == 3


def test_bench_recognize_compares_precisions(corpus_dir: Path) -> None:
    out = _run("bench_recognize.py", "--precisions", "fp32,fp32",
               str(corpus_dir / "pages" / "linn.png"))
    assert len(re.findall(r"^precision fp32 +recognition CPU", out, re.M)) == 2, out
    # the same precision twice reads the same text: the comparison itself is checked
    assert "fp32 vs fp32: word F1 1.0000, 0 line pairs differ" in out, out


def test_bench_accuracy_scores_folio_and_the_whole_page_baseline() -> None:
    out = _run("bench_accuracy.py", "--limit", "1")
    assert re.search(r"^form_210966-p01.png +[01]\.\d{4} +[01]\.\d{3} +[01]\.\d{4}", out,
                     re.M), out
    assert re.search(r"^forms +1 +[01]\.\d{4} +[01]\.\d{4}", out, re.M), out
    assert len(_ratios(out)) == 1, out


def test_bench_lines_compares_normalisations_and_workers_on_the_same_lines(
    corpus_dir: Path
) -> None:
    out = _run("bench_lines.py", "--rounds", "1", "--workers", "2",
               str(corpus_dir / "pages" / "typewriter.png"))
    assert out.count("pages whose lines differ: 0 of 1") == 2, out
    for workers in (1, 2):
        assert re.search(rf"^decode stage, lines.workers={workers}: +[\d.]+ pages/s", out,
                         re.M), out
    assert re.search(r"^host CPU/page, forward on a GPU \(lines.engine torch\): +[\d.]+ ms",
                     out, re.M), out
    assert len(_ratios(out)) == 3, out


def test_bench_orient_compares_the_probes_on_the_same_verdicts(corpus_dir: Path) -> None:
    out = _run("bench_orient.py", str(corpus_dir / "pages" / "typewriter.png"))
    assert "verdicts that differ: 0 of 4" in out, out
    assert len(_ratios(out)) == 1, out


def test_bench_layout_gpu_times_every_part_on_the_cpu(tmp_path: Path) -> None:
    """The GPU layout stage's benchmark on the CPU: a few corpus pages, every figure."""
    out = tmp_path / "layout.json"
    text = _run("bench_layout_gpu.py", "--device", "cpu", "--count", "4", "--batch-size", "2",
                "--repeats", "1", "--cuda-graph", "--json", str(out))
    for part in ("decode only", "decode \\+ resize/normalise", "model only",
                 "post-processing, torch", "whole stage, overlapped", "whole stage, sequential"):
        assert re.search(rf"^  {part}: +[\d.]+ pages/s", text, re.M), (part, text)
    assert re.search(r"ratio whole / slowest part \(\w+\): [\d.]+x", text), text
    assert re.search(r"ratio whole / decode-only ceiling: [\d.]+x", text), text
    assert "peak GPU memory: n/a (cpu)" in text and "batch size 2" in text
    assert "[cuda-graph] n/a" in text
    (eager,) = json.loads(out.read_text())["results"]
    assert eager["failed_pages"] == 0 and eager["regions_per_page"] > 1
    assert eager["stage_pages_s"] > 0 and eager["model_pages_s"] > 0


# folio's dependencies that the lent GPU machines lack (Python 3.12, torch, torchvision,
# numpy 2, transformers, onnx, onnxruntime, OpenCV and what those bring; nothing else can
# be installed there): perf/gpu must run without them.
ABSENT_ON_GPU_MACHINES = ("httpx", "tenacity", "prometheus_client", "pytriton", "tritonclient",
                          "nvidia.dali", "rapidocr", "openvino", "pyarrow", "pypdfium2", "ray",
                          "s3fs", "moto", "rapidfuzz")


def test_gpu_run_prepares_its_inputs_and_dry_runs_on_the_cpu(tmp_path: Path) -> None:
    """perf/gpu/prepare.py writes the pages and models; perf/gpu/h200.sh runs every
    section on the CPU with tiny sizes (the GPU run itself happens once, elsewhere), with
    the packages the GPU machines lack made unimportable (``None`` in ``sys.modules``, as
    Python reads a module that is not there, ``importlib.util.find_spec`` included)."""
    gpu, out = tmp_path / "gpu", tmp_path / "out"
    absent = tmp_path / "absent"
    absent.mkdir()
    (absent / "sitecustomize.py").write_text(
        "import sys\n"
        f"sys.modules.update(dict.fromkeys({ABSENT_ON_GPU_MACHINES!r}))\n")
    text = _run("gpu/prepare.py", "--out", str(gpu), "--count", "3", "--lines-side", "320")
    assert re.search(r"^3 pages in .*MB each on average", text, re.M), text
    pages = sorted((gpu / "pages").iterdir())
    assert [p.suffix for p in pages] == [".jpg"] * 3
    assert (gpu / "models" / "manifest.json").is_file()
    spec = json.loads((gpu / "models" / "lines.json").read_text())
    assert (gpu / "models" / spec["model"]).is_file() and spec["input_hw"] == [320, 224]
    env = {**os.environ, "FOLIO_SHARED": str(CORPUS.parent), "DEVICE": "cpu", "OUT": str(out),
           "GPU_DIR": str(gpu), "BATCH": "2", "COUNT": "2", "REPEATS": "1",
           "BATCH_SIZES": "1", "DOCLAYOUT_BATCH_SIZES": "", "LINES_COUNT": "2",
           "LINES_BATCH": "2", "PYTHON": sys.executable, "PYTHONPATH": str(absent)}
    done = subprocess.run(["bash", str(PERF / "gpu" / "h200.sh")], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == ["env", "bench", "agree", "memory", "crop",
                                                     "lines"]
    assert all(" rc=0 " in line for line in summary), summary
    agree = (out / "agree.txt").read_text()
    assert len(re.findall(r"3 of 3 pages agree box for box", agree)) == 2, agree
    lines = (out / "lines.txt").read_text()
    for precision in ("fp32", "bf16"):
        for batch in (1, 2):
            assert re.search(rf"^lines forward {precision} batch +{batch} on cpu: +[\d.]+ pages/s",
                             lines, re.M), lines
    assert "bf16 vs fp32 probability map: mean |diff|" in lines, lines
    for name in ("bench", "agree", "memory", "crop", "lines"):
        assert json.loads((out / f"{name}.json").read_text()), name
    assert "no DALI" in (out / "env.txt").read_text()  # the guard was in force


@pytest.mark.slow
@pytest.mark.ray
def test_bench_ray_compares_the_engine_with_the_in_process_run(corpus_dir: Path) -> None:
    pages = corpus_dir / "pages"
    out = _run("bench_ray.py", "--small", "1", str(pages / "typewriter.png"),
               str(pages / "baiona.png"))
    for mode in ("inprocess", "ray", "ray-1", "ray-2"):
        assert re.search(rf"^{mode} +2 pages: run [\d.]+ s = [\d.]+ pages/s; 1 pages: [\d.]+ s; "
                         r"the 1 more in -?[\d.]+ s$", out, re.M), out
    assert re.search(r"^ray / in-process = ([\d.]+x|n/a) without start-up .* [\d.]+x whole run",
                     out, re.M), out
    assert re.search(r"^ray 2 cores, 2 actors per stage / 1 core, 1 actor = ([\d.]+x|n/a) "
                     r"without start-up .* [\d.]+x whole run", out, re.M), out
