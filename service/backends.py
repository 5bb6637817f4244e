"""embed and assign: the two ONNX models behind one small interface, run in-process by ONNX Runtime or
remotely by a Triton Inference Server (tritonclient, HTTP or gRPC); ``make_backend`` is the one place that
chooses (FUSC_BACKEND).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import EPFail

from service.card import ModelCard, OnnxModel, sha256_file
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
        precision: str = "fp32",
    ) -> None:
        self.card = card
        self.precision = precision
        # The card's fp32 backbone, or its int8 copy (whose file must then exist and match the card).
        self._backbone_model = card.backbone_for(precision)
        self.providers = providers or _providers()
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        # Idle intra-op threads would otherwise spin for a while after each batch, taking the cores that the
        # preprocessing threads need between batches.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._backbone = self._open(self._backbone_model, repository, options)
        self._head = self._open(card.head, repository, options)
        self._check_shapes()

    def _open(self, model: OnnxModel, repository: Path, options: ort.SessionOptions) -> ort.InferenceSession:
        path = model.path(repository)
        if model is self.card.backbone_int8:
            # The int8 backbone is optional in a repository, so load_card checks it only where it exists.
            if not path.is_file():
                raise ModelRepositoryError(f"{path} (named by the model card) is missing: make quantize")
            if sha256_file(path) != model.sha256:
                raise ModelRepositoryError(f"{path} does not match the SHA-256 in the model card")
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
        return self._run(self._backbone, self._backbone_model, np.ascontiguousarray(x, dtype=np.float32))

    def assign(self, emb: np.ndarray) -> np.ndarray:
        return self._run(self._head, self.card.head, np.ascontiguousarray(emb, dtype=np.float32))

    def ready(self) -> bool:
        return True

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "providers": list(self._backbone.get_providers()),
            "precision": self.precision,
        }


# ------------------------------------------------------------------------------------------------ Triton
# tritonclient is imported when a Triton backend is made, so that the in-process default pays nothing for
# gevent and grpc at import time.
T = TypeVar("T")


class _HttpTransport:
    """tritonclient.http: its client is not thread-safe, so each thread gets its own (one keep-alive
    connection each); readiness goes through one more client with the short timeouts, under a lock.

    A kept-alive connection can be dead without anyone knowing (Triton restarted, an idle timeout on the
    way): a call that fails on one for any reason but a timeout or an answer of the server is tried once
    more on a new connection. Both calls are idempotent; against a server that is down, the second one is
    refused at once too."""

    def __init__(self, url: str, timeout_s: float, connect_timeout_s: float) -> None:
        import tritonclient.http as httpclient
        from tritonclient.utils import InferenceServerException

        self._http = httpclient
        self._answered = InferenceServerException
        self._url, self._timeout_s, self._connect_timeout_s = url, timeout_s, connect_timeout_s
        self._local = threading.local()
        self._probe_lock = threading.Lock()
        self._probe_client: Any = None

    def _new(self, network_timeout_s: float) -> Any:
        return self._http.InferenceServerClient(
            self._url, connection_timeout=self._connect_timeout_s, network_timeout=network_timeout_s
        )

    def _twice(self, holder: Any, attr: str, network_timeout_s: float, op: Callable[[Any], T]) -> T:
        """``op(client)`` with the client kept in ``holder.attr``; once more on a new one if it was stale."""
        for attempt in (1, 2):
            client = getattr(holder, attr, None)
            if client is None:
                client = self._new(network_timeout_s)
                setattr(holder, attr, client)
            try:
                return op(client)
            except Exception as exc:
                setattr(holder, attr, None)
                if attempt == 2 or isinstance(exc, (self._answered, TimeoutError)):
                    raise
        raise AssertionError("unreachable")

    def _probe(self, op: Callable[[Any], T]) -> T:
        with self._probe_lock:
            return self._twice(self, "_probe_client", self._connect_timeout_s, op)

    def model_ready(self, name: str, version: str) -> bool:
        return bool(self._probe(lambda c: c.is_model_ready(name, version)))

    def model_config(self, name: str, version: str) -> dict[str, Any]:
        return dict(self._probe(lambda c: c.get_model_config(name, version)))

    def infer(self, name: str, version: str, input_name: str, x: np.ndarray, output_name: str) -> np.ndarray:
        inp = self._http.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        out = self._http.InferRequestedOutput(output_name, binary_data=True)
        result = self._twice(
            self._local,
            "client",
            self._timeout_s,
            lambda c: c.infer(name, [inp], model_version=version, outputs=[out]),
        )
        return result.as_numpy(output_name)


class _GrpcTransport:
    """tritonclient.grpc: one channel for all threads (its unary calls are thread-safe); every call carries
    a deadline, and the channel retries a lost server every second at most instead of backing off to
    gRPC's default two minutes, so that the backend recovers as soon as Triton is back."""

    def __init__(self, url: str, timeout_s: float, connect_timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self._timeout_s, self._connect_timeout_s = timeout_s, connect_timeout_s
        unlimited = 2**31 - 1
        self._client = grpcclient.InferenceServerClient(
            url,
            channel_args=[
                ("grpc.max_send_message_length", unlimited),
                ("grpc.max_receive_message_length", unlimited),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 1000),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", int(connect_timeout_s * 1000) + 1000),
            ],
        )

    def model_ready(self, name: str, version: str) -> bool:
        return bool(self._client.is_model_ready(name, version, client_timeout=self._connect_timeout_s))

    def model_config(self, name: str, version: str) -> dict[str, Any]:
        answer = self._client.get_model_config(
            name, version, as_json=True, client_timeout=self._connect_timeout_s
        )
        return dict(answer["config"])

    def infer(self, name: str, version: str, input_name: str, x: np.ndarray, output_name: str) -> np.ndarray:
        inp = self._grpc.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        out = self._grpc.InferRequestedOutput(output_name)
        result = self._client.infer(
            name, [inp], model_version=version, outputs=[out], client_timeout=self._timeout_s
        )
        return result.as_numpy(output_name)


# How HTTP and gRPC say that the model rejected the request's input (a deterministic failure).
_REJECTED_INPUT = frozenset({"400", "StatusCode.INVALID_ARGUMENT"})


def _dims(tensors: list[dict[str, Any]]) -> dict[str, tuple[int, ...]]:
    # gRPC's JSON renders int64 dims as strings; HTTP gives numbers.
    return {t["name"]: tuple(int(d) for d in t.get("dims", [])) for t in tensors}


class TritonBackend:
    """embed and assign on a Triton Inference Server that serves the card's two models.

    Readiness follows the server's: both models ready, and their configs match the card (inputs, outputs,
    shapes, and the ``fusc_sha256`` parameter that ``python -m service.triton repo`` writes). That check
    runs once per (re)connection and is kept until a call fails. A server that is down, unreachable or
    slower than the timeouts raises BackendUnavailableError (503, retryable) at once; the next call tries
    again, so the backend recovers by itself when Triton comes back. Models that do not match the card
    raise ModelRepositoryError, and a model that rejects its input ModelFailedError (both 500): retrying
    cannot help.
    """

    name = "triton"

    def __init__(
        self,
        card: ModelCard,
        *,
        url: str,
        protocol: str = "http",
        timeout_s: float = 10.0,
        connect_timeout_s: float = 1.0,
        max_batch_size: int = 64,
        ready_ttl_s: float = 1.0,
    ) -> None:
        if protocol not in ("http", "grpc"):
            raise BackendNotSupportedError(f"FUSC_TRITON_PROTOCOL must be 'http' or 'grpc', not {protocol!r}")
        self.card = card
        self.url, self.protocol = url, protocol
        self.max_batch_size = max_batch_size
        self.ready_ttl_s = ready_ttl_s
        transport = _HttpTransport if protocol == "http" else _GrpcTransport
        # Creating a client connects to nothing: the service starts (unready) before Triton does.
        self._transport = transport(url, timeout_s, connect_timeout_s)
        self._lock = threading.Lock()
        self._limits: dict[str, int] | None = None  # model -> max_batch_size, once the configs matched
        self._ready: tuple[float, bool] = (float("-inf"), False)
        self._down = False  # an outage was logged and the server has not answered since
        size, d, k = card.preprocess.size, card.embedding_dim, card.num_clusters
        self._shapes = {
            card.backbone.name: (card.backbone, (1, size, size), (d,)),
            card.head.name: (card.head, (d,), (k,)),
        }

    # --------------------------------------------------------------------------------------- plumbing
    def _call(self, what: str, fn: Callable[[], T], *, model_call: bool = False) -> T:
        try:
            return fn()
        except FuscError:
            raise
        except Exception as exc:  # tritonclient, grpc, gevent and socket errors share no base class
            status = str(exc.status()) if callable(getattr(exc, "status", None)) else type(exc).__name__
            if model_call and status in _REJECTED_INPUT:
                # The server is fine and the model refused this input: the same call would fail again.
                logger.error("Triton's %s failed on its input: %s", what, status)
                raise ModelFailedError(f"the model failed on this input ({what} on Triton)") from exc
            # Anything may have changed behind a failed call (a restart with other models): check again.
            self._limits = None
            self._ready = (time.monotonic(), False)
            # Once per outage at WARNING: a lost server under load would otherwise log every request.
            level = logging.DEBUG if self._down else logging.WARNING
            self._down = True
            logger.log(level, "Triton %s at %s failed during %s: %s", self.protocol, self.url, what, status)
            raise BackendUnavailableError(
                f"the Triton server at {self.url} ({self.protocol}) did not answer {what}; retry later"
            ) from exc

    def _check(self, model: OnnxModel, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> int:
        """The model's max_batch_size once its config matches the card; ModelRepositoryError otherwise."""
        version = str(model.version)
        if not self._call(
            f"readiness of {model.name}", lambda: self._transport.model_ready(model.name, version)
        ):
            raise BackendUnavailableError(f"Triton at {self.url} has {model.name} v{version} not ready yet")
        config = self._call(
            f"the config of {model.name}", lambda: self._transport.model_config(model.name, version)
        )
        inputs, outputs = _dims(config.get("input", [])), _dims(config.get("output", []))
        problems = []
        if inputs.get(model.input_name) != in_shape:
            problems.append(f"input {model.input_name!r} {inputs} (card: {in_shape})")
        if outputs.get(model.output_name) != out_shape:
            problems.append(f"output {model.output_name!r} {outputs} (card: {out_shape})")
        sha = config.get("parameters", {}).get("fusc_sha256", {}).get("string_value")
        if sha is not None and sha != model.sha256:
            problems.append(f"ONNX SHA-256 {sha[:12]}… (card: {model.sha256[:12]}…)")
        if problems:
            raise ModelRepositoryError(
                f"Triton at {self.url} serves a {model.name} that does not match the model card: "
                + "; ".join(problems)
                + ". Regenerate its repository with `python -m service.triton repo` from this card"
            )
        if sha is None:
            logger.warning("Triton's %s carries no fusc_sha256: its ONNX file cannot be checked", model.name)
        # max_batch_size 0 means the model takes no batch dimension, which these configs never are.
        return int(config.get("max_batch_size", 0)) or 1

    def _models(self) -> dict[str, int]:
        limits = self._limits
        if limits is not None:
            return limits
        with self._lock:
            if self._limits is None:
                self._limits = {
                    name: min(self.max_batch_size, self._check(*spec)) for name, spec in self._shapes.items()
                }
                logger.info(
                    "Triton at %s (%s) serves the card's models: %s", self.url, self.protocol, self._limits
                )
                self._down = False
            return self._limits

    def _infer(self, model: OnnxModel, x: np.ndarray) -> np.ndarray:
        limit = self._models()[model.name]
        _, _, out_shape = self._shapes[model.name]
        x = np.ascontiguousarray(x, dtype=np.float32)
        parts = []
        # The service's batch may exceed the server's max_batch_size: split it rather than fail.
        for start in range(0, len(x), limit):
            chunk = x[start : start + limit]
            out = self._call(
                f"a call to {model.name}",
                lambda chunk=chunk: self._transport.infer(
                    model.name, str(model.version), model.input_name, chunk, model.output_name
                ),
                model_call=True,
            )
            out = np.asarray(out, dtype=np.float32)
            if out.shape != (len(chunk), *out_shape):
                raise ModelRepositoryError(
                    f"Triton's {model.name} answered shape {out.shape} for {len(chunk)} inputs, "
                    f"the model card expects {(len(chunk), *out_shape)}"
                )
            parts.append(out)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    # --------------------------------------------------------------------------------------- Backend
    def embed(self, x: np.ndarray) -> np.ndarray:
        return self._infer(self.card.backbone, x)

    def assign(self, emb: np.ndarray) -> np.ndarray:
        return self._infer(self.card.head, emb)

    def ready(self) -> bool:
        """Both models ready on the server and matching the card; the answer is kept ``ready_ttl_s``."""
        checked_at, value = self._ready
        now = time.monotonic()
        if now - checked_at < self.ready_ttl_s:
            return value
        try:
            self._models()
            value = all(
                self._call("readiness", lambda m=m: self._transport.model_ready(m.name, str(m.version)))
                for m, _, _ in self._shapes.values()
            )
        except FuscError as exc:
            logger.info("Triton backend not ready: %s", exc.message)
            value = False
        self._ready = (time.monotonic(), value)
        return value

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.url,
            "protocol": self.protocol,
            "models": {m.name: m.version for m, _, _ in self._shapes.values()},
            "max_batch_size": dict(self._limits) if self._limits is not None else None,
        }


def make_backend(settings: Settings, card: ModelCard) -> Backend:
    if settings.backend == "onnxruntime":
        return OnnxRuntimeBackend(
            settings.model_repository,
            card,
            intra_op_threads=settings.ort_intra_op_threads,
            precision=settings.precision,
        )
    if settings.backend == "triton":
        if settings.precision != "fp32":
            raise BackendNotSupportedError(
                "FUSC_PRECISION=int8 runs in-process (FUSC_BACKEND=onnxruntime); "
                "the Triton repository serves the fp32 backbone"
            )
        return TritonBackend(
            card,
            url=settings.triton_url,
            protocol=settings.triton_protocol,
            timeout_s=settings.triton_timeout_s,
            connect_timeout_s=settings.triton_connect_timeout_s,
            max_batch_size=settings.triton_max_batch_size,
        )
    raise BackendNotSupportedError(f"FUSC_BACKEND={settings.backend!r} is not a backend of this build")
