"""Configuration: defaults, TOML file, overrides, and the errors a user sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.config import FolioConfig, load_config
from orchestrator.errors import ConfigError


def test_file_then_flags_override_defaults(tmp_path: Path) -> None:
    path = tmp_path / "folio.toml"
    path.write_text('[sources]\ndpi = 300\n[layout]\nlabel_tasks = { header = "text" }\n'
                    "[sink]\nbatch_rows = 1000\n", encoding="utf-8")
    cfg = load_config(path)
    assert (cfg.sources.dpi, cfg.sink.batch_rows) == (300, 1000)
    assert cfg.layout.label_tasks["header"] == "text"
    assert cfg.layout.label_tasks["table"] == "table"  # a table merges over the defaults
    cfg = cfg.override({"sources.dpi": 150, "pipeline.limit": None})
    assert cfg.sources.dpi == 150 and cfg.pipeline.limit is None
    assert FolioConfig().sources.dpi == 200


@pytest.mark.parametrize("values,message", [
    ({"layout.nms_iou": 7.0}, "layout.nms_iou"),
    ({"sources.dpi": "high"}, "sources.dpi must be an integer"),
    ({"sink.batch_rows": 0}, "sink.batch_rows"),
    ({"recognize.precision": "int4"}, "recognize.precision must be fp32|bf16|auto"),
    ({"recognize.bf16_width_bucket_px": 0}, "recognize.bf16_width_bucket_px"),
    ({"layout.label_tasks": {"figure": "paint"}}, "unknown task 'paint'"),
    ({"nope.key": 1}, "unknown config section"),
    ({"layout.nope": 1}, "unknown config key layout.nope"),
    ({"decode.input_width": 640}, "decode.input_height/input_width"),
    ({"decode.threads": 0}, "decode.threads must be >= 1"),
    ({"layout.threads": -1}, "layout.threads must be >= 1"),
    ({"layout.max_candidates": 0}, "layout.max_candidates must be >= 1"),
    ({"layout.top_k_per_level": 0}, "layout.top_k_per_level must be >= 1"),
    ({"layout.score_threshold": 1.5}, "layout.score_threshold"),
    ({"layout.class_score_thresholds": {"table": -0.1}}, "layout.class_score_thresholds"),
    ({"layout.containment": 0.0}, "layout.containment"),
    ({"layout.strides": [8, 0]}, "layout.strides"),
    ({"decode.orient_lines": 0}, "decode.orient_lines"),
    ({"decode.device_id": -1}, "decode.device_id"),
    ({"triton.max_in_flight": 0}, "triton.max_in_flight"),
    ({"triton.timeout_s": 0}, "triton.timeout_s"),
    ({"recognize.threads": 0}, "recognize.threads"),
    ({"lines.side_px": 0}, "lines.side_px"),
    ({"lines.region_share": 0.0}, "lines.region_share"),
    ({"lines.core_inset": 0.5}, "lines.core_inset"),
    ({"layout.figure_text": "maybe"}, "layout.figure_text"),
    ({"recognize.min_line_score": 2.0}, "recognize.min_line_score"),
    ({"crop.min_side_px": 0}, "crop.min_side_px"),
    ({"layout.gpu_resident": "yes"}, "layout.gpu_resident must be auto|on|off"),
    ({"layout.batches_in_flight": 0}, "layout.batches_in_flight must be >= 1"),
    ({"layout.cuda_graph": 1}, "layout.cuda_graph must be true or false"),
    ({"decode.gpu_decoder": "nvjpeg"}, "decode.gpu_decoder must be auto|dali|torch"),
])
def test_bad_values_name_the_key(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FolioConfig().override(values)


def test_bad_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a folder"):
        load_config(tmp_path)
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("# é\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(latin1)
    broken = tmp_path / "broken.toml"
    broken.write_text("[layout\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(broken)


def test_config_is_recorded_as_json_types() -> None:
    import json

    data = FolioConfig().to_dict()
    assert json.loads(json.dumps(data))["layout"]["model_dir"].endswith("build/models")
