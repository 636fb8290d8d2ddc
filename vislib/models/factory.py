"""Your own network: a ``package.module:callable`` factory, or an ``nn.Module`` object.

A factory name imports the module and calls the callable (with the spec file's ``kwargs``) under a
fixed seed; it must return an ``nn.Module``. Importing and calling it runs the operator's own code:
factory names come from the command line, the Python API and spec files, which are trusted
configuration, never from a browser.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

from torch import nn

from ..errors import ModelError
from .registry import ModelSpec, _seeded, source_spec
from .source import FACTORY_PATTERN, SourceModel
from .weights import load_weights


def resolve_callable(target: str, search_path: str | Path | None = None, what: str = "factory") -> Callable:
    """The callable named ``package.module:attr[.attr]``. A module that sits next to a spec file
    (``search_path``) is imported from there."""
    if not FACTORY_PATTERN.match(target):
        raise ModelError(f"{what} {target!r} is not of the form package.module:callable")
    module_name, attr = target.split(":")
    with _search_path(search_path, module_name.split(".")[0]):
        try:
            obj = importlib.import_module(module_name)
        except Exception as exc:
            raise ModelError(f"{what} {target!r}: cannot import {module_name} "
                             f"({type(exc).__name__}: {exc})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ModelError(f"{what} {target!r}: {module_name} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ModelError(f"{what} {target!r} is not callable")
    return obj


@contextlib.contextmanager
def _search_path(folder: str | Path | None, top: str):
    """Put ``folder`` first on ``sys.path`` while importing, if it holds the top-level module."""
    folder = Path(folder) if folder else None
    if folder is None or not ((folder / f"{top}.py").is_file() or (folder / top).is_dir()):
        yield
        return
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))


def factory_source(target: str, weights, kwargs: dict, search_path: str | Path | None = None) -> SourceModel:
    """Build ``target``'s model. ``weights``: "default" or None keep what the factory built (under a
    fixed seed); a path loads a state dict (a factory that takes ``num_classes`` is called again with
    the file's number of classes when only the head differs)."""
    factory = resolve_callable(target, search_path)

    def build(num_classes: int | None = None) -> nn.Module:
        extra = {"num_classes": num_classes} if num_classes else {}
        try:
            model = _seeded(lambda: factory(**{**kwargs, **extra}))
        except Exception as exc:
            raise ModelError(f"factory {target!r} failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"factory {target!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    model = build()
    notes, weights_id = [], "as built by the factory (seeded)"
    if weights not in ("default", None):
        model, note = load_weights(model, weights, build if _takes(factory, "num_classes") else None)
        notes += [note] if note else []
        weights_id = str(weights)
    src = module_source(model, "default")
    src.weights, src.source, src.notes = weights_id, "factory", notes + src.notes
    src.description = f"factory {target}"
    return src


def _takes(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def factory_spec(name: str) -> ModelSpec:
    return source_spec(name, "factory", f"factory {name}",
                       lambda weights, kwargs: factory_source(name, weights, kwargs))


def module_source(model: nn.Module, weights, *, processor: object = None) -> SourceModel:
    """A user's ``nn.Module`` as given (``weights``: "default" or None keep it; a path loads a
    state dict into it). A Hugging Face model object brings its labels (``config.id2label``) and
    input channels; ``processor`` (a Hugging Face image processor) its preprocessing."""
    weights_id = "as given"
    if weights not in ("default", None):
        model, _ = load_weights(model, weights)
        weights_id = str(weights)
    labels, labels_from, channels, pre, notes = None, "class indices", None, None, []
    config = getattr(model, "config", None)
    if config is not None and getattr(model, "main_input_name", None) == "pixel_values":
        from .huggingface import config_labels, preprocess_from_processor

        labels, labels_from = config_labels(config)
        channels = getattr(config, "num_channels", None)
        if processor is not None:
            pre, note = preprocess_from_processor(processor, channels or 3)
            notes += [note] if note else []
    elif processor is not None:
        raise ModelError("processor= is for Hugging Face models; give preprocess= for other models")
    from .zeroshot import ZeroShot, output_kind

    scores = None
    if isinstance(model, ZeroShot):  # its labels are its prompts; SigLIP's are sigmoid scores
        labels, labels_from, scores = model.prompts, "prompts", output_kind(model)
        inner = getattr(model.model, "config", None)
        channels = getattr(getattr(inner, "vision_config", None), "num_channels", None)
    return SourceModel(model=model, preprocess=pre, labels=labels, labels_from=labels_from,
                       weights=weights_id, source="module", channels=channels, notes=notes, scores=scores)
