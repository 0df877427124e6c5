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


@pytest.mark.parametrize("name", ["efficientnet_lite0", "vgg16", "inception_resnet_v2"])
def test_fast_crop_resize_gives_timms_eval_pixels(name):
    """Preprocessing.to_pixels (one PIL resize of the kept box) stands in for timm's resize + centre crop."""
    prep = get_spec(name).preprocessing
    reference = prep.eval_transform(normalize=False)
    photos = [Image.fromarray(getattr(skdata, p)()).convert("RGB")
              for p in ("astronaut", "coffee", "chelsea", "rocket")]
    photos.append(photos[0].crop((0, 0, 512, 200)))  # wide
    photos.append(photos[1].crop((0, 0, 150, 400)))  # tall
    photos.append(photos[2].resize((60, 45)))  # smaller than the input: upsampled
    for photo in photos:
        ours, theirs = prep.to_pixels(photo).astype(int), reference(photo).numpy().astype(int)
        assert ours.shape == theirs.shape == (3, prep.input_size, prep.input_size)
        if min(photo.size) >= prep.resize_size():  # shrunk both ways, as nearly every photo: the same pixels
            assert (ours == theirs).mean() > 0.999 and np.abs(ours - theirs).max() <= 1
        else:  # enlarged one way: PIL may run its two passes in the other order, rounding in between differs
            assert (ours == theirs).mean() > 0.75 and np.abs(ours - theirs).mean() < 0.25
