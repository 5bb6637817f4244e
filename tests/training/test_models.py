"""ResNet stems: how far each downsamples, and that old configs naming ``small_stem`` still load."""

import pytest

torch = pytest.importorskip("torch")

from training.config import SSLConfig, build_config  # noqa: E402
from training.models import build_backbone  # noqa: E402


@pytest.mark.parametrize(("stem", "stride"), [("imagenet", 4), ("stride2", 2), ("stride1", 1)])
def test_stem_sets_the_resolution_the_blocks_see(stem, stride):
    net = build_backbone("resnet18-quarter", stem=stem).eval()
    x = torch.randn(2, 1, 64, 64)
    assert net.stem(x).shape[-1] == 64 // stride
    with torch.no_grad():
        assert net(x).shape == (2, net.out_dim)


def test_unknown_stem_is_refused():
    with pytest.raises(ValueError, match="unknown stem"):
        build_backbone("resnet18-quarter", stem="stride3")
    with pytest.raises(ValueError):
        SSLConfig(stem="stride3")


def test_small_stem_of_older_configs_maps_to_a_stem():
    assert SSLConfig.model_validate({"small_stem": True}).stem == "stride1"
    assert SSLConfig.model_validate({"small_stem": False}).stem == "imagenet"
    assert SSLConfig.model_validate({"small_stem": True, "stem": "stride2"}).stem == "stride2"
    assert build_config("smoke").ssl.stem == "stride1"
    assert build_config("cpu-small", ssl={"stem": "stride2"}).ssl.stem == "stride2"
