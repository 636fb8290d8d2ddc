"""Models that the Ray tests' workers can build: registered when this module is imported (the
workers import it from the registry entry's module, as they would a user's own model module).

``tiny_ray``: the GAP net of the helpers at 16 px. ``crash_ray``: the same net, whose worker process
dies (``os._exit``) on its first batch of a run when the file named by ``VISLIB_TEST_CRASH`` exists,
removing that file first, so exactly one worker process dies mid-run and its restart goes on.
``other_ray``: registered with other weights in the workers than in the tests' process.
"""

from __future__ import annotations

import os

import torch
from helpers import PLAIN, GapNet

from vislib import models

LABELS = ["circle", "square", "triangle", "star"]


class CrashOnce(GapNet):
    def forward(self, x):
        flag = os.environ.get("VISLIB_TEST_CRASH")
        if flag and x.shape[0] > 1:
            try:
                os.remove(flag)  # only one process wins the removal
            except FileNotFoundError:
                pass
            else:
                os._exit(1)
        return super().forward(x)


def _register(name: str, net_type, seed: int) -> None:
    if name in models.list_models():
        return

    @models.register_model(name, source="test", description="Ray test model")
    def build(weights):
        torch.manual_seed(seed if os.environ.get("VISLIB_TEST_WORKER_SEED") is None or name != "other_ray"
                          else int(os.environ["VISLIB_TEST_WORKER_SEED"]))
        return models.make_bundle(name, net_type(channels=6, classes=4), preprocess=PLAIN, labels=LABELS,
                                  default_layer="features", device=torch.device("cpu"), weights="test")


_register("tiny_ray", GapNet, 0)
_register("crash_ray", CrashOnce, 0)
_register("other_ray", GapNet, 0)
