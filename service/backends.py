"""embed and assign: the two ONNX models behind one small interface, run in-process by ONNX Runtime.

A Triton backend (the same repository served remotely) plugs in behind the same ``Backend`` protocol;
``make_backend`` is the one place that chooses.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

from service.card import ModelCard, OnnxModel
from service.errors import BackendUnavailableError, FuscError, ModelFailedError, ModelRepositoryError
from service.settings import Settings

logger = logging.getLogger("fusc.service")


class Backend(Protocol):
    name: str

    def embed(self, x: np.ndarray) -> np.ndarray:
        """float32 [N,1,S,S] -> float32 [N,D] L2-normalised embeddings."""
        ...

    def assign(self, emb: np.ndarray) -> np.ndarray:
        """float32 [N,D] -> float32 [N,K] cluster probabilities."""
        ...

    def ready(self) -> bool: ...

    def describe(self) -> dict[str, object]: ...


class BackendNotSupportedError(FuscError):
    code = "backend_not_supported"
    http_status = 500


def _providers() -> list[str]:
    available = ort.get_available_providers()
    # CUDA first where the onnxruntime-gpu build finds a GPU; the CPU EP is always the fallback.
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OnnxRuntimeBackend:
    """Both models as ONNX Runtime sessions; ``InferenceSession.run`` is thread-safe, so one per process."""

    name = "onnxruntime"

    def __init__(
        self,
        repository: Path,
        card: ModelCard,
        *,
        intra_op_threads: int = 0,
        providers: list[str] | None = None,
    ) -> None:
        self.card = card
        self.providers = providers or _providers()
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # Idle intra-op threads would otherwise spin for a while after each batch, taking the cores that the
        # preprocessing threads need between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._backbone = self._open(card.backbone, repository, options)
        self._head = self._open(card.head, repository, options)
        self._check_shapes()

    def _open(self, model: OnnxModel, repository: Path, options: ort.SessionOptions) -> ort.InferenceSession:
        path = model.path(repository)
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        except Exception as exc:  # ORT raises its own exception types, not one base class
            raise ModelRepositoryError(f"ONNX Runtime cannot load {model.name}: {exc}") from exc
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if model.input_name not in inputs or model.output_name not in outputs:
            raise ModelRepositoryError(
                f"{model.name} has inputs {inputs} and outputs {outputs}; the model card expects "
                f"input {model.input_name!r} and output {model.output_name!r}"
            )
        return session

    def _check_shapes(self) -> None:
        # A warm-up call proves the pair matches the card before the service reports ready.
        size = self.card.preprocess.size
        emb = self.embed(np.zeros((1, 1, size, size), np.float32))
        probs = self.assign(emb)
        if emb.shape != (1, self.card.embedding_dim) or probs.shape != (1, self.card.num_clusters):
            raise ModelRepositoryError(
                f"models give embedding {emb.shape[1:]} and probabilities {probs.shape[1:]}; the model card "
                f"says D={self.card.embedding_dim}, K={self.card.num_clusters}"
            )

    def _run(self, session: ort.InferenceSession, model: OnnxModel, x: np.ndarray) -> np.ndarray:
        try:
            (out,) = session.run([model.output_name], {model.input_name: x})
        except EPFail as exc:
            # The execution provider (a GPU) failed: possibly transient, so the caller may retry.
            logger.error("ONNX Runtime's execution provider failed in %s: %s", model.name, exc)
            raise BackendUnavailableError(f"the inference backend failed to run {model.name}") from exc
        except Exception as exc:
            # The model raised on this input (a bad shape, a failing operator): the same call fails again.
            # The message can name shapes and ORT internals but never the image or its sender.
            logger.error("ONNX Runtime failed in %s: %s", model.name, exc)
            raise ModelFailedError(f"the model {model.name} failed on this input") from exc
        return np.asarray(out, dtype=np.float32)

    def embed(self, x: np.ndarray) -> np.ndarray:
        return self._run(self._backbone, self.card.backbone, np.ascontiguousarray(x, dtype=np.float32))

    def assign(self, emb: np.ndarray) -> np.ndarray:
        return self._run(self._head, self.card.head, np.ascontiguousarray(emb, dtype=np.float32))

    def ready(self) -> bool:
        return True

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "providers": list(self._backbone.get_providers())}


def make_backend(settings: Settings, card: ModelCard) -> Backend:
    if settings.backend == "onnxruntime":
        return OnnxRuntimeBackend(
            settings.model_repository, card, intra_op_threads=settings.ort_intra_op_threads
        )
    raise BackendNotSupportedError(
        f"FUSC_BACKEND={settings.backend!r} is not available in this build yet; use 'onnxruntime' "
        "(the Triton repository layout is ready, the client side is not)"
    )
