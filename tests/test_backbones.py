"""Backbones: real offline ImageNet weights, layer selection, and clear errors when weights are missing."""

import numpy as np
import pytest
import torch
from skimage import data as skdata

from patchcore_core.backbones import FeatureExtractor
from patchcore_core.errors import WeightsUnavailableError


@pytest.fixture(scope="module")
def lite0():
    return FeatureExtractor("efficientnet_lite0")


def test_lite0_has_real_imagenet_weights(lite0):
    """The shipped weights classify scikit-image's cat photo as a cat (ImageNet classes 281–285)."""
    from patchcore_core.backbones import _build_lite, _lite_state_dict

    head = _build_lite("efficientnet_lite0", _lite_state_dict("efficientnet_lite0")).eval()
    img = torch.from_numpy(np.ascontiguousarray(skdata.chelsea())).permute(2, 0, 1)[None].float() / 255
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    with torch.inference_mode():
        logits = head((img - lite0.mean) / lite0.std)
    assert 281 <= int(logits.argmax()) <= 285


def test_lite0_default_layers_are_stride_8_and_16(lite0):
    out = lite0(torch.rand(2, 3, 224, 224))
    assert list(out) == ["blocks.2", "blocks.4"]
    assert out["blocks.2"].shape == (2, 40, 28, 28)
    assert out["blocks.4"].shape == (2, 112, 14, 14)
    assert lite0.channels == [40, 112]


def test_unknown_layer_and_backbone():
    with pytest.raises(ValueError, match="no layer"):
        FeatureExtractor("efficientnet_lite0", layers=["layer2"])
    with pytest.raises(ValueError, match="unknown backbone"):
        FeatureExtractor("vgg_nonexistent")


def test_wrn50_offline_without_weights_says_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHCORE_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="--weights"):
        FeatureExtractor("wide_resnet50_2")


def test_missing_weights_file_named(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="nope.pth"):
        FeatureExtractor("resnet18", weights=tmp_path / "nope.pth")


def test_torchvision_backbone_from_local_weights_file(tmp_path):
    """The local-file path a user takes for WRN-50; resnet18 keeps the test small. Checks loading, not accuracy."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    extractor = FeatureExtractor("resnet18", weights=path)
    x = torch.rand(1, 3, 64, 64)
    out = extractor(x)
    assert out["layer2"].shape == (1, 128, 8, 8) and out["layer3"].shape == (1, 256, 4, 4)
    with torch.inference_mode():
        # The extractor runs channels-last; the reference does too, so both take the same conv kernels.
        reference = reference.to(memory_format=torch.channels_last)
        h = ((x - extractor.mean) / extractor.std).contiguous(memory_format=torch.channels_last)
        h = reference.maxpool(reference.relu(reference.bn1(reference.conv1(h))))
        expected = reference.layer3(reference.layer2(reference.layer1(h)))
    # Wrongly loaded weights differ by the activations' own scale; float32 kernel choice by ~1e-6 of it.
    scale = expected.abs().max().item()
    torch.testing.assert_close(out["layer3"], expected, rtol=1e-4, atol=1e-5 * scale)
