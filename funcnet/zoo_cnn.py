"""Classic ImageNet CNNs as funcnet networks: ResNet, VGG, AlexNet, GoogLeNet.

NHWC inputs, cross-correlation convolutions. Each builder's docstring names the paper and
the reference implementation (torchvision) whose parameter count it matches exactly; the
counts include BatchNorm's ``scale`` and ``bias`` (its running statistics are state).
"""

from __future__ import annotations

from funcnet import _checks
from funcnet import layers as L
from funcnet.nets import Parallel, Residual, Serial

__all__ = ["alexnet", "googlenet", "resnet", "vgg"]


# ---------------------------------------------------------------------------------------
# ResNet
# ---------------------------------------------------------------------------------------

_RESNET_STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}


def _conv_bn(features: int, kernel: int, stride: int = 1, relu: bool = True) -> list[L.Layer]:
    """``Conv(no bias, padding k // 2) -> BatchNorm [-> ReLU]`` as a list of layers."""
    out: list[L.Layer] = [
        L.Conv(features, (kernel, kernel), stride=stride, padding=kernel // 2, use_bias=False),
        L.BatchNorm(),
    ]
    return [*out, L.ReLU()] if relu else out


def _shortcut(features: int, stride: int, in_features: int) -> L.Layer | None:
    """Identity, or a 1x1 strided projection + BatchNorm when the shape changes."""
    if stride == 1 and in_features == features:
        return None
    return Serial(_conv_bn(features, 1, stride, relu=False))


def _basic_block(features: int, stride: int, in_features: int) -> Serial:
    body = Serial([*_conv_bn(features, 3, stride), *_conv_bn(features, 3, 1, relu=False)])
    return Serial([Residual(body, _shortcut(features, stride, in_features)), L.ReLU()])


def _bottleneck(width: int, stride: int, in_features: int) -> Serial:
    out = 4 * width
    body = Serial([
        *_conv_bn(width, 1),
        *_conv_bn(width, 3, stride),  # v1.5: the stride sits on the 3x3 conv
        *_conv_bn(out, 1, relu=False),
    ])
    return Serial([Residual(body, _shortcut(out, stride, in_features)), L.ReLU()])


def resnet(
    depth: int = 18,
    num_classes: int = 1000,
    input_shape: tuple[int, int, int] = (224, 224, 3),
    stem: str = "imagenet",
) -> Serial:
    """ResNet-18/34 (basic blocks) or ResNet-50 (bottlenecks), logits out.

    He, Zhang, Ren & Sun, *Deep Residual Learning for Image Recognition* (CVPR 2016);
    matches ``torchvision.models.resnet18/34/50`` (ResNet-50 is "v1.5": the stride of a
    downsampling bottleneck is on its 3x3 conv). Every conv is bias-free and followed by
    BatchNorm; a block's shortcut is the identity, or a strided 1x1 conv + BatchNorm
    where the shape changes; the ReLU follows the addition. Stages of 64, 128, 256, 512
    (bottleneck width; outputs x4 for ResNet-50), strides 1, 2, 2, 2, then global
    average pooling and ``Dense(num_classes)``.

    Parameters at 224x224x3 with 1000 classes (as torchvision): ResNet-18 11,689,512;
    ResNet-34 21,797,672; ResNet-50 25,557,032 (about 4.1 GMACs per image).

    ``stem="imagenet"``: ``Conv 7x7/2 (pad 3) -> BN -> ReLU -> MaxPool 3x3/2 (pad 1)``.
    ``stem="small"`` (28x28 / 32x32 inputs, CIFAR-style): ``Conv 3x3/1 -> BN -> ReLU``, no
    max pool. ``input_shape`` is checked (the network is shape-agnostic otherwise).
    """
    num_classes = _checks.positive_int(num_classes, "num_classes", "resnet")
    if depth not in _RESNET_STAGES:
        raise ValueError(f"resnet: depth must be one of {sorted(_RESNET_STAGES)}, got {depth!r}")
    if stem not in ("imagenet", "small"):
        raise ValueError(f"resnet: stem must be 'imagenet' or 'small', got {stem!r}")
    if stem == "imagenet":
        layers: list[L.Layer] = [*_conv_bn(64, 7, 2), L.MaxPool(3, stride=2, padding=1)]
    else:
        layers = _conv_bn(64, 3, 1)
    block, expansion = (_bottleneck, 4) if depth == 50 else (_basic_block, 1)
    in_features = 64
    for i, (n, width) in enumerate(zip(_RESNET_STAGES[depth], (64, 128, 256, 512),
                                       strict=True)):
        stage = []
        for j in range(n):
            stride = 2 if (i > 0 and j == 0) else 1
            stage.append(block(width, stride, in_features))
            in_features = width * expansion
        layers.append(Serial(stage))
    net = Serial([*layers, L.GlobalAvgPool(), L.Dense(num_classes)])
    net.output_shape(tuple(input_shape))
    return net


# ---------------------------------------------------------------------------------------
# VGG
# ---------------------------------------------------------------------------------------

_VGG_CFG = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
         512, 512, 512, "M"),
    19: (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
         512, 512, 512, 512, "M"),
}


def _classifier(num_classes: int, dropout: float, hidden: int = 4096) -> list[L.Layer]:
    """``Flatten -> Dense -> ReLU -> Dropout -> Dense -> ReLU -> Dropout -> Dense``."""
    return [
        L.Flatten(),
        L.Dense(hidden), L.ReLU(), L.Dropout(dropout),
        L.Dense(hidden), L.ReLU(), L.Dropout(dropout),
        L.Dense(num_classes),
    ]  # fmt: skip


def vgg(
    depth: int = 16, num_classes: int = 1000, batch_norm: bool = False, dropout: float = 0.5
) -> Serial:
    """VGG-11/13/16/19 (configurations A, B, D, E), logits out.

    Simonyan & Zisserman, *Very Deep Convolutional Networks for Large-Scale Image
    Recognition* (ICLR 2015); matches ``torchvision.models.vgg11/13/16/19`` (and the
    ``_bn`` variants with ``batch_norm=True``: ``Conv -> BatchNorm -> ReLU``, the conv
    keeping its bias as torchvision's does). 3x3 stride-1 SAME convs with bias, 2x2
    stride-2 max pools, then ``Flatten -> 4096 -> ReLU -> Dropout -> 4096 -> ReLU ->
    Dropout -> num_classes``. torchvision's ``AdaptiveAvgPool2d(7)`` before the classifier
    is the identity at 224x224 and is left out: at another input size the first Dense
    sees ``(H / 32) * (W / 32) * 512`` features instead of 25,088.

    Parameters at 224x224x3 with 1000 classes: VGG-11 132,863,336; VGG-13 133,047,848;
    VGG-16 138,357,544; VGG-19 143,667,240 (``batch_norm=True`` adds ``2 *`` the conv
    channels: 5,504 / 5,888 / 8,448 / 11,008).
    """
    num_classes = _checks.positive_int(num_classes, "num_classes", "vgg")
    if depth not in _VGG_CFG:
        raise ValueError(f"vgg: depth must be one of {sorted(_VGG_CFG)}, got {depth!r}")
    layers: list[L.Layer] = []
    for v in _VGG_CFG[depth]:
        if v == "M":
            layers.append(L.MaxPool(2, stride=2))
        else:
            layers.append(L.Conv(v, (3, 3), padding="SAME"))
            if batch_norm:
                layers.append(L.BatchNorm())
            layers.append(L.ReLU())
    return Serial([*layers, *_classifier(num_classes, dropout)])


# ---------------------------------------------------------------------------------------
# AlexNet
# ---------------------------------------------------------------------------------------


def alexnet(num_classes: int = 1000, variant: str = "torchvision", dropout: float = 0.5) -> Serial:
    """AlexNet, logits out.

    Krizhevsky, Sutskever & Hinton, *ImageNet Classification with Deep Convolutional
    Neural Networks* (NeurIPS 2012). Two variants:

    - ``"torchvision"`` (``torchvision.models.alexnet``, the "one weird trick" single-tower
      version): ``Conv 64 11x11/4 pad 2 -> ReLU -> MaxPool 3/2 -> Conv 192 5x5 pad 2 ->
      ReLU -> MaxPool 3/2 -> Conv 384 3x3 -> ReLU -> Conv 256 3x3 -> ReLU -> Conv 256
      3x3 -> ReLU -> MaxPool 3/2 -> Flatten -> Dropout -> 4096 -> ReLU -> Dropout ->
      4096 -> ReLU -> num_classes``; 61,100,840 parameters with 1000 classes.
    - ``"original"``: the paper's two-tower network, 96-256-384-384-256 filters, the
      convs of layers 2, 4 and 5 with ``groups=2`` (each tower sees only its own half of
      the previous layer's maps; layer 3 and the dense layers connect across towers),
      ``LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2)`` after the ReLUs of layers
      1 and 2, overlapping 3x3/2 max pools, dropout on the outputs of the first two dense
      layers; 60,965,224 parameters with 1000 classes (34,944 + 307,456 + 885,120 +
      663,936 + 442,624 conv, 37,752,832 + 16,781,312 + 4,097,000 dense). The first conv
      pads 2 so that a 224x224 input gives the paper's 55x55 maps (as 227x227 unpadded).

    All convs have biases. Both give 6x6x256 = 9216 features to the first Dense at
    224x224 (torchvision's ``AdaptiveAvgPool2d(6)`` is then the identity and is left
    out; at another size the first Dense sees the flattened maps as they are). The
    smallest input is 63x63 (1x1x256 after the last pool).
    """
    num_classes = _checks.positive_int(num_classes, "num_classes", "alexnet")
    if variant == "torchvision":
        return Serial([
            L.Conv(64, (11, 11), stride=4, padding=2), L.ReLU(), L.MaxPool(3, stride=2),
            L.Conv(192, (5, 5), padding=2), L.ReLU(), L.MaxPool(3, stride=2),
            L.Conv(384, (3, 3), padding=1), L.ReLU(),
            L.Conv(256, (3, 3), padding=1), L.ReLU(),
            L.Conv(256, (3, 3), padding=1), L.ReLU(), L.MaxPool(3, stride=2),
            L.Flatten(),
            L.Dropout(dropout), L.Dense(4096), L.ReLU(),
            L.Dropout(dropout), L.Dense(4096), L.ReLU(),
            L.Dense(num_classes),
        ])  # fmt: skip
    if variant == "original":
        lrn = L.LocalResponseNorm(size=5, alpha=1e-4, beta=0.75, k=2.0)
        return Serial([
            L.Conv(96, (11, 11), stride=4, padding=2), L.ReLU(), lrn, L.MaxPool(3, stride=2),
            L.Conv(256, (5, 5), padding=2, groups=2), L.ReLU(), lrn, L.MaxPool(3, stride=2),
            L.Conv(384, (3, 3), padding=1), L.ReLU(),
            L.Conv(384, (3, 3), padding=1, groups=2), L.ReLU(),
            L.Conv(256, (3, 3), padding=1, groups=2), L.ReLU(), L.MaxPool(3, stride=2),
            *_classifier(num_classes, dropout),
        ])  # fmt: skip
    raise ValueError(f"alexnet: variant must be 'torchvision' or 'original', got {variant!r}")


# ---------------------------------------------------------------------------------------
# GoogLeNet
# ---------------------------------------------------------------------------------------

# (1x1, 3x3 reduce, 3x3, "5x5" reduce, "5x5" (a 3x3 in torchvision), pool projection)
_INCEPTION = {
    "3a": (64, 96, 128, 16, 32, 32),
    "3b": (128, 128, 192, 32, 96, 64),
    "4a": (192, 96, 208, 16, 48, 64),
    "4b": (160, 112, 224, 24, 64, 64),
    "4c": (128, 128, 256, 24, 64, 64),
    "4d": (112, 144, 288, 32, 64, 64),
    "4e": (256, 160, 320, 32, 128, 128),
    "5a": (256, 160, 320, 32, 128, 128),
    "5b": (384, 192, 384, 48, 128, 128),
}


def _basic_conv(features: int, kernel: int, stride: int = 1) -> list[L.Layer]:
    """torchvision's ``BasicConv2d``: bias-free conv, ``BatchNorm(eps=0.001)``, ReLU."""
    return [
        L.Conv(features, (kernel, kernel), stride=stride, padding=kernel // 2, use_bias=False),
        L.BatchNorm(epsilon=1e-3),
        L.ReLU(),
    ]


def _inception(c1: int, c3r: int, c3: int, c5r: int, c5: int, pool_proj: int) -> Parallel:
    """Four branches on the same input, concatenated along the channels."""
    return Parallel([
        Serial(_basic_conv(c1, 1)),
        Serial([*_basic_conv(c3r, 1), *_basic_conv(c3, 3)]),
        Serial([*_basic_conv(c5r, 1), *_basic_conv(c5, 3)]),  # 3x3, as torchvision
        Serial([L.MaxPool(3, stride=1, padding=1), *_basic_conv(pool_proj, 1)]),
    ], merge="concat")  # fmt: skip


def _ceil_max_pool(window: int, stride: int, hw: tuple[int, int]) -> L.MaxPool:
    """``MaxPool(window, stride)`` with PyTorch's ``ceil_mode=True`` on an ``hw`` input
    (no low padding): extra high-side padding so the output is ``ceil((n - k) / s) + 1``,
    less one when the last window would start past the input (PyTorch's rule)."""
    pads = []
    for n in hw:
        out = -(-(n - window) // stride) + 1
        if (out - 1) * stride >= n:
            out -= 1
        pads.append((0, max(0, (out - 1) * stride + window - n)))
    return L.MaxPool(window, stride=stride, padding=tuple(pads))


def googlenet(
    num_classes: int = 1000,
    input_shape: tuple[int, int, int] = (224, 224, 3),
    dropout: float = 0.2,
) -> Serial:
    """GoogLeNet (Inception v1) without the auxiliary classifiers, logits out.

    Szegedy et al., *Going Deeper with Convolutions* (CVPR 2015); matches
    ``torchvision.models.googlenet(aux_logits=False)``: 6,624,904 parameters with 1000
    classes. Every conv is torchvision's ``BasicConv2d`` (bias-free conv,
    ``BatchNorm(epsilon=0.001)``, ReLU); an inception block is a :class:`Parallel` of
    four :class:`Serial` branches (1x1; 1x1 -> 3x3; 1x1 -> 3x3 where the paper has a 5x5,
    as torchvision; 3x3/1 max pool -> 1x1) concatenated along the channels. Stem: ``7x7/2
    conv 64 -> pool -> 1x1 conv 64 -> 3x3 conv 192 -> pool``; blocks 3a, 3b, pool, 4a-4e,
    pool (2x2/2), 5a, 5b, global average pool, ``Dropout(dropout)``, ``Dense``.

    torchvision's max pools between stages use ``ceil_mode=True``; here each is a plain
    ``MaxPool`` with the extra high-side padding that gives the same output size for
    ``input_shape`` (for which the pads are computed): at 224x224 the stages are 56, 28,
    14 and 7 pixels wide, as torchvision's. Other input sizes need their own builder
    call. The ``transform_input`` re-normalisation of torchvision's ImageNet weights is
    not part of the network.
    """
    num_classes = _checks.positive_int(num_classes, "num_classes", "googlenet")
    layers: list[L.Layer] = []

    def prefix_hw() -> tuple[int, int]:
        return Serial(layers).output_shape(tuple(input_shape))[:2]

    layers += _basic_conv(64, 7, 2)
    layers.append(_ceil_max_pool(3, 2, prefix_hw()))
    layers += [*_basic_conv(64, 1), *_basic_conv(192, 3)]
    layers.append(_ceil_max_pool(3, 2, prefix_hw()))
    layers += [_inception(*_INCEPTION["3a"]), _inception(*_INCEPTION["3b"])]
    layers.append(_ceil_max_pool(3, 2, prefix_hw()))
    layers += [_inception(*_INCEPTION[name]) for name in ("4a", "4b", "4c", "4d", "4e")]
    layers.append(_ceil_max_pool(2, 2, prefix_hw()))
    layers += [_inception(*_INCEPTION["5a"]), _inception(*_INCEPTION["5b"])]
    return Serial([*layers, L.GlobalAvgPool(), L.Dropout(dropout), L.Dense(num_classes)])
