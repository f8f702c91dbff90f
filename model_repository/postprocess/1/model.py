"""folio_layout step 3, both targets: RAW__0 .. RAW__n + PAGE_SIZE -> BOXES, SCORES, CLASSES.

A thin adapter over ``orchestrator.serving.triton_stages.PostprocessStage``: the in-process path's
post-processing, imported from the installed package; numpy on the cpu target, torch on
the GPU tensors Triton hands over (DLPack) on the gpu target. One page per request (its
boxes are a ragged [N, 4] tensor).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from orchestrator.serving.triton_stages import PostprocessStage, format_error, stage_config


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = config["parameters"]
        labels = json.loads(params["labels"]["string_value"])
        kind = params.get("postprocess", {}).get("string_value", "picodet")
        device = params.get("postprocess_device", {}).get("string_value", "cpu")
        self.stage = PostprocessStage(stage_config(config), labels, kind, device)
        self.inputs = [i["name"] for i in config["input"] if i["name"] != "PAGE_SIZE"]

    def execute(self, requests):
        raws = [[self.stage.array(pb_utils.get_input_tensor_by_name(r, name))
                 for name in self.inputs] for r in requests]
        sizes = [pb_utils.get_input_tensor_by_name(r, "PAGE_SIZE").as_numpy() for r in requests]
        counts = [s.shape[0] for s in sizes]
        try:
            batch = [self.stage.concatenate([raw[k] for raw in raws])
                     for k in range(len(self.inputs))]
            detections = self.stage(batch, np.concatenate(sizes))
        except Exception as exc:  # the whole batch failed: every request says why
            error = pb_utils.TritonError(f"LayoutError: {format_error(exc)}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for count in counts:
            mine = detections[start:start + count]
            start += count
            if count != 1:
                error = pb_utils.TritonError(
                    f"LayoutError: send one page per request (got a batch of {count})",
                    pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            det = mine[0]
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("BOXES", det.boxes.reshape(1, -1, 4).astype(np.float32)),
                pb_utils.Tensor("SCORES", det.scores.reshape(1, -1).astype(np.float32)),
                pb_utils.Tensor("CLASSES", det.classes.reshape(1, -1).astype(np.int32)),
            ]))
        return responses
