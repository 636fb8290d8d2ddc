"""Measuring tools: wall-clock timing with warm-up and a time budget, peak memory, the two physical
references (a forward pass, a forward + backward to the input) and Pearson correlation of maps.

Everything here is independent of vislib so that the references cannot inherit a vislib bug.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call of one row: ``runs`` after ``warmup`` discarded calls (fewer when over budget)."""

    batch: int
    runs: list[float]
    warmup: int
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def per_image(self) -> float:
        return self.median / self.batch

    def as_dict(self) -> dict:
        stats = {"median_s": self.median, "min_s": min(self.runs), "per_image_s": self.per_image}
        return {**asdict(self), **stats}


def time_call(
    fn: Callable[[], object],
    *,
    device: torch.device,
    batch: int,
    repeats: int = 3,
    warmup: int = 1,
    budget_s: float = float("inf"),
) -> tuple[Timing, object]:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    The budget bounds a row's total time: when the first call already took more than the budget
    allows for all calls, fewer calls are made, and a call longer than the whole budget becomes the
    only sample (its one-time costs are then negligible). Returns the timing and the last output.
    """
    runs: list[float] = []
    out = None
    warm_done = 0
    used = 0.0
    while True:
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        seconds = time.perf_counter() - start
        used += seconds
        if warm_done < warmup and seconds * (warmup + repeats) <= budget_s:
            warm_done += 1
        else:
            runs.append(seconds)
        if len(runs) >= repeats or (runs and used + seconds > budget_s):
            break
    note = "" if len(runs) >= repeats else f"{len(runs)} run(s): over the {budget_s:g} s row budget"
    return Timing(batch=batch, runs=runs, warmup=warm_done, note=note), out


def time_paired(
    reference: Callable[[], object],
    fn: Callable[[], object],
    *,
    device: torch.device,
    batch: int,
    repeats: int = 3,
    warmup: int = 1,
    budget_s: float = float("inf"),
) -> tuple[Timing, Timing, object]:
    """Time ``reference`` and ``fn`` alternately (ref, fn, ref, fn, …) so that both see the same load
    on a shared machine: their ratio is then far steadier than one of two separately timed rows.
    Returns (reference timing, fn timing, last output of fn)."""
    pair_runs: list[tuple[float, float]] = []
    out = None
    warm_done = 0
    used = 0.0
    while True:
        pair = []
        for f in (reference, fn):
            sync(device)
            start = time.perf_counter()
            result = f()
            sync(device)
            pair.append(time.perf_counter() - start)
            if f is fn:
                out = result
        seconds = sum(pair)
        used += seconds
        if warm_done < warmup and seconds * (warmup + repeats) <= budget_s:
            warm_done += 1
        else:
            pair_runs.append((pair[0], pair[1]))
        if len(pair_runs) >= repeats or (pair_runs and used + seconds > budget_s):
            break
    note = "" if len(pair_runs) >= repeats else f"{len(pair_runs)} pair(s): over the {budget_s:g} s budget"
    ref = Timing(batch=batch, runs=[a for a, _ in pair_runs], warmup=warm_done, note=note)
    timed = Timing(batch=batch, runs=[b for _, b in pair_runs], warmup=warm_done, note=note)
    return ref, timed, out


def pair_ratio(reference: Timing, timed: Timing) -> float:
    """Median over the pairs of ``timed / reference``: each pair saw the same load."""
    return statistics.median(b / a for a, b in zip(reference.runs, timed.runs, strict=True))


# --------------------------------------------------------------------------------------------------
# Memory


def _status_kib(key: str) -> int | None:
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``), so that one row's peak is not
    hidden by pages an earlier row freed but the allocator kept resident."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process to its current RSS (Linux ≥ 4.0)."""
    try:
        PROC_CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Memory:
    """Peak memory of one row: process RSS high-water mark (MiB) and its rise over the row's start.

    ``rss_reset`` False means the high-water mark could not be reset, so ``peak_rss_mib`` is the
    process peak so far and ``rss_delta_mib`` a lower bound. ``cuda_peak_mib``: torch's
    ``max_memory_allocated`` during the row, when the row ran on CUDA.
    """

    peak_rss_mib: float | None = None
    rss_delta_mib: float | None = None
    rss_reset: bool = False
    cuda_peak_mib: float | None = None


@dataclass
class MemoryProbe:
    """Context manager measuring the peak memory of the code inside it."""

    device: torch.device
    result: Memory = field(default_factory=Memory)

    def __enter__(self) -> MemoryProbe:
        _release_free_heap()
        self.result.rss_reset = _reset_peak_rss()
        self._start_kib = _status_kib("VmRSS")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> bool:
        peak = _status_kib("VmHWM")
        if peak is not None:
            self.result.peak_rss_mib = round(peak / 1024, 1)
            if self._start_kib is not None:
                self.result.rss_delta_mib = round(max(0, peak - self._start_kib) / 1024, 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.result.cuda_peak_mib = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return False


# --------------------------------------------------------------------------------------------------
# Physical references


def forward_reference(model: torch.nn.Module, inputs: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A plain inference forward pass (``torch.no_grad``)."""

    def run():
        with torch.no_grad():
            return model(inputs)

    return run


def forward_backward_reference(
    model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """A forward and a backward of the target logits to the input only.

    ``autograd.grad`` with respect to the input computes no parameter gradient (nothing is
    accumulated in ``.grad`` and the weight-gradient kernels are skipped): the least work any
    input-gradient method must do.
    """

    def run():
        x = inputs.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(x)
            score = logits.gather(1, targets.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, x)
        return grad

    return run


# --------------------------------------------------------------------------------------------------
# Agreement between maps


def as_maps(signal: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Any method output as N×H×W maps at ``size``: input-space signals (N×3×H×W) reduce to the
    largest magnitude over colour channels (as vislib displays them), maps upsample bilinearly."""
    signal = torch.as_tensor(signal).detach().float().cpu()
    if signal.dim() == 4 and signal.shape[1] == 1:
        signal = signal[:, 0]
    if signal.dim() == 4:
        signal = signal.abs().amax(dim=1)
    if signal.dim() == 2:
        signal = signal.unsqueeze(0)
    if tuple(signal.shape[-2:]) != tuple(size):
        signal = F.interpolate(signal.unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]
    return signal


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Mean over samples of the Pearson correlation of two N×… tensors (float64).

    None when a sample's map is constant in either tensor (the correlation is undefined).
    """
    a = torch.as_tensor(a).detach().double().cpu().flatten(1)
    b = torch.as_tensor(b).detach().double().cpu().flatten(1)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    na, nb = a.norm(dim=1), b.norm(dim=1)
    if bool(((na == 0) | (nb == 0)).any()):
        return None
    return float(((a * b).sum(dim=1) / (na * nb)).mean())


def agreement(ours_raw, ours_map, theirs, size: tuple[int, int]) -> tuple[float | None, str]:
    """Pearson correlation between our output and a peer's, and what was compared.

    Signed outputs are compared as they are whenever they describe the same thing: input-space
    signals of the same shape; maps (N×h×w) against maps, or against a peer's input-space output
    whose colour channels are all equal (Captum's occlusion), both upsampled to the input size.
    Otherwise both are compared as displayed (largest magnitude over colour channels).
    """
    theirs = torch.as_tensor(theirs).detach().float().cpu()
    ours_raw = torch.as_tensor(ours_raw).detach().float().cpu()
    if ours_raw.dim() == 3 and ours_raw.shape[0] == 3 and theirs.dim() == 4 and theirs.shape[0] == 1:
        ours_raw = ours_raw.unsqueeze(0)  # a single unbatched input-space signal
    if ours_raw.dim() == 4 and tuple(ours_raw.shape) == tuple(theirs.shape):
        return pearson(ours_raw, theirs), "input-space signal"
    if theirs.dim() == 4 and (theirs.shape[1] == 1 or bool((theirs == theirs[:, :1]).all())):
        theirs = theirs[:, 0]  # one value per pixel, repeated over the colour channels
    if ours_raw.dim() == 2:
        ours_raw = ours_raw.unsqueeze(0)
    if ours_raw.dim() == 3 and theirs.dim() == 3:
        return pearson(as_maps(ours_raw, size), as_maps(theirs, size)), "map at input size"
    ours = torch.as_tensor(ours_map).float()
    if ours.dim() == 2:
        ours = ours.unsqueeze(0)
    return pearson(ours, as_maps(theirs, size)), "displayed map at input size"
