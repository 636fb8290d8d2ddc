"""The page state that lives in the URL (parse and serialise ``st.query_params``) and the cache keys
(SHA-256 of the image bytes plus every parameter)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .catalogues import SCORES

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
