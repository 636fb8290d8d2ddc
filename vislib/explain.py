"""``explain``: one call from an image (or batch) to maps, scores and timings for many methods."""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ._version import __version__
from .errors import InputError, MethodError, TargetError
from .hooks import resolve_layer
from .imageio import load_image
from .methods import METHODS
from .methods.base import ExplainContext, Stopwatch, get_method
from .methods.registry import FAMILY_ORDER, FAMILY_RUNNERS
from .methods.sharing import PassCache, share_forward
from .models import ModelBundle, Preprocess, load_model
from .targets import Target, class_index, output_scores, refusal, resolve_class_indices, resolve_target

SCORES = ("logit", "probability")


@dataclass
class Explanation:
    """The result of :func:`explain`.

    ``maps[m]``: float32 in [0, 1] at the input resolution (H×W, or N×H×W for a batch);
    ``raw[m]``: the method's own output before normalisation (feature resolution after the method's
    ReLU for the CAM family); ``flat[m]``: True where a map was constant (returned as zeros);
    ``timings[m]``: seconds spent in the method itself, ``pass_timings``: the shared passes.
    """

    maps: dict[str, np.ndarray]
    raw: dict[str, np.ndarray]
    flat: dict[str, np.ndarray]
    timings: dict[str, float]
    pass_timings: dict[str, float]
    probs: np.ndarray
    target: int | list[int | None] | None  # the class / label index explained (None: a classless target)
    input_image: Image.Image | list[Image.Image]
    labels: list[str]
    layer: str
    score: str
    model: str
    weights: str
    batched: bool = False
    contrast: int | list[int] | None = None  # the class B of S_A − S_B, when a contrast was asked for
    reused: list[str] = field(default_factory=list)  # methods served by the cache (``cache=``)
    extras: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. an out-of-memory retry
    what: Target | None = None  # the target explained (vislib.targets), bound to the images
    scores: str = "logits"  # the model's output kind; ``probs`` is that output as the chart shows it
    vislib_version: str = __version__  # provenance: the vislib that computed the maps

    @property
    def methods(self) -> list[str]:
        return list(self.maps)

    def _pick(self, value, index: int):
        return value[index] if self.batched else value

    def view(self, index: int = 0) -> Image.Image:
        """The model's input view of image ``index`` (what the maps are drawn over)."""
        picked: Image.Image = self._pick(self.input_image, index)
        return picked

    def class_index(self, index: int = 0) -> int:
        """The class / label index explained for image ``index``; a :class:`TargetError` for a target
        without classes (similarity, regression as a vector, ...)."""
        picked = self._pick(self.target, index)
        if picked is None:
            raise TargetError(f"this explanation's target ({self.describe_target(index)}) has no class")
        return int(picked)

    def target_label(self, index: int = 0) -> str:
        picked = self._pick(self.target, index)
        if picked is None:
            return self.what.describe(self.labels, index) if self.what is not None else ""
        return self.labels[picked]

    def describe_target(self, index: int = 0) -> str:
        """What was explained, e.g. "logit of class 'dog'" or "cosine similarity to the reference"."""
        return self.what.describe(self.labels, index) if self.what is not None else self.target_label(index)

    def top_k(self, k: int = 5, index: int = 0) -> list[tuple[int, str, float]]:
        """The k most probable classes as (index, label, probability)."""
        probs = self._pick(self.probs, index)
        order = np.argsort(-probs)[:k]
        return [(int(i), self.labels[i], float(probs[i])) for i in order]

    def overlay(self, method: str, *, index: int = 0, alpha: float = 0.5, colormap: str = "jet"):
        """The method's map drawn over the input view (a PIL image)."""
        from .render import overlay

        return overlay(self._pick(self.input_image, index), self._pick(self.maps[method], index),
                       alpha=alpha, colormap=colormap)


def explain(
    bundle: ModelBundle | str,
    image_or_batch,
    methods: Sequence[str] | str = ("gradcam",),
    layer: str | None = None,
    target=None,
    score: str = "logit",
    *,
    contrast=None,
    options: dict[str, dict] | None = None,
    cache: PassCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: threading.Event | None = None,
    on_wait: Callable[[], None] | None = None,
) -> Explanation:
    """Explain one image or a batch with several methods, sharing passes between them.

    ``image_or_batch``: a path, bytes, PIL image or array (one image), a list of those (a batch),
    or an already preprocessed tensor (3×H×W or N×3×H×W). ``target``: what to explain, a
    :class:`vislib.targets.Target` (``Class``, ``Label``, ``Regression``, ``Similarity``, ``Text``),
    or as before a class index, a label, or ``None`` for the top-1 class (a batch takes one target for
    all or a list with one per sample; on a multi-label model these name labels).
    ``score``: ``"logit"`` (default) or ``"probability"`` (the softmax output; a label's sigmoid;
    a probabilities model's output as given). ``contrast``: a class
    B (same forms as ``target``) to explain S_A − S_B, "why A rather than B?" (gradient-based methods).
    ``cache``: a :class:`vislib.PassCache`; methods already computed for this model, input, layer,
    target, contrast and score come from it, and new ones reuse its recorded passes.
    ``options``: per-method settings, e.g. ``{"scorecam": {"batch_size": 64}}``. ``progress(done,
    total)`` is called by long methods; setting ``cancel`` stops them (raising ``Cancelled``);
    ``on_wait()`` is called if the explanation has to wait for a free GPU slot.
    """
    model: ModelBundle = load_model(bundle) if isinstance(bundle, str) else bundle
    if score not in SCORES:
        raise MethodError(f"score must be one of {SCORES}, not {score!r}")
    names = parse_methods(methods)
    refused = [r for n in names if (r := METHODS[n].refuses_task(getattr(model, "task", "classification")))]
    if refused:
        raise MethodError("; ".join(refused))
    if contrast is not None:
        check_contrastive(names)
    what = resolve_target(model, target, score=score, contrast=contrast)
    model, note = what.prepare(model)  # maybe another view of the model (e.g. its embedding)
    check_target(names, what)
    prepared = _prepare_inputs(model, image_or_batch)
    layer_name, _ = resolve_layer(model, layer)
    job = _Job(names=names, layer=layer_name, score=what.score_name, options=options or {},
               progress=progress, cancel=cancel, cache=cache, notes=[note] if note else [])
    return explain_prepared(model, prepared, what, job, on_wait)


def explain_prepared(bundle: ModelBundle, prepared: tuple[bool, list, torch.Tensor], what: Target, job: _Job,
                     on_wait: Callable[[], None] | None = None) -> Explanation:
    """:func:`explain` from its checked parts: ``prepared`` = (batched, views, inputs) of
    :func:`_prepare_inputs`, the resolved target and the job (methods, layer, options). Callers that
    explain the same input several times (every label of a multi-label model) prepare it once."""
    batched, views, inputs = prepared
    layer_name = job.layer
    with device_slot(bundle.device, on_wait):
        part = _compute_chunked(bundle, inputs, what, job)
    pick = (lambda a: a) if batched else (lambda a: a[0])
    return Explanation(
        maps={m: pick(a) for m, a in part.maps.items()},
        raw={m: pick(a) for m, a in part.raw.items()},
        flat={m: pick(a) for m, a in part.flat.items()},
        timings=part.timings, pass_timings=part.pass_timings, probs=pick(part.probs),
        target=part.targets if batched else part.targets[0],
        input_image=views if batched else views[0], labels=bundle.labels, layer=layer_name,
        score=what.score_name, model=bundle.name, weights=bundle.weights, batched=batched,
        extras=part.extras, notes=job.notes + [n for n in output_notes(bundle, part.probs)
                                               if n not in job.notes],
        contrast=part.contrast if batched or part.contrast is None else part.contrast[0],
        reused=part.reused, what=part.what, scores=getattr(bundle, "scores", "logits"),
    )


# --------------------------------------------------------------------------------------------------
# One batch through the family runners, with out-of-memory recovery

GPU_SLOTS = threading.BoundedSemaphore(max(1, int(os.environ.get("VISLIB_GPU_SLOTS", "2"))))


@contextmanager
def device_slot(device: torch.device, on_wait: Callable[[], None] | None = None):
    """Bound the number of explanations running at once on the GPU; the rest wait their turn."""
    if device.type != "cuda":
        yield
        return
    if not GPU_SLOTS.acquire(blocking=False):
        if on_wait is not None:
            on_wait()
        GPU_SLOTS.acquire()
    try:
        yield
    finally:
        GPU_SLOTS.release()


@dataclass
class _Job:
    names: list[str]
    layer: str
    score: str
    options: dict
    progress: Callable[[int, int], None] | None
    cancel: threading.Event | None
    contrast: object = None
    cache: PassCache | None = None
    notes: list[str] = field(default_factory=list)
    # passes recorded before the call for exactly this input: {"logits": ..., "shared": {"cam_pass": ...}}
    seed: dict | None = None


@dataclass
class _Part:
    """Results for a batch, every array with the batch first."""

    maps: dict[str, np.ndarray]
    raw: dict[str, np.ndarray]
    flat: dict[str, np.ndarray]
    timings: dict[str, float]
    pass_timings: dict[str, float]
    probs: np.ndarray
    targets: list[int | None]  # None: a target without classes
    extras: dict[str, dict]
    contrast: list[int] | None = None
    reused: list[str] = field(default_factory=list)
    what: Target | None = None  # the target bound to the batch (of the first chunk)


def _compute(bundle: ModelBundle, inputs: torch.Tensor, target, job: _Job) -> _Part:
    if not isinstance(target, Target):
        target = resolve_target(bundle, target, score=job.score, contrast=job.contrast)
    ctx = ExplainContext(bundle=bundle, inputs=inputs, layer=job.layer, target=target,
                         progress=job.progress, cancel=job.cancel)
    if job.seed is not None and job.seed["logits"].shape[0] == inputs.shape[0]:
        ctx.set_logits(job.seed["logits"])
        ctx.shared.update(job.seed["shared"])
    results = job.cache.restore(ctx, job.names, job.options) if job.cache is not None else {}
    missing = [n for n in job.names if n not in results]
    share_forward(ctx, missing, job.options)
    for family in FAMILY_ORDER:
        wanted = [n for n in missing if METHODS[n].family == family]
        if wanted:
            results.update(FAMILY_RUNNERS[family](ctx, wanted, job.options))
    if job.cache is not None:
        job.cache.store(ctx, {n: results[n] for n in missing}, job.options)
    if ctx.logits is None:
        with bundle.lock, torch.no_grad(), Stopwatch(bundle.device) as sw:
            ctx.set_logits(bundle.logits(inputs))
        ctx.pass_timings["forward"] = sw.seconds
    size = (int(inputs.shape[-2]), int(inputs.shape[-1]))
    part = _Part({}, {}, {}, {}, dict(ctx.pass_timings), probs=np.empty(0), targets=[], extras={},
                 reused=[n for n in job.names if n not in missing])
    for name in job.names:
        result = results[name]
        with Stopwatch(bundle.device) as sw:
            display = result.extra.pop("display", result.raw)
            normed, is_flat = normalize_maps(display, size)
        part.maps[name] = normed.cpu().numpy()
        part.raw[name] = result.raw.detach().float().cpu().numpy()
        part.flat[name] = is_flat.cpu().numpy()
        part.timings[name] = result.seconds + sw.seconds
        if result.extra:
            part.extras[name] = result.extra
    assert ctx.logits is not None  # set by the forward above
    part.probs = output_scores(getattr(bundle, "scores", "logits"), ctx.logits).cpu().numpy()
    n = inputs.shape[0]
    part.targets = ctx.targets.cpu().tolist() if ctx.targets is not None else [None] * n
    part.what = ctx.bound
    job.notes += [n for n in ctx.notes if n not in job.notes]
    if ctx.contrast is not None:
        part.contrast = ctx.contrast.cpu().tolist()
    return part


# On the CPU a recorded graph (the CAM and backprop families' forward, kept for their backward
# passes) runs on chunks of the batch whose largest activation stays under this size. Larger graphs
# are slower per image: every gradient buffer above glibc's 32 MiB mmap threshold is a fresh mapping
# whose pages fault in (resnet50 at batch 16, default view: 4.57× a forward in one graph, 3.90× in
# two of 8, paired runs), and they hold more memory at once. Results do not depend on the chunking.
GRAPH_CHUNK_BYTES = 32 * 2**20
GRAPH_FAMILIES = ("cam", "backprop")


def graph_chunks(bundle: ModelBundle, inputs: torch.Tensor, names: Sequence[str]) -> list[int]:
    """Sizes of the chunks ``inputs`` is explained in (balanced), ``[len(inputs)]`` for one.

    Only on the CPU and for requests with a recorded graph; the largest activation per image comes
    from the bundle's probe (its layer table), scaled to this input's pixels."""
    n = inputs.shape[0]
    if (n < 2 or inputs.device.type != "cpu" or not bundle.layer_table
            or not any(METHODS[m].family in GRAPH_FAMILIES for m in names)):
        return [n]
    sizes = [row.view.channels * int(np.prod(row.view.grid))
             for row in bundle.layer_table if row.view is not None]
    if not sizes:
        return [n]
    probe_pixels = max(1, int(np.prod(bundle.input_shape[1:])))
    per_image = max(sizes) * inputs.element_size() * inputs[0, 0].numel() / probe_pixels
    count = min(n, max(1, int(np.ceil(n * per_image / GRAPH_CHUNK_BYTES))))
    base, extra = divmod(n, count)
    return [base + (i < extra) for i in range(count)]


def _compute_chunked(bundle: ModelBundle, inputs: torch.Tensor, target, job: _Job) -> _Part:
    """``_compute_resilient`` on the chunks of :func:`graph_chunks`, merged; progress is reported
    over the whole batch (each chunk's total scaled to the images left)."""
    sizes = graph_chunks(bundle, inputs, job.names)
    n = inputs.shape[0]
    targets = target.tolist() if isinstance(target, torch.Tensor) else target
    contrast = job.contrast.tolist() if isinstance(job.contrast, torch.Tensor) else job.contrast
    misfit = any(isinstance(s, (list, tuple, np.ndarray)) and len(s) != n for s in (targets, contrast))
    misfit = misfit or (isinstance(target, Target) and target.per_image_count() not in (None, n))
    if len(sizes) == 1 or misfit:  # one graph; or per-sample lists that do not fit: the error says so
        return _compute_resilient(bundle, inputs, target, job)
    start, done_before, part = 0, 0, None
    for size in sizes:
        stop = start + size
        last = {"total": 0}

        def report(done: int, total: int, _start=start, _before=done_before, _size=size, _last=last) -> None:
            _last["total"] = total
            if job.progress is not None:
                job.progress(_before + done, _before + round(total * (n - _start) / _size))

        chunk_job = replace(job, contrast=_rows(contrast, start, stop), progress=report,  # same notes list
                            seed=None)
        piece = _compute_resilient(bundle, inputs[start:stop], _rows(targets, start, stop), chunk_job)
        part = piece if part is None else _merge(part, piece)
        done_before += last["total"]
        start = stop
    assert part is not None  # graph_chunks gives at least one chunk
    return part


def _rows(spec, start: int, stop: int):
    """The rows [start, stop) of a per-sample target / contrast (a list, array or tensor, or a Target
    holding one); a single spec (one class for every sample, None) as it is."""
    if isinstance(spec, Target):
        return spec.take(start, stop)
    if isinstance(spec, torch.Tensor):
        spec = spec.tolist()
    if isinstance(spec, (list, tuple, np.ndarray)):
        return list(spec[start:stop])
    return spec


def _compute_resilient(bundle: ModelBundle, inputs: torch.Tensor, target, job: _Job) -> _Part:
    """``_compute``; on a GPU out-of-memory error, retry in two halves, then on a CPU copy.

    The shared model is never moved: the CPU fallback uses a private copy, made once per bundle.
    """
    try:
        return _compute(bundle, inputs, target, job)
    except torch.cuda.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        n = inputs.shape[0]
        if n > 1:
            job.notes.append(f"out of GPU memory with a batch of {n}: retried in two halves")
            half = n // 2
            a = _compute_resilient(bundle, inputs[:half], _rows(target, 0, half),
                                   replace(job, contrast=_rows(job.contrast, 0, half), seed=None))
            b = _compute_resilient(bundle, inputs[half:], _rows(target, half, n),
                                   replace(job, contrast=_rows(job.contrast, half, n), seed=None))
            return _merge(a, b)
        if not can_fall_back_to_cpu(bundle):
            raise
        job.notes.append("out of GPU memory: this image was explained on the CPU")
        return _compute(cpu_copy(bundle), inputs.cpu(), target, job)


def can_fall_back_to_cpu(bundle: ModelBundle) -> bool:
    return bundle.device.type != "cpu"


def cpu_copy(bundle: ModelBundle) -> ModelBundle:
    """A private CPU copy of the bundle (made once, under the bundle's lock)."""
    with bundle.lock:
        if bundle.cpu_fallback is None:
            bundle.cpu_fallback = replace(
                bundle, model=copy.deepcopy(bundle.model).cpu(), device=torch.device("cpu"),
                lock=threading.RLock(), cpu_fallback=None,
            )
        return bundle.cpu_fallback


def _merge(a: _Part, b: _Part) -> _Part:
    cat = lambda x, y: np.concatenate([x, y], axis=0)  # noqa: E731
    return _Part(
        maps={m: cat(a.maps[m], b.maps[m]) for m in a.maps},
        raw={m: cat(a.raw[m], b.raw[m]) for m in a.raw},
        flat={m: cat(a.flat[m], b.flat[m]) for m in a.flat},
        timings={m: a.timings[m] + b.timings.get(m, 0.0) for m in a.timings},
        pass_timings={k: a.pass_timings.get(k, 0.0) + b.pass_timings.get(k, 0.0)
                      for k in {**a.pass_timings, **b.pass_timings}},
        probs=cat(a.probs, b.probs), targets=a.targets + b.targets, reused=a.reused,
        what=_cat_what(a.what, b.what),
        contrast=None if a.contrast is None or b.contrast is None else a.contrast + b.contrast,  # all or none
        extras={m: _merge_extras(a.extras.get(m, {}), b.extras.get(m, {})) for m in {**a.extras, **b.extras}},
    )


def _merge_extras(a: dict, b: dict) -> dict:
    """Per-sample lists are concatenated; other values (settings, titles) are kept from the first half."""
    merged = {**b, **a}
    for key in a.keys() & b.keys():
        if isinstance(a[key], list) and isinstance(b[key], list):
            merged[key] = a[key] + b[key]
    return merged


def _cat_what(a: Target | None, b: Target | None) -> Target | None:
    """The bound targets of two halves of a batch as one (per-image indices concatenated)."""
    if a is None or b is None:
        return a or b
    return a.concat(b)


def check_target(names: Sequence[str], target: Target) -> None:
    """Refuse methods that cannot explain ``target``, each with its reason."""
    reasons = [r for r in (refusal(METHODS[n], target) for n in names) if r]
    if reasons:
        raise MethodError("; ".join(reasons))


def output_notes(bundle: ModelBundle, shown: np.ndarray) -> list[str]:
    """Notes on the output the chart shows: saturated probabilities flatten the gradients."""
    kind = getattr(bundle, "scores", "logits")
    if kind not in ("probabilities", "sigmoid") or shown.size == 0:
        return []
    top = shown.max(axis=-1)
    if kind == "probabilities" and float(top.max()) > 1 - 1e-4:
        return ["the model's output is saturated (a probability within 1e-4 of 1): the gradient of a "
                "probability vanishes there, so gradient maps of score='probability' are weak or flat; "
                "explain the log-probability (score='logit', the default)"]
    if kind == "sigmoid" and bool(((shown < 1e-4) | (shown > 1 - 1e-4)).all()):
        return ["every label's sigmoid is within 1e-4 of 0 or 1 (saturated): explain the labels' "
                "logits (score='logit', the default); their gradients do not vanish"]
    return []


def check_contrastive(names: Sequence[str]) -> None:
    """Refuse a contrast for methods that do not explain a differentiable score."""
    refused = [n for n in names if not METHODS[n].contrastive]
    if refused:
        raise MethodError(f"a contrast class applies to gradient-based methods; {', '.join(refused)} "
                          f"cannot explain S_A − S_B")


def parse_methods(methods: Sequence[str] | str) -> list[str]:
    """Validate method names (a list or a comma-separated string), keeping order, no duplicates."""
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    names: list[str] = []
    for name in methods:
        get_method(name)
        if name not in names:
            names.append(name)
    if not names:
        raise MethodError(f"no method given; available: {', '.join(METHODS)}")
    return names


def normalize_maps(maps: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear upsampling to ``size`` and per-sample min-max scaling to [0, 1].

    Constant (flat) or non-finite maps come back as zeros with a True flag, never NaN.
    """
    maps = maps.detach().float()
    if maps.dim() == 4:  # input-space signals: magnitude over channels for display
        maps = maps.abs().amax(dim=1)
    # Checked before upsampling (cheaper, same answer: bilinear weights of finite values stay finite,
    # and a non-finite sample comes back as zeros either way). In-place steps below: each fresh
    # full-size temporary costs page faults that dominate on a busy CPU.
    finite = torch.isfinite(maps).flatten(1).all(dim=1)
    if not bool(finite.all()):
        maps = torch.nan_to_num(maps, nan=0.0, posinf=0.0, neginf=0.0)
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)
    else:
        maps = maps.clone()  # never scale the caller's tensor in place
    lo = maps.flatten(1).amin(dim=1)
    hi = maps.flatten(1).amax(dim=1)
    span = hi - lo
    scale = torch.maximum(hi.abs(), lo.abs())
    flat = (span <= 1e-6 * scale) | (scale == 0) | ~finite
    safe = torch.where(flat, torch.ones_like(span), span)
    normed = maps.sub_(lo.view(-1, 1, 1)).div_(safe.view(-1, 1, 1))
    if bool(flat.any()):
        normed.masked_fill_(flat.view(-1, 1, 1), 0.0)
    return normed.clamp_(0, 1), flat


def resolve_targets(labels: list[str], logits: torch.Tensor, spec) -> torch.Tensor:
    """Turn the user's target (None, index, label, or one per sample) into N class indices."""
    return resolve_class_indices(labels, logits, spec)


def _target_index(labels: list[str], spec) -> int:
    return class_index(labels, spec)


def _prepare_inputs(bundle: ModelBundle, source) -> tuple[bool, list[Image.Image], torch.Tensor]:
    """(batched, input views, input tensor on the model's device)."""
    if isinstance(source, torch.Tensor):
        batched = source.dim() == 4
        tensor = source if batched else source.unsqueeze(0)
        c = bundle.channels
        if tensor.dim() != 4 or tensor.shape[1] != c:
            raise InputError(f"an input tensor must be {c}×H×W or N×{c}×H×W for this model "
                             f"(got {tuple(source.shape)})")
        tensor = tensor.to(bundle.device, torch.float32)
        views = _tensor_views(bundle, tensor)
        return batched, views, tensor
    batched = isinstance(source, (list, tuple))
    items = list(source) if batched else [source]
    if not items:
        raise InputError("the batch is empty")
    tensor, views = bundle.prepare([load_image(item) for item in items])
    return batched, views, tensor


def _tensor_views(bundle: ModelBundle, tensor: torch.Tensor) -> list[Image.Image]:
    """RGB input views of an N×C×H×W batch, computed for the whole batch at once (per-image tensor
    ops cost milliseconds each on a busy CPU): the inverse normalisation, or a per-image min-max;
    a grey input is shown grey, a 4th channel is not shown."""
    tensor = tensor.detach()
    c = tensor.shape[1]
    if isinstance(bundle.preprocess, Preprocess):
        mean = torch.tensor(bundle.preprocess.mean, device=tensor.device).view(1, c, 1, 1)
        std = torch.tensor(bundle.preprocess.std, device=tensor.device).view(1, c, 1, 1)
        arr = (tensor * std + mean).clamp_(0, 1).mul_(255).round_().byte()
    else:
        lo = tensor.amin(dim=(1, 2, 3), keepdim=True)
        hi = tensor.amax(dim=(1, 2, 3), keepdim=True)
        arr = ((tensor - lo) / (hi - lo).clamp_min(1e-12)).mul_(255).round_().byte()
    arr = arr[:, :3] if c >= 3 else arr[:, :1].expand(-1, 3, -1, -1)
    return [Image.fromarray(a) for a in arr.permute(0, 2, 3, 1).cpu().numpy()]
