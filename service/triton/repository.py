"""A Triton model repository written from a fusc model repository: one generator, two variants.

- ``ngc``: what the NGC Triton image (``nvcr.io/nvidia/tritonserver:<yy.mm>-py3``) serves as it is:
  ``fusc_backbone`` and ``fusc_head`` on its ``onnxruntime`` backend (GPU where there is one);
- ``cpu``: what the ``tritonserver`` bundled in PyPI's ``nvidia-pytriton`` serves: it has the Python
  backend only, so the same two ONNX files run in ONNX Runtime inside a Python-backend ``model.py``.

Both variants have the same models, inputs, outputs, dynamic batching and ``max_batch_size``:

- ``fusc_backbone`` image float32 [N,1,S,S] -> embedding [N,D]; ``fusc_head`` embedding -> probs [N,K];
- ``fusc_ensemble`` (as ``training/export.py`` writes it): image tensor -> embedding, probs;
- ``fusc_preprocess`` (Python backend in both variants): encoded image bytes (TYPE_STRING) -> image tensor,
  by the project's own ``service.decode.decode_image`` and ``service.clean.preprocess`` with the card's
  preprocessing; the modules are copied into the model's version folder (see ``SERVICE_MODULES_DIR``);
- ``fusc_pipeline``: the ensemble bytes -> fusc_preprocess -> fusc_backbone -> fusc_head -> embedding,
  probs, so that a gRPC (or HTTP) client of Triton gets the whole data path.

The output is also a fusc model repository: the card, the OOD bank and the ONNX files sit where the card
says, so ``load_card`` verifies it and the service may read its card from the very folder Triton serves.
Every ONNX model's config carries the card's SHA-256 as the parameter ``fusc_sha256``; the service's
Triton backend compares it with its own card and refuses to mix models of two trainings.
"""

from __future__ import annotations

import ast
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import service
from service.card import (
    BACKBONE_NAME,
    CARD_FILENAME,
    ENSEMBLE_NAME,
    HEAD_NAME,
    ModelCard,
    OnnxModel,
    load_card,
)
from service.decode import MAX_BYTES, MAX_PIXELS

Variant = Literal["ngc", "cpu"]
VARIANTS: tuple[Variant, ...] = ("ngc", "cpu")

PREPROCESS_NAME = "fusc_preprocess"
PIPELINE_NAME = "fusc_pipeline"
# The ensemble's input: one encoded image (PNG, JPEG, BMP, TIFF or DICOM file bytes) per batch row.
BYTES_INPUT = "image_bytes"
# Where fusc_preprocess finds the project's decode + clean: a copy of the ``service`` modules they import,
# in <model>/<version>/, put first on sys.path by its model.py. The repository then carries the code that
# matches its card (the NGC init container copies one folder, nothing else), and needs no project checkout.
SERVICE_MODULES_DIR = "service"
PREPROCESS_CONFIG = "preprocess.json"
SHA256_PARAMETER = "fusc_sha256"
CARD_VERSION_PARAMETER = "fusc_model_version"
# A few milliseconds of waiting let concurrent single-image requests share one model execution.
QUEUE_DELAY_US = 2000

_TEMPLATES = Path(__file__).resolve().parent / "models"
# The modules fusc_preprocess runs; everything they import from ``service`` is copied with them.
_PREPROCESS_ROOTS = ("decode", "clean")


class RepositoryExistsError(Exception):
    """The output folder already holds files and --force was not given."""


@dataclass(frozen=True)
class TritonRepositoryOptions:
    variant: Variant
    max_batch_size: int = 64
    # Instances of fusc_preprocess: decode + clean is the CPU-heavy step, one instance uses one core.
    preprocess_instances: int = 1
    # Python-backend execution environment (a conda-pack tarball) for the NGC image, whose own Python has
    # no OpenCV/pydicom/pydantic: written as EXECUTION_ENV_PATH of fusc_preprocess when set.
    python_env: str | None = None


# ----------------------------------------------------------------------------------------- config text
def _dims(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _tensor(name: str, dtype: str, shape: tuple[int, ...]) -> str:
    return f'{{ name: "{name}" data_type: {dtype} dims: {_dims(shape)} }}'


def _parameters(values: dict[str, str]) -> str:
    return "".join(
        f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}\n' for k, v in values.items()
    )


def _config(
    name: str,
    *,
    backend: str,
    max_batch_size: int,
    inputs: list[str],
    outputs: list[str],
    instance: str,
    parameters: dict[str, str] | None = None,
) -> str:
    return (
        f'name: "{name}"\n'
        f'backend: "{backend}"\n'
        f"max_batch_size: {max_batch_size}\n"
        f"input [\n  " + ",\n  ".join(inputs) + "\n]\n"
        "output [\n  " + ",\n  ".join(outputs) + "\n]\n"
        f"dynamic_batching {{ max_queue_delay_microseconds: {QUEUE_DELAY_US} }}\n"
        f"instance_group [{{ {instance} }}]\n" + _parameters(parameters or {})
    )


def _ensemble(
    name: str, max_batch_size: int, inputs: list[str], outputs: list[str], steps: list[tuple[str, dict, dict]]
) -> str:
    def step(model: str, input_map: dict[str, str], output_map: dict[str, str]) -> str:
        maps = "".join(f'      input_map {{ key: "{k}" value: "{v}" }}\n' for k, v in input_map.items())
        maps += "".join(f'      output_map {{ key: "{k}" value: "{v}" }}\n' for k, v in output_map.items())
        return f'    {{\n      model_name: "{model}"\n      model_version: -1\n{maps}    }}'

    return (
        f'name: "{name}"\n'
        'platform: "ensemble"\n'
        f"max_batch_size: {max_batch_size}\n"
        "input [\n  " + ",\n  ".join(inputs) + "\n]\n"
        "output [\n  " + ",\n  ".join(outputs) + "\n]\n"
        "ensemble_scheduling {\n  step [\n" + ",\n".join(step(*s) for s in steps) + "\n  ]\n}\n"
    )


# ------------------------------------------------------------------------------------------ the models
def _onnx_model(
    out: Path, repository: Path, model: OnnxModel, card: ModelCard, options: TritonRepositoryOptions, io
) -> None:
    (in_shape, out_shape) = io
    folder = out / model.name
    version = folder / str(model.version)
    version.mkdir(parents=True)
    shutil.copyfile(model.path(repository), version / "model.onnx")
    parameters = {SHA256_PARAMETER: model.sha256, CARD_VERSION_PARAMETER: card.version}
    if options.variant == "ngc":
        backend, instance = "onnxruntime", "kind: KIND_AUTO"
    else:
        backend, instance = "python", "kind: KIND_CPU count: 1"
        shutil.copyfile(_TEMPLATES / "onnx_model.py", version / "model.py")
    (folder / "config.pbtxt").write_text(
        _config(
            model.name,
            backend=backend,
            max_batch_size=options.max_batch_size,
            inputs=[_tensor(model.input_name, "TYPE_FP32", in_shape)],
            outputs=[_tensor(model.output_name, "TYPE_FP32", out_shape)],
            instance=instance,
            parameters=parameters,
        )
    )


def service_modules(roots: tuple[str, ...] = _PREPROCESS_ROOTS) -> list[str]:
    """The ``service`` modules that ``roots`` import, directly or not (``service.X`` names, by ast)."""
    package = Path(service.__file__).resolve().parent
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((package / f"{name}.py").read_text())
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
                if node.module == "service":
                    names = [f"service.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for full in names:
                parts = full.split(".")
                if parts[0] == "service" and len(parts) == 2 and (package / f"{parts[1]}.py").is_file():
                    todo.append(parts[1])
    return sorted(seen)


def _preprocess_model(out: Path, card: ModelCard, options: TritonRepositoryOptions) -> None:
    size = card.preprocess.size
    folder = out / PREPROCESS_NAME
    version = folder / "1"
    modules = version / SERVICE_MODULES_DIR
    modules.mkdir(parents=True)
    package = Path(service.__file__).resolve().parent
    for name in ["__init__", *service_modules()]:
        shutil.copyfile(package / f"{name}.py", modules / f"{name}.py")
    shutil.copyfile(_TEMPLATES / "preprocess_model.py", version / "model.py")
    settings = {
        "clean": card.preprocess.model_dump(mode="json"),
        "max_pixels": MAX_PIXELS,
        "max_bytes": MAX_BYTES,
    }
    (version / PREPROCESS_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    parameters = {CARD_VERSION_PARAMETER: card.version}
    if options.python_env:
        parameters["EXECUTION_ENV_PATH"] = options.python_env
    (folder / "config.pbtxt").write_text(
        _config(
            PREPROCESS_NAME,
            backend="python",
            max_batch_size=options.max_batch_size,
            inputs=[_tensor(BYTES_INPUT, "TYPE_STRING", (1,))],
            outputs=[_tensor(card.backbone.input_name, "TYPE_FP32", (1, size, size))],
            instance=f"kind: KIND_CPU count: {options.preprocess_instances}",
            parameters=parameters,
        )
    )


def _ensembles(out: Path, card: ModelCard, options: TritonRepositoryOptions) -> None:
    size, d, k = card.preprocess.size, card.embedding_dim, card.num_clusters
    bb, head = card.backbone, card.head
    image = _tensor(bb.input_name, "TYPE_FP32", (1, size, size))
    outputs = [_tensor(bb.output_name, "TYPE_FP32", (d,)), _tensor(head.output_name, "TYPE_FP32", (k,))]
    model_steps = [
        (bb.name, {bb.input_name: bb.input_name}, {bb.output_name: bb.output_name}),
        (head.name, {head.input_name: bb.output_name}, {head.output_name: head.output_name}),
    ]
    for name, inputs, steps in (
        (ENSEMBLE_NAME, [image], model_steps),
        (
            PIPELINE_NAME,
            [_tensor(BYTES_INPUT, "TYPE_STRING", (1,))],
            [(PREPROCESS_NAME, {BYTES_INPUT: BYTES_INPUT}, {bb.input_name: bb.input_name}), *model_steps],
        ),
    ):
        folder = out / name
        (folder / "1").mkdir(parents=True)
        # An ensemble has no files of its own; the empty version folder is what Triton looks for.
        (folder / "1" / ".gitkeep").touch()
        (folder / "config.pbtxt").write_text(_ensemble(name, options.max_batch_size, inputs, outputs, steps))


def _owned_entries(card: ModelCard) -> list[str]:
    entries = [BACKBONE_NAME, HEAD_NAME, card.backbone.name, card.head.name, ENSEMBLE_NAME]
    entries += [PREPROCESS_NAME, PIPELINE_NAME, CARD_FILENAME]
    if card.ood is not None and card.ood.bank is not None:
        entries.append(card.ood.bank.path)
    return sorted(set(entries))


def write_triton_repository(
    source: Path, out: Path, options: TritonRepositoryOptions, *, force: bool = False
) -> list[str]:
    """Write the Triton repository of ``options.variant`` for the fusc repository ``source`` into ``out``.

    The source's card and ONNX hashes are verified first. ``out`` must be empty or absent; with ``force``
    the entries this function writes are replaced (nothing else in ``out`` is touched). Returns the model
    names written.
    """
    if options.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, not {options.variant!r}")
    if options.max_batch_size < 1 or options.preprocess_instances < 1:
        raise ValueError("max_batch_size and preprocess_instances must be at least 1")
    source, out = Path(source).resolve(), Path(out).resolve()
    if source == out:
        raise ValueError("--out must differ from --from: the source repository is never rewritten")
    card = load_card(source, verify=True)
    out.mkdir(parents=True, exist_ok=True)
    owned = _owned_entries(card)
    present = [p.name for p in out.iterdir()]
    if present and not force:
        raise RepositoryExistsError(f"{out} is not empty ({', '.join(sorted(present)[:5])}); use --force")
    for name in owned:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()

    size, d, k = card.preprocess.size, card.embedding_dim, card.num_clusters
    _onnx_model(out, source, card.backbone, card, options, ((1, size, size), (d,)))
    _onnx_model(out, source, card.head, card, options, ((d,), (k,)))
    _preprocess_model(out, card, options)
    _ensembles(out, card, options)
    shutil.copyfile(source / CARD_FILENAME, out / CARD_FILENAME)
    if card.ood is not None and card.ood.bank is not None:
        shutil.copyfile(source / card.ood.bank.path, out / card.ood.bank.path)
    # The copy must verify exactly as the source did.
    load_card(out, verify=True)
    return [card.backbone.name, card.head.name, PREPROCESS_NAME, ENSEMBLE_NAME, PIPELINE_NAME]
