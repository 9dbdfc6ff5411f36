"""Backbones: the offline Lite0 weights must really be ImageNet weights, and missing weights must fail loudly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

from madfh_pipeline.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    LITE0_TENSOR_COUNT,
    BackboneWeightsError,
    FeatureExtractor,
    MissingModelError,
    build_backbone,
    lite0_weights_file,
    load_efficientnet_lite0,
    map_lite0_state_dict,
)

CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0() -> FeatureExtractor:
    return build_backbone("efficientnet_lite0")


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A torch hub directory we control, so tests never depend on (or write to) the user's cache."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub" / "checkpoints"


def _normalise(image: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return (image - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


@pytest.mark.parametrize(
    ("mean", "std"), [(INCEPTION_MEAN, INCEPTION_STD), (IMAGENET_MEAN, IMAGENET_STD)], ids=["lite0-norm", "imagenet"]
)
def test_lite0_weight_mapping_recognises_a_cat(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    model = load_efficientnet_lite0()
    image = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1)[None].float() / 255.0
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        top1 = int(model(_normalise(image, mean, std)).argmax(dim=1))
    assert top1 in CAT_CLASSES


def test_lite0_package_file_has_the_expected_tensors() -> None:
    state = torch.load(lite0_weights_file(), map_location="cpu", weights_only=True)
    assert len(state) == LITE0_TENSOR_COUNT


def test_lite0_mapping_rejects_wrong_count_and_shapes() -> None:
    target = {"a.weight": torch.zeros(2, 3), "b.weight": torch.zeros(4)}
    with pytest.raises(BackboneWeightsError, match="tensors"):
        map_lite0_state_dict({"x": torch.zeros(2, 3)}, target)
    with pytest.raises(BackboneWeightsError, match=r"'y'.*\(5,\).*'b.weight'"):
        map_lite0_state_dict({"x": torch.zeros(2, 3), "y": torch.zeros(5)}, target)
    mapped = map_lite0_state_dict({"x": torch.ones(2, 3), "y": torch.ones(4)}, target)
    assert list(mapped) == ["a.weight", "b.weight"]


def test_feature_strides_shapes_and_truncation(lite0: FeatureExtractor) -> None:
    assert lite0.layers == ["blocks.2", "blocks.4"]
    assert lite0.strides == [8, 16]
    assert lite0.channels == [40, 112]
    assert lite0.stage_names[-1] == "blocks.4"  # blocks.5/6 are never computed
    features = lite0(torch.rand(2, 3, 256, 192))
    assert [tuple(f.shape) for f in features] == [(2, 40, 32, 24), (2, 112, 16, 12)]


def test_gray_input_equals_replicated_rgb(lite0: FeatureExtractor) -> None:
    gray = torch.rand(1, 1, 64, 96)
    for a, b in zip(lite0(gray), lite0(gray.repeat(1, 3, 1, 1)), strict=True):
        torch.testing.assert_close(a, b)


def test_extractor_is_frozen(lite0: FeatureExtractor) -> None:
    lite0.train()
    assert not lite0.training
    assert not any(module.training for module in lite0.modules())
    assert not any(p.requires_grad for p in lite0.parameters())
    assert not lite0(torch.rand(1, 3, 64, 64, requires_grad=True))[0].requires_grad


def test_bad_input_shape_is_rejected(lite0: FeatureExtractor) -> None:
    with pytest.raises(ValueError, match="shape"):
        lite0(torch.rand(1, 4, 64, 64))


def test_custom_layers() -> None:
    extractor = build_backbone("efficientnet_lite0", ["blocks.1", "blocks.3"])
    assert extractor.strides == [4, 16]
    assert extractor.channels == [24, 80]


def test_unknown_backbone_and_layer() -> None:
    with pytest.raises(ValueError, match="Unknown backbone 'vgg16'.*efficientnet_lite0"):
        build_backbone("vgg16")
    with pytest.raises(ValueError, match="layer4"):
        build_backbone("efficientnet_lite0", ["layer4"])


@pytest.mark.parametrize(
    ("name", "filename"),
    [("resnet18", "resnet18-f37072fd.pth"), ("wide_resnet50_2", "wide_resnet50_2-95faca4d.pth")],
)
def test_missing_torchvision_weights_raise_one_clear_error(empty_hub: Path, name: str, filename: str) -> None:
    with pytest.raises(MissingModelError) as info:
        build_backbone(name)
    message = str(info.value)
    assert filename in message
    assert "https://download.pytorch.org/models/" in message
    assert "weights_path" in message
    assert isinstance(info.value, FileNotFoundError)


def test_missing_weights_path_names_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    for name in ("resnet18", "efficientnet_lite0"):
        with pytest.raises(MissingModelError, match="nope.pth"):
            build_backbone(name, weights_path=str(missing))


def test_resnet_loads_from_hub_cache_and_from_path(empty_hub: Path, tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    empty_hub.mkdir(parents=True)
    torch.save(reference.state_dict(), empty_hub / "resnet18-f37072fd.pth")
    extractor = build_backbone("resnet18")
    assert extractor.layers == ["layer2", "layer3"]
    assert extractor.strides == [8, 16]
    assert extractor.channels == [128, 256]
    assert "layer4" not in extractor.stage_names
    torch.testing.assert_close(extractor.stages[1][0].conv1.weight, reference.layer1[0].conv1.weight)

    local = tmp_path / "my_resnet18.pth"
    torch.save({"state_dict": reference.state_dict()}, local)
    assert build_backbone("resnet18", ["layer1"], weights_path=str(local)).channels == [64]


def test_weights_file_for_another_model_is_rejected(tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), wrong)
    with pytest.raises(BackboneWeightsError, match="wrong.pth"):
        build_backbone("efficientnet_lite0", weights_path=str(wrong))
