"""Shared test helpers: tiny analytic networks and a check that a model was left untouched."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

import vislib
from vislib.models import Preprocess

PLAIN = Preprocess(resize=16, crop=16, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


class Counter(nn.Module):
    """Identity that counts the images the eager model sees (a Python side effect: neither a hook nor
    something a TorchScript trace records, so a frozen copy's forwards leave it unchanged)."""

    def __init__(self):
        super().__init__()
        self.images = 0

    def forward(self, x):
        self.images += x.shape[0]
        return x


class GapNet(nn.Module):
    """conv → ReLU → conv → ReLU (target ``features``) → GAP → linear: CAM applies exactly."""

    def __init__(self, channels: int = 6, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, channels, 3, stride=2, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


class FlatNet(nn.Module):
    """conv → ReLU (target ``features``) → flatten → linear: Σ HiResCAM + bias = logit."""

    def __init__(self, channels: int = 5, classes: int = 3, size: int = 16):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(channels * (size // 2) ** 2, classes)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def tiny_bundle(net: nn.Module, labels=None) -> vislib.ModelBundle:
    torch.manual_seed(0)
    return vislib.load_model(net, preprocess=PLAIN, labels=labels, default_layer="features", device="cpu")


def snapshot(model: nn.Module) -> dict:
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "params": [p.detach().clone() for p in model.parameters()],
        "buffers": [b.detach().clone() for b in model.buffers()],
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    """No hook left, no flag or parameter changed, no .grad, grad mode as it was."""
    for name, module in model.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            assert not getattr(module, attr), f"{attr} left on {name or 'model'}"
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["grad_enabled"] == before["grad_enabled"]
    for a, b in zip(after["params"], before["params"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(after["buffers"], before["buffers"], strict=True):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in model.parameters())


def gradcam_top5(bundle, image, layer=None):
    """Grad-CAM of the five top classes, as one batch. With random weights one class's map can be
    negative everywhere, hence flat after Grad-CAM's ReLU (a random ViT's is on 3 of 5 sample
    images); a default layer that the class scores do not reach gives five flat maps."""
    x, _ = bundle.prepare([image])
    with torch.no_grad():
        top = bundle.logits(x)[0].topk(5).indices.tolist()
    return vislib.explain(bundle, [image] * 5, methods=["gradcam"], target=top, layer=layer)


# --------------------------------------------------------------------------------------------------
# The dashboard under streamlit.testing.v1.AppTest (test_app*.py)

APP = str(Path(__file__).resolve().parent.parent / "app.py")
TIMEOUT = 120


def run_app(**params):
    """The Explain page run once with these URL query parameters."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params.update(params)
    return at.run()


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]


@contextlib.contextmanager
def registered_models(registrations: dict[str, Callable[[], None]]) -> Iterator[list[str]]:
    """Register test models (each ``name``'s function, unless one is already registered) for a module,
    then remove them and restore torch's thread count (the app bounds it for the server process)."""
    from vislib import models

    threads = torch.get_num_threads()
    for name, register in registrations.items():
        if name not in vislib.list_models():
            register()
    yield list(registrations)
    for name in registrations:
        models._REGISTRY.pop(name, None)
    torch.set_num_threads(threads)
