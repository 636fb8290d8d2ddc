"""The catalogues as the dashboard shows them: methods (grouped by family, default view, which
depend on the target layer) and models (sources, search, refusals, weights, the card, the offline note)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from ..errors import VislibError
from ..methods import METHODS
from ..methods.base import FAMILY_TITLES, Method
from ..methods.registry import FAMILY_ORDER
from .layers import bundle_layer_label

# --------------------------------------------------------------------------------------------------
# Method catalogue

#: The default view: the six gradient CAMs, guided backprop and Deconvnet (those that are registered).
DEFAULT_METHODS = ("cam", "gradcam", "gradcam++", "xgradcam", "layercam", "hirescam",
                   "guided_backprop", "deconvnet")
SCORES = ("logit", "probability")
SIGNAL_VIEWS = ("signed RGB", "magnitude", "heatmap")


def methods_by_family(methods: Mapping[str, type[Method]] | None = None) -> dict[str, list[str]]:
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
    from ..models import model_spec

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
    from ..models import list_models

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
    from ..models import model_spec

    source = model_source(name)
    if source == "upload":
        return (f"{name!r} is a model uploaded in another browser session: an uploaded model lives only in "
                f"the session that uploaded it and cannot be in a link; upload it again (Model → Upload a "
                f"model)")
    if source == "factory":
        return (f"{name!r} names Python code (package.module:callable): the dashboard runs only the code "
                f"that the operator's spec files name (scripts/dashboard.sh --models FILE)")
    if source == "hf":
        from ..models.huggingface import local_folder

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


def task_refusal(bundle) -> str | None:
    """Why the dashboard's pages cannot explain ``bundle`` yet (a detector or a segmenter), or None.

    The library and the CLI explain boxes and regions (``vislib.objects``, ``--box`` / ``--region``);
    the pages are built for classifiers' outputs (class charts, one target class).
    """
    task = getattr(bundle, "task", "classification")
    if task == "classification":
        return None
    what = {"detection": "boxes (--box, --detection K)",
            "segmentation": "regions (--region LABEL)"}.get(task, task)
    return (f"{bundle.name} is a {task} model: the dashboard's pages explain classifiers in this release. "
            f"Explain its {what} with the library or the command line, e.g. "
            f"`vislib explain IMAGE --model {bundle.name} --out out/` (see the README, "
            f"'Detectors and segmenters').")


def model_card(bundle, *, source: str | None = None, origin: str | None = None) -> list[tuple[str, str]]:
    """The rows of a model's card in the sidebar: (label, text).

    The description (a spec file's ``description``, the source's own otherwise), source, weights
    (file, pretrained tag or random), classes and where their labels come from, input size and
    channels, default layer (as the methods see it) and why it was chosen, then the notes.
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
    description = " ".join(str(getattr(bundle, "description", "") or "").split())
    rows = [("About", description)] if description else []
    rows += [
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
    from ..models import model_spec, pretrained_available

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

        from ..models import pretrained_cache_path

        weights = torchvision.models.get_model_weights(name).DEFAULT
        path = pretrained_cache_path(weights)
        return (f"To use them, download [{path.name}]({weights.url}) into `{path.parent}` (or start the app "
                f"once with internet access).")
    try:
        from ..models import cache
    except ImportError:  # an older models package without the shared cache helpers
        return "Start the app once with internet access to download them."
    if source == "hf":
        repo = name[3:]
        folder = cache.hf_cache_dir() / ("models--" + repo.replace("/", "--"))
        return (f"To use them, run once with internet access: the Hugging Face repo `{repo}` goes into "
                f"`{folder}`.")
    try:
        from ..models.timm_zoo import _weights_location

        location = _weights_location(name[5:])
    except Exception:  # noqa: BLE001  (no pretrained weights at all: the loader says so)
        return "timm has no pretrained weights for it."
    if location[0] == "hf":
        folder = cache.hf_cache_dir() / ("models--" + location[1].replace("/", "--"))
        return (f"To use them, run once with internet access: the Hugging Face repo `{location[1]}` "
                f"({' or '.join(location[2])}) goes into `{folder}`.")
    path = cache.torch_checkpoint_path(location[1])
    return f"To use them, download [{path.name}]({location[1]}) into `{path.parent}`."
