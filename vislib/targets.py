"""What to explain: a *target* maps the model's output to one score per image.

Every method explains a target's score; no method knows what kind of output the model has
(pytorch-grad-cam's ``model_targets``, Gildenblat 2021, extended: a target also says what it offers,
so that a method that needs more -- CAM's head weights, LRP's linear output relevance, Finer-CAM's
class axis -- refuses it with a reason).

- :class:`Class`: class ``c`` of a one-label classifier: the logit ``z_c``, or the softmax ``p_c``
  (``score="probability"``); with ``contrast=B``: ``S_c − S_B``. On a model that returns
  probabilities the "logit" is ``log p_c`` (the logit up to a constant shared by every class).
- :class:`Label`: label ``c`` of a multi-label model: its logit ``z_c``, or ``σ(z_c)``; never a
  softmax over labels (pgc ``BinaryClassifierOutputTarget``).
- :class:`Regression`: ``sign · y_i`` ("what pushes output i up / down"; pgc ``RawScoresOutputTarget``).
- :class:`Similarity`: ``cos(f(x), f(ref))`` on the embedding ``f`` (pgc's ``SimilarityToConceptTarget``).
- :class:`Text`: ``logit_scale · cos(f_img(x), f_txt(prompt))`` of a CLIP-like model (Radford et al. 2021).

A target is *bound* to a batch (:meth:`Target.bind`) against the first forward's output: ``None``
becomes each image's top class, a label its index, an image its embedding. Scores may be asked for rows
that repeat images (noisy copies, path points, perturbed inputs): ``rows`` maps each output row to its
image. The base makes no assumption on the output's structure, so targets on a detector's or a
segmenter's output (a box, a region) join as subclasses.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .errors import TargetError

SCORE_NAMES = ("logit", "probability")
OUTPUT_KINDS = ("logits", "probabilities", "sigmoid", "regression", "embedding")


class Target:
    """Base: ``score(output, rows)`` → one score per row; ``target(output)`` is the same (pgc's shape).

    Class attributes say what a target offers the methods: ``class_axis`` (it scores one entry of an
    output with a class axis, and :meth:`retarget` gives the same score for other classes: Finer-CAM),
    ``linear`` (the score is ``Σ_k e_k z_k`` of the model's output ``z``: :meth:`head_rows` gives
    ``e``, which CAM turns into head weights and LRP uses as output relevance).
    """

    kind: ClassVar[str] = "target"
    class_axis: ClassVar[bool] = False
    linear: ClassVar[bool] = False
    score_name: str = "logit"

    # -- before the forward ------------------------------------------------------------------------

    def prepare(self, bundle) -> tuple[Any, str | None]:
        """The bundle to explain this target on (another view of the same model, e.g. its embedding)
        and a note for the user saying so, or ``(bundle, None)``."""
        return bundle, None

    def bind(self, output, bundle) -> Target:
        """This target resolved for the batch whose (detached) output is ``output``."""
        return self

    # -- the score ---------------------------------------------------------------------------------

    def score(self, output, rows: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, output) -> torch.Tensor:
        return self.score(output)

    def head_rows(self, output: torch.Tensor) -> torch.Tensor:
        """N×K coefficients ``e`` with ``score = Σ_k e_k z_k`` (linear targets only)."""
        raise TargetError(f"{self.describe()} is not a linear function of the model's output")

    def retarget(self, classes: torch.Tensor) -> Target:
        """The same kind of score for other classes (one per image), without a contrast."""
        raise TargetError(f"{self.describe()} has no class axis")

    def with_score(self, score: str) -> Target:
        """This target with another score ("logit" / "probability"), where it has the choice."""
        if score == self.score_name:
            return self
        raise TargetError(f"{self.describe()} has no {score!r} score")

    # -- batches -----------------------------------------------------------------------------------

    def take(self, start: int, stop: int) -> Target:
        """This target for the images [start, stop) of the batch (a batch explained in chunks)."""
        return self

    def per_image_count(self) -> int | None:
        """How many images a per-image target was given for (None: one target for any batch)."""
        return None

    def concat(self, other: Target) -> Target:
        """The bound targets of two parts of a batch as one."""
        return self

    # -- what the result says ------------------------------------------------------------------------

    @property
    def class_index(self) -> torch.Tensor | None:
        """Per-image class (or label) index, once bound; None for targets without a class axis."""
        return None

    @property
    def contrast_index(self) -> torch.Tensor | None:
        return None

    def describe(self, labels: Sequence[str] | None = None, index: int = 0) -> str:
        """A readable description, e.g. "logit of class 'dog'"."""
        return self.kind

    def key(self) -> str:
        """What identifies the bound target's score (cache keys)."""
        return repr(self)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------------------------------
# Helpers


def per_row(values: torch.Tensor, rows: torch.Tensor | None, count: int) -> torch.Tensor:
    """Per-image ``values`` picked for ``count`` output rows: by ``rows`` (row → image) when given,
    broadcast when one value serves every image, as is otherwise."""
    if rows is not None:
        return values[rows.to(values.device)] if values.numel() > 1 else values.expand(len(rows))
    if values.numel() == 1:
        return values.expand(count)
    if values.shape[0] != count:
        raise TargetError(f"{values.shape[0]} targets for {count} output rows")
    return values


def _per_image(value) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() > 0
    return isinstance(value, (list, tuple, np.ndarray))


def _slice(value, start: int, stop: int):
    if not _per_image(value):
        return value
    return value[start:stop] if isinstance(value, torch.Tensor) else list(value[start:stop])


def output_scores(kind: str, output: torch.Tensor) -> torch.Tensor:
    """The model's output as the class chart shows it: a softmax of logits; probabilities as given
    (never a softmax of probabilities); each label's sigmoid; regression values and embeddings as
    they are."""
    out = output.detach().float()
    if kind == "logits":
        return F.softmax(out, dim=1)
    if kind == "sigmoid":
        return torch.sigmoid(out)
    return out.reshape(out.shape[0], -1)


def class_output(output) -> torch.Tensor:
    """The output as an N×K tensor of class scores (targets with a class axis)."""
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise TargetError(f"this target needs an N×classes output, not {shape}")
    return output


def _as_index_tensor(value, device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.long).view(-1)
    return torch.as_tensor(np.asarray(value, dtype=np.int64), device=device).view(-1)


def resolve_class_indices(labels: Sequence[str], output: torch.Tensor, spec) -> torch.Tensor:
    """The user's class (None: each image's top class; an index; a label; one per image) as N indices."""
    output = class_output(output)
    n = output.shape[0]
    if spec is None:
        return output.argmax(dim=1)
    if isinstance(spec, torch.Tensor):
        spec = spec.tolist()
    if isinstance(spec, (list, tuple, np.ndarray)):
        if len(spec) != n:
            raise TargetError(f"{len(spec)} targets given for a batch of {n} images")
        idx = [int(output[i].argmax()) if s is None else class_index(labels, s) for i, s in enumerate(spec)]
    else:
        idx = [class_index(labels, spec)] * n
    return torch.tensor(idx, device=output.device, dtype=torch.long)


def class_index(labels: Sequence[str], spec) -> int:
    """One class given as an index or a label (case-insensitive; close labels are suggested)."""
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        if 0 <= int(spec) < len(labels):
            return int(spec)
        raise TargetError(f"class index {spec} is out of range (0–{len(labels) - 1})")
    if isinstance(spec, str):
        text = spec.strip()
        if text.isdigit():
            return class_index(labels, int(text))
        lowered = [lab.lower() for lab in labels]
        if text.lower() in lowered:
            return lowered.index(text.lower())
        close = difflib.get_close_matches(text.lower(), lowered, n=3)
        hint = f"; did you mean {', '.join(labels[lowered.index(c)] for c in close)}?" if close else ""
        raise TargetError(f"unknown class {spec!r}{hint}")
    raise TargetError(f"a target must be a class index or label, not {type(spec).__name__}")


def _check_score(score: str, allowed=SCORE_NAMES) -> str:
    if score not in allowed:
        raise TargetError(f"score must be one of {allowed}, not {score!r}")
    return score


def _pick(labels, index_tensor, i: int) -> str:
    if index_tensor is None:
        return "?"
    value = int(index_tensor[i] if index_tensor.numel() > 1 else index_tensor[0])
    return repr(labels[value]) if labels is not None and 0 <= value < len(labels) else str(value)


# --------------------------------------------------------------------------------------------------
# Classification


class _ClassAxis(Target):
    """Shared by :class:`Class` and :class:`Label`: one entry of an N×K output per image."""

    class_axis = True

    def __init__(self, index=None, *, score: str = "logit", contrast=None):
        self.index = index
        self.score_name = _check_score(score)
        self.contrast = contrast
        self._bound = False

    def _rebuilt(self, index, contrast) -> _ClassAxis:
        copy = type(self).__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.index, copy.contrast = index, contrast
        return copy

    def bind(self, output, bundle) -> _ClassAxis:
        if self._bound:
            return self
        output = class_output(output)
        labels = list(getattr(bundle, "labels", None) or [str(i) for i in range(output.shape[1])])
        index = resolve_class_indices(labels, output, self.index)
        contrast = None if self.contrast is None else resolve_class_indices(labels, output, self.contrast)
        bound = self._rebuilt(index, contrast)
        bound._bound = True
        return bound

    def _indices(self, value, output: torch.Tensor, rows) -> torch.Tensor:
        if value is None:  # unbound top class (called pgc-style without binding)
            top = output.argmax(dim=1)
            return top
        if not isinstance(value, torch.Tensor):
            if isinstance(value, str):
                raise TargetError(f"bind the target to a model to resolve the label {value!r}")
            value = _as_index_tensor(value, output.device)
        return per_row(value.to(output.device), rows, output.shape[0])

    def transformed(self, output: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, output, rows=None) -> torch.Tensor:
        output = class_output(output)
        picked = self.transformed(output)
        out = picked.gather(1, self._indices(self.index, output, rows).view(-1, 1)).squeeze(1)
        if self.contrast is not None:
            out = out - picked.gather(1, self._indices(self.contrast, output, rows).view(-1, 1)).squeeze(1)
        return out

    def head_rows(self, output: torch.Tensor) -> torch.Tensor:
        output = class_output(output)
        rows = torch.zeros_like(output)
        n = torch.arange(output.shape[0], device=output.device)
        rows[n, self._indices(self.index, output, None)] = 1.0
        if self.contrast is not None:
            rows[n, self._indices(self.contrast, output, None)] -= 1.0
        return rows

    def retarget(self, classes: torch.Tensor) -> _ClassAxis:
        return self._rebuilt(classes, None)

    def take(self, start: int, stop: int) -> _ClassAxis:
        copy = self._rebuilt(_slice(self.index, start, stop), _slice(self.contrast, start, stop))
        return copy

    def per_image_count(self) -> int | None:
        counts = {len(v) for v in (self.index, self.contrast) if _per_image(v)}
        return counts.pop() if len(counts) == 1 else (None if not counts else -1)

    def concat(self, other: Target) -> _ClassAxis:
        def cat(a, b):
            return torch.cat([a, b.to(a.device)]) if isinstance(a, torch.Tensor) else a
        assert isinstance(other, _ClassAxis)  # the parts of one explanation have one kind of target
        return self._rebuilt(cat(self.index, other.index), cat(self.contrast, other.contrast))

    def with_score(self, score: str) -> _ClassAxis:
        copy = self._rebuilt(self.index, self.contrast)
        copy.score_name = _check_score(score)
        return copy

    @property
    def class_index(self):
        return self.index if isinstance(self.index, torch.Tensor) else None

    @property
    def contrast_index(self):
        return self.contrast if isinstance(self.contrast, torch.Tensor) else None

    def key(self) -> str:
        def spec(v):
            return v.tolist() if isinstance(v, torch.Tensor) else v
        return f"{type(self).__name__}({spec(self.index)!r}, {self.score_name}, {spec(self.contrast)!r})"

    def __repr__(self) -> str:
        extra = f", contrast={self.contrast!r}" if self.contrast is not None else ""
        return f"{type(self).__name__}({self.index!r}, score={self.score_name!r}{extra})"


class Class(_ClassAxis):
    """Class ``index`` (an index, a label, ``None`` for each image's top class, or one per image) of a
    one-label classifier: the logit ``z_c``, or the softmax probability ``p_c`` with
    ``score="probability"``; ``contrast=B`` explains ``S_c − S_B`` ("why c rather than B?").

    ``output_kind="probabilities"`` (a model whose head already returns probabilities, set by
    :func:`resolve_target` from the bundle): ``p_c`` as given, and ``log p_c`` as the "logit" -- never
    a softmax of probabilities."""

    kind = "class"
    linear = True

    def __init__(self, index=None, *, score: str = "logit", contrast=None, output_kind: str = "logits"):
        super().__init__(index, score=score, contrast=contrast)
        if output_kind not in ("logits", "probabilities"):
            raise TargetError(f"Class explains logits or probabilities, not {output_kind!r} outputs")
        self.output_kind = output_kind

    @property
    def is_linear(self) -> bool:
        return self.output_kind == "logits"

    def transformed(self, output):
        if self.output_kind == "probabilities":
            return output if self.score_name == "probability" else torch.log(output.clamp_min(1e-30))
        return output if self.score_name == "logit" else F.softmax(output, dim=1)

    def head_rows(self, output):
        if self.output_kind != "logits":
            raise TargetError("a model that returns probabilities has no linear class score")
        return super().head_rows(output)

    def describe(self, labels=None, index: int = 0) -> str:
        what = "probability" if self.score_name == "probability" else (
            "log-probability" if self.output_kind == "probabilities" else "logit")
        text = f"{what} of class {_pick(labels, self.class_index, index)}"
        if self.contrast_index is not None:
            text += f" minus that of {_pick(labels, self.contrast_index, index)}"
        return text


class Label(_ClassAxis):
    """Label ``index`` of a multi-label (sigmoid) model: its logit ``z_c``, or ``σ(z_c)`` with
    ``score="probability"``; never a softmax over the labels (each label is its own yes / no).
    pgc's ``BinaryClassifierOutputTarget(1)`` on the label's logit."""

    kind = "label"
    linear = True

    def transformed(self, output):
        return output if self.score_name == "logit" else torch.sigmoid(output)

    def describe(self, labels=None, index: int = 0) -> str:
        what = "sigmoid" if self.score_name == "probability" else "logit"
        return f"{what} of label {_pick(labels, self.class_index, index)}"


# --------------------------------------------------------------------------------------------------
# Regression and embeddings


class Regression(Target):
    """Output ``index`` of a regression head times ``sign`` (+1: what pushes the value up; −1: down)."""

    kind = "regression"
    linear = True

    def __init__(self, index: int = 0, sign: int = 1):
        if sign not in (1, -1):
            raise TargetError(f"sign must be +1 or -1, not {sign!r}")
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
            raise TargetError(f"a regression output is a non-negative index, not {index!r}")
        self.index, self.sign = int(index), int(sign)

    def bind(self, output, bundle) -> Regression:
        width = _flat(output).shape[1]
        if self.index >= width:
            raise TargetError(f"regression output {self.index} is out of range (the model has {width})")
        return self

    def score(self, output, rows=None):
        return self.sign * _flat(output)[:, self.index]

    def head_rows(self, output):
        flat = _flat(output)
        rows = torch.zeros_like(flat)
        rows[:, self.index] = float(self.sign)
        return rows.view_as(output)

    def describe(self, labels=None, index: int = 0) -> str:
        known = labels is not None and self.index < len(labels)
        name = labels[self.index] if known else f"output {self.index}"
        return f"{name} ({'up' if self.sign > 0 else 'down'})"

    def __repr__(self) -> str:
        return f"Regression({self.index}, sign={self.sign:+d})"


class Box(Target):
    """A detector's box ``box`` (x0, y0, x1, y1 in input-view pixels) of ``label`` (an index or a name;
    None: any label): over the detections of that label, the one with the largest IoU; if it exceeds
    ``iou_threshold``, ``score = IoU + s_d``, else 0 (pytorch-grad-cam's FasterRCNNBoxScoreTarget;
    shared METHODS.md). D-RISE, the black-box method, weighs its masks by its own similarity to the box.

    The target explains the detection bundle through a view whose output is this score
    (:func:`vislib.objects.box_bundle`), so every method that explains a score serves it."""

    kind = "box"

    def __init__(self, box, label=None, iou_threshold: float = 0.5):
        values = [float(v) for v in np.asarray(box, dtype=np.float64).reshape(-1)]
        if len(values) != 4 or not (values[0] < values[2] and values[1] < values[3]):
            raise TargetError(f"a box is x0, y0, x1, y1 with x0 < x1 and y0 < y1, not {box!r}")
        self.box, self.label, self.iou_threshold = values, label, float(iou_threshold)

    def prepare(self, bundle):
        from .objects.scores import box_bundle

        if getattr(bundle, "task", "classification") != "detection":
            raise TargetError(f"a Box target needs a detection model; {bundle.name} is a {bundle.task} model")
        label = -1 if self.label is None else self.label
        return box_bundle(bundle, [self.box], [label], self.iou_threshold), None

    def score(self, output, rows=None):
        return _flat(output)[:, 0]

    def describe(self, labels=None, index: int = 0) -> str:
        name = self.label if not isinstance(self.label, int) or labels is None else labels[self.label]
        return f"box {[round(v, 1) for v in self.box]} ({'any label' if name is None else name})"

    def __repr__(self) -> str:
        return f"Box({self.box}, {self.label!r})"


class Region(Target):
    """A segmenter's region: class ``label``'s logits summed over ``mask`` (H×W at the input view;
    None: the pixels predicted as that class on the image explained, fixed at its first forward):
    pytorch-grad-cam's SemanticSegmentationTarget; Seg-Grad-CAM (Vinogradova et al. 2020) with
    Grad-CAM."""

    kind = "region"

    def __init__(self, label, mask=None):
        self.label = label
        self.mask = None if mask is None else np.asarray(mask)

    def prepare(self, bundle):
        from .objects.scores import region_bundle

        return region_bundle(bundle, None, [self.label], None if self.mask is None else [self.mask]), None

    def score(self, output, rows=None):
        return _flat(output)[:, 0]

    def describe(self, labels=None, index: int = 0) -> str:
        name = self.label if not isinstance(self.label, int) or labels is None else labels[self.label]
        return f"region of {name} ({'predicted pixels' if self.mask is None else 'given mask'})"

    def __repr__(self) -> str:
        return f"Region({self.label!r}, mask={'None' if self.mask is None else 'given'})"


def _flat(output) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.dim() < 1:
        raise TargetError(f"this target needs a tensor output, not {type(output).__name__}")
    return output.reshape(output.shape[0], -1)


class Similarity(Target):
    """``cos(f(x), f(ref))``: the cosine similarity of each image's embedding ``f(x)`` (the model's
    output; a classifier is explained through its penultimate layer, :func:`vislib.models.as_embedding`)
    to a reference: an image (anything :func:`vislib.imageio.load_image` reads, or a preprocessed
    C×H×W tensor) or a given embedding vector (``vector=``). "Why are these two similar?"
    pgc's ``SimilarityToConceptTarget`` (its embeddings tutorial)."""

    kind = "similarity"

    def __init__(self, reference=None, *, vector=None, name: str = "the reference"):
        if (reference is None) == (vector is None):
            raise TargetError("Similarity takes a reference image or a vector (one of them)")
        self.reference, self.name = reference, name
        self.vector = None if vector is None else torch.as_tensor(vector, dtype=torch.float32).reshape(-1)

    def prepare(self, bundle):
        if getattr(bundle, "scores", "logits") == "embedding":
            return bundle, None
        from .models import as_embedding

        embedded = as_embedding(bundle)
        return embedded, f"similarity is measured on {embedded.description}"

    def bind(self, output, bundle) -> Similarity:
        if self.vector is not None:
            bound = self
        else:
            bound = Similarity(vector=embed_reference(bundle, self.reference), name=self.name)
        width = _flat(output).shape[1]
        assert bound.vector is not None  # given, or embedded just above
        if bound.vector.numel() != width:
            raise TargetError(f"the reference embedding has {bound.vector.numel()} values, the model's "
                              f"output {width}")
        return bound

    def score(self, output, rows=None):
        flat = _flat(output)
        if self.vector is None:
            raise TargetError("bind the Similarity to a model first (it needs the reference's embedding)")
        ref = self.vector.to(flat.device, flat.dtype).view(1, -1)
        return F.cosine_similarity(flat, ref.expand_as(flat), dim=1, eps=1e-8)

    def describe(self, labels=None, index: int = 0) -> str:
        return f"cosine similarity to {self.name}"

    def key(self) -> str:
        import hashlib

        data = self.vector.detach().cpu().float().numpy().tobytes() if self.vector is not None else b""
        return f"Similarity({hashlib.sha256(data).hexdigest()[:16]})"

    def __repr__(self) -> str:
        return f"Similarity({self.name!r})"


def embed_reference(bundle, reference) -> torch.Tensor:
    """The embedding (the bundle's output, flattened) of one reference image."""
    from .imageio import load_image

    if isinstance(reference, torch.Tensor):
        x = reference if reference.dim() == 4 else reference.unsqueeze(0)
        x = x.to(bundle.device, torch.float32)
    else:
        x, _ = bundle.prepare([load_image(reference)])
    with bundle.lock, torch.no_grad():
        out = bundle.logits(x)
    return _flat(out)[0].detach().float()


class Text(Target):
    """``logit_scale · cos(f_img(x), f_txt(prompt))`` of a CLIP-like model loaded with prompts
    (``load_model("hf:openai/clip-vit-base-patch32", labels=[...])``): a prompt outside the model's
    prompts is added to them (its text embedding computed once and cached); the score is that
    prompt's column, so a softmax over the prompts is CLIP's zero-shot probability."""

    kind = "text"
    class_axis = True

    def __init__(self, prompt: str, *, score: str = "logit"):
        if not isinstance(prompt, str) or not prompt.strip():
            raise TargetError("a text target needs a non-empty prompt")
        self.prompt, self.score_name = prompt.strip(), _check_score(score)

    def prepare(self, bundle):
        with_prompts = getattr(bundle, "with_prompts", None)
        if with_prompts is None or getattr(bundle, "prompts", None) is None:
            raise TargetError(f"a text prompt needs a CLIP-like model loaded with prompts, "
                              f"not {bundle.name!r}")
        if self.prompt in bundle.labels:
            return bundle, None
        return with_prompts([*bundle.labels, self.prompt]), f"prompt {self.prompt!r} added to the prompts"

    def bind(self, output, bundle) -> Target:
        return Class(bundle.labels.index(self.prompt), score=self.score_name).bind(output, bundle)

    def score(self, output, rows=None):
        raise TargetError("bind the Text target to a model first")

    def describe(self, labels=None, index: int = 0) -> str:
        return f"similarity to the prompt {self.prompt!r}"

    def __repr__(self) -> str:
        return f"Text({self.prompt!r})"


# --------------------------------------------------------------------------------------------------
# From the API's forms


def resolve_target(bundle, target=None, *, score: str = "logit", contrast=None) -> Target:
    """Turn ``explain``'s ``target`` into a :class:`Target`: a Target as it is; ``None`` (top class),
    an index, a label or one per image into :class:`Class` (``score``, ``contrast``) -- or a
    :class:`Label` on a multi-label model, a :class:`Regression` output on a regression model."""
    kind = getattr(bundle, "scores", "logits")
    if isinstance(target, Target):
        if contrast is not None:
            if not isinstance(target, Class):
                raise TargetError(f"a contrast class applies to a Class target, not {target.describe()}")
            target = Class(target.index, score=target.score_name, contrast=contrast,
                           output_kind=target.output_kind)
        if score != "logit" and isinstance(target, _ClassAxis) and target.score_name == "logit":
            target = target.with_score(score)
        return target
    _check_score(score)
    if kind == "sigmoid":
        if contrast is not None:
            raise TargetError("a contrast applies to one-label classes, not to a multi-label model's labels")
        return Label(target, score=score)
    if kind == "regression":
        if contrast is not None or score != "logit":
            raise TargetError("a regression output has no contrast and no probability")
        index = 0 if target is None else target
        if isinstance(index, str):
            index = class_index(bundle.labels, index)
        return Regression(index)
    if kind == "embedding":
        raise TargetError("an embedding model explains a Similarity target (a reference image or vector), "
                          "not a class")
    return Class(target, score=score, contrast=contrast,
                 output_kind="probabilities" if kind == "probabilities" else "logits")


def refusal(method, target: Target) -> str | None:
    """Why ``method`` (a method class) cannot explain ``target``, or None."""
    needs = getattr(method, "target_needs", ())
    if "linear" in needs and not _is_linear(target):
        return (f"{method.name} needs a score linear in the model's output (a class, a label's logit, a "
                f"regression output), not the {target.describe()}")
    if "class_axis" in needs and not target.class_axis:
        return f"{method.name} needs a class axis (classes to compare), not the {target.describe()}"
    return None


def accepted_targets(method) -> str:
    """Which targets ``method`` (a method class) explains, in words (``python -m vislib methods``)."""
    needs = getattr(method, "target_needs", ())
    if "linear" in needs:
        return "class / label / regression (head rows)"
    if "class_axis" in needs:
        return "class / label / prompt (classes to compare)"
    return "any"


def _is_linear(target: Target) -> bool:
    """Whether the target has head rows (its logit-space score is linear in the model's output)."""
    if isinstance(target, Class):
        return target.is_linear
    if isinstance(target, Text):
        return True  # bound, it is a class column of the prompts' logits
    return target.linear
