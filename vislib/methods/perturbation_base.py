"""What the perturbation methods share: one :class:`Session` per explanation (the activation, the
logits, progress over all of the family's forwards, the batched forward loop) and the
:class:`PerturbationMethod` template with its option checks.

Every batch of perturbed forwards runs under ``torch.inference_mode`` with ``bundle.lock`` held
for that batch only (other explanations can interleave), then reports progress through
``ctx.report(done, total)``, which raises :class:`~vislib.errors.Cancelled` when the caller's cancel
event is set: a cancelled run stops after the batch in flight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, ClassVar, overload

import torch
import torch.nn.functional as F

from ..errors import LayerError, MethodError
from ..hooks import capture_layer, resolve_layer
from ..models.bundle import select_output
from .base import ExplainContext, Method, Stopwatch
from .frozen import BatchForward

SCORES = ("logit", "probability")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def class_scores(logits: torch.Tensor, targets: torch.Tensor, score: str) -> torch.Tensor:
    """Per-row score of the row's target class: the logit, or the softmax probability."""
    picked = logits.float() if score == "logit" else F.softmax(logits.float(), dim=1)
    return picked.gather(1, targets.view(-1, 1)).squeeze(1)


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` to ``precision`` on ``device`` ("fp32": no autocast)."""
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# Shared state of one family run


@dataclass
class Plan:
    """What one method will do: how many forwards it needs, and the work itself."""

    forwards: int
    run: Callable[[], tuple[torch.Tensor, dict]]
    seconds: float = 0.0


class Session:
    """State the perturbation methods of one explanation share: the activation, the logits,
    progress over all of the family's forwards, and the batched forward loop."""

    def __init__(self, ctx: ExplainContext):
        self.ctx = ctx
        self.bundle = ctx.bundle
        self.device = ctx.bundle.device
        self.done = 0
        self.total = 0
        self._activation: torch.Tensor | None = None
        self.forward_info: dict = {}  # how the last batch of model forwards ran (BatchForward.summary)

    def activation(self) -> torch.Tensor:
        """The target layer's activation N×C×h×w (float32, no graph)."""
        if self._activation is None:
            self._activation = self._capture()
        return self._activation

    def _capture(self) -> torch.Tensor:
        ctx = self.ctx
        shared = ctx.shared.get("cam_pass")
        if shared and shared["layer"] == ctx.layer and shared["activation"].shape[0] == ctx.inputs.shape[0]:
            return shared["activation"].detach().float()
        layer, module = resolve_layer(self.bundle, ctx.layer)
        with self.bundle.lock, Stopwatch(self.device) as sw:
            with capture_layer(module, view=self.bundle.view(layer)) as captured, torch.no_grad():
                logits = self.bundle.logits(ctx.inputs)
        key = "forward" if "forward" not in ctx.pass_timings else "perturbation_forward"
        ctx.pass_timings[key] = sw.seconds
        ctx.set_logits(logits)
        if captured.activation is None:
            raise MethodError(f"layer {layer!r} did not run during the forward pass")
        if captured.activation.dim() != 4:
            raise LayerError(f"layer {layer!r} does not output an N×C×H×W activation")
        return captured.activation.float()

    def logits(self) -> torch.Tensor:
        """The unperturbed logits (one forward if no earlier family ran one)."""
        if self.ctx.logits is None:
            with self.bundle.lock, torch.no_grad(), Stopwatch(self.device) as sw:
                self.ctx.set_logits(self.bundle.logits(self.ctx.inputs))
            self.ctx.pass_timings["forward"] = sw.seconds
        assert self.ctx.logits is not None  # set_logits recorded it
        return self.ctx.logits

    def advance(self, count: int) -> None:
        """Count finished forwards, report progress, raise Cancelled if the caller asked."""
        self.done += count
        self.ctx.report(self.done, self.total)

    def scores(
        self,
        rows: int,
        make_batch: Callable[[int, int], Any],  # input batches, or whatever ``forward`` takes
        samples: torch.Tensor,
        target,
        batch_size: int,
        forward: Callable[[object], torch.Tensor] | None = None,
        *,
        fast_forward: object = "auto",
        channels_last: bool = True,
        precision: str = "fp32",
    ) -> torch.Tensor:
        """Target scores of ``rows`` perturbed inputs, built and run ``batch_size`` at a time.

        ``make_batch(start, stop)`` builds rows [start, stop) (called in increasing order; again
        for the same start after an out-of-memory retry): by default input batches for the model,
        run by a :class:`~vislib.methods.frozen.BatchForward` (eager, channels-last if asked, or a
        frozen copy: ``fast_forward``), whose choice lands in :attr:`forward_info`; with
        ``forward``, anything that callable takes. ``samples``: the image of each row, whose ``target``
        (the bound :class:`~vislib.targets.Target`) scores it; a score name instead of a target
        scores class ``samples[row]`` of each row (the logit or the softmax). ``precision``
        ("fp32", "bf16", "fp16"): the forwards run under ``torch.autocast`` to that type (eager
        only: autocast does not reach a frozen graph). The model's lock is held for each batch's
        forward only. On CUDA, a batch that runs out of memory is retried at half the size.
        """
        reduced = precision != "fp32"
        runner: Callable[[Any], torch.Tensor]
        if forward is None:
            runner = BatchForward(self.bundle.model, self.ctx.inputs, self.logits(),
                                  mode=False if reduced else fast_forward, channels_last=channels_last,
                                  rows=rows, run_locked=self._locked,
                                  select=lambda out: select_output(out, self.bundle.output))
            if reduced:
                runner.reason = f"precision={precision}: autocast runs eager forwards"
        else:
            def run_given(batch):
                return self._locked(lambda: forward(batch))

            runner = run_given
        parts, start, size, halvings = [], 0, batch_size, 0
        while start < rows:
            stop = min(start + size, rows)
            try:
                with torch.inference_mode():
                    batch = make_batch(start, stop)  # built in float32, outside autocast
                    with autocast(self.device, precision):
                        logits = runner(batch)
                    rows_of = samples[start:stop]
                    parts.append(class_scores(logits, rows_of, target) if isinstance(target, str)
                                 else target.score(logits.float(), rows_of).float())
            except torch.cuda.OutOfMemoryError:
                if self.device.type != "cuda" or size == 1:
                    raise
                torch.cuda.empty_cache()
                size, halvings = max(1, size // 2), halvings + 1
                continue
            self.advance(stop - start)
            start = stop
        info = dict(runner.summary) if isinstance(runner, BatchForward) else {}
        if reduced:
            info["precision"] = precision
        if halvings:
            info["out_of_memory"] = f"batch size halved {halvings}× to {size} after CUDA out-of-memory errors"
        self.forward_info = info
        if not parts:
            return torch.zeros(0, device=self.device)
        return torch.cat(parts)

    def _locked(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self.bundle.lock:
            return fn()


class PerturbationMethod(Method):
    """Template: ``plan(session)`` says how many forwards the method needs and returns its work."""

    family = "perturbation"
    contrastive = False  # scores of perturbed inputs: S_A − S_B is not offered (yet)
    options_allowed: ClassVar[tuple[str, ...]] = ("batch_size", "channels_last")
    needs_activation: ClassVar[bool] = True
    default_batch_size: ClassVar[int] = 32
    cuda_batch_size: ClassVar[int | None] = None  # a larger default on CUDA (None: the CPU default)

    def __init__(self, **options):
        self.check_options(options, self.options_allowed)
        super().__init__(**options)

    def plan(self, session: Session) -> Plan:
        raise NotImplementedError

    @overload
    def int_option(self, key: str, default: int, low: int = 1) -> int: ...
    @overload
    def int_option(self, key: str, default: int | None, low: int = 1) -> int | None: ...

    def int_option(self, key: str, default: int | None, low: int = 1) -> int | None:
        value = self.options.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise MethodError(f"{self.name}: option {key!r} must be an integer ≥ {low}, not {value!r}")
        return value

    def float_option(self, key: str, default: float, low: float = 0.0) -> float:
        value = self.options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value < low:
            raise MethodError(f"{self.name}: option {key!r} must be a number ≥ {low:g}, not {value!r}")
        return float(value)

    def bool_option(self, key: str, default: bool) -> bool:
        value = self.options.get(key, default)
        if not isinstance(value, bool):
            raise MethodError(f"{self.name}: option {key!r} must be True or False, not {value!r}")
        return value

    def choice_option(self, key: str, default: str, choices) -> str:
        value = self.options.get(key, default)
        if value not in tuple(choices):
            raise MethodError(f"{self.name}: option {key!r} must be one of {', '.join(map(repr, choices))}, "
                              f"not {value!r}")
        return value

    def batch_size_for(self, device: torch.device) -> int:
        """The ``batch_size`` option, or the default for ``device`` (larger on CUDA where set)."""
        default = self.default_batch_size
        if device.type == "cuda" and self.cuda_batch_size is not None:
            default = self.cuda_batch_size
        return self.int_option("batch_size", default)

    @property
    def batch_size(self) -> int:
        return self.int_option("batch_size", self.default_batch_size)

    @property
    def channels_last(self) -> bool:
        return self.bool_option("channels_last", True)

    @property
    def fast_forward(self) -> object:
        value = self.options.get("fast_forward", "auto")
        if not (isinstance(value, bool) or value == "auto"):
            raise MethodError(f"{self.name}: option 'fast_forward' must be 'auto', True or False, "
                              f"not {value!r}")
        return value
