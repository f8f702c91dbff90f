"""folio_layout step 2, cpu target: MODEL_INPUT__0 (B, 3, H, W) -> RAW__0 .. RAW__n.

A thin adapter over ``orchestrator.serving.triton_stages.LayoutStage`` (``LayoutModel``, the
TorchScript artifact copied into this version folder). The requests Triton batched run
as one forward pass.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from orchestrator.serving.triton_stages import LayoutStage, format_error, stage_config


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.stage = LayoutStage(stage_config(config), version_dir)
        self.outputs = [output["name"] for output in config["output"]]

    def execute(self, requests):
        inputs = [pb_utils.get_input_tensor_by_name(r, "MODEL_INPUT__0").as_numpy()
                  for r in requests]
        try:
            raw = self.stage(np.concatenate(inputs))
        except Exception as exc:  # the whole batch failed: every request says why
            error = pb_utils.TritonError(f"LayoutError: {format_error(exc)}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for array in inputs:
            stop = start + array.shape[0]
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(name, np.ascontiguousarray(out[start:stop]))
                for name, out in zip(self.outputs, raw)
            ]))
            start = stop
        return responses
