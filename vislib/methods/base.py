"""Method registry and the context shared by the methods of one explanation."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from ..errors import Cancelled, MethodError

if TYPE_CHECKING:
    from ..models import ModelBundle
    from ..targets import Target

METHODS: dict[str, type[Method]] = {}
FAMILY_TITLES = {"cam": "CAM family", "backprop": "Backprop family", "perturbation": "Perturbation"}


class Method:
    """One explanation method. Subclasses set the class attributes and the family's hook."""

    name: ClassVar[str]
    family: ClassVar[str]
    title: ClassVar[str]
    paper: ClassVar[str] = ""
    passes: ClassVar[str] = ""  # what one call costs, e.g. "1 fwd + 1 bwd" (shown by `vislib methods`)
    uses_layer: ClassVar[bool] = True  # False: the result does not depend on the target layer
    slow: ClassVar[bool] = False  # True: many forward passes (the UI marks it and shows progress)
    contrastive: ClassVar[bool] = True  # False: cannot explain a contrastive score S_A − S_B
    #: the tasks it serves (a detector's box and a segmenter's region are scores like a class's), and
    #: why not the others (shown by `vislib methods`, raised by explain)
    tasks: ClassVar[tuple[str, ...]] = ("classification", "detection", "segmentation")
    task_reason: ClassVar[str] = ""
    # what the target must offer (vislib.targets.refusal): "linear" (head rows: CAM, LRP),
    # "class_axis" (other classes to compare: Finer-CAM); () explains any target's score
    target_needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **options):
        self.options = options

    def check_options(self, options: dict, allowed) -> None:
        """Refuse options outside ``allowed``, naming the valid ones."""
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            valid = ", ".join(allowed) or "none"
            raise MethodError(f"{self.name}: unknown option(s) {', '.join(unknown)} (valid: {valid})")

    @classmethod
    def refuses_task(cls, task: str) -> str | None:
        """Why this method cannot serve ``task``, or None."""
        if task in cls.tasks:
            return None
        return f"{cls.name} serves {', '.join(cls.tasks)} models, not {task}: {cls.task_reason}"

    @classmethod
    def unavailable(cls, bundle, layer: str) -> str | None:  # noqa: ARG003
        """Why this method cannot run on ``bundle`` at ``layer`` (one line for the dashboard, which then
        shows it disabled with this reason), or None. Cheap: structure, at most one probe forward;
        the method itself still refuses with a :class:`MethodError` when called anyway."""
        return None


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator adding ``cls`` to :data:`METHODS`; refuses duplicate names."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} is already registered")
    METHODS[cls.name] = cls
    return cls


def method_names(family: str | None = None) -> list[str]:
    return [n for n, c in METHODS.items() if family is None or c.family == family]


def get_method(name: str) -> type[Method]:
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(f"unknown method {name!r}; available: {', '.join(METHODS)}") from None


@dataclass
class MethodResult:
    """A method's output for a batch: ``raw`` at its own resolution, timing in seconds."""

    raw: torch.Tensor  # N×h×w (maps) or N×3×H×W (input-space signals)
    seconds: float
    extra: dict = field(default_factory=dict)


@dataclass
class ExplainContext:
    """Everything the family runners share for one explanation of one batch.

    ``target`` (a :class:`vislib.targets.Target`) is what is explained; without one it is built from
    ``target_spec``, ``contrast_spec`` and ``score`` (a :class:`~vislib.targets.Class`). The first
    forward's output binds it (:meth:`set_logits`): ``bound`` scores any rows of outputs,
    ``targets`` / ``contrast`` are its per-image class indices where it has a class axis."""

    bundle: ModelBundle  # or an object with its interface (a detector's box view, ...)
    inputs: torch.Tensor  # N×3×H×W on the model's device
    layer: str
    score: str = "logit"  # "logit" or "probability" (of the class / label targets)
    target_spec: object = None  # None, int, str or a list of those, resolved against the first logits
    resolve_targets: Callable | None = None  # unused (kept for callers that pass it)
    contrast_spec: object = None  # the class B of "why A rather than B?" (same forms), or None
    progress: Callable[[int, int], None] | None = None
    cancel: threading.Event | None = None
    logits: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    contrast: torch.Tensor | None = None  # N contrast classes when a contrast was asked for
    pass_timings: dict[str, float] = field(default_factory=dict)
    shared: dict = field(default_factory=dict)  # results one family offers another (e.g. Grad-CAM)
    notes: list[str] = field(default_factory=list)  # for the user, e.g. a layer the gradient misses
    target: Target | None = None  # the Target explained (built from the specs when None)
    bound: Target | None = None  # the target bound to this batch (after the first forward)

    def __post_init__(self):
        if self.target is None:
            from ..targets import resolve_target

            self.target = resolve_target(self.bundle, self.target_spec, score=self.score,
                                         contrast=self.contrast_spec)
        self.score = self.target.score_name

    def set_logits(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Record the first forward's output and bind the target to it; returns the class indices."""
        if self.logits is None:
            # Bind first, assign after: a bad target (an index past the classes) raises here and
            # leaves the context as it was, so a caller that catches the error cannot go on with
            # logits but no targets.
            detached = logits.detach()
            assert self.target is not None  # built in __post_init__
            bound = self.target.bind(detached, self.bundle)
            self.logits, self.bound = detached, bound
            self.targets, self.contrast = bound.class_index, bound.contrast_index
        return self.targets

    def class_score(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-sample score explained (the target's: S_A, or S_A − S_B with a contrast class B)."""
        self.set_logits(logits)
        assert self.bound is not None  # set_logits bound it
        return self.bound.score(logits)

    def row_scores(self, output: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The target's score of output rows that belong to images ``rows`` (noisy copies, path points,
        perturbed inputs); the first forward must have bound the target."""
        assert self.bound is not None, "the first forward binds the target"
        return self.bound.score(output, rows)

    def rows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(targets, contrast) of the samples ``index`` (for copies of samples: noisy inputs, paths)."""
        assert self.targets is not None, "rows() needs a target with classes, bound by the first forward"
        return self.targets[index], None if self.contrast is None else self.contrast[index]

    @property
    def target_key(self) -> str:
        """What identifies the bound target's score (the pass cache's key)."""
        assert self.bound is not None, "the first forward binds the target"
        return self.bound.key()

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("cancelled by the caller")

    def report(self, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(done, total)
        self.check_cancel()


def target_scores(score: str, logits: torch.Tensor, targets: torch.Tensor,
                  contrast: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row score of ``targets``: the logit or the softmax probability (``score``), minus that of
    ``contrast`` when given (S_A − S_B). Rows may repeat samples (noisy copies, path points)."""
    picked = logits if score == "logit" else F.softmax(logits, dim=1)
    out = picked.gather(1, targets.view(-1, 1)).squeeze(1)
    if contrast is not None:
        out = out - picked.gather(1, contrast.view(-1, 1)).squeeze(1)
    return out


class Stopwatch:
    """Wall-clock timer that synchronises CUDA so GPU work is counted where it happens."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.start
        return False

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
