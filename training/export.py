"""Export the backbone and the cluster head to ONNX and write a Triton model repository with its card."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from service.card import BACKBONE_NAME, ENSEMBLE_NAME, HEAD_NAME, ModelCard, OnnxModel, sha256_file


class ServedBackbone(nn.Module):
    """image [N,1,S,S] -> unit-norm embedding [N,D], exactly what training used for mining and heads."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(image), dim=1)


class ServedHead(nn.Module):
    """embedding [N,D] -> cluster probabilities [N,K]."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(embedding), dim=1)


def export_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str
) -> None:
    module = module.cpu().eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[input_name],
            output_names=[output_name],
            dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def check_onnx(module: nn.Module, example: torch.Tensor, path: Path, atol: float = 1e-4) -> float:
    """Run the ONNX file with onnxruntime on a batch, compare with torch; returns the max abs difference."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = module.cpu().eval()(example).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: example.numpy()})[0]
    diff = float(np.abs(got - want).max())
    if diff > atol:
        raise RuntimeError(f"ONNX export of {path.name} differs from torch by {diff:.2e} (> {atol:.0e})")
    return diff


def _config_pbtxt(
    name: str, inp: str, in_dims: list[int], out: str, out_dims: list[int], max_batch: int
) -> str:
    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch}\n'
        f'input [{{ name: "{inp}" data_type: TYPE_FP32 dims: {in_dims} }}]\n'
        f'output [{{ name: "{out}" data_type: TYPE_FP32 dims: {out_dims} }}]\n'
        "dynamic_batching { max_queue_delay_microseconds: 2000 }\n"
        "instance_group [{ kind: KIND_AUTO }]\n"
    )


def _ensemble_pbtxt(size: int, dim: int, k: int, max_batch: int) -> str:
    return f"""name: "{ENSEMBLE_NAME}"
platform: "ensemble"
max_batch_size: {max_batch}
input [{{ name: "image" data_type: TYPE_FP32 dims: [1, {size}, {size}] }}]
output [
  {{ name: "embedding" data_type: TYPE_FP32 dims: [{dim}] }},
  {{ name: "probs" data_type: TYPE_FP32 dims: [{k}] }}
]
ensemble_scheduling {{
  step [
    {{
      model_name: "{BACKBONE_NAME}"
      model_version: -1
      input_map {{ key: "image" value: "image" }}
      output_map {{ key: "embedding" value: "embedding" }}
    }},
    {{
      model_name: "{HEAD_NAME}"
      model_version: -1
      input_map {{ key: "embedding" value: "embedding" }}
      output_map {{ key: "probs" value: "probs" }}
    }}
  ]
}}
"""


def write_model_repository(
    out: Path,
    backbone: nn.Module,
    head: nn.Linear,
    card_fields: dict,
    max_batch: int = 64,
    ood_bank: np.ndarray | None = None,
) -> ModelCard:
    """Write ``out/`` as a Triton model repository (backbone, head, ensemble) plus ``model_card.json``;
    ``ood_bank``: the embeddings a ``knn_cosine`` OOD calibration (``card_fields["ood"]``) compares with,
    written beside the card with its SHA-256."""
    out = Path(out)
    clean = card_fields["preprocess"]
    size = clean.size
    for name in (BACKBONE_NAME, HEAD_NAME, ENSEMBLE_NAME):
        shutil.rmtree(out / name, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    served_bb, served_head = ServedBackbone(backbone), ServedHead(head)
    example = torch.randn(4, 1, size, size)
    bb = OnnxModel(name=BACKBONE_NAME, input_name="image", output_name="embedding", sha256="")
    export_onnx(served_bb, example, bb.path(out), bb.input_name, bb.output_name)
    check_onnx(served_bb, example, bb.path(out))
    with torch.no_grad():
        emb = served_bb(example).clone()
    dim, k = emb.shape[1], head.out_features
    hd = OnnxModel(name=HEAD_NAME, input_name="embedding", output_name="probs", sha256="")
    export_onnx(served_head, emb, hd.path(out), hd.input_name, hd.output_name)
    check_onnx(served_head, emb, hd.path(out))
    bb.sha256, hd.sha256 = sha256_file(bb.path(out)), sha256_file(hd.path(out))

    (out / BACKBONE_NAME / "config.pbtxt").write_text(
        _config_pbtxt(BACKBONE_NAME, "image", [1, size, size], "embedding", [dim], max_batch)
    )
    (out / HEAD_NAME / "config.pbtxt").write_text(
        _config_pbtxt(HEAD_NAME, "embedding", [dim], "probs", [k], max_batch)
    )
    # Triton wants a version folder for the ensemble too; the marker file keeps it in version control.
    (out / ENSEMBLE_NAME / "1").mkdir(parents=True, exist_ok=True)
    (out / ENSEMBLE_NAME / "1" / ".gitkeep").touch()
    (out / ENSEMBLE_NAME / "config.pbtxt").write_text(_ensemble_pbtxt(size, dim, k, max_batch))

    ood = card_fields.get("ood")
    if ood is not None and ood.bank is not None:
        if ood_bank is None:
            raise ValueError("the OOD calibration names a bank file; pass its embeddings as ood_bank")
        bank_path = out / ood.bank.path
        np.save(bank_path, np.asarray(ood_bank, dtype=np.float16))
        bank = ood.bank.model_copy(update={"sha256": sha256_file(bank_path), "count": len(ood_bank)})
        card_fields = {**card_fields, "ood": ood.model_copy(update={"bank": bank})}
    card = ModelCard(embedding_dim=dim, num_clusters=k, backbone=bb, head=hd, **card_fields)
    card.write(out)
    return card
