import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from tlearn.backbones import BACKBONES, Preprocessing, WeightsUnavailable, create_backbone, get_spec


def _imagenet_top1(model, spec, photo: np.ndarray) -> int:
    x = spec.preprocessing.eval_transform()(Image.fromarray(photo).convert("RGB"))
    with torch.no_grad():
        return int(model(x[None]).argmax())


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2"])
def test_shipped_weights_are_imagenet_weights(name):
    model, info = create_backbone(name, imagenet_head=True)
    spec = get_spec(name)
    assert 281 <= _imagenet_top1(model, spec, skdata.chelsea()) <= 285  # a cat
    assert _imagenet_top1(model, spec, skdata.coffee()) == 967  # espresso
    assert len(info.sha256) == 64


def test_feature_backbone_returns_pooled_features():
    model, _ = create_backbone("efficientnet_lite1")
    size = get_spec("efficientnet_lite1").preprocessing.input_size
    assert size == 240
    with torch.no_grad():
        out = model(torch.zeros(2, 3, size, size))
    assert out.shape == (2, 1280)


def test_registry_sizes_and_normalisation():
    sizes = {name: spec.preprocessing.input_size for name, spec in BACKBONES.items()}
    assert sizes["efficientnet_lite0"] == 224 and sizes["efficientnet_lite2"] == 260
    assert get_spec("efficientnet_lite0").preprocessing.mean == pytest.approx((127 / 255,) * 3)


@pytest.mark.parametrize("name", [n for n in BACKBONES if not n.startswith("efficientnet_lite")])
def test_classic_preprocessing_is_the_one_timm_publishes(name):
    """The registry writes it out (so a re-train need not import timm); it must be what the weights expect."""
    spec = get_spec(name)
    assert spec.preprocessing == Preprocessing.from_timm(spec.architecture)


def test_unknown_backbone_names_the_known_ones():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        get_spec("resnet9000")


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailable, match="efficientnet_lite0"):
        create_backbone("efficientnet_lite0", weights=tmp_path / "nope.pth")
