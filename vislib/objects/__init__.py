"""Detectors and segmenters: the task of a model, its detections / class map, what to explain in them.

- :mod:`.outputs`: the task of a model, its output read per source, the default layer rule;
- :mod:`.api`: :func:`detect` and :func:`segment`;
- :mod:`.scores`: the box and region scores (pytorch-grad-cam's box and segmentation targets) and the
  bundle views that make every method explain them.
"""

from .api import Detections, Segmentation, detect, segment  # noqa: F401
from .explain import ObjectExplanation, explain_boxes, explain_regions, per_box_normalise  # noqa: F401
from .outputs import TASKS, detections_of, segmentation_logits_of, task_of  # noqa: F401
from .scores import BoxScores, RegionScores, box_bundle, box_score, region_bundle  # noqa: F401
