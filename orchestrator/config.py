"""Configuration: one typed place, defaults as named constants.

A ``FolioConfig`` is built from defaults, then a TOML file (``--config``), then CLI
flags, in that order. Each section is a frozen dataclass; stage code takes its
section and never hard-codes a number.

Usage::

    cfg = FolioConfig()                                   # defaults
    cfg = load_config(Path("folio.toml"))                 # file over defaults
    cfg = cfg.override({"sources.dpi": 150, "sink.batch_rows": 800})
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import ConfigError
from orchestrator.paths import default_model_dir

# The source checkout (tests and perf scripts); the package itself never looks there.
REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_DPI = 200
# 2400 dpi A4 is ~ 560 MP; 35000 x 35000 is 1.2 GP. 200 MP admits any sane scan.
DEFAULT_MAX_PIXELS = 200_000_000
DEFAULT_IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp", ".jp2", ".j2k", ".jpx", ".bmp",
)
DEFAULT_PDF_EXTENSIONS = (".pdf",)

# The CDLA PP-PicoDet model is trained at a stretched 800 x 608 (H x W) input.
LAYOUT_INPUT_HEIGHT = 800
LAYOUT_INPUT_WIDTH = 608
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# BF16 recognition: line inputs padded to a multiple of this width (OpenVINO compiles each
# new input shape once; buckets make repeats hit its cache).
BF16_WIDTH_BUCKET_PX = 32

# Labels that are headings: Markdown writes them as "## ", and reading order attaches a
# narrow one to the block below it.
DEFAULT_HEADING_LABELS = ("title", "doc_title", "paragraph_title", "section_title")
# Page furniture (CDLA and PP-DocLayout names): read and stored, left out of Markdown
# unless asked for, and read in its place from the top without shaping the columns.
DEFAULT_FURNITURE_LABELS = ("header", "footer", "number", "page_number", "header_image",
                            "footer_image")

DEFAULT_LABEL_TASKS: dict[str, str] = {
    "text": "text",
    "title": "text",
    "figure_caption": "text",
    "table_caption": "text",
    "caption": "text",
    "reference": "text",
    "table": "table",
    "equation": "formula",
    "formula": "formula",
    "figure": "skip",
    # Page furniture is read and stored with its label (the Markdown export leaves it out
    # unless asked); "abandon" drops a label before recognition.
    "header": "text",
    "footer": "text",
}


@dataclass(frozen=True, slots=True)
class SourceConfig:
    dpi: int = DEFAULT_DPI
    max_pixels: int = DEFAULT_MAX_PIXELS
    image_extensions: tuple[str, ...] = DEFAULT_IMAGE_EXTENSIONS
    pdf_extensions: tuple[str, ...] = DEFAULT_PDF_EXTENSIONS
    image_column: str = "image"  # Arrow/Parquet shards: the {bytes, path} column


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    device: str = "auto"  # "cpu" | "gpu" | "auto" (gpu when CUDA is visible)
    device_id: int = 0
    threads: int = 1
    batch_size: int = 4
    input_height: int = LAYOUT_INPUT_HEIGHT
    input_width: int = LAYOUT_INPUT_WIDTH
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # Orientation: find pages turned by 90/180/270 degrees and turn them upright.
    orient: bool = True
    orient_min_lines: int = 3  # fewer clear text lines than this: leave the page as is
    orient_line_aspect: float = 3.0  # a box this elongated counts as a text line
    orient_lines: int = 3  # lines read to tell upright from upside down
    orient_crop_aspect: float = 8.0  # each of those lines trimmed to this width / height
    orient_margin: float = 0.05  # upside down only when its mean score is this much better
    # Lines read this confidently as they stand are upright: the turned reading is skipped.
    # On the corpus, upright lines score 0.88-1.0 on average, turned ones 0.21-0.75.
    orient_confident: float = 0.85
    # The probe lines' recogniser arithmetic, as recognize.precision (auto: bf16 where the
    # CPU computes it natively).
    orient_precision: str = "auto"
    # The GPU-resident layout stage's JPEG decoder: "dali" (DALI's "mixed" nvJPEG decoder and
    # its resize/normalise graph), "torch" (torchvision's batched nvJPEG on CUDA, OpenCV on
    # the CPU; torch resize/normalise), "auto" (dali where DALI is installed, else torch).
    gpu_decoder: str = "auto"


@dataclass(frozen=True, slots=True)
class LinesConfig:
    """Text lines: detected once per upright page, each given to one region; the lines no
    region holds become regions of their own, so no text on the page is lost."""

    # The page is scaled down (never up) so its long side is at most this for detection.
    # 2000 px keeps 7-point print in a dense 150-dpi table (a 2100 px landscape page): at
    # 1280 px a third of that page's cells were missed. rapidocr's whole-page default too.
    side_px: int = 2000
    # The detector's arithmetic (as recognize.precision): auto is bf16 where the CPU
    # computes it natively, through OpenVINO either way (fp32 OpenVINO is ~3x faster than
    # onnxruntime on this model).
    precision: str = "auto"
    threads: int = 1
    # The detector's forward pass: "openvino" (the CPU), "torch" (the decode device: a GPU,
    # or the CPU), "auto" (torch where pages are decoded on a GPU, else openvino). With
    # torch, precision auto is bf16 on a GPU and fp32 on the CPU.
    engine: str = "auto"
    # Pages of a decode batch whose lines are detected at once, each in a thread of its own
    # (one OpenVINO request per thread): the decode stage's one thread otherwise caps a
    # run at one page per detection time (about 0.4 s), whatever the machine. Up to
    # decode.batch_size; raise both on a machine with cores to spare (a GPU server).
    workers: int = 1
    # rapidocr's DB post-processing: pixel and box score thresholds, box growth.
    pixel_threshold: float = 0.3
    box_threshold: float = 0.5
    unclip_ratio: float = 1.6
    max_lines: int = 5000  # per page (a dense statistics table has ~1,300)
    # A line belongs to the region holding the largest share of its area, if at least this.
    region_share: float = 0.5
    # The detector grows each line's box well around its ink (DB's unclip), while layout
    # boxes hug the ink: shares are measured on the line's box shrunk by this many line
    # heights on every side, about where its ink is.
    core_inset: float = 0.25
    # Lines outside every region form blocks: a line joins the block of a line above it when
    # the gap between them is at most block_gap line heights and they share a column (their
    # x-ranges overlap, or their left edges lie within block_indent line heights).
    block_gap: float = 1.2
    block_indent: float = 2.0


@dataclass(frozen=True, slots=True)
class LayoutConfig:
    backend: str = "inprocess"  # "inprocess" | "triton"
    # Default: the user cache's models/ folder (orchestrator.paths), built on first use.
    model_dir: Path = field(default_factory=default_model_dir)
    precision: str = "auto"  # "fp32" | "bf16" | "auto" (bf16 on GPU, fp32 on CPU)
    # One CPU thread: 87-122 ms/page at batch 1-2, 136-149 at batch 4 (cache-bound).
    # On a GPU use 16-64.
    batch_size: int = 2
    threads: int = 1
    score_threshold: float = 0.5
    class_score_thresholds: dict[str, float] = field(default_factory=dict)
    nms_iou: float = 0.5
    top_k_per_level: int = 1000
    # A box whose area lies this much inside a higher-scoring box of the same task is dropped.
    containment: float = 0.9
    label_tasks: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_LABEL_TASKS))
    # A figure holding text lines (a flowchart, a form drawn as a picture): "read" reads
    # them and stores the text with the figure; "skip" keeps the figure without text.
    figure_text: str = "read"
    heading_labels: tuple[str, ...] = DEFAULT_HEADING_LABELS
    furniture_labels: tuple[str, ...] = DEFAULT_FURNITURE_LABELS
    # Reading order: a box narrower than this share of the page is a column candidate.
    column_max_width: float = 0.6
    # Reading order: boxes of neighbouring columns may overlap by this share of the page
    # width (detector slop across the gutter) and still count as separate columns.
    column_overlap: float = 0.02
    # The model's input size (must match the artifacts' manifest) and its detection strides.
    input_height: int = LAYOUT_INPUT_HEIGHT
    input_width: int = LAYOUT_INPUT_WIDTH
    strides: tuple[int, ...] = (8, 16, 32, 64)
    # At most this many (box, class) candidates per page enter NMS, the highest-scoring:
    # bounds its n x n matrices (a page rarely has more than a few hundred).
    max_candidates: int = 2000
    # The GPU-resident stage (orchestrator.stages.layout_gpu: decode, resize, model and
    # post-processing on the device, only boxes to the host): "auto" when the layout device
    # is CUDA, "on" on any device (the CPU runs the same code), "off".
    gpu_resident: str = "auto"
    # Model-input buffers of that stage: batches decoded ahead of the model. 2 lets batch
    # n+1 decode while the model runs batch n and batch n-1 is post-processed.
    batches_in_flight: int = 2
    # Replay the model as a CUDA graph captured at batch_size (CUDA only; a short last
    # batch is padded). torch.compile cannot compile the TorchScript artifacts.
    cuda_graph: bool = False


@dataclass(frozen=True, slots=True)
class TritonConfig:
    url: str = "127.0.0.1:8001"
    model_name: str = "folio_layout"
    max_in_flight: int = 8
    timeout_s: float = 60.0
    retries: int = 5
    # At start: nothing answering at ``url`` for this long is an error (a wrong address
    # fails in seconds); a server that answers gets ready_wait_s to load the model.
    connect_wait_s: float = 5.0
    ready_wait_s: float = 60.0


@dataclass(frozen=True, slots=True)
class CropConfig:
    # The layout model's boxes often end a character short of a line's end; at 4 px, 53%
    # of the corpus's text lines touched the crop edge and lost their last letters
    # ("PLA" for "PLAY"), at 16 px (2 mm at 200 dpi) 11% touch it and linn reads better.
    margin_px: int = 16
    min_side_px: int = 4


@dataclass(frozen=True, slots=True)
class RecognizeConfig:
    engine: str = "rapidocr"  # "rapidocr" | "vllm"
    workers: int = 2
    # Pages whose regions may wait in the recogniser's queue at once, bounded so memory
    # stays bounded. None: 64 for vLLM (enough to keep the server's batch full across
    # pages), 2 x workers for rapidocr (its pool only needs the next page ready).
    pages_in_flight: int | None = None
    threads: int = 1
    # The text-line recogniser's arithmetic. "fp32": onnxruntime, the reference numerics.
    # "bf16": OpenVINO in BF16, only on CPUs that compute it natively (AVX512-BF16, AMX):
    # 1.36-1.44x less recognition CPU, same linn F1, word F1 0.999 against fp32 over the
    # corpus (perf/bench_recognize.py). "auto" (default): bf16 where native, else fp32.
    # Line detection stays fp32 (its boxes decide the crops).
    precision: str = "auto"
    bf16_width_bucket_px: int = BF16_WIDTH_BUCKET_PX
    # A line read with less confidence than this is kept, flagged low_confidence.
    min_line_score: float = 0.5

    def in_flight_pages(self) -> int:
        if self.pages_in_flight is not None:
            return self.pages_in_flight
        return 64 if self.engine == "vllm" else 2 * self.workers


@dataclass(frozen=True, slots=True)
class VLLMConfig:
    url: str = "http://127.0.0.1:8012"
    model: str | None = None  # None: the server's first model
    profile: str = "glm-ocr"
    max_in_flight: int = 32
    timeout_s: float = 120.0
    retries: int = 4
    dead_server_wait_s: float = 60.0
    ttft_sla_s: float = 2.0
    # Scheduling: a waiting region gains this many tokens of priority per second, so a
    # large crop (6k image tokens) waits at most ~6 s behind a stream of small ones.
    ageing_tokens_per_s: float = 1000.0
    backoff_initial_s: float = 0.5  # first retry delay; doubles per attempt, plus jitter
    backoff_max_s: float = 8.0
    encode_threads: int = 2  # crop resize/encode/base64, off the event loop
    # the environment variable holding the key for `vllm serve --api-key` (a Bearer
    # token); the key itself stays out of the config, and so out of the runs table
    api_key_env: str = "VLLM_API_KEY"
    profiles_file: str | None = None  # TOML file of [NAME] profile tables
    profiles: dict[str, Any] = field(default_factory=dict)  # [vllm.profiles.NAME] tables


@dataclass(frozen=True, slots=True)
class SinkConfig:
    batch_rows: int = 800
    queue_pages: int = 256
    # A batch is committed after this long even when under batch_rows (slow runs persist).
    flush_interval_s: float = 0.5


@dataclass(frozen=True, slots=True)
class PipelineConfig:
    queue_pages: int = 8
    limit: int | None = None
    # "inprocess": this process, into SQLite; "ray": a Ray cluster, into Parquet ([ray]).
    engine: str = "inprocess"
    # A run in which no page finishes for this long prints every thread's stack and exits
    # with status 1 (0 turns the watchdog off); pages already written stay, a re-run
    # resumes. Above the slowest legitimate gap: a vLLM region's worst case is
    # timeout_s x (retries + 1) plus back-off, ~11 min with the defaults.
    stall_timeout_s: float = 1800.0
    # An interrupted run (SIGINT, SIGTERM) stops reading and gives the pages in flight this
    # long to finish; those still unfinished are dropped unwritten (a re-run does them).
    drain_timeout_s: float = 10.0


# The Ray engine's unit of work and of output: a PDF's pages or a Parquet/Arrow shard's
# rows are cut into runs of at most this many pages (shards at row-group / record-batch
# boundaries), each written as one Parquet file. Small enough that a crash redoes little
# and a long PDF spreads over many workers; large enough that files stay few.
DEFAULT_UNIT_PAGES = 64


# The standard object-store settings of fsspec's implementations (s3fs/botocore, gcsfs,
# huggingface_hub).
DEFAULT_FORWARD_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
    "GOOGLE_APPLICATION_CREDENTIALS", "HF_TOKEN", "HF_ENDPOINT",
)


@dataclass(frozen=True, slots=True)
class RayConfig:
    """The Ray engine (``folio run --engine ray``): where the cluster is, the unit size,
    and each stage's actors and their resource shares.

    The shares are Ray's logical resources, not threads (the stages' threads come from
    their own sections). On a small node the actors must leave CPU to the read tasks, or
    the reads wait forever for a free CPU: hence fractional defaults.
    """

    # None: start a Ray on this machine (listening on 127.0.0.1 only); "auto": join the
    # cluster this machine belongs to; "ray://HOST:PORT": a remote cluster through Ray Client.
    address: str | None = None
    unit_pages: int = DEFAULT_UNIT_PAGES
    read_cpus: float = 0.25  # per read task (a unit's pages: file bytes, PDF rendering)
    layout_actors: int = 1  # decode + text lines + orientation + layout
    layout_cpus: float = 0.5
    layout_gpus: float = 0.0  # 1 (or a share, beside vLLM) on GPU nodes
    recognize_actors: int = 1  # coverage + crop + recognition
    recognize_cpus: float = 1.0
    # Ray custom resources each recognition actor asks for: with every GPU node started
    # with `--resources '{"vllm": 4}'`, { vllm = 1 } puts 4 actors on each node, each then
    # talking to its own node's server at vllm.url = http://127.0.0.1:8012.
    recognize_resources: dict[str, float] = field(default_factory=dict)
    # vLLM servers the recognition actors spread pages over (round robin); empty: vllm.url.
    vllm_urls: tuple[str, ...] = ()
    # Environment variables handed from the driver to every task and actor (those set),
    # so the workers read and write the same stores with the same credentials. They travel
    # in the job's task specs: on nodes with credentials of their own (an IAM role), set [].
    forward_env: tuple[str, ...] = DEFAULT_FORWARD_ENV


@dataclass(frozen=True, slots=True)
class FolioConfig:
    sources: SourceConfig = field(default_factory=SourceConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    lines: LinesConfig = field(default_factory=LinesConfig)
    layout: LayoutConfig = field(default_factory=LayoutConfig)
    triton: TritonConfig = field(default_factory=TritonConfig)
    crop: CropConfig = field(default_factory=CropConfig)
    recognize: RecognizeConfig = field(default_factory=RecognizeConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def override(self, values: dict[str, Any]) -> FolioConfig:
        """Return a copy with dotted keys (``"section.field"``) replaced; None values skipped."""
        nested: dict[str, dict[str, Any]] = {}
        for key, value in values.items():
            if value is None:
                continue
            section, _, name = key.partition(".")
            if not name:
                raise ConfigError(f"config key {key!r} must be 'section.field'")
            nested.setdefault(section, {})[name] = value
        return _apply(self, nested)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _coerce(section: str, f: dataclasses.Field[Any], current: Any, value: Any) -> Any:
    where = f"{section}.{f.name}"
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(current, Path):
        return Path(os.path.expanduser(str(value)))
    if isinstance(current, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return tuple(value)
    if isinstance(current, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {value!r}")
        return {**current, **value}
    if isinstance(current, int) and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if isinstance(current, float):
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if current is None or isinstance(current, str):
        if value is not None and not isinstance(value, str | int):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _apply(cfg: FolioConfig, nested: dict[str, dict[str, Any]]) -> FolioConfig:
    changes: dict[str, Any] = {}
    for section, values in nested.items():
        if section not in {f.name for f in dataclasses.fields(cfg)}:
            raise ConfigError(f"unknown config section [{section}]")
        current = getattr(cfg, section)
        fields = {f.name: f for f in dataclasses.fields(current)}
        updates: dict[str, Any] = {}
        for name, value in values.items():
            if name not in fields:
                raise ConfigError(f"unknown config key {section}.{name}")
            updates[name] = _coerce(section, fields[name], getattr(current, name), value)
        changes[section] = dataclasses.replace(current, **updates)
    result = dataclasses.replace(cfg, **changes)
    validate(result)
    return result


def validate(cfg: FolioConfig) -> None:
    """Reject values no stage can run with; message names the key."""
    checks: list[tuple[bool, str]] = [
        (cfg.sources.dpi > 0, "sources.dpi must be > 0"),
        (cfg.sources.max_pixels > 0, "sources.max_pixels must be > 0"),
        (cfg.decode.device in ("cpu", "gpu", "auto"), "decode.device must be cpu|gpu|auto"),
        (cfg.decode.device_id >= 0, "decode.device_id must be >= 0"),
        (cfg.decode.threads >= 1, "decode.threads must be >= 1"),
        (cfg.decode.batch_size >= 1, "decode.batch_size must be >= 1"),
        (cfg.lines.side_px >= 32, "lines.side_px must be >= 32"),
        (cfg.lines.precision in ("fp32", "bf16", "auto"), "lines.precision must be fp32|bf16|auto"),
        (cfg.lines.threads >= 1, "lines.threads must be >= 1"),
        (cfg.lines.workers >= 1, "lines.workers must be >= 1"),
        (cfg.lines.engine in ("openvino", "torch", "auto"),
         "lines.engine must be openvino|torch|auto"),
        (0.0 < cfg.lines.pixel_threshold < 1.0, "lines.pixel_threshold must be in (0, 1)"),
        (0.0 <= cfg.lines.box_threshold < 1.0, "lines.box_threshold must be in [0, 1)"),
        (cfg.lines.unclip_ratio > 0, "lines.unclip_ratio must be > 0"),
        (cfg.lines.max_lines >= 1, "lines.max_lines must be >= 1"),
        (0.0 < cfg.lines.region_share <= 1.0, "lines.region_share must be in (0, 1]"),
        (0.0 <= cfg.lines.core_inset < 0.5, "lines.core_inset must be in [0, 0.5)"),
        (cfg.lines.block_gap >= 0, "lines.block_gap must be >= 0"),
        (cfg.lines.block_indent >= 0, "lines.block_indent must be >= 0"),
        (cfg.layout.figure_text in ("read", "skip"), "layout.figure_text must be read|skip"),
        (0.0 <= cfg.recognize.min_line_score <= 1.0, "recognize.min_line_score must be in [0, 1]"),
        (cfg.decode.input_height >= 1 and cfg.decode.input_width >= 1,
         "decode.input_height/input_width must be >= 1"),
        (len(cfg.decode.mean) == 3 and len(cfg.decode.std) == 3,
         "decode.mean and decode.std must hold 3 values (one per channel)"),
        (all(s > 0 for s in cfg.decode.std), "decode.std values must be > 0"),
        (cfg.decode.orient_min_lines >= 1, "decode.orient_min_lines must be >= 1"),
        (cfg.decode.orient_line_aspect >= 1.0, "decode.orient_line_aspect must be >= 1"),
        (cfg.decode.orient_lines >= 1, "decode.orient_lines must be >= 1"),
        (cfg.decode.orient_crop_aspect > 0, "decode.orient_crop_aspect must be > 0"),
        (cfg.decode.orient_margin >= 0, "decode.orient_margin must be >= 0"),
        (cfg.layout.backend in ("inprocess", "triton"), "layout.backend must be inprocess|triton"),
        (cfg.layout.precision in ("fp32", "bf16", "auto"),
         "layout.precision must be fp32|bf16|auto"),
        (cfg.layout.batch_size >= 1, "layout.batch_size must be >= 1"),
        (cfg.layout.threads >= 1, "layout.threads must be >= 1"),
        (0.0 <= cfg.layout.score_threshold <= 1.0, "layout.score_threshold must be in [0, 1]"),
        (all(isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= 1.0
             for v in cfg.layout.class_score_thresholds.values()),
         "layout.class_score_thresholds values must be numbers in [0, 1]"),
        (cfg.layout.top_k_per_level >= 1, "layout.top_k_per_level must be >= 1"),
        (cfg.layout.max_candidates >= 1, "layout.max_candidates must be >= 1"),
        (cfg.layout.containment > 0, "layout.containment must be > 0"),
        (0.0 < cfg.layout.column_max_width <= 1.0, "layout.column_max_width must be in (0, 1]"),
        (0.0 <= cfg.layout.column_overlap < 1.0, "layout.column_overlap must be in [0, 1)"),
        (len(cfg.layout.strides) >= 1 and all(isinstance(s, int) and s >= 1
                                              for s in cfg.layout.strides),
         "layout.strides must be a list of integers >= 1"),
        (cfg.triton.max_in_flight >= 1, "triton.max_in_flight must be >= 1"),
        (cfg.triton.timeout_s > 0, "triton.timeout_s must be > 0"),
        (cfg.triton.retries >= 0, "triton.retries must be >= 0"),
        (cfg.triton.ready_wait_s >= 0, "triton.ready_wait_s must be >= 0"),
        (cfg.triton.connect_wait_s > 0, "triton.connect_wait_s must be > 0"),
        (cfg.layout.gpu_resident in ("auto", "on", "off"),
         "layout.gpu_resident must be auto|on|off"),
        (cfg.layout.batches_in_flight >= 1, "layout.batches_in_flight must be >= 1"),
        (cfg.decode.gpu_decoder in ("auto", "dali", "torch"),
         "decode.gpu_decoder must be auto|dali|torch"),
        ((cfg.decode.input_height, cfg.decode.input_width)
         == (cfg.layout.input_height, cfg.layout.input_width),
         "decode.input_height/input_width must equal layout.input_height/input_width "
         "(the decode stage resizes pages to the layout model's input)"),
        (0.0 < cfg.layout.nms_iou <= 1.0, "layout.nms_iou must be in (0, 1]"),
        (cfg.recognize.engine in ("rapidocr", "vllm"), "recognize.engine must be rapidocr|vllm"),
        (cfg.recognize.workers >= 1, "recognize.workers must be >= 1"),
        (cfg.recognize.threads >= 1, "recognize.threads must be >= 1"),
        (cfg.recognize.precision in ("fp32", "bf16", "auto"),
         "recognize.precision must be fp32|bf16|auto"),
        (cfg.decode.orient_precision in ("fp32", "bf16", "auto"),
         "decode.orient_precision must be fp32|bf16|auto"),
        (0.0 < cfg.decode.orient_confident <= 1.0, "decode.orient_confident must be in (0, 1]"),
        (cfg.recognize.bf16_width_bucket_px >= 1, "recognize.bf16_width_bucket_px must be >= 1"),
        (cfg.recognize.pages_in_flight is None or cfg.recognize.pages_in_flight >= 1,
         "recognize.pages_in_flight must be >= 1"),
        (cfg.vllm.max_in_flight >= 1, "vllm.max_in_flight must be >= 1"),
        (cfg.vllm.timeout_s > 0, "vllm.timeout_s must be > 0"),
        (cfg.vllm.retries >= 0, "vllm.retries must be >= 0"),
        (cfg.vllm.dead_server_wait_s >= 0, "vllm.dead_server_wait_s must be >= 0"),
        (cfg.vllm.ttft_sla_s > 0, "vllm.ttft_sla_s must be > 0"),
        (cfg.vllm.ageing_tokens_per_s >= 0, "vllm.ageing_tokens_per_s must be >= 0"),
        (0 < cfg.vllm.backoff_initial_s <= cfg.vllm.backoff_max_s,
         "vllm.backoff_initial_s must be in (0, vllm.backoff_max_s]"),
        (cfg.vllm.encode_threads >= 1, "vllm.encode_threads must be >= 1"),
        (cfg.crop.margin_px >= 0, "crop.margin_px must be >= 0"),
        (cfg.crop.min_side_px >= 1, "crop.min_side_px must be >= 1"),
        (1 <= cfg.sink.batch_rows <= 100_000, "sink.batch_rows must be in 1..100000"),
        (cfg.sink.queue_pages >= 1, "sink.queue_pages must be >= 1"),
        (cfg.sink.flush_interval_s > 0, "sink.flush_interval_s must be > 0"),
        (cfg.pipeline.queue_pages >= 1, "pipeline.queue_pages must be >= 1"),
        (cfg.pipeline.limit is None or cfg.pipeline.limit >= 1, "pipeline.limit must be >= 1"),
        (cfg.pipeline.stall_timeout_s >= 0, "pipeline.stall_timeout_s must be >= 0"),
        (cfg.pipeline.drain_timeout_s >= 0, "pipeline.drain_timeout_s must be >= 0"),
        (cfg.pipeline.engine in ("inprocess", "ray"), "pipeline.engine must be inprocess|ray"),
        (cfg.ray.unit_pages >= 1, "ray.unit_pages must be >= 1"),
        (cfg.ray.read_cpus > 0, "ray.read_cpus must be > 0"),
        (cfg.ray.layout_actors >= 1, "ray.layout_actors must be >= 1"),
        (cfg.ray.recognize_actors >= 1, "ray.recognize_actors must be >= 1"),
        (cfg.ray.layout_cpus >= 0 and cfg.ray.recognize_cpus >= 0,
         "ray.layout_cpus and ray.recognize_cpus must be >= 0"),
        (cfg.ray.layout_gpus >= 0, "ray.layout_gpus must be >= 0"),
        (cfg.ray.address is None or cfg.ray.address == "auto"
         or cfg.ray.address.startswith("ray://") or ":" in cfg.ray.address,
         "ray.address must be auto, ray://HOST:PORT or HOST:PORT"),
    ]
    for task in cfg.layout.label_tasks.values():
        checks.append((task in ("text", "table", "formula", "skip", "abandon"),
                       f"layout.label_tasks: unknown task {task!r}"))
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """A TOML file's tables; a missing or malformed file is a ConfigError naming ``what``."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{what} not found: {path}") from exc
    except IsADirectoryError as exc:
        raise ConfigError(f"{what} {path} is a folder, not a TOML file") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason})"
        ) from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML: {exc}") from exc


def load_config(path: Path | None, base: FolioConfig | None = None) -> FolioConfig:
    """Defaults, overlaid with a TOML file's ``[section]`` tables when a path is given."""
    cfg = base or FolioConfig()
    if path is None:
        validate(cfg)
        return cfg
    data = read_toml(path, "config file")
    flat: dict[str, Any] = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path}: top-level key {section!r} must be a table")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return cfg.override(flat)
