"""Small CNN architectures for the bundled ``shapes_*`` models.

Both networks are sized to train on two CPU cores in a few minutes on the synthetic
dataset of :mod:`vislib.data.shapes` (128x128 RGB, 8 classes), and are laid out so that
the explanation methods of vislib apply cleanly:

* every module offered as a target layer runs **exactly once** per forward (no ReLU
  instance is reused inside a block), so a forward hook sees one activation;
* :class:`ShapesResNet` ends in global average pooling and a single linear layer, the
  head that CAM (Zhou et al. 2016) needs, so CAM and Grad-CAM coincide there;
* :class:`ShapesZFNet` follows Zeiler & Fergus (2014): conv/ReLU/max-pool stages then
  fully connected layers, the net that Deconvnet reconstructions were made for.

Models are rebuilt from a model card with ``ARCHITECTURES[card["architecture"]](**card["arch_kwargs"])``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ARCHITECTURES", "BasicBlock", "ShapesResNet", "ShapesZFNet"]


def _norm(kind: str, channels: int) -> nn.Module:
    """``"batch"``: BatchNorm2d; ``"instance"``: instance norm with a learnt scale and shift.

    Instance norm is built as ``GroupNorm(channels, channels)`` (one channel per group):
    the same function as ``InstanceNorm2d(affine=True)``, and faster on CPU.
    """
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)
    raise ValueError(f"unknown norm {kind!r}; expected 'batch' or 'instance'")


def _conv_bn(in_ch: int, out_ch: int, stride: int = 1, norm: str = "batch") -> list[nn.Module]:
    """A bias-free conv + norm: 3x3 'same' at stride 1, 4x4 with padding 1 at stride 2.

    Why 4x4 at stride 2: output cell i then sees inputs 2i-1 .. 2i+2, centred on its
    2x2 block, so every feature map stays centred on the pixel grid the way bilinear
    upsampling (``align_corners=False``) assumes. A 3x3 stride-2 conv centres cell i on
    input 2i instead, and three of them shift a map by 3.5 px towards the top-left.
    """
    if stride not in (1, 2):
        raise ValueError("stride must be 1 or 2")
    kernel = 3 if stride == 1 else 4
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=1, bias=False),
        _norm(norm, out_ch),
    ]


class BasicBlock(nn.Module):
    """ResNet basic block (He et al. 2016): ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.

    Each ReLU is its own module (``relu1``, ``relu2``) so that hooks on either fire once.
    The shortcut is the identity, or (when the shape changes) a 2x2 average pool if
    strided, then a 1x1 conv + norm; like ``conv1``, it stays centred on the input grid.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, norm: str = "batch") -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_ch, out_ch, stride, norm)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(out_ch, out_ch, 1, norm)
        self.relu2 = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            pool = [nn.AvgPool2d(2)] if stride == 2 else []
            self.shortcut = nn.Sequential(
                *pool, nn.Conv2d(in_ch, out_ch, 1, bias=False), _norm(norm, out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ShapesResNet(nn.Module):
    """A small ResNet with a GAP + single linear head (CAM-compatible).

    Layout at a 128x128 input (default arguments)::

        stem    conv3x3/2 + BN + ReLU              -> 64x64
        layer1  BasicBlock x blocks[0], stride 2   -> 32x32
        layer2  BasicBlock x blocks[1], stride 2   -> 16x16
        layer3  BasicBlock x blocks[2], stride 1   -> 16x16   (default CAM layer)
        pool    AdaptiveAvgPool2d(1), flatten
        fc      Linear(widths[-1], num_classes)

    Normalisation: ``norm="batch"`` is the classic ResNet. The bundled models use
    ``norm="instance"`` (per-image, per-channel statistics, the same in train and eval
    mode): on the shapes data, where object and background colours are random, removing
    each feature map's per-image mean lets training leave the chance-level plateau after
    a few hundred steps, while BatchNorm (and GroupNorm with 4 groups) stayed at chance
    for 1000+ steps. The norm modules keep the names ``bn1``/``bn2``.

    Args:
        num_classes: number of output logits.
        widths: channels of the stem and of each stage (``len(blocks) + 1`` values).
        blocks: number of basic blocks per stage.
        strides: stride of the first block of each stage.
        norm: ``"batch"`` or ``"instance"``.
    """

    def __init__(
        self,
        num_classes: int = 8,
        widths: Sequence[int] = (16, 24, 48, 64),
        blocks: Sequence[int] = (1, 1, 1),
        strides: Sequence[int] = (2, 2, 1),
        norm: str | Sequence[str] = "batch",
    ) -> None:
        super().__init__()
        norms = [norm] * len(widths) if isinstance(norm, str) else list(norm)
        if not (len(widths) == len(blocks) + 1 == len(strides) + 1 == len(norms)):
            raise ValueError("need one width and norm for the stem and each stage, and one "
                             "block count and stride for each stage")
        self.stem = nn.Sequential(*_conv_bn(3, widths[0], 2, norms[0]), nn.ReLU(inplace=True))
        for i, (n_blocks, stride) in enumerate(zip(blocks, strides, strict=True)):
            width, kind = widths[i + 1], norms[i + 1]
            stage = [BasicBlock(widths[i], width, stride, kind)]
            stage += [BasicBlock(width, width, 1, kind) for _ in range(n_blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
        self.num_stages = len(blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """He init for convs. (Zero-initialising each block's last norm, a common ResNet
        trick, made the shapes training stall for several hundred more steps.)"""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last conv stage's activation (the input to ``pool``)."""
        x = self.stem(x)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.features(x))))


class ShapesZFNet(nn.Module):
    """A Zeiler & Fergus (2014) style net: conv/ReLU/max-pool stages, then an MLP head.

    Layout at a 128x128 input (default arguments)::

        conv1 6x6/2  norm1 relu1                            -> 64x64
        pool1 2/2                                           -> 32x32
        conv2 3x3  norm2 relu2   conv3 3x3  norm3 relu3     -> 32x32
        pool2 2/2                                           -> 16x16
        conv4 3x3  norm4 relu4   conv5 3x3  norm5 relu5     -> 16x16
        pool3 2/2                                           -> 8x8
        conv6 3x3  norm6 relu6                              -> 8x8   (default layer)
        pool4 2/2, flatten                                  -> 4x4
        fc1  relu_fc1  dropout  fc2

    ``relu6`` is the last conv activation before the last max-pool; ``relu5`` is the last
    16x16 one. Every module has its own attribute and runs once, so any of them can be a
    target layer. The even conv1 kernel (ZF used 7x7) and the non-overlapping pools keep
    every map centred on the pixel grid, as in :class:`ShapesResNet`. The head flattens
    the 4x4 map (no global pooling), so CAM does not apply.

    Training notes (shapes data, 2 CPU cores):

    * each conv is followed by instance norm (``GroupNorm(c, c)``, per image and channel,
      a contrast normalisation in the spirit of ZF's layers 1-2) before its ReLU, as in the
      bundled ShapesResNet; two 3x3 convs per stage (VGG-like) give ``relu5`` a 60 px
      receptive field, enough to see a whole shape. With one conv per stage (a 36 px
      field at the last conv) training stayed at chance level.
    * ``fc1`` starts *position-shared* (:meth:`init_fc1_position_shared`): each hidden
      unit weighs a channel equally at all 4x4 positions, so at initialisation the head
      is global average pooling + MLP. With a random position-specific ``fc1``, the
      gradient that reaches a conv filter is a random mix over positions, which averages
      out for objects at random places: training stayed at chance for 500+ steps, while a
      similar stack with a GAP head left the plateau after ~250. The shared start alone
      was not enough under Adam (whose per-weight steps of size ~lr soon swamp fc1's
      small shared weights); the training recipe also gives fc1 a 1/16 learning rate (one
      position's share), and then training leaves the plateau after ~400-600 steps, with
      fc1 learning position-specific weights from there.

    Args:
        num_classes: number of output logits.
        widths: output channels of conv1..conv6.
        hidden: width of fc1.
        dropout: dropout probability before fc2.
        input_size: input side, used to size fc1.
    """

    # added in a loop by __init__ (declared here for the type checker)
    conv2: nn.Conv2d
    conv3: nn.Conv2d
    conv4: nn.Conv2d
    conv5: nn.Conv2d
    conv6: nn.Conv2d
    norm2: nn.GroupNorm
    norm3: nn.GroupNorm
    norm4: nn.GroupNorm
    norm5: nn.GroupNorm
    norm6: nn.GroupNorm
    relu2: nn.ReLU
    relu3: nn.ReLU
    relu4: nn.ReLU
    relu5: nn.ReLU
    relu6: nn.ReLU
    pool2: nn.MaxPool2d
    pool3: nn.MaxPool2d
    pool4: nn.MaxPool2d

    def __init__(
        self,
        num_classes: int = 8,
        widths: Sequence[int] = (16, 32, 32, 64, 64, 96),
        hidden: int = 256,
        dropout: float = 0.5,
        input_size: int = 128,
    ) -> None:
        super().__init__()
        if len(widths) != 6:
            raise ValueError("need six widths, for conv1..conv6")
        if input_size % 32:
            raise ValueError("input_size must be a multiple of 32")
        self.conv1 = nn.Conv2d(3, widths[0], 6, stride=2, padding=2, bias=False)
        self.norm1 = nn.GroupNorm(widths[0], widths[0])
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        pools = {3: "pool2", 5: "pool3", 6: "pool4"}  # the max-pool after conv k
        for k in range(2, 7):
            c_in, c_out = widths[k - 2], widths[k - 1]
            self.add_module(f"conv{k}", nn.Conv2d(c_in, c_out, 3, padding=1, bias=False))
            self.add_module(f"norm{k}", nn.GroupNorm(c_out, c_out))
            self.add_module(f"relu{k}", nn.ReLU(inplace=True))
            if k in pools:
                self.add_module(pools[k], nn.MaxPool2d(2))
        self.flatten = nn.Flatten(1)
        self.positions = (input_size // 32) ** 2
        self.fc1 = nn.Linear(widths[-1] * self.positions, hidden)
        self.relu_fc1 = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.init_fc1_position_shared()

    @torch.no_grad()
    def init_fc1_position_shared(self) -> None:
        """Set ``fc1`` to global average pooling followed by a default-initialised
        ``Linear(channels, hidden)``: ``W[h, c, p] = w[h, c] / positions``."""
        hidden, channels = self.fc1.out_features, self.fc1.in_features // self.positions
        shared = nn.Linear(channels, hidden)
        self.fc1.weight.copy_((shared.weight[:, :, None] / self.positions)
                              .expand(-1, -1, self.positions).reshape(hidden, -1))
        self.fc1.bias.copy_(shared.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.norm1(self.conv1(x))))
        x = self.relu2(self.norm2(self.conv2(x)))
        x = self.pool2(self.relu3(self.norm3(self.conv3(x))))
        x = self.relu4(self.norm4(self.conv4(x)))
        x = self.pool3(self.relu5(self.norm5(self.conv5(x))))
        x = self.pool4(self.relu6(self.norm6(self.conv6(x))))
        return self.fc2(self.dropout(self.relu_fc1(self.fc1(self.flatten(x)))))


ARCHITECTURES: dict[str, type[nn.Module]] = {
    "ShapesResNet": ShapesResNet,
    "ShapesZFNet": ShapesZFNet,
}
