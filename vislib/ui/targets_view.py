"""What the Explain page explains beyond one softmax class (no Streamlit here): the chart's title for
the model's output kind, typed prompts of a CLIP-like model, every label of a multi-label model above
a threshold (one row each), and "why similar?" for two images (both maps side by side)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..explain import Explanation, explain
from ..imageio import load_image
from ..methods import METHODS
from ..models.embedding import as_embedding
from ..multilabel import DEFAULT_THRESHOLD, explain_labels
from ..targets import Label, Similarity, embed_reference, refusal

MAX_PROMPTS = 32


def chart_title(scores: str, threshold: float | None = None) -> str:
    """What the class chart shows for a model whose output kind is ``scores``."""
    if scores == "probabilities":
        return "The model's output (it returns probabilities: shown as given)"
    if scores == "sigmoid":
        extra = f"; explained from {threshold:.0%}" if threshold is not None else ""
        return f"Each label's sigmoid (independent yes / no{extra})"
    if scores == "regression":
        return "The model's outputs (regression values)"
    return "Class probabilities (softmax of the logits)"


def parse_prompts(text: str) -> list[str]:
    """Prompts typed one per line (or separated by ';'), blank lines dropped, duplicates kept once."""
    parts = [p.strip() for line in (text or "").splitlines() for p in line.split(";")]
    prompts = list(dict.fromkeys(p for p in parts if p))
    return prompts[:MAX_PROMPTS]


@dataclass
class LabelRowsResult:
    """One row per label above the threshold: (index, label, sigmoid, its Explanation)."""

    rows: list[tuple[int, str, float, Explanation]]
    threshold: float
    sigmoid: np.ndarray
    refused: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def label_rows(bundle, image, methods: Sequence[str], layer: str | None = None,
               threshold: float = DEFAULT_THRESHOLD) -> LabelRowsResult:
    """Every label whose sigmoid reaches ``threshold``, explained in one call (one forward)."""
    picture = image if isinstance(image, Image.Image) else load_image(image)
    usable, refused = _usable(methods, Label(0))
    found = explain_labels(bundle, picture, usable, layer, threshold=threshold)
    rows = [(c, found.labels[c], float(found.sigmoid[c]), found.explanations[c]) for c in found.selected]
    return LabelRowsResult(rows, float(threshold), found.sigmoid, refused, list(found.notes))


@dataclass
class SimilarityResult:
    """"Why similar?": the cosine similarity of two images' embeddings and each one's maps for it."""

    similarity: float
    first: Explanation
    second: Explanation
    embedding: str  # which layer, in words
    refused: dict[str, str] = field(default_factory=dict)


def compare_images(bundle, image_a, image_b, methods: Sequence[str], layer: str | None = None
                   ) -> SimilarityResult:
    """Explain cos(f(a), f(b)) on both images (f: the model's penultimate features), each against the
    other; methods that cannot explain a similarity (CAM, LRP, Finer-CAM) are left out with why."""
    a = image_a if isinstance(image_a, Image.Image) else load_image(image_a)
    b = image_b if isinstance(image_b, Image.Image) else load_image(image_b)
    embedded = as_embedding(bundle)
    usable, refused = _usable(methods, Similarity(vector=[0.0]))
    if not usable:
        usable = ["gradcam"]
    first = explain(embedded, a, usable, layer, target=Similarity(b, name="the second image"))
    second = explain(embedded, b, usable, layer, target=Similarity(a, name="the first image"))
    f_a, f_b = embed_reference(embedded, a), embed_reference(embedded, b)
    similarity = float(torch.nn.functional.cosine_similarity(f_a, f_b, dim=0, eps=1e-8))
    return SimilarityResult(similarity, first, second, embedded.description, refused)


def _usable(methods: Sequence[str], target) -> tuple[list[str], dict[str, str]]:
    """The methods that explain ``target`` here, and why each other one is left out (a refusal, or
    many forward passes that these extra views do not repeat)."""
    usable, refused = [], {}
    for name in methods:
        slow = "many forward passes: left out of these extra views" if METHODS[name].slow else None
        why = refusal(METHODS[name], target) or slow
        if why:
            refused[name] = why
        else:
            usable.append(name)
    return usable, refused
