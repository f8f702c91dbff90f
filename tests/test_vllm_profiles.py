"""Model profiles: pixel budget arithmetic, output post-processing, profiles from config."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from orchestrator.config import VLLMConfig, load_config
from orchestrator.errors import ConfigError
from orchestrator.stages.profiles import (
    BUILTIN_PROFILES,
    GLM_OCR,
    QWEN2_VL_TINY,
    PixelBudget,
    formula_to_latex,
    profile_from_dict,
    resolve_profile,
    strip_code_fences,
    table_to_html,
)
from orchestrator.types import Task

HERE = Path(__file__).resolve().parent


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_glm_ocr_is_the_default_profile_with_its_task_prompts() -> None:
    profile = resolve_profile(VLLMConfig())
    assert profile is GLM_OCR
    assert profile.prompt(Task.TEXT) == "Text Recognition:"
    assert profile.prompt(Task.TABLE) == "Table Recognition:"
    assert profile.prompt(Task.FORMULA) == "Formula Recognition:"
    assert profile.budget.factor == 28
    assert profile.budget.max_image_tokens == 6144


def test_tiny_profile_matches_the_tiny_model_builder() -> None:
    builder = _load("build_tiny_model", HERE / "vllm" / "build_tiny_model.py")
    budget = QWEN2_VL_TINY.budget
    assert (budget.min_pixels, budget.max_pixels) == (builder.MIN_PIXELS, builder.MAX_PIXELS)
    assert (budget.patch_size, budget.merge_size) == (builder.PATCH_SIZE, builder.MERGE_SIZE)


@pytest.mark.parametrize(
    ("size", "dims"),
    [
        # values from transformers' Qwen2-VL smart_resize with the same budget
        ((64, 320), (56, 308)),
        ((10, 300), (28, 308)),  # too small: scaled up to min_pixels
        ((682, 640), (448, 420)),  # over 256 tokens: scaled down
        ((3300, 2550), (504, 392)),
    ],
)
def test_server_dims_follow_smart_resize(size: tuple[int, int], dims: tuple[int, int]) -> None:
    assert QWEN2_VL_TINY.budget.server_dims(*size) == dims


@pytest.mark.parametrize("size", [(3300, 2550), (682, 640), (40, 2500), (9000, 30), (300, 300)])
def test_fit_keeps_every_crop_within_the_budget(size: tuple[int, int]) -> None:
    budget = QWEN2_VL_TINY.budget
    h, w = budget.pad_dims(*size)
    target = budget.fit(h, w)
    if target is None:
        # sent as is: the server's rounding stays within max_pixels
        sh, sw = budget.server_dims(h, w)
        assert sh * sw <= budget.max_pixels
    else:
        th, tw = target
        assert th % budget.factor == 0 and tw % budget.factor == 0
        assert th * tw <= budget.max_pixels
        assert budget.server_dims(th, tw) == (th, tw)  # the server won't resize again
    assert budget.image_tokens(h, w) <= budget.max_image_tokens


def test_fit_leaves_crops_within_budget_alone() -> None:
    assert GLM_OCR.budget.fit(64, 1200) is None
    assert GLM_OCR.budget.fit(2339, 1654) is None  # a whole A4 page at 200 dpi
    assert GLM_OCR.budget.fit(7016, 4961) is not None  # A4 at 600 dpi


def test_pad_dims_fixes_extreme_aspect_ratios_and_tiny_sides() -> None:
    budget = GLM_OCR.budget
    h, w = budget.pad_dims(12, 5000)
    assert h >= 28 and w / h <= budget.max_aspect_ratio
    assert budget.pad_dims(8, 8) == (28, 28)
    assert budget.pad_dims(100, 200) == (100, 200)


def test_pixel_budget_rejects_nonsense() -> None:
    with pytest.raises(ConfigError):
        PixelBudget(min_pixels=10, max_pixels=5)
    with pytest.raises(ConfigError):
        PixelBudget(min_pixels=1, max_pixels=100)  # not even one 28x28 token


def test_prompt_tokens_estimate_counts_image_and_prompt() -> None:
    est = QWEN2_VL_TINY.prompt_tokens_estimate(Task.TEXT, 64, 320)
    # the tiny server reports 43 prompt tokens for this crop and prompt
    assert 30 <= est <= 60
    assert QWEN2_VL_TINY.prompt_tokens_estimate(Task.TEXT, 700, 700) > est


def test_postprocessing_cleans_completions() -> None:
    assert strip_code_fences("```latex\nx^2\n```") == "x^2"
    assert strip_code_fences("no fence") == "no fence"
    assert formula_to_latex("$$\\frac{a}{b}$$") == "\\frac{a}{b}"
    assert formula_to_latex("\\[ x + y \\]") == "x + y"
    assert formula_to_latex("E = mc^2") == "E = mc^2"
    html = "<table><tr><td>1</td></tr></table>"
    assert table_to_html(f"Here:\n{html}\nDone") == html
    md = "| a | b |\n|---|:-:|\n| 1 | x<y |\n| 2 | 3 |"
    assert table_to_html(md) == (
        "<table><thead><tr><th>a</th><th>b</th></tr></thead><tbody>"
        "<tr><td>1</td><td>x&lt;y</td></tr><tr><td>2</td><td>3</td></tr></tbody></table>"
    )
    assert GLM_OCR.postprocess(Task.TABLE, f"```html\n{html}\n```") == html
    assert GLM_OCR.postprocess(Task.FORMULA, "```\n$$a+b$$\n```") == "a+b"
    assert GLM_OCR.postprocess(Task.TEXT, "  Hello  \n") == "Hello"


def test_profiles_from_the_config_file(tmp_path: Path) -> None:
    toml = tmp_path / "folio.toml"
    toml.write_text(
        '[vllm]\nprofile = "my-ocr"\n\n'
        '[vllm.profiles.my-ocr]\nbase = "glm-ocr"\nmax_pixels = 2408448\n'
        'max_tokens = { table = 1000 }\ntemperature = 0.0\nprompts = { text = "OCR:" }\n'
        'image_format = "png"\n',
        encoding="utf-8",
    )
    cfg = load_config(toml)
    profile = resolve_profile(cfg.vllm)
    assert profile.name == "my-ocr"
    assert profile.budget.max_image_tokens == 3072
    assert profile.max_tokens_for(Task.TABLE) == 1000
    assert profile.max_tokens_for(Task.TEXT) == GLM_OCR.max_tokens_for(Task.TEXT)
    assert profile.prompt(Task.TEXT) == "OCR:"
    assert profile.prompt(Task.TABLE) == "Table Recognition:"
    assert profile.sampling.temperature == 0.0
    assert profile.sampling.top_p == GLM_OCR.sampling.top_p
    assert profile.image_format == "png"


def test_profiles_file_and_bases_within_it(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(
        '[child]\nbase = "parent"\nmax_tokens = { text = 64 }\n\n'
        '[parent]\nbase = "qwen2-vl-tiny"\nrepetition_penalty = 1.05\n',
        encoding="utf-8",
    )
    profile = resolve_profile(VLLMConfig(profile="child", profiles_file=str(path)))
    assert profile.max_tokens_for(Task.TEXT) == 64
    assert profile.sampling.repetition_penalty == 1.05
    assert profile.budget == QWEN2_VL_TINY.budget


def test_bad_profiles_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown keys"):
        profile_from_dict("x", {"max_pixel": 1})
    with pytest.raises(ConfigError, match="unknown task"):
        profile_from_dict("x", {"prompts": {"chart": "?"}})
    with pytest.raises(ConfigError, match="not a known profile"):
        profile_from_dict("x", {"base": "nope"})
    with pytest.raises(ConfigError, match="not defined"):
        resolve_profile(VLLMConfig(profile="nope"))
    with pytest.raises(ConfigError, match="image_format"):
        profile_from_dict("x", {"image_format": "gif"})
    with pytest.raises(ConfigError, match="not found"):
        resolve_profile(VLLMConfig(profiles_file=str(tmp_path / "missing.toml")))
    assert set(BUILTIN_PROFILES) == {"glm-ocr", "qwen2-vl-tiny"}
