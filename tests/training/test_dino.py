"""DINO: the loss against a hand computation, its schedules and EMA updates, and a short real training run."""

import math

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")

from service.clean import CleanConfig  # noqa: E402
from training.config import SSLConfig  # noqa: E402
from training.methods.base import compute_embeddings, train_ssl  # noqa: E402
from training.methods.dino import DINO, dino_loss, teacher_momentum, update_center  # noqa: E402
from training.models.vit import VisionTransformer  # noqa: E402


def _tiny_cfg(**kw) -> SSLConfig:
    base = dict(
        method="dino",
        epochs=2,
        batch_size=8,
        head_hidden=32,
        head_bottleneck=16,
        prototypes=24,
        local_crops=2,
    )
    return SSLConfig(**(base | kw))


def _tiny_vit(size: int = 16) -> VisionTransformer:
    return VisionTransformer(img_size=size, patch_size=8, dim=16, depth=1, heads=2)


def test_dino_loss_by_hand():
    # One image, 3 prototypes, 2 global views; centre 0, temperatures 1.
    s1, s2 = torch.tensor([[0.0, 1.0, 2.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    t1, t2 = torch.tensor([[0.0, 0.0, math.log(2.0)]]), torch.tensor([[math.log(3.0), 0.0, 0.0]])
    # softmax(t1) = (1/4, 1/4, 1/2), softmax(t2) = (3/5, 1/5, 1/5)
    # log_softmax(s1) = (0,1,2) - log(1 + e + e^2), log_softmax(s2) = (1,0,0) - log(e + 2)
    h12 = -(0.25 * 0 + 0.25 * 0 + 0.5 * 0 - math.log(math.e + 2) + 0.25)  # target view 1, student view 2
    h21 = -(0.6 * 0 + 0.2 * 1 + 0.2 * 2 - math.log(1 + math.e + math.e**2))  # target view 2, student view 1
    got = dino_loss([s1, s2], [t1, t2], torch.zeros(1, 3), student_temp=1.0, teacher_temp=1.0)
    assert got.item() == pytest.approx((h12 + h21) / 2, abs=1e-6)


def test_dino_loss_uses_centre_and_temperatures():
    s = [torch.randn(4, 3) for _ in range(3)]
    t = [torch.randn(4, 3) for _ in range(2)]
    c = torch.randn(1, 3)
    # A centre shifted by a constant per row changes nothing (softmax); temperatures scale the logits.
    a = dino_loss(s, t, c, 0.1, 0.04)
    b = dino_loss([x * 10 for x in s], [(x - c) / 0.04 for x in t], torch.zeros(1, 3) + 5.0, 1.0, 1.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_centre_update_exact():
    center = torch.tensor([[1.0, 2.0]])
    teacher = torch.tensor([[3.0, 0.0], [5.0, 4.0]])  # mean (4, 2)
    got = update_center(center, teacher, momentum=0.9)
    assert torch.allclose(got, torch.tensor([[0.9 * 1 + 0.1 * 4, 0.9 * 2 + 0.1 * 2]]))


def test_teacher_ema_follows_scheduled_momentum():
    assert teacher_momentum(0, 10, 0.996) == pytest.approx(0.996)
    assert teacher_momentum(10, 10, 0.996) == pytest.approx(1.0)
    torch.manual_seed(0)
    method = DINO(_tiny_vit(), _tiny_cfg(), CleanConfig(size=16))
    for p in method.student.parameters():
        p.data.fill_(1.0)
    for p in [*method.backbone.parameters(), *method.teacher_head.parameters()]:
        p.data.fill_(3.0)
    method.after_step(1, 4)
    m = 1 - (1 - 0.996) * (1 + math.cos(math.pi / 4)) / 2
    for p in [*method.backbone.parameters(), *method.teacher_head.parameters()]:
        assert torch.allclose(p, torch.full_like(p, 3.0 * m + 1.0 * (1 - m)))
    assert method.step == 2 and method.steps_per_epoch == 2  # total 4 over 2 epochs


def test_teacher_has_no_gradient_and_is_what_training_keeps():
    method = DINO(_tiny_vit(), _tiny_cfg(), CleanConfig(size=16))
    assert all(not p.requires_grad for p in method.backbone.parameters())
    assert all(p.requires_grad for p in method.student.parameters())
    assert method.backbone is not method.student.backbone
    assert method.local_size == 8  # 3/7 of 16 px, rounded to whole 8-px patches


def test_schedules_warm_up_and_unfreeze():
    cfg = _tiny_cfg(epochs=10, warmup_teacher_temp_epochs=2, freeze_last_layer_epochs=1)
    method = DINO(_tiny_vit(), cfg, CleanConfig(size=16))
    assert method.teacher_temp() == pytest.approx(0.04)
    method.after_step(4, 100)  # 10 steps per epoch, now at step 5: a quarter into the warm-up
    assert method.teacher_temp() == pytest.approx(0.04 + 0.25 * 0.03)
    method.after_step(19, 100)
    assert method.teacher_temp() == pytest.approx(0.07)


def test_loss_falls_on_a_toy_problem():
    # Four noisy views of the same features; the teacher's logits are a fixed linear map of the 2 global ones.
    # A linear student learns to predict them from every other view (centre updated as in DINO).
    torch.manual_seed(0)
    base = torch.randn(16, 8)
    views = [base + 0.1 * torch.randn(16, 8) for _ in range(4)]
    w = torch.randn(8, 5)
    teacher = [0.1 * v @ w for v in views[:2]]
    student = torch.nn.Linear(8, 5)
    opt = torch.optim.SGD(student.parameters(), lr=0.03)
    center, losses = torch.zeros(1, 5), []
    for _ in range(20):
        loss = dino_loss([student(v) for v in views], teacher, center, 0.1, 0.04)
        opt.zero_grad()
        loss.backward()
        opt.step()
        center = update_center(center, torch.cat(teacher), 0.9)
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_prototypes_frozen_for_the_first_steps():
    torch.manual_seed(0)
    cfg = _tiny_cfg(epochs=1, freeze_last_layer_epochs=0.5)
    method = DINO(_tiny_vit(), cfg, CleanConfig(size=16))
    frames = torch.randint(0, 255, (4, 16, 16), dtype=torch.uint8)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-2)
    protos = method.student.head.prototypes
    start = protos.detach().clone()
    for step in range(4):  # 4 steps per epoch: frozen for steps 0 and 1
        assert torch.equal(protos, start) == (step < 3)
        loss = method.loss(frames)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert (protos.grad is None) == (step < 2)
        opt.step()
        method.after_step(step, 4)


def test_train_ssl_returns_teacher_backbone_with_unit_embeddings():
    clean = CleanConfig(size=32)
    cfg = SSLConfig(
        method="dino",
        backbone="vit-tiny-8",
        epochs=2,
        batch_size=8,
        head_hidden=32,
        head_bottleneck=16,
        prototypes=32,
        local_crops=2,
    )
    frames = torch.randint(0, 255, (8, 32, 32), dtype=torch.uint8)  # one step per epoch
    backbone, hist = train_ssl(frames, cfg, clean, torch.device("cpu"))
    assert len(hist) == 2 and all(math.isfinite(h) for h in hist)
    assert not any(p.requires_grad for p in backbone.parameters())  # the EMA teacher's, not the student's
    emb = compute_embeddings(backbone, frames, clean, torch.device("cpu"))
    assert emb.shape == (8, 192)
    assert abs(float((emb**2).sum(1).mean()) - 1.0) < 1e-4


def test_head_batch_norm_follows_the_backbone_unless_set():
    from training.models import build_backbone

    clean = CleanConfig(size=16)
    resnet = build_backbone("resnet18-quarter", stem="stride1", img_size=16)
    has_bn = lambda m: any(isinstance(x, torch.nn.BatchNorm1d) for x in m.student.head.mlp)  # noqa: E731
    assert has_bn(DINO(resnet, _tiny_cfg(), clean))
    assert not has_bn(DINO(_tiny_vit(), _tiny_cfg(), clean))
    assert has_bn(DINO(_tiny_vit(), _tiny_cfg(head_bn=True), clean))
    resnet = build_backbone("resnet18-quarter", stem="stride1", img_size=16)
    assert not has_bn(DINO(resnet, _tiny_cfg(head_bn=False), clean))


def test_head_batch_norm_spreads_nearly_identical_features():
    # Features with a large shared component (as pooled ReLU features of a ResNet at the start): without
    # normalisation the head gives every image almost the same logits; with it they differ.
    from training.methods.dino import DINOHead

    torch.manual_seed(0)
    feats = 5.0 + 0.05 * torch.randn(64, 32)
    spread = {}
    for bn in (False, True):
        head = DINOHead(32, hidden=64, bottleneck=16, prototypes=48, batch_norm=bn).train()
        with torch.no_grad():
            out = head(feats)
        spread[bn] = float(out.std(0).mean() / out.std(1).mean())
    assert spread[True] > 3 * spread[False]
