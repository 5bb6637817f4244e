"""The ViT backbone: output shapes, position embeddings at other input sizes, ONNX parity with torch."""

import pytest

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.usefixtures("one_thread")

from training.models import build_backbone  # noqa: E402
from training.models.vit import VisionTransformer, build_vit  # noqa: E402


@pytest.mark.parametrize(
    ("name", "size", "dim"), [("vit-tiny-8", 32, 192), ("vit-tiny-16", 32, 192), ("vit-small-16", 32, 384)]
)
def test_shapes(name, size, dim):
    vit = build_backbone(name, img_size=size).eval()
    assert vit.out_dim == dim
    with torch.no_grad():
        out = vit(torch.randn(2, 1, size, size))
    assert out.shape == (2, dim) and torch.isfinite(out).all()


def test_unknown_name():
    with pytest.raises(ValueError, match="vit-tiny-8"):
        build_vit("vit-huge-3")


def test_position_embeddings_resampled_for_other_sizes():
    vit = VisionTransformer(img_size=32, patch_size=8, dim=16, depth=1, heads=2).eval()
    assert vit.pos_embed_for(4, 4) is vit.pos_embed  # the learnt size: untouched
    pe = vit.pos_embed_for(2, 3)
    assert pe.shape == (1, 1 + 6, 16)
    assert torch.equal(pe[:, 0], vit.pos_embed[:, 0])  # the CLS embedding is not spatial
    # A constant grid stays constant under bicubic resampling.
    with torch.no_grad():
        vit.pos_embed[:, 1:] = 0.5
    assert torch.allclose(vit.pos_embed_for(7, 7)[:, 1:], torch.full((1, 49, 16), 0.5), atol=1e-6)
    with torch.no_grad():
        assert vit(torch.randn(3, 1, 16, 24)).shape == (3, 16)  # a local crop, not even square


def test_onnx_matches_torch(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import warnings

    vit = build_vit("vit-tiny-8", img_size=32).eval()
    example = torch.randn(2, 1, 32, 32)
    path = tmp_path / "vit.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            vit,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["embedding"],
            dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 32, 32)  # another batch size than the export's
    with torch.no_grad():
        want = vit(x).numpy()
    got = sess.run(None, {"image": x.numpy()})[0]
    assert got.shape == want.shape
    assert abs(got - want).max() < 1e-4
