"""fusc_backbone / fusc_head of the ``cpu`` variant: the model's ONNX file run by ONNX Runtime inside the
Python backend (the PyPI ``tritonserver`` has no onnxruntime backend). The NGC variant serves the same file
with Triton's own onnxruntime backend instead.

Dynamic batching hands ``execute`` several requests at once: they are concatenated into one ONNX Runtime
call and the output is split back, so the batch is formed by Triton, not by this file. Parameters of the
model's config.pbtxt read here: ``intra_op_thread_count`` (ONNX Runtime threads; absent or 0: its default).
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        options = ort.SessionOptions()
        threads = int(params.get("intra_op_thread_count") or 0)
        if threads:
            options.intra_op_num_threads = threads
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)

    def execute(self, requests):
        batches = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            x = np.ascontiguousarray(np.concatenate(batches), dtype=np.float32)
            (out,) = self.session.run([self.output_name], {self.input_name: x})
        except Exception as exc:  # ORT has no single exception base class
            error = pb_utils.TritonError(f"ONNX Runtime failed: {exc}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        out = np.asarray(out, dtype=np.float32)
        ends = np.cumsum([len(b) for b in batches])
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(self.output_name, out[end - len(b) : end])])
            for b, end in zip(batches, ends, strict=True)
        ]
