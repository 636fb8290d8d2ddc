"""The benchmark itself: every registered vislib method, the physical references, the peers.

``bench_bundle`` measures one model on one device and returns plain data (JSON-ready dicts);
``scaling`` measures the CAM engine against batch size and input size. Rendering lives in
:mod:`benchmarks.report`. All ratios are taken against the references measured in the same call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial

import torch

import vislib
from vislib.errors import Cancelled, VislibError

from . import peers as peer_lib
from .measure import (
    Memory,
    MemoryProbe,
    Timing,
    agreement,
    as_maps,
    forward_backward_reference,
    forward_reference,
    pair_ratio,
    pearson,
    sync,
    time_paired,
)
from .reference import PAPER_FORMULAS, paper_maps

ROW_EXTRAS = ("channels", "channels_skipped", "forwards", "forward", "forward_why", "path", "approximate",
              "batch_size", "precision", "out_of_memory")
PAST_DEADLINE = "skipped: past the run's deadline (--deadline)"
SIX_CAMS = ("cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam")
ALL_CAMS_ROW = "all six CAMs"
PROMISE_RATIO = 1.3  # the six CAMs together cost at most this many forward passes
DEFAULT_VIEW_ROW = "default view"  # the dashboard's first view: the six CAMs + guided backprop + Deconvnet
VIEW_RATIO = 4.0  # the default view costs at most this many forward passes
ADD_ONE_ROW = "add one CAM to a cached view"


@dataclass
class BenchConfig:
    """What to measure. ``budget_s`` bounds one row (all its calls); a method whose single call is
    estimated (from its progress reports) to exceed it is stopped and reported as an estimate."""

    batches: Sequence[int] = (1, 16)
    repeats: int = 3
    warmup: int = 1
    budget_s: float = 30.0
    methods: Sequence[str] | None = None  # None: every registered method, at run time
    peers: bool = True
    peer_batches: Sequence[int] | None = None  # None: the same as ``batches``
    size: int | None = None  # input side; None: the model's own input size
    options: dict[str, dict] = field(default_factory=dict)  # per-method options, mirrored by the peers
    peer_single_call: bool = False  # True: a peer's first call is its only sample (long methods)
    pairs: int = 0  # > 0: head to head, that many (ours, peer) call pairs, ours from a cold start
    variants: Sequence[tuple[str, str, dict]] = ()  # (label, method, options): rows compared to the method's
    deadline: float | None = None  # time.perf_counter() after which rows are skipped (results still written)
    peer_budget_s: float | None = None  # a peer's row budget (None: budget_s); its calls are not interrupted
    view: bool = True  # the dashboard's default view and "add one CAM to a cached view" rows
    seed: int = 0
    log: Callable[[str], None] = field(default=lambda msg: None, repr=False)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.perf_counter() > self.deadline

    def method_names(self) -> list[str]:
        names = list(vislib.METHODS) if self.methods is None else list(self.methods)
        unknown = [n for n in names if n not in vislib.METHODS]
        if unknown:
            raise VislibError(f"unknown method(s) {unknown}; registered: {', '.join(vislib.METHODS)}")
        return names


def make_inputs(bundle, batch: int, size: int | None = None, seed: int = 0) -> torch.Tensor:
    """A deterministic N×3×S×S batch: the bundled sample images when there are any (at the model's
    own size), else a smooth random pattern (low-frequency colour blobs plus a little noise) in the
    model's normalised input space."""
    side = size or bundle.input_size
    samples = vislib.sample_images()
    if samples and size in (None, bundle.input_size):
        views = [bundle.input_view(vislib.load_image(samples[i % len(samples)])) for i in range(batch)]
        return bundle.to_input(views)
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(batch, 3, 7, 7, generator=gen)
    smooth = torch.nn.functional.interpolate(coarse, size=(side, side), mode="bicubic", align_corners=False)
    noise = 0.1 * torch.randn(batch, 3, side, side, generator=gen)
    return (smooth + noise).to(bundle.device)


def top1_targets(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs).argmax(dim=1)


def _row_base(**kw) -> dict:
    return {"status": "ok", "message": "", **kw}


def _timing_fields(forward: Timing, timing: Timing, refs: dict, memory: Memory) -> dict:
    """A row timed paired with a forward pass: × forward is the median of the per-pair ratios,
    × forward+backward divides it by the references' own paired ratio (fwd+bwd / fwd)."""
    x_forward = pair_ratio(forward, timing)
    return {
        "per_image_s": timing.per_image,
        "median_s": timing.median,
        "runs_s": timing.runs,
        "warmup": timing.warmup,
        "paired_forward_per_image_s": forward.per_image,
        "paired_forward_runs_s": forward.runs,
        "x_forward": x_forward,
        "x_fwd_bwd": x_forward / refs["fwd_bwd_over_fwd"],
        "memory": vars(memory),
        "note": timing.note,
    }


class BudgetGuard:
    """A progress callback that cancels a vislib call whose projected duration exceeds the budget.

    The projection is the time so far plus the remaining steps at the rate measured since the first
    report, so a call's fixed start-up cost (its first forward pass) is not multiplied.
    """

    def __init__(self, budget_s: float):
        self.budget_s = budget_s
        self.cancel = threading.Event()
        self.estimate_s: float | None = None
        self.reset()

    def reset(self) -> None:
        self.cancel.clear()
        self.start = time.perf_counter()
        self.first: tuple[float, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, done)
            return
        t1, d1 = self.first
        if done <= d1 or done >= total:
            return
        projected = (now - self.start) + (now - t1) / (done - d1) * (total - done)
        if projected > self.budget_s:
            self.estimate_s = projected
            self.cancel.set()


def measure_references(bundle, inputs, targets, config: BenchConfig) -> dict:
    """Forward (no_grad) and forward + backward to the input: one call each alone (warm-up and peak
    memory), then timed alternately; ``fwd_bwd_over_fwd`` is the median of their per-pair ratios."""
    forward = forward_reference(bundle.model, inputs)
    both = forward_backward_reference(bundle.model, inputs, targets)
    refs: dict = {}
    for name, fn in (("forward", forward), ("forward_backward", both)):
        with MemoryProbe(bundle.device) as probe:
            out = fn()
        refs[name] = {"memory": vars(probe.result)}
    fwd, fwd_bwd, _ = time_paired(forward, both, device=bundle.device, batch=len(inputs),
                                  repeats=config.repeats, warmup=0, budget_s=config.budget_s)
    refs["forward"].update(fwd.as_dict())
    refs["forward_backward"].update(fwd_bwd.as_dict())
    refs["fwd_bwd_over_fwd"] = pair_ratio(fwd, fwd_bwd)
    refs["_gradient"] = out.detach()
    return refs


def run_ours(bundle, inputs, targets, methods: list[str], refs: dict, config: BenchConfig, label: str):
    """Time ``vislib.explain`` end to end (maps normalised to input size, copied to numpy),
    alternately with a forward pass (paired), so that × forward sees the same machine load."""
    guard = BudgetGuard(config.budget_s)
    target_list = targets.tolist()

    def call():
        guard.reset()
        return vislib.explain(bundle, inputs, methods=methods, target=target_list, progress=guard,
                              cancel=guard.cancel, options=config.options)

    row = _row_base(method=label, family=_family(methods), batch=len(inputs))
    if len(methods) == 1 and config.options.get(methods[0]):
        row["options"] = dict(config.options[methods[0]])
    with MemoryProbe(bundle.device) as probe:
        try:
            forward, timing, explanation = time_paired(
                forward_reference(bundle.model, inputs), call, device=bundle.device, batch=len(inputs),
                repeats=config.repeats, warmup=config.warmup, budget_s=config.budget_s,
            )
        except Cancelled:
            row.update(status="estimated", per_image_s=guard.estimate_s / len(inputs),
                       message=f"stopped: one call projected at {guard.estimate_s:.0f} s "
                               f"> the {config.budget_s:g} s row budget")
            forward = refs["forward"]["per_image_s"]
            row.update(x_forward=row["per_image_s"] / forward,
                       x_fwd_bwd=row["per_image_s"] / refs["forward_backward"]["per_image_s"])
            return row, None
        except VislibError as exc:
            row.update(status="error", message=str(exc))
            return row, None
    row.update(_timing_fields(forward, timing, refs, probe.result))
    if len(methods) == 1:
        extras = explanation.extras.get(methods[0], {})
        row["extras"] = {k: extras[k] for k in ROW_EXTRAS if k in extras}
    return row, explanation


def _family(methods: list[str]) -> str:
    families = {vislib.METHODS[m].family for m in methods}
    return families.pop() if len(families) == 1 else "+".join(sorted(families))


def run_peer(peer, bundle, inputs, targets, ours_row: dict, ours_out, paper: dict, refs: dict,
             config: BenchConfig):
    """Time one peer implementation and correlate its output with ours and with the paper formula.

    A peer predicted (passes × the reference's time) to exceed the row budget is skipped: its calls
    cannot be interrupted. The peer's first call alone gives its peak memory; then the peer and our
    method are timed alternately (paired), so that their ratio does not depend on the machine's load.
    A first call longer than half the budget is the peer's only sample.
    """
    row = _row_base(method=peer.ours, library=peer.library, peer=peer.peer_name, batch=len(inputs),
                    note=peer.note, differs=peer.differs)
    if ours_row.get("status") == "estimated":
        row.update(status="skipped", message="ours was over the row budget; the peer needs as many passes")
        return row
    defaults = getattr(vislib.METHODS[peer.ours], "defaults", None) or {}
    options = {**defaults, **config.options.get(peer.ours, {})}
    setup = peer_lib.peer_setup(bundle.model, _layer_of(bundle), inputs, targets, options)
    passes, kind = peer.passes(setup)
    predicted = passes * refs[kind]["per_image_s"] * len(inputs)
    budget = config.peer_budget_s or config.budget_s
    if predicted > budget:
        row.update(status="skipped", per_image_s=predicted / len(inputs),
                   message=f"predicted {predicted:.0f} s per call ({passes} passes per image) "
                           f"> the {budget:g} s row budget")
        return row
    target_list = targets.tolist()
    ours_call = partial(vislib.explain, bundle, inputs, methods=[peer.ours], target=target_list,
                        options=config.options)
    close = None
    try:
        run, close = peer.make(setup)
        if config.pairs:
            mine, timing, out, memory = head_to_head(ours_call, run, bundle.device, len(inputs), config.pairs)
            row.update(per_image_s=timing.per_image, runs_s=timing.runs, memory=vars(memory),
                       ours_paired_per_image_s=mine.per_image, ours_runs_s=mine.runs, timing_note=timing.note,
                       x_ours=pair_ratio(mine, timing),
                       x_ours_runs=[t / m for m, t in zip(mine.runs, timing.runs, strict=True)])
            _peer_agreement(row, peer, ours_out, out, paper, tuple(inputs.shape[-2:]))
            return row
        with MemoryProbe(bundle.device) as probe:
            sync(bundle.device)
            start = time.perf_counter()
            out = run()
            sync(bundle.device)
            first = time.perf_counter() - start
        if (first > budget / 2 or config.peer_single_call) and ours_row.get("runs_s"):
            n = len(inputs)
            why = "single call" if config.peer_single_call else "single call: over half the budget"
            timing = Timing(batch=n, runs=[first], warmup=0, note=why)
            mine = Timing(batch=n, runs=ours_row["runs_s"], warmup=0, note="from our row (unpaired)")
        else:
            mine, timing, out = time_paired(ours_call, run, device=bundle.device, batch=len(inputs),
                                            repeats=config.repeats, warmup=0, budget_s=budget)
    except Exception as exc:  # a peer failing is a result, not a benchmark crash
        row.update(status="error", message=f"{type(exc).__name__}: {exc}"[:300])
        return row
    finally:
        if close is not None:
            close()
    row.update(per_image_s=timing.per_image, runs_s=timing.runs, memory=vars(probe.result),
               ours_paired_per_image_s=mine.per_image, ours_runs_s=mine.runs, timing_note=timing.note,
               x_ours=timing.median / mine.median)
    _peer_agreement(row, peer, ours_out, out, paper, tuple(inputs.shape[-2:]))
    return row


def _peer_agreement(row: dict, peer, ours_out, out, paper: dict, size) -> None:
    if ours_out is not None:
        rho, compared = agreement(ours_out.raw[peer.ours], ours_out.maps[peer.ours], out, size)
        row.update(rho_ours=rho, compared=compared)
    if peer.ours in paper:
        row["rho_paper"] = pearson(as_maps(out, size), as_maps(paper[peer.ours], size))


def head_to_head(ours: Callable[[], object], theirs: Callable[[], object], device: torch.device, batch: int,
                 pairs: int) -> tuple[Timing, Timing, object, Memory]:
    """``pairs`` × (our call, their call), alternately, each of ours from a cold start (no frozen copy
    cached: the first call a user makes); the peer's first call gives its peak memory."""
    from vislib.methods.frozen import clear_cache

    mine, theirs_runs, out, memory = [], [], None, None
    for _ in range(pairs):
        clear_cache()
        sync(device)
        start = time.perf_counter()
        ours()
        sync(device)
        mine.append(time.perf_counter() - start)
        with MemoryProbe(device) as probe:
            sync(device)
            start = time.perf_counter()
            out = theirs()
            sync(device)
            theirs_runs.append(time.perf_counter() - start)
        memory = memory or probe.result
    note = f"head to head: {pairs} pair(s) (ours, theirs), ours from a cold start"
    return (Timing(batch=batch, runs=mine, warmup=0, note=note),
            Timing(batch=batch, runs=theirs_runs, warmup=0, note=note), out, memory)


def _layer_of(bundle) -> str:
    return bundle.default_layer


def bench_bundle(bundle, config: BenchConfig, *, device_label: str | None = None) -> dict:
    """All rows for one model on one device: references, our methods, the six CAMs, the peers."""
    methods = config.method_names()
    libraries = peer_lib.installed_libraries() if config.peers else {}
    peer_batches = set(config.peer_batches or config.batches)
    result = {
        "model": bundle.name, "weights": bundle.weights, "device": device_label or str(bundle.device),
        "layer": bundle.default_layer, "references": {}, "rows": [], "peers": [], "all_cams": [],
        "input": [3, config.size or bundle.input_size, config.size or bundle.input_size],
    }
    over_budget: dict[str, float] = {}  # method -> per-image estimate at an earlier batch size
    for batch in config.batches:
        if config.out_of_time():
            result["rows"] += [_row_base(method=name, family=vislib.METHODS[name].family, batch=batch,
                                         status="skipped", message=PAST_DEADLINE) for name in methods]
            continue
        inputs = make_inputs(bundle, batch, config.size, config.seed)
        result["input"] = list(inputs.shape[1:])
        targets = top1_targets(bundle.model, inputs)
        config.log(f"{bundle.name} {result['device']} batch {batch}: references")
        refs = measure_references(bundle, inputs, targets, config)
        gradient = refs.pop("_gradient")
        result["references"][str(batch)] = refs
        try:
            paper, scale = paper_maps(bundle.model, bundle.default_layer, inputs, targets)
            result.setdefault("layer_gradient", {})[str(batch)] = scale
        except Exception as exc:  # no arbiter for this layer; the rows still run
            config.log(f"  no paper-formula reference: {type(exc).__name__}: {exc}")
            paper = {}
        outputs = {}
        for name in methods:
            if config.out_of_time():
                result["rows"].append(_row_base(method=name, family=vislib.METHODS[name].family, batch=batch,
                                                status="skipped", message=PAST_DEADLINE))
                continue
            if name in over_budget:
                est = over_budget[name]
                result["rows"].append(_row_base(
                    method=name, family=vislib.METHODS[name].family, batch=batch, status="skipped",
                    per_image_s=est, x_forward=est / refs["forward"]["per_image_s"],
                    x_fwd_bwd=est / refs["forward_backward"]["per_image_s"],
                    message="over the row budget at a smaller batch; per-image estimate carried over"))
                continue
            config.log(f"  {name}")
            row, out = run_ours(bundle, inputs, targets, [name], refs, config, name)
            if row["status"] == "estimated":
                over_budget[name] = row["per_image_s"]
            if out is not None:
                _add_paper_agreement(row, out, name, paper, gradient, tuple(inputs.shape[-2:]))
            result["rows"].append(row)
            outputs[name] = out
            if batch in peer_batches:
                for peer in peer_lib.peers_for(name, libraries):
                    if config.out_of_time():
                        break
                    config.log(f"    vs {peer.library} {peer.peer_name}")
                    result["peers"].append(
                        run_peer(peer, bundle, inputs, targets, row, out, paper, refs, config))
        for label, name, options in config.variants:
            if outputs.get(name) is not None and not config.out_of_time():
                config.log(f"  {label}")
                result["rows"].append(variant_row(bundle, inputs, targets, refs, config, label, name, options,
                                                  outputs[name]))
        if not config.out_of_time():
            config.log(f"  {ALL_CAMS_ROW}")
            result["all_cams"].append(all_cams_row(bundle, inputs, targets, refs, config))
        if config.view and not config.out_of_time():
            config.log(f"  {DEFAULT_VIEW_ROW}, then {ADD_ONE_ROW}")
            result.setdefault("views", []).append(default_view_row(bundle, inputs, targets, refs, config))
            result["views"].append(add_one_row(bundle, inputs, targets, config))
    return result


def variant_row(bundle, inputs, targets, refs: dict, config: BenchConfig, label: str, name: str,
                options: dict, base) -> dict:
    """``name`` with extra ``options`` (e.g. reduced precision), timed like any row, and its agreement with
    the row of ``name`` at the same batch: Pearson r of the raw maps, largest difference of the normalised
    maps (both also in the row's extras)."""
    merged = {**config.options, name: {**config.options.get(name, {}), **options}}
    row, out = run_ours(bundle, inputs, targets, [name], refs, replace(config, options=merged), label)
    row["options"] = dict(options)
    if out is not None:
        rho = pearson(torch.as_tensor(out.raw[name]), torch.as_tensor(base.raw[name]))
        diff = float(abs(torch.as_tensor(out.maps[name]) - torch.as_tensor(base.maps[name])).max())
        row.setdefault("extras", {}).update(agreement_with=name, agreement_r=rho, agreement_max_abs_diff=diff)
    return row


def all_cams_row(bundle, inputs, targets, refs: dict, config: BenchConfig) -> dict:
    """The six CAMs in one ``explain`` call (the promise: ≤ 1.3 forward passes)."""
    cams = [m for m in SIX_CAMS if m in vislib.METHODS]
    row, _ = run_ours(bundle, inputs, targets, cams, refs, config, ALL_CAMS_ROW)
    row["methods"] = cams
    return row


def view_methods(bundle) -> tuple[list[str], dict[str, str]]:
    """The dashboard's default methods that apply to ``bundle`` at its default layer (as the page
    offers them), and why each of the others is left out (e.g. CAM without a GAP + linear head)."""
    from vislib import ui

    reasons = ui.method_availability(bundle, bundle.default_layer)
    names = [m for m in ui.default_methods() if not reasons.get(m)]
    return names, {m: reasons[m] for m in ui.default_methods() if reasons.get(m)}


def default_view_row(bundle, inputs, targets, refs: dict, config: BenchConfig) -> dict:
    """The dashboard's default view in one ``explain`` call (the promise: ≤ 4 forward passes), with
    the passes it ran (the Explain page's caption)."""
    names, left_out = view_methods(bundle)
    row, out = run_ours(bundle, inputs, targets, names, refs, config, DEFAULT_VIEW_ROW)
    row["methods"] = names
    if left_out:
        row["left_out"] = left_out
    if out is not None:
        row["pass_timings"] = dict(out.pass_timings)
    return row


def add_one_row(bundle, inputs, targets, config: BenchConfig) -> dict:
    """Adding one CAM to a view already computed (``PassCache``): each repeat fills a fresh cache with
    the default view minus one CAM (untimed), then times the call with the full view, paired with a
    plain forward. Only the added method runs, from the recorded pass: no forward at all."""
    names, _ = view_methods(bundle)
    cams = [m for m in names if vislib.METHODS[m].family == "cam"]
    row = _row_base(method=ADD_ONE_ROW, family="cam", batch=len(inputs))
    if not cams:
        return {**row, "status": "skipped", "message": "no CAM method applies at the default layer"}
    added = cams[-1]
    before = [m for m in names if m != added]
    target_list = targets.tolist()
    forward = forward_reference(bundle.model, inputs)
    forward_runs, add_runs, out = [], [], None
    for i in range(config.warmup + config.repeats):
        cache = vislib.PassCache()
        vislib.explain(bundle, inputs, before, target=target_list, cache=cache)
        timed = []
        for fn in (forward, lambda cache=cache: vislib.explain(bundle, inputs, names, target=target_list,
                                                                cache=cache)):
            sync(bundle.device)
            start = time.perf_counter()
            result = fn()
            sync(bundle.device)
            timed.append(time.perf_counter() - start)
        if i >= config.warmup:
            forward_runs.append(timed[0])
            add_runs.append(timed[1])
            out = result
    ratios = sorted(b / a for a, b in zip(forward_runs, add_runs, strict=True))
    row.update(
        added=added, view=names, per_image_s=sorted(add_runs)[len(add_runs) // 2] / len(inputs),
        runs_s=add_runs, paired_forward_runs_s=forward_runs, x_forward=ratios[len(ratios) // 2],
        reused=list(out.reused), passes_run=dict(out.pass_timings),
    )
    if sorted(out.reused) != sorted(before):
        row.update(status="error", message=f"the cache served {out.reused}, expected {before}")
    return row


def _add_paper_agreement(row: dict, out, name: str, paper: dict, gradient: torch.Tensor, size) -> None:
    """ρ between our output and the textbook formula (CAMs) or plain autograd (``gradient``)."""
    if name in paper and name in PAPER_FORMULAS:
        row["rho_paper"] = pearson(as_maps(out.raw[name], size), as_maps(paper[name], size))
    elif name == "gradient":
        raw = torch.as_tensor(out.raw[name])
        if raw.shape == gradient.shape:
            row["rho_paper"] = pearson(raw, gradient)


# --------------------------------------------------------------------------------------------------
# Scaling of the CAM engine


def scaling(bundle, *, batches: Sequence[int], sizes: Sequence[int], config: BenchConfig) -> dict:
    """Per-image time of a forward pass and of the six CAMs in one call, against batch size (at the
    model's input size) and against input size (batch 1)."""
    cams = [m for m in SIX_CAMS if m in vislib.METHODS]
    points = {"batch": [], "size": []}
    grid = [("batch", b, config.size or bundle.input_size) for b in batches]
    grid += [("size", 1, s) for s in sizes]
    for axis, batch, side in grid:
        config.log(f"scaling {bundle.name}: batch {batch}, {side}×{side}")
        inputs = make_inputs(bundle, batch, side, config.seed)
        targets = top1_targets(bundle.model, inputs)
        target_list = targets.tolist()
        with MemoryProbe(bundle.device) as probe:
            fwd, ours, _ = time_paired(
                forward_reference(bundle.model, inputs),
                partial(vislib.explain, bundle, inputs, methods=cams, target=target_list),
                device=bundle.device, batch=batch, repeats=config.repeats, warmup=config.warmup,
                budget_s=config.budget_s,
            )
        points[axis].append({
            "batch": batch, "size": side, "forward_per_image_s": fwd.per_image,
            "cams_per_image_s": ours.per_image, "x_forward": pair_ratio(fwd, ours),
            "memory": vars(probe.result),
        })
    return {"model": bundle.name, "device": str(bundle.device), "methods": cams, "points": points}
