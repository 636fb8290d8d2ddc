"""Faster forward passes for the many-forward methods: a frozen inference copy of the model.

Score-CAM, occlusion and the other perturbation methods spend nearly all their time in plain
forward passes of perturbed inputs. On the CPU a TorchScript trace of the model, frozen with
``torch.jit.freeze`` and ``torch.jit.optimize_for_inference``, folds batch norms into the
convolutions, fuses convolution + add + ReLU and keeps activations in oneDNN's blocked layout with
prepacked weights. It computes the same function up to float rounding (batch-norm folding), and on
some models it is much faster than eager PyTorch, on others slower (measured on 2 CPU cores, per
image, against eager channels-last: ResNet-50 1.2-1.3× faster, MobileNet-V3 2.5×; DenseNet-121,
EfficientNet-B0 and ConvNeXt-T slower). So :class:`BatchForward` does not guess: in ``"auto"`` mode
it times one batch each way and keeps the faster.

Safety:

* the trace runs on a hook-free :func:`~vislib.methods.perturbation.shallow_clone` (shared
  weights, own containers), so the shared model and other users' hooks are never involved;
* a frozen copy is used only after its logits on the unperturbed input match the eager model's
  (relative 1e-4) in this very call, and any failure (an untraceable model, a warning that the trace
  depends on the data, a mismatch) falls back to eager forwards with the reason recorded;
* copies are cached weakly per model and keyed by the identity and version counter of every
  parameter and buffer, so changed weights (``load_state_dict``, in-place initialisation) build a
  new copy instead of reusing a stale one.
"""

from __future__ import annotations

import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

BUILD_WORTH_S = 10.0  # "auto" builds a frozen copy only when the eager forwards still ahead take longer
TIMED_BATCHES = 2  # batches timed on each path before "auto" settles
TOLERANCE = 1e-4  # relative gap allowed between frozen and eager logits (batch-norm folding rounds)


def memory_layout(batch: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """The batch in channels-last memory order when asked (eager convolutions on the CPU: about
    1.4× faster per image on ResNet-50 than contiguous batches), else as it is."""
    return batch.contiguous(memory_format=torch.channels_last) if channels_last else batch


def fingerprint(model: nn.Module) -> tuple:
    """Identity, storage and version counter of every parameter and buffer: changes when weights do."""
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((id(t), t.data_ptr(), t._version, t.device.type, t.dtype) for t in tensors)


def build_frozen(model: nn.Module, example: torch.Tensor) -> tuple[torch.jit.ScriptModule | None, str]:
    """A frozen, inference-optimised TorchScript copy of ``model`` traced on ``example``, or
    (None, why not)."""
    from .perturbation import shallow_clone  # the same hook-free copy the fx head is traced on

    if model.training:
        return None, "the model is in training mode"
    clone = shallow_clone(model)
    try:
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            traced = torch.jit.trace(clone, example, check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
    except Exception as exc:  # noqa: BLE001  (anything TorchScript cannot trace or freeze)
        return None, f"TorchScript could not trace the model ({type(exc).__name__})"
    if any(issubclass(w.category, torch.jit.TracerWarning) for w in caught):
        return None, "the model's forward depends on the data (TorchScript tracer warning)"
    return frozen, ""


@dataclass
class _Entry:
    key: tuple
    frozen: torch.jit.ScriptModule | None
    reason: str
    per_row_s: dict[tuple, dict[str, float]] = field(default_factory=dict)  # batch shape -> path -> s


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def cached_frozen(model: nn.Module, example: torch.Tensor, *, build: bool = True) -> _Entry | None:
    """The cache entry for the model's current weights (built now if ``build``), else None."""
    key = fingerprint(model) + (tuple(example.shape[1:]),)
    with _CACHE_LOCK:
        entry = _CACHE.get(model)
    if entry is not None and entry.key == key:
        return entry
    if not build:
        return None
    frozen, reason = build_frozen(model, example)
    entry = _Entry(key, frozen, reason)
    with _CACHE_LOCK:
        _CACHE[model] = entry
    return entry


def clear_cache() -> None:
    """Forget every frozen copy (the next call builds again: what a benchmark of a first call needs)."""
    with _CACHE_LOCK:
        _CACHE.clear()


class BatchForward:
    """Runs perturbed input batches through the model: eager (optionally channels-last) or a frozen
    copy, whichever the mode and (in ``"auto"``) timing two batches each way choose.

    ``inputs`` and ``logits``: the unperturbed batch and the eager model's logits on it, against
    which a frozen copy is checked before it is used. ``rows``: how many perturbed inputs will be
    run (to judge whether building a copy pays off). ``run_locked(fn)`` runs ``fn`` while holding
    whatever lock guards the shared model. :attr:`summary` says which path ran and why.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, logits: torch.Tensor, *, mode="auto",
                 channels_last: bool = True, rows: int = 0,
                 run_locked: Callable[[Callable[[], torch.Tensor]], torch.Tensor] = lambda fn: fn()):
        self.model, self.inputs, self.logits = model, inputs, logits
        self.mode, self.channels_last, self.rows_left = mode, channels_last, rows
        self.run_locked = run_locked
        self.entry: _Entry | None = None
        self.path = "eager"  # the path of the next batch: "eager", "frozen" or "trial"
        self.reason = "fast_forward=False" if mode is False else ""
        self.decided = mode is False or inputs.device.type != "cpu"
        if inputs.device.type != "cpu" and mode is not False:
            self.reason = "the frozen copy is used on the CPU only"
        self.timed: dict[str, list[float]] = {}
        if not self.decided:
            self._start()

    # ------------------------------------------------------------------ choosing the path

    def _start(self) -> None:
        cached = cached_frozen(self.model, self.inputs, build=self.mode is True)
        if cached is not None:
            self._adopt(cached)

    def _adopt(self, entry: _Entry) -> None:
        """Use ``entry`` if its copy reproduces the eager logits; else settle on eager."""
        self.entry = entry
        if entry.frozen is None:
            self._settle("eager", entry.reason)
            return
        ok, why = self._check(entry.frozen)
        if not ok:
            self._settle("eager", why)
        elif self.mode is True:
            self._settle("frozen", "fast_forward=True")
        else:
            self.path = "trial"  # "auto": time it against eager before settling

    def _check(self, frozen) -> tuple[bool, str]:
        try:
            with torch.inference_mode():
                out = self.run_locked(lambda: frozen(self.inputs))
        except Exception as exc:  # noqa: BLE001
            return False, f"the frozen copy failed ({type(exc).__name__})"
        if not isinstance(out, torch.Tensor) or out.shape != self.logits.shape:
            return False, "the frozen copy does not return the model's logits"
        gap = (out - self.logits).abs().max().item()
        if gap > TOLERANCE * max(1.0, self.logits.abs().max().item()):
            return False, f"the frozen copy's logits differ from the model's by {gap:.3g}"
        return True, ""

    def _settle(self, path: str, reason: str) -> None:
        self.path, self.reason, self.decided = path, reason, True

    def _after_batch(self, path: str, rows: int, seconds: float, shape: tuple) -> None:
        self.rows_left -= rows
        if self.decided or self.rows_left <= 0:
            return
        if path == "trial":  # the copy's first batch runs TorchScript's optimisation: time the next
            self.path = "frozen"
            return
        runs = self.timed.setdefault(path, [])
        runs.append(seconds / rows)
        if len(runs) < TIMED_BATCHES:  # the best of a few batches: one can be slowed by other work
            return
        best = min(runs)
        if self.entry is None:  # eager timed; build a copy only if it can pay off
            if best * self.rows_left < BUILD_WORTH_S:
                self._settle("eager", f"eager forwards left take < {BUILD_WORTH_S:g} s")
                return
            self._adopt(cached_frozen(self.model, self.inputs))
        known = self.entry.per_row_s.setdefault(shape, {}) if self.entry is not None else {}
        known[path] = min(best, known.get(path, best))
        if self.decided or self.path == "trial":
            return
        if "eager" not in known:
            self.path = "eager"
            return
        if path == "eager" and "frozen" not in self.timed:
            self.path = "frozen"
            return
        ratio = known["frozen"] / known["eager"]
        self._settle("frozen" if ratio < 1 else "eager",
                     f"timed: the frozen copy takes {ratio:.2f}× eager's time per input")

    # ------------------------------------------------------------------ running

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        path = self.path
        if path == "eager" and batch.dim() == 4:
            batch = memory_layout(batch, self.channels_last)
        module = self.model if path == "eager" else self.entry.frozen
        seconds = [0.0]

        def run() -> torch.Tensor:  # timed inside the lock: waiting for it is not the path's cost
            start = time.perf_counter()
            out = module(batch)
            seconds[0] = time.perf_counter() - start
            return out

        out = self.run_locked(run)
        if not self.decided:
            self._after_batch(path, len(batch), seconds[0], tuple(batch.shape))
        return out

    @property
    def summary(self) -> dict:
        used = "eager" if self.path == "eager" else "frozen TorchScript copy"
        why = self.reason or "too few batches to time both paths"
        return {"forward": used, "forward_why": why}
