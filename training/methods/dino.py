"""DINO: self-distillation with no labels, the SSL method of the FUSC paper's ViT backbone.

A student (backbone + DINO head) sees 2 global and several local crops of each frame and learns to predict,
from every view, the teacher's centred and sharpened distribution over prototypes for each OTHER global
view. The teacher is an exponential moving average of the student and gets no gradient. DINO keeps the
teacher, so ``DINO.backbone`` IS the teacher's backbone: that is what ``train_ssl`` returns; the student
trains in ``DINO.student``. ``DINO.state_dict()`` holds all of it (student, teacher, centre, step count).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from service.clean import CleanConfig
from training.config import SSLConfig
from training.data.augment import augment
from training.methods.base import SSLMethod


def dino_loss(
    student_out: list[torch.Tensor],
    teacher_out: list[torch.Tensor],
    center: torch.Tensor,
    student_temp: float,
    teacher_temp: float,
) -> torch.Tensor:
    """Mean over pairs (global view i, any other view j) of H(teacher_i, student_j), averaged over the batch.

    ``student_out`` lists the logits [N,K] of every view, the global ones first and in the same order as
    ``teacher_out`` (logits of the global views only). Targets: softmax((t - center) / teacher_temp).
    """
    if len(student_out) < len(teacher_out):
        raise ValueError("the student must see at least the teacher's views")
    targets = [F.softmax((t - center) / teacher_temp, dim=-1).detach() for t in teacher_out]
    log_probs = [F.log_softmax(s / student_temp, dim=-1) for s in student_out]
    total, pairs = student_out[0].new_zeros(()), 0
    for i, q in enumerate(targets):
        for j, log_p in enumerate(log_probs):
            if j != i:
                total = total - (q * log_p).sum(dim=-1).mean()
                pairs += 1
    return total / pairs


def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> torch.Tensor:
    """The EMA of the teacher's mean logit over all global views of the batch; centring it out of the
    targets keeps one prototype from taking every image (collapse), sharpening keeps them from going uniform.
    """
    batch_mean = teacher_out.mean(dim=0, keepdim=True)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under torchrun every rank must keep the same centre: average the batch means over ranks.
        torch.distributed.all_reduce(batch_mean)
        batch_mean = batch_mean / torch.distributed.get_world_size()
    return center * momentum + batch_mean * (1 - momentum)


def teacher_momentum(step: int, total: int, base: float) -> float:
    """Cosine from ``base`` at step 0 to 1 at the end: the teacher moves less and less."""
    return 1 - (1 - base) * (1 + math.cos(math.pi * step / max(1, total))) / 2


class DINOHead(nn.Module):
    """3-layer MLP -> L2-normalised bottleneck -> weight-normalised prototypes (cosine logits in [-1, 1]).

    ``batch_norm``: BatchNorm after the two hidden layers, as DINO does for convolutional backbones. Pooled
    ReLU features of a ResNet share a large common component (cosine ~0.8-0.97 between any two images at
    the start); without the normalisation every image gets almost the same logits, centring removes them,
    the targets go uniform and the loss sits at log(prototypes): collapse.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int = 2048,
        bottleneck: int = 256,
        prototypes: int = 65536,
        batch_norm: bool = False,
    ):
        super().__init__()
        norm = (lambda: nn.BatchNorm1d(hidden)) if batch_norm else nn.Identity
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            norm(),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            norm(),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)  # as in training.models.vit
                nn.init.zeros_(m.bias)
        # Weight norm with the gain fixed at 1: only the directions of the prototypes are learnt.
        self.prototypes = nn.Parameter(torch.empty(prototypes, bottleneck))
        nn.init.normal_(self.prototypes, std=0.02)
        # DINO freezes the prototypes at the start (training is unstable otherwise); a detached weight gets
        # no gradient, so the optimiser skips it (AdamW leaves a None grad alone, weight decay included).
        self.freeze_prototypes = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        w = self.prototypes.detach() if self.freeze_prototypes else self.prototypes
        return F.linear(z, F.normalize(w, dim=-1))


class DINO(SSLMethod):
    def __init__(self, backbone: nn.Module, cfg: SSLConfig, clean: CleanConfig):
        convolutional = not hasattr(backbone, "patch_size")
        batch_norm = convolutional if cfg.head_bn is None else cfg.head_bn
        head = DINOHead(backbone.out_dim, cfg.head_hidden, cfg.head_bottleneck, cfg.prototypes, batch_norm)
        student = nn.Sequential()
        student.add_module("backbone", backbone)
        student.add_module("head", head)
        teacher = copy.deepcopy(student).requires_grad_(False)
        super().__init__(teacher.backbone, cfg, clean)
        self.student, self.teacher_head = student, teacher.head
        self.register_buffer("center", torch.zeros(1, cfg.prototypes))
        self.global_aug = dataclasses.replace(cfg.augment, scale=tuple(cfg.global_scale))
        self.local_aug = dataclasses.replace(cfg.augment, scale=tuple(cfg.local_scale))
        patch = getattr(backbone, "patch_size", 1)
        self.local_size = cfg.local_size or max(patch, round(clean.size * 3 / 7 / patch) * patch)
        # The loop tells the method its step count only in after_step; until then we are at step 0.
        self.step, self.steps_per_epoch = 0, None

    def _in_first_epochs(self, epochs: float) -> float | None:
        """Progress (0..1) through the first ``epochs`` epochs, or None once they are over."""
        if epochs <= 0:
            return None
        if self.steps_per_epoch is None:
            return 0.0
        t = self.step / (epochs * self.steps_per_epoch)
        return t if t < 1 else None

    def teacher_temp(self) -> float:
        """Linear warm-up from ``warmup_teacher_temp`` to ``teacher_temp`` (sharp targets early on)."""
        t = self._in_first_epochs(self.cfg.warmup_teacher_temp_epochs)
        if t is None:
            return self.cfg.teacher_temp
        return self.cfg.warmup_teacher_temp + t * (self.cfg.teacher_temp - self.cfg.warmup_teacher_temp)

    def multi_crop(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        mean, std = self.clean.mean, self.clean.std
        globals_ = [augment(x, self.global_aug, mean, std) for _ in range(2)]
        size, n = self.local_size, self.cfg.local_crops
        locals_ = [augment(x, self.local_aug, mean, std, out_size=size) for _ in range(n)]
        return globals_, locals_

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        globals_, locals_ = self.multi_crop(x)
        frozen = self._in_first_epochs(self.cfg.freeze_last_layer_epochs) is not None
        self.student.head.freeze_prototypes = frozen
        # One forward per resolution; float32 before the temperatures (0.04 is too sharp for fp16).
        student_out = list(self.student(torch.cat(globals_)).float().chunk(2))
        if locals_:
            student_out += self.student(torch.cat(locals_)).float().chunk(len(locals_))
        with torch.no_grad():
            teacher_out = self.teacher_head(self.backbone(torch.cat(globals_))).float()
        loss = dino_loss(
            student_out, list(teacher_out.chunk(2)), self.center, self.cfg.student_temp, self.teacher_temp()
        )
        self.center.copy_(update_center(self.center, teacher_out, self.cfg.center_momentum))
        return loss

    def get_extra_state(self) -> dict:
        # In state_dict() beside the weights and the centre: the schedules read the step count, so a run
        # resumed from a checkpoint needs it back.
        return {"step": self.step, "steps_per_epoch": self.steps_per_epoch}

    def set_extra_state(self, state: dict) -> None:
        self.step, self.steps_per_epoch = state["step"], state["steps_per_epoch"]

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        teacher = [*self.backbone.parameters(), *self.teacher_head.parameters()]
        for p_t, p_s in zip(teacher, self.student.parameters(), strict=True):
            p_t.mul_(momentum).add_(p_s.detach(), alpha=1 - momentum)

    def after_step(self, step: int, total: int) -> None:
        self.update_teacher(teacher_momentum(step, total, self.cfg.teacher_momentum))
        self.step, self.steps_per_epoch = step + 1, max(1, total // self.cfg.epochs)
