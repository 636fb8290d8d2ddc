"""Pure helpers for the dashboard: no Streamlit in here, so all of it can be tested and timed alone.

The pages (``app.py``, ``pages/*``) are thin: widgets in, one call into this module, render out.
This module owns

* the method catalogue as the UI shows it (grouped by family, default view, which methods depend
  on the target layer),
* the page state that lives in the URL (parse and serialise ``st.query_params``),
* cache keys (SHA-256 of the image bytes plus every parameter),
* the computation of a whole view (several layers, errors isolated per family and per method) and a
  background job that reports progress and can be cancelled,
* rendering: overlays, signed-RGB views of input-space signals, colour bars, the top-k bar chart,
  feature-map and filter grids, PNG/NPZ downloads.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import render
from .errors import Cancelled, VislibError
from .explain import Explanation, explain
from .methods import METHODS
from .methods.base import FAMILY_TITLES
from .methods.registry import FAMILY_ORDER

# --------------------------------------------------------------------------------------------------
# Method catalogue

#: The default view: the six gradient CAMs, guided backprop and Deconvnet (those that are registered).
DEFAULT_METHODS = ("cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam",
                   "guided_backprop", "deconvnet")
SCORES = ("logit", "probability")
SIGNAL_VIEWS = ("signed RGB", "magnitude", "heatmap")


def methods_by_family(methods: Mapping[str, type] | None = None) -> dict[str, list[str]]:
    """Registered method names grouped by family, families in the order ``explain`` runs them."""
    methods = METHODS if methods is None else methods
    groups: dict[str, list[str]] = {}
    families = list(FAMILY_ORDER) + sorted({c.family for c in methods.values()} - set(FAMILY_ORDER))
    for family in families:
        names = [n for n, c in methods.items() if c.family == family]
        if names:
            groups[family] = names
    return groups


def family_title(family: str) -> str:
    return FAMILY_TITLES.get(family, family.title())


def method_title(name: str) -> str:
    cls = METHODS.get(name)
    return getattr(cls, "title", name) if cls is not None else name


def method_summary(name: str) -> str:
    """The first paragraph of the method's docstring (it carries the formula), on one line."""
    doc = (METHODS[name].__doc__ or "").strip()
    return " ".join(doc.split("\n\n")[0].split())


def default_methods(available: Iterable[str] | None = None) -> list[str]:
    available = list(METHODS if available is None else available)
    return [m for m in DEFAULT_METHODS if m in available]


#: Panel order: maps over the image first (CAM family, perturbation), then input-space signals.
DISPLAY_FAMILY_ORDER = ("cam", "perturbation", "backprop")


def display_order(methods: Sequence[str]) -> list[str]:
    """``methods`` with heatmap families first and input-space signals last (stable within a family)."""
    order = list(DISPLAY_FAMILY_ORDER)

    def rank(name: str) -> int:
        family = METHODS[name].family if name in METHODS else ""
        return order.index(family) if family in order else len(order)

    return sorted(methods, key=rank)


def uses_layer(name: str) -> bool:
    """Whether the method's result depends on the target layer (``Method.uses_layer``)."""
    return METHODS[name].uses_layer


def is_slow(name: str) -> bool:
    """Whether the method needs many forward passes (``Method.slow``)."""
    return METHODS[name].slow


#: Methods that need many forward passes: the UI marks them as slow.
SLOW_METHODS = frozenset(name for name in METHODS if is_slow(name))


# --------------------------------------------------------------------------------------------------
# Layers


#: How the layer picker names a layer's layout when it is not a plain feature map.
LAYOUT_WORDS = {"tokens": "tokens", "nhwc": "channels-last"}


def layer_label(name: str, shape: Sequence[int], view=None) -> str:
    """``layer4 · 512×7×7``; with the layer's :class:`~vislib.layers.LayerView`, its layout too:
    ``blocks.11.norm1 · 192×14×14 (tokens)`` — the map as the methods see it."""
    text = f"{name} · {'×'.join(str(s) for s in shape)}"
    word = LAYOUT_WORDS.get(getattr(view, "layout", "nchw"))
    return f"{text} ({word})" if word else text


def bundle_layer_label(bundle, name: str) -> str:
    """:func:`layer_label` of one of ``bundle``'s layers (its grid and layout as the methods see it)."""
    return layer_label(name, bundle.layers[name], bundle.view(name))


_SKIP_IN_WALK = ("BatchNorm", "Dropout", "Identity")


def forward_order(names: Sequence[str]) -> list[str]:
    """Module names (definition order) rearranged so that a container follows its children: the
    order in which their outputs are computed (``layer1.0``, ``layer1.1``, ``layer1``, ``layer2.0``…)."""
    out: list[str] = []
    pending: list[str] = []  # open containers, innermost last
    for name in names:
        while pending and not name.startswith(pending[-1] + "."):
            out.append(pending.pop())
        pending.append(name)
    out.extend(reversed(pending))
    return out


def walk_layers(bundle, *, everything: bool = False) -> list[str]:
    """Target layers in forward order, for walking through the network from input to output.

    By default a readable subset: stages and blocks up to two levels deep, without batch norm or
    dropout, and without the last module of a ``Sequential`` (its output *is* the container's);
    ``everything=True`` gives every candidate layer.
    """
    names = forward_order(list(bundle.layers))
    if everything:
        return names
    modules = dict(bundle.model.named_modules())
    keep = [n for n in names
            if n.count(".") <= 1 and not type(modules[n]).__name__.startswith(_SKIP_IN_WALK)]
    same_as_parent = set()
    for name, module in modules.items():
        if isinstance(module, torch.nn.Sequential) and len(module) and name in keep:
            last = f"{name}.{len(module) - 1}" if name else str(len(module) - 1)
            same_as_parent.add(last)
    keep = [n for n in keep if n not in same_as_parent]
    return keep or names


# --------------------------------------------------------------------------------------------------
# Model catalogue: sources, search, the card


#: The catalogue's groups, in the order the model picker shows them.
CATALOGUE_SOURCES = ("bundled", "spec", "torchvision", "timm", "hf", "upload")
SOURCE_TITLES = {
    "bundled": "Bundled", "spec": "Spec files", "torchvision": "torchvision", "timm": "timm",
    "hf": "Hugging Face", "upload": "Your uploads",
}
#: Names of models uploaded in a browser session (they live in that session only: never in a link).
UPLOAD_PREFIX = "upload:"
#: How many matches the model picker lists at once (refine the filter for the others).
SEARCH_LIMIT = 100
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_LISTING_CACHE: dict[str, list[str]] = {}


def model_source(name: str) -> str:
    """The catalogue group of a model name, without building anything: one of
    :data:`CATALOGUE_SOURCES`, ``"factory"`` (``package.module:callable``) or ``"unknown"``."""
    from .models import model_spec

    if name.startswith(UPLOAD_PREFIX):
        return "upload"
    if name.startswith("timm:"):
        return "timm"
    if name.startswith("hf:"):
        return "hf"
    if _FACTORY.match(name):
        return "factory"
    try:
        return model_spec(name).source
    except VislibError:
        return "unknown"


def catalogue(source: str) -> list[str]:
    """The model names of one catalogue group (uploads are the session's own: the page adds them).

    timm's listing (about 1,300 names) is read once per process, and only when that group is opened.
    """
    from .models import list_models

    if source == "upload":
        return []
    if source == "timm":
        if "timm" not in _LISTING_CACHE:
            _LISTING_CACHE["timm"] = list(list_models("timm"))
        return list(_LISTING_CACHE["timm"])
    return list(list_models(source))


def _search_key(name: str) -> str:
    return name.split(":", 1)[1].lower() if name.startswith(("timm:", "hf:", UPLOAD_PREFIX)) else name.lower()


def search_models(names: Sequence[str], query: str, limit: int = SEARCH_LIMIT) -> tuple[list[str], int]:
    """(the best ``limit`` matches, how many match) of ``query`` among ``names``.

    Every word of the query must occur in the name (case-insensitive; the ``timm:`` / ``hf:`` prefix
    is not searched). Order: exact name, then names that start with the query, then names where a
    word starts a part (after ``_ . - /``), then the others; shorter names first within each.
    """
    words = query.lower().split()
    if not words:
        return list(names)[:limit], len(names)
    phrase = " ".join(words)
    ranked = []
    for name in names:
        key = _search_key(name)
        if not all(w in key for w in words):
            continue
        if key == phrase:
            rank = 0
        elif key.startswith(words[0]):
            rank = 1
        elif any(re.search(rf"(^|[_.\-/]){re.escape(w)}", key) for w in words):
            rank = 2
        else:
            rank = 3
        ranked.append((rank, len(key), key, name))
    ranked.sort()
    return [name for *_, name in ranked[:limit]], len(ranked)


def dashboard_refusal(name: str) -> str | None:
    """Why the dashboard will not load ``name`` (a link or a typed name), or None when it may.

    ``package.module:callable`` names import and run code: only the operator's spec files may name
    them; an uploaded model lives in the browser session that uploaded it; anything else must
    resolve to a model (a registered name, ``timm:<name>`` or ``hf:<repo>``).
    """
    from .models import model_spec

    source = model_source(name)
    if source == "upload":
        return (f"{name!r} is a model uploaded in another browser session: an uploaded model lives only in "
                f"the session that uploaded it and cannot be in a link; upload it again (Model → Upload a "
                f"model)")
    if source == "factory":
        return (f"{name!r} names Python code (package.module:callable): the dashboard runs only the code "
                f"that the operator's spec files name (scripts/dashboard.sh --models FILE)")
    if source == "hf":
        from .models.huggingface import local_folder

        if local_folder(name):
            return (f"{name!r} is not a Hugging Face hub repo id (namespace/name): the dashboard reads model "
                    f"folders on the server only through the operator's spec files "
                    f"(scripts/dashboard.sh --models FILE)")
    try:
        model_spec(name)
    except VislibError as exc:
        return str(exc)
    return None


def weights_choices(source: str) -> dict[str, str]:
    """The weights radio of a catalogue group: choice → label ("pretrained" is the source's own)."""
    trained = {"bundled": "Trained (bundled)", "spec": "The spec file's", "upload": "Your file"}
    return {"pretrained": trained.get(source, "Pretrained"), "random": "Random init"}


_CHANNEL_WORDS = {1: "greyscale", 3: "RGB", 4: "RGBA"}


def weights_text(weights: str) -> str:
    return "random initialisation (seeded: the same in every session)" if weights == "random" else weights


def model_card(bundle, *, source: str | None = None, origin: str | None = None) -> list[tuple[str, str]]:
    """The rows of a model's card in the sidebar: (label, text).

    Source, weights (file, pretrained tag or random), classes and where their labels come from, input
    size and channels, default layer (as the methods see it) and why it was chosen, then the notes.
    """
    source = source or getattr(bundle, "source", None) or "module"
    where = {"bundled": "bundled (assets/models)", "hf": "Hugging Face", "upload": "uploaded in this session"}
    text = where.get(source, source)
    if source == "spec" and origin:
        text = f"spec file {Path(origin).name}"
    architecture = getattr(bundle, "upload_architecture", None)
    if architecture:
        text += f" · architecture {architecture}"
    c, h, w = bundle.input_shape
    labels_from = getattr(bundle, "labels_from", "") or "given"
    reason = getattr(bundle, "default_reason", "") or "given"
    rows = [
        ("Source", text),
        ("Weights", weights_text(bundle.weights)),
        ("Classes", f"{len(bundle.labels)} · labels: {labels_from}"),
        ("Input", f"{c}×{h}×{w} · {_CHANNEL_WORDS.get(c, f'{c} channels')}"),
        ("Default layer", f"{bundle_layer_label(bundle, bundle.default_layer)} · {reason}"),
    ]
    rows += [("Note", note) for note in getattr(bundle, "notes", []) or []]
    return rows


def offline_note(name: str) -> str | None:
    """For a model whose pretrained weights are not on this machine: what to fetch and where it goes
    (torchvision: the file and the torch hub folder; timm and Hugging Face: the repo and the cache
    folder), and that a random initialisation is offered meanwhile. None when they are at hand."""
    from .models import model_spec, pretrained_available

    source = model_source(name)
    if source not in ("torchvision", "timm", "hf"):
        return None
    try:
        if pretrained_available(name):
            return None
        model_spec(name)
    except VislibError as exc:
        return str(exc)
    meanwhile = ("Meanwhile you can explore the randomly initialised network: its maps show the "
                 "architecture's bias, not what it learned.")
    where = _weights_location_text(name, source)
    return f"Pretrained weights for **{name}** are not on this machine. {where} {meanwhile}"


def _weights_location_text(name: str, source: str) -> str:
    """Where the pretrained weights of ``name`` come from and where they go, in one sentence."""
    if source == "torchvision":
        import torchvision

        from .models import pretrained_cache_path

        weights = torchvision.models.get_model_weights(name).DEFAULT
        path = pretrained_cache_path(weights)
        return (f"To use them, download [{path.name}]({weights.url}) into `{path.parent}` (or start the app "
                f"once with internet access).")
    try:
        from .models import cache
    except ImportError:  # an older models package without the shared cache helpers
        return "Start the app once with internet access to download them."
    if source == "hf":
        repo = name[3:]
        folder = cache.hf_cache_dir() / ("models--" + repo.replace("/", "--"))
        return (f"To use them, run once with internet access: the Hugging Face repo `{repo}` goes into "
                f"`{folder}`.")
    try:
        from .models.timm_zoo import _weights_location

        location = _weights_location(name[5:])
    except Exception:  # noqa: BLE001  (no pretrained weights at all: the loader says so)
        return "timm has no pretrained weights for it."
    if location[0] == "hf":
        folder = cache.hf_cache_dir() / ("models--" + location[1].replace("/", "--"))
        return (f"To use them, run once with internet access: the Hugging Face repo `{location[1]}` "
                f"({' or '.join(location[2])}) goes into `{folder}`.")
    path = cache.torch_checkpoint_path(location[1])
    return f"To use them, download [{path.name}]({location[1]}) into `{path.parent}`."


# --------------------------------------------------------------------------------------------------
# Which methods apply to a model and layer


#: ReLU-family activations the backprop rules act on; other activations keep their gradient.
_ACTIVATION_NAMES = ("GELU", "SiLU", "Hardswish", "ReLU6", "Mish", "ELU", "LeakyReLU", "Tanh", "Sigmoid",
                     "Hardsigmoid", "Softplus", "QuickGELU", "GELUTanh", "Swish")


@dataclass(frozen=True)
class ModelFacts:
    """What decides which methods apply (computed once per bundle and layer)."""

    relus: int  # ReLUs the backprop family's rules reach (modules, or functional calls on one probe)
    activations: tuple[str, ...]  # other activation types in the network, for the reasons
    cam: str | None  # why CAM cannot run at this layer, or None


class _ReluCounter(torch.overrides.TorchFunctionMode):
    """Counts the ReLU calls (modules and functions) of this thread's forward passes in the block: the
    calls the backprop family's ReLU rules reach."""

    FUNCS = frozenset({torch.nn.functional.relu, torch.relu, torch.relu_, torch.Tensor.relu,
                       torch.Tensor.relu_})

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.FUNCS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _probe_input(bundle) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, *bundle.input_shape, generator=generator).to(bundle.device)


def model_facts(bundle, layer: str) -> ModelFacts:
    """:class:`ModelFacts` of ``bundle`` at ``layer``: from the structure, plus at most one probe
    forward (hooks on this thread only, removed in ``finally``) when the structure cannot tell: a
    model without ``nn.ReLU`` modules (are there functional ReLUs?), a layer that may sit under a
    GAP + linear head (does the head reproduce the logits?)."""
    from .hooks import capture_layer
    from .methods.cam import gap_linear_head

    modules = list(bundle.model.modules())
    relus = sum(isinstance(m, torch.nn.ReLU) for m in modules)
    activations = tuple(sorted({type(m).__name__ for m in modules
                                if type(m).__name__ in _ACTIVATION_NAMES}))
    cam = None
    need_head = cam_head_possible(bundle, layer)
    if not need_head:
        c = bundle.layers[layer][0]
        cam = (f"CAM needs a global-average-pool + linear head on this layer: no linear layer maps its {c} "
               f"channels to the {len(bundle.labels)} classes. Grad-CAM generalises CAM to any head")
    if need_head or not relus:
        from contextlib import nullcontext

        module = bundle.model.get_submodule(layer)
        counting = _ReluCounter() if not relus else nullcontext()
        with torch.no_grad(), capture_layer(module, view=bundle.view(layer)) as captured, counting:
            logits = bundle.logits(_probe_input(bundle))
        relus = relus or counting.count
        if need_head:
            try:
                gap_linear_head(bundle.model, captured.activation, logits, layer)
            except VislibError as exc:
                cam = f"{exc}"
    return ModelFacts(relus=relus, activations=activations, cam=cam)


def _builtin_reason(cls, bundle, layer: str, facts: ModelFacts) -> str | None:
    if cls.name == "cam":
        return facts.cam
    rule = getattr(cls, "rule", "gradient")
    if rule != "gradient" and not facts.relus:
        uses = f" (it uses {', '.join(facts.activations)})" if facts.activations else ""
        return (f"{cls.title} changes the backward pass at ReLUs only, and this network has none{uses}: "
                f"it would show the plain gradient. Use Gradient (saliency)")
    return None


def method_availability(bundle, layer: str) -> dict[str, str | None]:
    """Every registered method → why it cannot run on ``bundle`` at ``layer`` (one line for the UI), or
    None when it can.

    Built-in rules: CAM needs a GAP + linear head that reproduces the logits at this layer; Deconvnet,
    guided backprop and guided Grad-CAM need ReLUs. A method class may add its own with a classmethod
    ``unavailable(bundle, layer) -> str | None`` (see :class:`vislib.methods.base.Method`). Cached on
    the bundle per layer, so it costs one probe forward at most per model and layer.
    """
    cache = bundle.__dict__.setdefault("_ui_availability", {})
    if layer in cache:
        return dict(cache[layer])
    facts = model_facts(bundle, layer)
    found: dict[str, str | None] = {}
    for name, cls in METHODS.items():
        reason = _builtin_reason(cls, bundle, layer, facts)
        if reason is None and hasattr(cls, "unavailable"):
            try:
                reason = cls.unavailable(bundle, layer)
            except VislibError as exc:
                reason = str(exc)
        found[name] = reason
    cache[layer] = found
    return dict(found)


# --------------------------------------------------------------------------------------------------
# Page state in the URL


@dataclass
class ViewState:
    """What a link must reproduce: model, weights, layer(s), class, methods, score, sample."""

    model: str | None = None
    weights: str | None = None  # "pretrained" | "random"
    layer: str | None = None
    layers: list[str] = field(default_factory=list)  # extra rows
    target: int | None = None
    methods: list[str] | None = None
    score: str | None = None
    sample: str | None = None


def _one(value) -> str | None:
    if isinstance(value, (list, tuple)):
        value = value[-1] if value else None
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _split(value) -> list[str]:
    text = _one(value)
    return [v.strip() for v in text.split(",") if v.strip()] if text else []


def parse_query(
    params: Mapping, *, models: Sequence[str] = (), methods: Sequence[str],
    check_model: Callable[[str], str | None] | None = None,
) -> tuple[ViewState, list[str]]:
    """Parse ``st.query_params`` into a :class:`ViewState`; unknown values are dropped with a note.

    A model is accepted when it is in ``models``, or, with ``check_model(name)`` (which returns why a
    name is refused, e.g. :func:`dashboard_refusal`), when that gives no reason. Layers are checked
    later against the loaded model.
    """
    notes: list[str] = []
    state = ViewState()
    model = _one(params.get("model"))
    if model is not None:
        refusal = None if model in models else (
            check_model(model) if check_model is not None else f"unknown model {model!r}")
        if refusal is None:
            state.model = model
        else:
            notes.append(f"The link's model cannot be shown: {refusal}. Showing the default model instead.")
    weights = _one(params.get("weights"))
    if weights in ("pretrained", "random"):
        state.weights = weights
    state.layer = _one(params.get("layer"))
    state.layers = _split(params.get("layers"))
    target = _one(params.get("class"))
    if target is not None:
        if target.isdigit():
            state.target = int(target)
        else:
            notes.append(f"class {target!r} in the link is not a class index; explaining the top class")
    if params.get("methods") is not None:
        wanted = _split(params.get("methods"))
        unknown = [m for m in wanted if m not in methods]
        if unknown:
            notes.append(f"unknown method(s) in the link: {', '.join(unknown)}")
        state.methods = [m for m in wanted if m in methods]
    score = _one(params.get("score"))
    if score in SCORES:
        state.score = score
    state.sample = _one(params.get("sample"))
    return state, notes


def to_query(state: ViewState) -> dict[str, str]:
    """The URL parameters for ``state`` (empty values left out)."""
    out = {
        "model": state.model,
        "weights": state.weights,
        "layer": state.layer,
        "layers": ",".join(state.layers) if state.layers else None,
        "class": str(state.target) if state.target is not None else None,
        "methods": ",".join(state.methods) if state.methods is not None else None,
        "score": state.score,
        "sample": state.sample,
    }
    return {k: v for k, v in out.items() if v is not None}


# --------------------------------------------------------------------------------------------------
# Cache keys


def image_digest(data: bytes) -> str:
    """SHA-256 of the image file's bytes (the identity of an upload)."""
    return hashlib.sha256(data).hexdigest()


def result_key(digest: str, **params) -> str:
    """SHA-256 over the image digest and every parameter that changes the result."""
    payload = json.dumps({"image": digest, **params}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


# --------------------------------------------------------------------------------------------------
# Computing a view


@dataclass
class LayerRow:
    """One row of the results grid: the methods computed at one target layer."""

    layer: str
    methods: list[str]
    explanation: Explanation | None = None
    errors: dict[str, str] = field(default_factory=dict)  # method -> message
    explanations: dict[str, Explanation] = field(default_factory=dict)  # method -> its explanation

    def has(self, method: str) -> bool:
        return method in self.explanations


@dataclass
class ViewResult:
    """Everything the Explain page shows, picklable (it goes through ``st.cache_data``)."""

    rows: list[LayerRow]
    probs: np.ndarray | None
    target: int | None
    labels: list[str]
    input_image: Image.Image | None
    model: str
    weights: str
    score: str
    seconds: float
    pass_timings: dict[str, float] = field(default_factory=dict)
    reused: list[str] = field(default_factory=list)  # methods whose results came from the pass cache

    def top_k(self, k: int = 5) -> list[tuple[int, str, float]]:
        if self.probs is None:
            return []
        order = np.argsort(-self.probs)[:k]
        return [(int(i), self.labels[i], float(self.probs[i])) for i in order]

    @property
    def errors(self) -> list[tuple[str, str, str]]:
        """(layer, method, message) for every method that failed."""
        return [(row.layer, m, msg) for row in self.rows for m, msg in row.errors.items()]


def plan_rows(methods: Sequence[str], layer: str, extra_layers: Sequence[str]) -> list[tuple[str, list[str]]]:
    """The first row holds every method; extra layer rows only the methods that depend on a layer."""
    rows = [(layer, list(methods))]
    layered = [m for m in methods if uses_layer(m)]
    for extra in extra_layers:
        if extra != layer and layered and extra not in [r[0] for r in rows]:
            rows.append((extra, layered))
    return rows


def cam_head_possible(bundle, layer: str) -> bool:
    """Whether some linear layer maps ``layer``'s channels to the classes (CAM's GAP + linear head).

    A cheap structural check: when it fails, CAM cannot apply and is computed on its own, so that
    its error does not make the other methods' shared passes run again.
    """
    channels = bundle.layers[layer][0]
    return any(isinstance(m, torch.nn.Linear) and m.in_features == channels
               and m.out_features == len(bundle.labels) for m in bundle.model.modules())


def split_doomed(bundle, methods: Sequence[str], layer: str) -> list[list[str]]:
    """``methods`` as groups to explain together: CAM alone when its head cannot be there."""
    if "cam" in methods and len(methods) > 1 and not cam_head_possible(bundle, layer):
        return [[m for m in methods if m != "cam"], ["cam"]]
    return [list(methods)]


def _error_text(exc: Exception) -> str:
    if isinstance(exc, VislibError):
        return str(exc)
    return f"unexpected error ({type(exc).__name__}: {exc})"


def _explain_isolated(
    bundle, image, methods, layer, *, explain_kw,
) -> tuple[dict[str, Explanation], dict[str, str]]:
    """Explain ``methods``; when that fails, retry per family, then per method, to isolate the failure.

    A :class:`Cancelled` is never swallowed; any other failure (a method that does not fit the model
    or layer, or a bug) only marks its own panel. Returns (method → explanation, method → message).
    """
    try:
        result = explain(bundle, image, methods, layer=layer, **explain_kw)
        return {m: result for m in methods}, {}
    except Cancelled:
        raise
    except Exception as exc:
        if len(methods) == 1:
            return {}, {methods[0]: _error_text(exc)}
    found: dict[str, Explanation] = {}
    errors: dict[str, str] = {}
    groups = methods_by_family({m: METHODS[m] for m in methods})
    for names in groups.values():
        if len(groups) == 1:  # the whole request was this family: go straight to single methods
            break
        try:
            result = explain(bundle, image, names, layer=layer, **explain_kw)
            found.update({m: result for m in names})
        except Cancelled:
            raise
        except Exception:
            pass
    for name in methods:
        if name in found:
            continue
        try:
            found[name] = explain(bundle, image, [name], layer=layer, **explain_kw)
        except Cancelled:
            raise
        except Exception as exc:
            errors[name] = _error_text(exc)
    return found, errors


def compute_view(
    bundle,
    image,
    methods: Sequence[str],
    *,
    layer: str | None = None,
    extra_layers: Sequence[str] = (),
    target=None,
    score: str = "logit",
    options: dict | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    cancel: threading.Event | None = None,
    image_name: str | None = None,
    cache=None,
) -> ViewResult:
    """Compute every panel of the Explain page.

    ``image``: anything :func:`vislib.load_image` takes. Input, layer and target errors raise a
    :class:`VislibError` (the whole view is unusable); a method that does not fit the model or layer
    only marks its own panel. ``progress(done, total, text)`` is called from this thread. ``cache``:
    a :class:`vislib.PassCache`, so that a view that differs only in its methods reuses the passes
    and results already computed.
    """
    from .imageio import load_image

    start = time.perf_counter()
    image = load_image(image, name=image_name) if not isinstance(image, Image.Image) else image
    layer = layer or bundle.default_layer
    if layer not in bundle.layers:
        from .hooks import resolve_layer

        resolve_layer(bundle, layer)  # raises a LayerError with a hint
    bad = [x for x in extra_layers if x not in bundle.layers]
    if bad:
        from .hooks import resolve_layer

        resolve_layer(bundle, bad[0])
    plan = plan_rows(methods, layer, extra_layers)
    rows: list[LayerRow] = []
    first: Explanation | None = None
    for index, (row_layer, row_methods) in enumerate(plan):
        label = f"{row_layer} ({index + 1}/{len(plan)})" if len(plan) > 1 else row_layer

        def report(done: int, total: int, _label=label) -> None:
            if progress is not None:
                progress(done, total, _label)

        def waiting() -> None:
            if progress is not None:
                progress(0, 0, "waiting for a free GPU slot (other explanations are running)")

        explain_kw = dict(target=target, score=score, options=options, progress=report, cancel=cancel,
                          on_wait=waiting, cache=cache)
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled by the caller")
        found, errors = {}, {}
        for group in split_doomed(bundle, row_methods, row_layer):
            got, failed = _explain_isolated(bundle, image, group, row_layer, explain_kw=explain_kw)
            found.update(got)
            errors.update(failed)
        row = LayerRow(row_layer, list(row_methods), errors=errors, explanations=found)
        row.explanation = next(iter(found.values()), None)
        first = first or row.explanation
        rows.append(row)
    if first is None:  # every method failed: still show the prediction
        with bundle.lock, torch.no_grad():
            tensor, views = bundle.prepare([image])
            logits = bundle.logits(tensor)
        probs = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
        from .explain import resolve_targets

        tgt = int(resolve_targets(bundle.labels, logits, target)[0])
        view = views[0]
    else:
        probs, tgt, view = first.probs, int(first.target), first.input_image
    timings: dict[str, float] = {}
    for row in rows:
        for expl in {id(e): e for e in row.explanations.values()}.values():
            for k, v in expl.pass_timings.items():
                timings[k] = timings.get(k, 0.0) + v
    return ViewResult(
        rows=rows, probs=probs, target=tgt, labels=list(bundle.labels), input_image=view,
        model=bundle.name, weights=bundle.weights, score=score, seconds=time.perf_counter() - start,
        pass_timings=timings,
        reused=sorted({m for row in rows for e in row.explanations.values() for m in e.reused
                       if m in row.methods}),
    )


class BackgroundJob:
    """Run ``fn(progress, cancel)`` in a worker thread, so the page can poll, draw and cancel.

    ``progress(done, total, text)`` updates :attr:`fraction` and :attr:`text`; :meth:`cancel` sets
    the event that vislib checks between passes (it raises :class:`Cancelled` there, leaving the
    model clean); :meth:`result` re-raises the worker's exception.
    """

    def __init__(self, fn: Callable[[Callable, threading.Event], object]):
        self._fn = fn
        self.cancel_event = threading.Event()
        self._finished = threading.Event()
        self._result = None
        self._error: BaseException | None = None
        self.fraction = 0.0
        self.text = ""
        self.started = 0.0
        self._thread = threading.Thread(target=self._run, name="vislib-job", daemon=True)

    def start(self) -> BackgroundJob:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def _progress(self, done: int, total: int, text: str = "") -> None:
        self.fraction = min(1.0, max(0.0, done / total)) if total else 0.0
        if not total:  # a status message (e.g. waiting for the GPU), not a count
            self.text = text
        else:
            self.text = f"{text}: {done}/{total}" if text else f"{done}/{total}"

    def _run(self) -> None:
        try:
            self._result = self._fn(self._progress, self.cancel_event)
        except BaseException as exc:  # handed to the caller in result()
            self._error = exc
        finally:
            self._finished.set()

    @property
    def done(self) -> bool:
        return self._finished.is_set()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def cancel(self, join_timeout: float | None = 60.0) -> bool:
        """Ask the worker to stop and wait for it; True when it has finished."""
        self.cancel_event.set()
        self._thread.join(join_timeout)
        return self.done

    def result(self):
        if not self.done:
            raise RuntimeError("the job has not finished")
        if self._error is not None:
            raise self._error
        return self._result


# --------------------------------------------------------------------------------------------------
# Rendering


def is_signal(raw: np.ndarray) -> bool:
    """An input-space signal (3×H×W, e.g. guided backprop) rather than a map (h×w)."""
    return raw.ndim == 3 and raw.shape[0] == 3


def panel_image(
    row: LayerRow, method: str, *, alpha: float = 0.5, colormap: str = "jet", signal_view: str = "signed RGB",
) -> Image.Image:
    """The picture of one panel: an overlay for maps, the signal itself (or its heatmap) for signals."""
    expl = row.explanations[method]
    raw = expl.raw[method]
    if is_signal(raw) and signal_view == "signed RGB":
        return render.signed_rgb(raw)
    if is_signal(raw) and signal_view == "magnitude":
        return render.magnitude_gray(raw).convert("RGB")
    return render.overlay(expl.input_image, expl.maps[method], alpha=alpha, colormap=colormap)


@dataclass
class Panel:
    layer: str
    method: str
    title: str
    seconds: float | None = None
    flat: bool = False
    error: str | None = None
    signal: bool = False

    @property
    def caption(self) -> str:
        if self.error:
            return self.title
        text = f"{self.title} · {format_seconds(self.seconds or 0.0)}"
        return text + " · flat map" if self.flat else text


def panels(result: ViewResult) -> list[list[Panel]]:
    """The grid as rows (one per layer) of panels (one per method), errors included."""
    grid = []
    for row in result.rows:
        line = []
        for method in row.methods:
            title = method_title(method)
            if method in row.errors:
                line.append(Panel(row.layer, method, title, error=row.errors[method]))
                continue
            expl = row.explanations[method]
            line.append(Panel(
                row.layer, method, title, seconds=expl.timings[method],
                flat=bool(np.any(expl.flat[method])), signal=is_signal(expl.raw[method]),
            ))
        grid.append(line)
    return grid


def format_seconds(seconds: float) -> str:
    if seconds < 1.0:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.0095 else f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def colorbar(colormap: str = "jet", width: int = 256, height: int = 14) -> Image.Image:
    """A horizontal colour bar for the shared [0, 1] scale."""
    ramp = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))
    return render.heatmap(ramp, colormap)


def render_all(
    result: ViewResult, *, alpha: float, colormap: str, signal_view: str,
) -> dict[tuple[str, str], Image.Image]:
    """Every panel image of a view (what a re-render after an opacity/colormap change costs)."""
    out = {}
    for row in result.rows:
        for method in row.explanations:
            out[(row.layer, method)] = panel_image(row, method, alpha=alpha, colormap=colormap,
                                                   signal_view=signal_view)
    return out


def topk_figure(top: Sequence[tuple[int, str, float]], target: int | None):
    """Horizontal bars of the top-k class probabilities, the explained class highlighted.

    Each bar carries its class index in ``customdata`` so a click can be turned back into a class.
    """
    import plotly.graph_objects as go

    top = list(top)[::-1]  # plotly draws the first bar at the bottom
    labels = [f"{label} " for _, label, _ in top]
    colours = ["#e4572e" if idx == target else "#7a9cc6" for idx, _, _ in top]
    top_p = max((p for _, _, p in top), default=1.0)
    span = min(1.0, 1.25 * top_p) or 1.0
    hover = "%{y}: %{customdata[1]:.2%}<br>class %{customdata[0]}<extra>click to explain</extra>"
    customdata = [[idx, p] for idx, _, p in top]
    # A faint full-width track behind every bar: a confident model leaves the other bars a few pixels
    # (or zero) wide, and the track keeps each class clickable.
    track = go.Bar(x=[span] * len(top), y=labels, orientation="h", customdata=customdata,
                   marker_color="rgba(122, 156, 198, 0.10)", hovertemplate=hover, showlegend=False)
    bars = go.Bar(
        x=[p for _, _, p in top], y=labels, orientation="h", marker_color=colours, customdata=customdata,
        text=[f"{p:.1%}" for _, _, p in top], textposition="outside", cliponaxis=False,
        hovertemplate=hover, showlegend=False,
    )
    fig = go.Figure([track, bars])
    tickformat = ".0%" if span >= 0.05 else ".1%" if span >= 0.005 else ".2%"
    fig.update_layout(
        height=60 + 34 * max(1, len(top)), margin=dict(l=8, r=48, t=8, b=8), showlegend=False,
        xaxis=dict(range=[0, span], tickformat=tickformat, title=None, fixedrange=True),
        yaxis=dict(fixedrange=True, automargin=True), clickmode="event+select", dragmode=False,
        bargap=0.25, barmode="overlay",
    )
    return fig


def class_from_selection(selection, classes: Sequence[int] | None = None) -> int | None:
    """The class index of the first selected bar of :func:`topk_figure` (``None`` if none)."""
    if selection is None:
        return None
    sel = selection.get("selection", selection) if isinstance(selection, Mapping) else selection
    points = sel.get("points", []) if isinstance(sel, Mapping) else getattr(sel, "points", [])
    for point in points or []:
        data = point.get("customdata")
        if isinstance(data, (list, tuple)):
            data = data[0] if data else None
        if data is not None:
            return int(data)
        index = point.get("point_index", point.get("point_number"))
        if index is not None and classes is not None:
            ordered = list(classes)[::-1]  # the figure's bar order
            if 0 <= int(index) < len(ordered):
                return int(ordered[int(index)])
    return None


def maps_npz(result: ViewResult) -> bytes:
    """All maps of a view in one ``.npz``: ``<method>@<layer>`` (H×W in [0, 1]), raw outputs as
    ``raw/<method>@<layer>``, the input view, the class probabilities and the target."""
    arrays: dict[str, np.ndarray] = {}
    for row in result.rows:
        for method, expl in row.explanations.items():
            arrays[f"{method}@{row.layer}"] = expl.maps[method]
            arrays[f"raw/{method}@{row.layer}"] = expl.raw[method]
    if result.input_image is not None:
        arrays["input"] = np.asarray(result.input_image)
    if result.probs is not None:
        arrays["probs"] = result.probs
    arrays["target"] = np.array(-1 if result.target is None else result.target)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def safe_filename(*parts: str) -> str:
    text = "_".join(parts)
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "file"


# --------------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------------
# Samples


def sample_choices() -> dict[str, Path | None]:
    """Sample name → file; when no sample ships yet, one generated picture (``None``)."""
    from .models import sample_images

    files = {p.stem: p for p in sample_images()}
    return files or {"generated shapes": None}


def generated_sample(size: int = 256) -> bytes:
    """A small synthetic picture (a few shapes on a soft background) as PNG bytes."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.stack([0.55 + 0.25 * xx, 0.6 + 0.2 * yy, 0.75 - 0.2 * xx], axis=-1)
    img = Image.fromarray((base * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    s = size
    draw.ellipse((0.12 * s, 0.18 * s, 0.45 * s, 0.51 * s), fill=(214, 60, 45))
    draw.rectangle((0.58 * s, 0.55 * s, 0.86 * s, 0.83 * s), fill=(40, 90, 170))
    draw.polygon([(0.62 * s, 0.12 * s), (0.88 * s, 0.42 * s), (0.52 * s, 0.42 * s)], fill=(245, 200, 40))
    return render.to_png_bytes(img)
