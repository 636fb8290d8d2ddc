"""The common base of every metric: inputs as tensors, the model's forward in batches, the score.

Pure helpers (no model) take arrays or tensors; the model-querying ones take a ``ModelBundle`` or an
``nn.Module`` and run without gradients on the model's device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F


def _as_tensor(value, dtype=torch.float64) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(value), dtype=dtype)



def _module(model) -> torch.nn.Module:
    """The module of a ModelBundle, or the module itself (even one with a ``model`` attribute)."""
    return model if isinstance(model, torch.nn.Module) else model.model


def _scores(model):
    """The forward giving class scores: a bundle's (its output selection applied), or the module's."""
    return model if isinstance(model, torch.nn.Module) else model.logits


def _device(module: torch.nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def target_probabilities(model, inputs: torch.Tensor, targets, *, batch_size: int = 128,
                         cancel=None) -> torch.Tensor:
    """Softmax probability of ``targets[i]`` on ``inputs[i]`` (N,), in batches, on the model's device."""
    forward = _scores(model)
    device = _device(_module(model))
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long).view(-1)
    out = []
    with torch.no_grad():
        for lo in range(0, inputs.shape[0], batch_size):
            _check(cancel)
            logits = forward(inputs[lo:lo + batch_size].to(device, torch.float32)).float()
            probs = F.softmax(logits, dim=1)
            out.append(probs.gather(1, targets[lo:lo + batch_size].to(device).view(-1, 1)).squeeze(1).cpu())
    return torch.cat(out) if out else torch.empty(0)


def _check(cancel) -> None:
    if cancel is not None and cancel.is_set():
        from ..errors import Cancelled

        raise Cancelled("cancelled by the caller")


def _at_input_size(maps, size: tuple[int, int], device) -> torch.Tensor:
    m = _as_tensor(maps, torch.float32).to(device)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    if tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return m




# --------------------------------------------------------------------------------------------------
# What is scored: class indices, a score function, or a vislib.targets Target


ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (outputs, rows) -> one score per row


def bind_targets(targets, model, inputs: torch.Tensor | None):
    """A :class:`vislib.targets.Target` bound to the clean batch (its top class, labels resolved), so
    that perturbed inputs are scored for the class of the image, not their own top class; anything
    else as given."""
    if not hasattr(targets, "bind") or model is None or inputs is None:
        return targets
    with torch.no_grad():
        output = _scores(model)(inputs.to(_device(_module(model)), torch.float32))
    return targets.bind(output, model if hasattr(model, "labels") else None)


def score_function(targets, *, score: str = "probability", model=None,
                   inputs: torch.Tensor | None = None) -> ScoreFn:
    """``targets`` as ``fn(outputs, rows) -> one score per output row`` (``rows[r]``: the image of row r).

    - class indices (one per image, or one for all): the softmax probability of the class
      (``score="probability"``, the default, as Average Drop and RISE), or its logit (``"logit"``);
    - a :class:`vislib.targets.Target` (``target.score``), bound to the clean ``inputs`` of ``model``
      when they are given (:func:`bind_targets`);
    - a callable ``fn(outputs, rows)``, or ``fn(outputs)`` when the score is the same for every image
      (``lambda out: out[:, 3]``).
    """
    if hasattr(targets, "score") and callable(targets.score):
        bound = bind_targets(targets, model, inputs)
        return lambda out, rows: bound.score(out, rows)
    if callable(targets):
        try:
            takes_rows = len(inspect.signature(targets).parameters) >= 2
        except (TypeError, ValueError):
            takes_rows = False
        return targets if takes_rows else (lambda out, rows: targets(out))
    if score not in ("probability", "logit"):
        raise ValueError(f"score must be 'probability' or 'logit', not {score!r}")
    index = torch.as_tensor(np.asarray(targets), dtype=torch.long).view(-1)

    def by_class(out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        values = F.softmax(out.float(), dim=1) if score == "probability" else out.float()
        cls = index.to(out.device)
        cls = cls[rows.to(out.device)] if cls.numel() > 1 else cls.expand(len(rows))
        return values.gather(1, cls.view(-1, 1)).squeeze(1)

    return by_class


def class_indices(targets, model, inputs: torch.Tensor) -> torch.Tensor:
    """One class index per image: the indices given, a bound target's ``class_index``, or else the
    model's top class (for metrics that need "another class", as Random Logit)."""
    if targets is not None and not callable(targets) and not hasattr(targets, "score"):
        t = torch.as_tensor(np.asarray(targets), dtype=torch.long).view(-1)
        return t.expand(inputs.shape[0]).clone() if t.numel() == 1 else t
    index = getattr(bind_targets(targets, model, inputs), "class_index", None)
    if index is not None:
        return torch.as_tensor(index).long().view(-1).cpu()
    with torch.no_grad():
        return _scores(model)(inputs.to(_device(_module(model)), torch.float32)).argmax(1).cpu()


def forward_scores(model, inputs: torch.Tensor, rows, score_fn, *, batch_size: int = 128,
                   cancel=None) -> torch.Tensor:
    """``score_fn(outputs, rows)`` over ``inputs`` (one row per perturbed input, ``rows``: its image)
    in batches of ``batch_size``, without gradients, on the model's device; float64 on the CPU."""
    forward = _scores(model)
    device = _device(_module(model))
    rows = torch.as_tensor(rows, dtype=torch.long).view(-1)
    out = []
    with torch.no_grad():
        for lo in range(0, inputs.shape[0], batch_size):
            _check(cancel)
            outputs = forward(inputs[lo:lo + batch_size].to(device, torch.float32))
            out.append(score_fn(outputs, rows[lo:lo + batch_size].to(device)).detach().double().cpu())
    return torch.cat(out) if out else torch.empty(0, dtype=torch.float64)


def as_maps(maps, count: int | None = None) -> torch.Tensor:
    """Attribution maps as an N×H×W float64 CPU tensor (N×1×H×W and H×W accepted; N×C×H×W summed
    over the channels, as a pixel's relevance)."""
    m = _as_tensor(maps, torch.float64)
    if m.dim() == 2:
        m = m.unsqueeze(0)
    if m.dim() == 4:
        m = m.sum(dim=1)
    if m.dim() != 3:
        raise ValueError(f"maps must be N×H×W, not {tuple(m.shape)}")
    if count is not None and m.shape[0] != count:
        raise ValueError(f"{m.shape[0]} maps for {count} images")
    return m


# --------------------------------------------------------------------------------------------------
# The common base of the metric classes


Explainer = Callable[[object, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(kw_only=True)
class Metric:
    """One metric: settings in the constructor (the paper's defaults), the same call for all.

    ``metric(model, inputs, targets, maps, masks=None, explain=None, progress=None, cancel=None)``
    returns one score per image (NaN where it cannot be computed). ``model``: a ``ModelBundle`` or an
    ``nn.Module``; ``inputs``: the N×C×H×W model inputs; ``targets``: what is scored (see
    :func:`score_function`); ``maps``: the N×H×W attributions; ``masks``: N×H×W object masks (the
    localisation metrics); ``explain(model, inputs, classes) -> N×H×W maps``: the method itself (the
    robustness and randomisation metrics re-explain). ``seed`` fixes every random draw.

    Class attributes say what a metric needs and how to read it: ``group`` (Quantus's groups),
    ``higher_is_better``, ``needs_model`` / ``needs_masks`` / ``needs_explain``, ``fast`` (cheap
    enough to run on demand in the dashboard).
    """

    name: ClassVar[str] = ""
    group: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    needs_model: ClassVar[bool] = True
    needs_masks: ClassVar[bool] = False
    needs_explain: ClassVar[bool] = False
    fast: ClassVar[bool] = True
    centre_applies: ClassVar[bool] = False  # the image-centre map is a meaningful baseline

    seed: int = 0
    batch_size: int = 128  # inputs per forward

    def __call__(self, model, inputs, targets, maps, *, masks=None, explain: Explainer | None = None,
                 progress=None, cancel=None) -> np.ndarray:
        raise NotImplementedError

    def settings(self) -> dict:
        """The constructor's settings (recorded beside every figure)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def _require(self, *, model=None, masks=None, explain=None) -> None:
        if self.needs_masks and masks is None:
            raise ValueError(f"{self.name} needs object masks (or boxes as masks)")
        if self.needs_explain and explain is None:
            raise ValueError(f"{self.name} re-explains perturbed inputs: pass explain=")
