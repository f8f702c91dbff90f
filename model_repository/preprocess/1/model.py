"""folio_layout step 1, cpu target: encoded page bytes -> MODEL_INPUT, PAGE_SIZE.

A thin adapter over ``orchestrator.serving.triton_stages.PreprocessStage`` (the DALI pipeline of
``dali_pipelines.layout_preprocess`` on the CPU). A page that is not an image, is empty or
is over ``sources.max_pixels`` fails its own request only, with INVALID_ARG (the request's
fault, not the server's).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from orchestrator.serving.triton_stages import PreprocessStage, format_error, is_client_error, stage_config


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        threads = int(config["parameters"].get("threads", {}).get("string_value", "1"))
        self.stage = PreprocessStage(
            stage_config(config), max_batch_size=max(1, config["max_batch_size"]), threads=threads
        )

    def execute(self, requests):
        pages, owner = [], []
        for index, request in enumerate(requests):
            images = pb_utils.get_input_tensor_by_name(request, "IMAGE").as_numpy()
            for row in images.reshape(images.shape[0], -1):
                pages.append(row)
                owner.append(index)
        results = self.stage(pages)
        responses = []
        for index in range(len(requests)):
            mine = [r for r, o in zip(results, owner) if o == index]
            failed = [r for r in mine if isinstance(r, Exception)]
            if failed or not mine:
                message = format_error(failed[0]) if failed else "PageDecodeError: no image"
                bad_input = not failed or is_client_error(failed[0])
                code = (pb_utils.TritonError.INVALID_ARG if bad_input
                        else pb_utils.TritonError.INTERNAL)
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)))
                continue
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("MODEL_INPUT", np.stack([m for m, _ in mine])),
                pb_utils.Tensor("PAGE_SIZE", np.stack([s for _, s in mine])),
            ]))
        return responses
