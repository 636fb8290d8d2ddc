"""Faster forward passes for the many-forward methods: a frozen inference copy of the model.

Score-CAM, occlusion and the other perturbation methods spend nearly all their time in plain
forward passes of perturbed inputs. On the CPU a TorchScript trace of the model, frozen with
``torch.jit.freeze`` and ``torch.jit.optimize_for_inference``, folds batch norms into the
convolutions, fuses convolution + add + ReLU and keeps activations in oneDNN's blocked layout with
prepacked weights. It computes the same function up to float rounding (batch-norm folding), and on
some models it is much faster than eager PyTorch, on others slower (measured on 2 CPU cores, per
image, against eager channels-last: ResNet-50 1.2-1.3× faster, MobileNet-V3 2.5×; DenseNet-121,
EfficientNet-B0 and ConvNeXt-T slower). So :class:`BatchForward` does not guess: in ``"auto"`` mode
it builds a copy only when it should pay for itself on the forwards left, then times both paths and
keeps the faster.

A copy is built (and checked) with one intra-op thread: with two, the idle OpenMP worker spins
through the thousands of tiny operations of tracing and freezing, which costs about 5× the CPU time
(ResNet-18 on 2 cores: 0.6 s instead of 3 s) and, on a busy machine, far more wall-clock time. The
thread count is per thread (``omp_set_num_threads``): other threads' forwards keep theirs.

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
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

TIMED_BATCHES = 2  # batches timed on each path before "auto" settles
TOLERANCE = 1e-4  # relative gap allowed between frozen and eager logits (batch-norm folding rounds)
# "auto" builds a copy when the time it should save on the forwards left exceeds the time to build it.
# Until this process has built one (then the measured rate is used), building and checking a copy is
# estimated at BUILD_S_PER_LAYER per leaf module (CPU time measured with one thread: ResNet-18 0.6 s for
# 52 leaf modules, ResNet-50 1.1 s for 126, DenseNet-121 2.2 s for 366, MobileNet-V3 0.9 s for 168), and
# until a copy of the architecture has been timed its time per input is expected at EXPECTED_RATIO of
# eager channels-last (ResNet-18 and ResNet-50 measured 0.7-0.85).
BUILD_S_PER_LAYER = 0.012
EXPECTED_RATIO = 0.8


@contextmanager
def one_thread():
    """This thread's intra-op parallelism set to 1 inside the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
        with warnings.catch_warnings(record=True) as caught, torch.no_grad(), one_thread():
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


def leaf_modules(model: nn.Module) -> int:
    return sum(1 for m in model.modules() if next(m.children(), None) is None)


def architecture(model: nn.Module, example: torch.Tensor) -> tuple:
    """What a copy's speed depends on: the model's class and size, the input's shape (not the weights)."""
    return (type(model).__qualname__, leaf_modules(model), sum(p.numel() for p in model.parameters()),
            tuple(example.shape[1:]))


_COSTS_LOCK = threading.Lock()
_BUILD_RATE: list[float] = []  # seconds per leaf module of the builds in this process (last one counts)
_RATIOS: dict[tuple, float] = {}  # architecture -> measured frozen / eager time per input


def build_estimate(model: nn.Module) -> tuple[float, str]:
    """Seconds to build and check a copy of ``model``: measured rate of this process's last build, or
    the prior, times its leaf modules."""
    with _COSTS_LOCK:
        rate = _BUILD_RATE[-1] if _BUILD_RATE else None
    layers = leaf_modules(model)
    if rate is None:
        return BUILD_S_PER_LAYER * layers, "estimated"
    return rate * layers, "measured rate"


def ratio_estimate(signature: tuple) -> tuple[float, str]:
    """The copy's time per input as a share of eager's: measured for this architecture, or the prior."""
    with _COSTS_LOCK:
        ratio = _RATIOS.get(signature)
    return (EXPECTED_RATIO, "expected") if ratio is None else (ratio, "measured")


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
    """Forget every frozen copy and every learnt cost, as in a new process (what a benchmark of a
    first call needs)."""
    with _CACHE_LOCK:
        _CACHE.clear()
    with _COSTS_LOCK:
        _BUILD_RATE.clear()
        _RATIOS.clear()


class BatchForward:
    """Runs perturbed input batches through the model: eager (optionally channels-last) or a frozen
    copy, whichever the mode and, in ``"auto"``, the costs choose.

    ``"auto"``: a copy already built for these weights is timed against eager (two batches each) and
    the faster kept. Without one, two eager batches are timed, and a copy is built only if the time
    it should save on the forwards left, rows_left · t_eager · (1 − ratio), exceeds the time to build
    and check it (:func:`build_estimate`, :func:`ratio_estimate`); the copy is then timed and kept only
    if faster, and both costs are learnt for the next call. ``True`` builds at once and uses the
    copy; ``False`` stays eager.

    ``inputs`` and ``logits``: the unperturbed batch and the eager model's logits on it, against
    which a frozen copy is checked before it is used. ``rows``: how many perturbed inputs will be
    run. ``run_locked(fn)`` runs ``fn`` while holding whatever lock guards the shared model;
    ``select(out)`` picks the logits from the model's output. :attr:`summary` says which path ran
    and why, with the figures behind the choice.
    """

    def __init__(self, model: nn.Module, inputs: torch.Tensor, logits: torch.Tensor, *, mode="auto",
                 channels_last: bool = True, rows: int = 0,
                 run_locked: Callable[[Callable[[], torch.Tensor]], torch.Tensor] = lambda fn: fn(),
                 select: Callable[[Any], torch.Tensor] = lambda out: out):
        self.model, self.inputs, self.logits, self.select = model, inputs, logits, select
        self.mode, self.channels_last, self.rows_left = mode, channels_last, rows
        self.run_locked = run_locked
        self.entry: _Entry | None = None
        self.path = "eager"  # the path of the next batch: "eager", "frozen" or "trial"
        self.last_path: str | None = None  # the path the last batch took
        self.reason = "fast_forward=False" if mode is False else ""
        self.decided = mode is False or inputs.device.type != "cpu"
        if inputs.device.type != "cpu" and mode is not False:
            self.reason = "the frozen copy is used on the CPU only"
        self.timed: dict[str, list[float]] = {}
        self.build_why = ""
        self.signature = architecture(model, inputs)
        if not self.decided:
            self._start()

    # ------------------------------------------------------------------ choosing the path

    def _start(self) -> None:
        cached = cached_frozen(self.model, self.inputs, build=False)
        if cached is not None:
            self._adopt(cached)
        elif self.mode is True:
            self._build()

    def _build(self) -> None:
        """Build and check a copy (one thread), learn what that cost, then use or refuse the copy."""
        start = time.perf_counter()
        with one_thread():
            entry = cached_frozen(self.model, self.inputs)
            assert entry is not None  # build=True always gives an entry
            checked = self._check(entry.frozen) if entry.frozen is not None else (False, entry.reason)
        if entry.frozen is not None:
            with _COSTS_LOCK:
                _BUILD_RATE.append((time.perf_counter() - start) / max(1, leaf_modules(self.model)))
        self._adopt(entry, checked)

    def _adopt(self, entry: _Entry, checked: tuple[bool, str] | None = None) -> None:
        """Use ``entry`` if its copy reproduces the eager logits; else settle on eager."""
        self.entry = entry
        if entry.frozen is None:
            self._settle("eager", entry.reason)
            return
        ok, why = checked or self._check(entry.frozen)
        if not ok:
            self._settle("eager", why)
        elif self.mode is True:
            self._settle("frozen", "fast_forward=True")
        else:
            self.path = "trial"  # "auto": time it against eager before settling

    def _check(self, frozen) -> tuple[bool, str]:
        try:
            with torch.inference_mode():
                out = self.select(self.run_locked(lambda: frozen(self.inputs)))
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

    def _worth_building(self, eager_s: float) -> tuple[bool, str]:
        """Whether a copy should save more on the forwards left than building it costs."""
        build_s, build_how = build_estimate(self.model)
        ratio, ratio_how = ratio_estimate(self.signature)
        saving = self.rows_left * eager_s * (1 - ratio)
        why = (f"{self.rows_left} forwards left at {eager_s * 1000:.0f} ms eager, copy {ratio_how} at "
               f"{ratio:.2f}× that: saving {saving:.1f} s vs building {build_s:.1f} s ({build_how})")
        return saving > build_s, why

    def _after_batch(self, path: str, rows: int, seconds: float, shape: tuple) -> None:
        self.rows_left -= rows
        if self.decided or self.rows_left <= 0:
            return
        if path == "trial":  # the copy's first batch at this shape warms up: time the next ones
            self.path = "frozen"
            return
        runs = self.timed.setdefault(path, [])
        runs.append(seconds / rows)
        if len(runs) < TIMED_BATCHES:  # the best of a few batches: one can be slowed by other work
            return
        best = min(runs)
        if self.entry is None:  # eager timed; build a copy only if it can pay off
            worth, why = self._worth_building(best)
            if not worth:
                self._settle("eager", f"a frozen copy would not pay: {why}")
                return
            self.build_why = why
            self._build()
        if self.entry is None:
            return
        known = self.entry.per_row_s.setdefault(shape, {})
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
        with _COSTS_LOCK:
            _RATIOS[self.signature] = ratio
        built = f"built as {self.build_why}; " if self.build_why else ""
        self._settle("frozen" if ratio < 1 else "eager",
                     f"{built}timed: the frozen copy takes {ratio:.2f}× eager's time per input")

    # ------------------------------------------------------------------ running

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        path = self.path
        if path == "eager" and batch.dim() == 4:
            batch = memory_layout(batch, self.channels_last)
        if path == "eager":
            module: Callable[[torch.Tensor], Any] = self.model
        else:  # "frozen" or "trial": only set once a copy was adopted
            assert self.entry is not None and self.entry.frozen is not None
            module = self.entry.frozen
        seconds = [0.0]

        def run() -> torch.Tensor:  # timed inside the lock: waiting for it is not the path's cost
            start = time.perf_counter()
            out = module(batch)
            seconds[0] = time.perf_counter() - start
            return out

        out = self.select(self.run_locked(run))
        self.last_path = path
        if not self.decided:
            self._after_batch(path, len(batch), seconds[0], tuple(batch.shape))
        return out

    @property
    def summary(self) -> dict:
        used = "frozen TorchScript copy" if self.last_path in ("trial", "frozen") else "eager"
        why = self.reason
        if not why and self.build_why:
            why = f"built as {self.build_why}; too few forwards were left to time the copy"
        return {"forward": used, "forward_why": why or "too few batches to time both paths"}
