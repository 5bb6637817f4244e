"""fusc_preprocess: encoded image bytes (TYPE_STRING [N,1]) -> model input float32 [N,1,S,S], by the
project's own ``service.decode.decode_image`` and ``service.clean.preprocess`` with the model card's
preprocessing (``preprocess.json`` beside this file), exactly as the service's pipeline runs them.

The ``service`` modules it needs are copied next to this file by ``python -m service.triton repo`` and put
first on ``sys.path``: the repository carries the code that matches its card, and no project checkout or
installed ``fusc`` package is needed in Triton's Python environment (numpy, OpenCV, pydicom with the
pylibjpeg plug-ins, pydantic are: see service/triton/requirements-server.txt).

A request whose image cannot be decoded or cleaned fails alone, with the service's stable error code at
the start of the message (``corrupt_image: ...``); the other requests of the batch are answered.
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _error(code, message):
    # TritonError codes arrived in the Python backend of Triton 23.x; older servers take the message only.
    invalid = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    text = f"{code}: {message}"
    return pb_utils.TritonError(text, invalid) if invalid is not None else pb_utils.TritonError(text)


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        sys.path.insert(0, str(version_dir))
        from service.clean import CleanConfig, preprocess
        from service.decode import decode_image
        from service.errors import FuscError

        self._preprocess, self._decode, self._fusc_error = preprocess, decode_image, FuscError
        settings = json.loads((version_dir / "preprocess.json").read_text())
        self.clean = CleanConfig.model_validate(settings["clean"])
        self.max_pixels = int(settings["max_pixels"])
        self.max_bytes = int(settings["max_bytes"])
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.shape = (1, self.clean.size, self.clean.size)

    def _one(self, data):
        if not data:
            raise self._fusc_error("the upload is empty: send the image bytes", code="empty_input")
        try:
            frame = self._decode(data, max_pixels=self.max_pixels, max_bytes=self.max_bytes)
        except self._fusc_error:
            raise
        except Exception as exc:
            raise self._fusc_error("the image could not be decoded", code="corrupt_image") from exc
        try:
            tensor = np.asarray(self._preprocess(frame, self.clean), dtype=np.float32)
        except self._fusc_error:
            raise
        except Exception as exc:
            raise self._fusc_error(
                "the image decoded but could not be prepared for the model", code="preprocess_failed"
            ) from exc
        if tensor.shape != self.shape:
            message = f"preprocessing gave {tensor.shape}, not {self.shape}"
            raise self._fusc_error(message, code="preprocess_failed")
        return tensor

    def execute(self, requests):
        responses = []
        for request in requests:
            items = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy().reshape(-1)
            try:
                batch = np.stack([self._one(bytes(item)) for item in items])
            except self._fusc_error as exc:
                responses.append(pb_utils.InferenceResponse(error=_error(exc.code, exc.message)))
                continue
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, batch)]))
        return responses
