"""The bundled detector and segmenter: torchvision's FCOS and LR-ASPP on one small backbone.

Both read 128×128 shapes scenes (:mod:`vislib.data.scenes`). The backbone is four stages of two
3×3 conv + batch-norm + ReLU each (strides 2, 4, 8, 16; every ReLU its own module, so the backprop
rules see them):

- ``ShapesFCOS``: :class:`torchvision.models.detection.FCOS` (Tian et al. 2019) over a feature pyramid
  (``backbone.fpn``, levels at strides 8, 16 and a max-pooled 32) with a two-conv head;
  ``min_size = max_size = 128`` so the detector's own transform keeps a 128×128 view as it is.
- ``ShapesLRASPP``: :class:`torchvision.models.segmentation.LRASPP` (Howard et al. 2019, MobileNetV3's
  segmentation head) on the stride-4 ("low") and stride-16 ("high") features; logits upsampled to the
  input size.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

__all__ = ["ShapesBackbone", "ShapesFCOS", "ShapesLRASPP"]


def _stage(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)), ("bn1", nn.BatchNorm2d(out_ch)),
        ("relu1", nn.ReLU(inplace=True)),
        ("conv2", nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)), ("bn2", nn.BatchNorm2d(out_ch)),
        ("relu2", nn.ReLU(inplace=True)),
    ]))


class ShapesBackbone(nn.Sequential):
    """Four conv stages ``layer1..layer4`` at strides 2, 4, 8, 16 with ``widths`` channels."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64, 96)) -> None:
        chans = (3, *widths)
        super().__init__(OrderedDict(
            (f"layer{i + 1}", _stage(chans[i], chans[i + 1], 2)) for i in range(len(widths))
        ))


def ShapesFCOS(num_classes: int = 9, widths: tuple[int, ...] = (16, 32, 64, 96), fpn_channels: int = 32,
               head_convs: int = 2, size: int = 128, mean: tuple[float, ...] = (0.5, 0.5, 0.5),
               std: tuple[float, ...] = (0.25, 0.25, 0.25), score_thresh: float = 0.3) -> nn.Module:
    """FCOS on :class:`ShapesBackbone` + FPN (strides 8, 16, 32); ``num_classes`` counts the background."""
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.fcos import FCOSHead

    widths = tuple(widths)
    backbone = BackboneWithFPN(ShapesBackbone(widths), {"layer3": "0", "layer4": "1"},
                               [widths[2], widths[3]], fpn_channels)
    anchors = AnchorGenerator(((8,), (16,), (32,)), ((1.0,),) * 3)  # one per location, size = stride
    head = FCOSHead(fpn_channels, 1, num_classes, num_convs=head_convs)
    return FCOS(backbone, num_classes, min_size=size, max_size=size, image_mean=list(mean),
                image_std=list(std), anchor_generator=anchors, head=head, score_thresh=score_thresh,
                detections_per_img=50, topk_candidates=200)


def ShapesLRASPP(num_classes: int = 9, widths: tuple[int, ...] = (16, 32, 64, 96),
                 inter_channels: int = 64) -> nn.Module:
    """LR-ASPP on :class:`ShapesBackbone`: ``low`` = layer2 (stride 4), ``high`` = layer4 (stride 16)."""
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation import LRASPP

    widths = tuple(widths)
    backbone = IntermediateLayerGetter(ShapesBackbone(widths), {"layer2": "low", "layer4": "high"})
    return LRASPP(backbone, widths[1], widths[3], num_classes, inter_channels)
