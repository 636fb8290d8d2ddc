"""Hugging Face image classifiers: ``hf:<repo id>`` (the hub, through its cache) or ``hf:<folder>``
(a ``save_pretrained`` folder).

``AutoModelForImageClassification`` + ``AutoImageProcessor``; labels from ``config.id2label``, input
channels from ``config.num_channels``; the class scores are the output's ``logits``. The image
processor's settings become a :class:`Preprocess` where they can (resize by ``size`` — exact
height × width or shortest edge —, ``crop_pct`` for ConvNeXt and PoolFormer, LeViT's 256/224
rule, centre crop, rescale by 1/255, normalisation); a processor that does something else
(MobileViT's channel flip, EfficientNet's offset rescale, padding) is kept as the callable, with a
note. ``transformers`` is optional (the ``hf`` extra: ``pip install "vislib[hf]"``). Code from the
hub is never run (``trust_remote_code`` stays off): such a model needs a factory.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

from .._optional import install_hint, require
from ..errors import ModelError, WeightsError
from .cache import hf_cache_dir, hf_cached, hf_missing, hf_reachable, offline
from .registry import ModelSpec, _seeded, source_spec
from .source import SourceModel, fit_stats, interpolation_mode, preprocess, random_or_file

PREFIX = "hf:"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
ZERO_SHOT_ARCHITECTURES = ("CLIPModel", "SiglipModel", "Siglip2Model")
INSTALL_HINT = f"hf: models need the transformers package: {install_hint('hf')}"

#: Processors that resize by ``size``, centre-crop by ``crop_size`` when asked, rescale and
#: normalise, and nothing else (BEiT's and MobileNetV2's own steps concern segmentation maps only).
STANDARD_PROCESSORS = {
    "ViTImageProcessor", "DeiTImageProcessor", "BeitImageProcessor", "BitImageProcessor",
    "CLIPImageProcessor", "PvtImageProcessor", "SiglipImageProcessor", "MobileNetV1ImageProcessor",
    "MobileNetV2ImageProcessor", "ConvNextImageProcessor", "LevitImageProcessor", "PoolFormerImageProcessor",
}
#: Settings that change the pixels in a way a Preprocess cannot (when true).
UNSUPPORTED_FLAGS = ("do_flip_channel_order", "rescale_offset", "do_pad", "do_thumbnail", "do_color_quantize",
                     "do_align_long_axis", "size_divisor")


def _transformers():
    return require("transformers", "hf", feature="an hf: model", error=ModelError)


# The hub's repo ids: "name" or "namespace/name" of letters, digits, "-", "_" and "." (no "--" or
# "..", not starting or ending with "-" or ".").
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID = re.compile(rf"^(?:{_REPO_PART}/)?{_REPO_PART}$")


def is_repo_id(ref: str) -> bool:
    """Whether ``ref`` is shaped like a hub repo id (``google/vit-base-patch16-224``), not a path."""
    return bool(REPO_ID.match(ref)) and "--" not in ref and ".." not in ref


def local_folder(name: str) -> bool:
    """Whether ``hf:<ref>`` names a folder on this machine rather than a hub repo (no file is read)."""
    ref = name[len(PREFIX):] if name.startswith(PREFIX) else name
    return ref.startswith(("/", ".", "~")) or not is_repo_id(ref) or Path(ref).expanduser().is_dir()


def _split(name: str) -> tuple[str, Path | None]:
    """(reference, local folder or None) of ``hf:<repo id or folder>``."""
    ref = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if not ref:
        raise ModelError("hf: needs a repo id (hf:google/vit-base-patch16-224) or a folder "
                         "(hf:/path/to/model)")
    path = Path(ref).expanduser()
    if ref.startswith(("/", ".", "~")) or path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"hf:{ref}: no Hugging Face model folder there (a folder with config.json, "
                             f"as save_pretrained writes it)")
        return ref, path
    if not is_repo_id(ref):
        raise ModelError(f"hf:{ref}: not a Hugging Face repo id (namespace/name, e.g. "
                         f"hf:google/vit-base-patch16-224) nor a model folder (hf:/path/to/model)")
    return ref, None


def config_labels(config) -> tuple[list[str], str]:
    """The labels of a Hugging Face config, by class index."""
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    n = int(getattr(config, "num_labels", len(id2label)) or len(id2label))
    return [id2label.get(i, f"class {i}") for i in range(n)], "config.id2label"


def preprocess_from_processor(processor, channels: int = 3):
    """(preprocess, note): the :class:`Preprocess` that does what ``processor`` does, or the
    processor itself as a callable and a note saying why it could not be expressed."""
    settings = processor.to_dict()
    kind = type(processor).__name__.removesuffix("Pil").removesuffix("Fast")
    try:
        return _preprocess_from_settings(kind, settings, channels), None
    except _Unsupported as why:
        return ProcessorTransform(processor), (f"the Hugging Face {kind} is used as is ({why}): the "
                                               f"overlay is drawn on the image as it leaves the processor")


class _Unsupported(Exception):
    pass


def _preprocess_from_settings(kind: str, s: dict, channels: int):
    if kind not in STANDARD_PROCESSORS:
        raise _Unsupported(f"{kind} has steps of its own")
    flags = [f for f in UNSUPPORTED_FLAGS if _active(s.get(f))]
    if flags:
        raise _Unsupported(", ".join(flags))
    if s.get("do_rescale", True) and abs(float(s.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise _Unsupported(f"rescale_factor={s.get('rescale_factor')}")
    if not s.get("do_rescale", True):
        raise _Unsupported("no rescaling to [0, 1]")
    size = {k: v for k, v in (s.get("size") or {}).items() if v is not None}
    crop_pct = s.get("crop_pct")
    resize: int | tuple[int, int] | None = None
    crop: int | tuple[int, int] | None = None
    if s.get("do_resize", True):
        if set(size) == {"height", "width"}:
            h, w = int(size["height"]), int(size["width"])
            if kind == "PoolFormerImageProcessor" and crop_pct:
                resize = int(h / crop_pct) if h == w else (int(h / crop_pct), int(w / crop_pct))
            else:
                resize = (h, w)
        elif set(size) == {"shortest_edge"}:
            edge = int(size["shortest_edge"])
            if kind == "ConvNextImageProcessor":
                if edge < 384:
                    resize, crop = int(edge / (crop_pct or 224 / 256)), edge
                else:
                    resize = (edge, edge)
            elif kind == "LevitImageProcessor":
                resize = int((256 / 224) * edge)
            elif kind == "PoolFormerImageProcessor" and crop_pct:
                resize = int(edge / crop_pct)
            else:
                resize = edge
        else:
            raise _Unsupported(f"size={size}")
    if s.get("do_center_crop"):
        if crop is not None:
            raise _Unsupported("two centre crops")
        crop_size = s.get("crop_size") or {}
        if not {"height", "width"} <= set(crop_size):
            raise _Unsupported(f"crop_size={crop_size}")
        h, w = int(crop_size["height"]), int(crop_size["width"])
        crop = h if h == w else (h, w)
    if s.get("do_normalize", True):
        mean = _seq(s.get("image_mean"), channels)
        mean, std = fit_stats(mean, _seq(s.get("image_std"), channels), channels)
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    try:
        return preprocess(resize=resize, crop=crop, mean=mean, std=std,
                          interpolation=interpolation_mode(s.get("resample", 2)), channels=channels)
    except ModelError as exc:
        raise _Unsupported(str(exc)) from None


def _active(value) -> bool:
    """A flag that is on, or a number other than 0 and 1 (``size_divisor=1`` changes nothing)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return value is True or (number and value not in (0, 1))


def _seq(value, channels: int) -> tuple[float, ...]:
    if value is None:
        raise _Unsupported("no normalisation statistics")
    return tuple(value) if isinstance(value, (list, tuple)) else (float(value),) * channels


class ProcessorTransform:
    """A Hugging Face image processor as a PIL image → C×H×W tensor callable."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image):
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"ProcessorTransform({type(self.processor).__name__})"


def _ensure_files(ref: str, weights: bool) -> bool:
    """Whether everything needed is cached (then nothing touches the network). When it is not:
    offline or unreachable, one clear error; online, False (``from_pretrained`` downloads)."""
    groups = [("config.json",)] + ([WEIGHT_FILES] if weights else [])
    missing = [g for g in groups if not any(hf_cached(ref, f) is not None for f in g)]
    if not missing:
        return True
    what = f"{'pretrained weights' if weights else 'the configuration'} of hf:{ref}"
    files = [f for g in missing for f in g]
    if offline():
        raise WeightsError(hf_missing(ref, files, what))
    if not hf_reachable():
        raise WeightsError(f"{hf_missing(ref, files, what)} [no network: the hub is unreachable]")
    return False


def _call(what: str, fn, *args, **kwargs):
    """Run a transformers loader; its exceptions become one line."""
    try:
        return fn(*args, **kwargs)
    except (ModelError, WeightsError):
        raise
    except ValueError as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise ModelError(f"{what} needs code from the hub (trust_remote_code); vislib never runs it: "
                             f"write a factory (package.module:callable) that builds the model") from None
        if "Unrecognized configuration class" in text or "AutoModelForImageClassification" in text:
            raise ModelError(f"{what} is not an image classifier that transformers' "
                             f"AutoModelForImageClassification knows") from None
        raise ModelError(f"{what}: {text.splitlines()[0]}") from None
    except OSError as exc:
        raise WeightsError(f"{what}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(f"{what}: {type(exc).__name__}: {first}") from None


def hf_source(name: str, weights, kwargs: dict) -> SourceModel:
    transformers = _transformers()
    ref, folder = _split(name)
    what = f"hf:{ref}"
    load: dict[str, object] = {"trust_remote_code": False}
    if folder is None:
        cached = _ensure_files(ref, weights == "default")
        load.update(cache_dir=str(hf_cache_dir()), local_files_only=cached)
    config = _call(what, transformers.AutoConfig.from_pretrained, ref, **load, **kwargs)
    from .zeroshot import CLIP_TYPES

    if getattr(config, "model_type", "") in CLIP_TYPES:
        return clip_source(ref, folder, config, weights, load)
    auto = transformers.AutoModelForImageClassification
    notes: list[str] = []

    def build(num_classes: int | None = None):
        cfg = config
        if num_classes:
            cfg = copy.deepcopy(config)
            cfg.num_labels = num_classes
            cfg.id2label = {i: f"class {i}" for i in range(num_classes)}
            cfg.label2id = {v: k for k, v in cfg.id2label.items()}
        return _seeded(lambda: _call(what, auto.from_config, cfg))

    if weights == "default":
        model = _call(what, auto.from_pretrained, ref, config=config, **load)
        weights_id = f"hf:{ref}"
    else:
        model, weights_id, note = random_or_file(build(), weights, build, f"hf:{ref}")
        notes += [note] if note else []
    labels, labels_from = config_labels(model.config)
    channels = int(getattr(model.config, "num_channels", 3) or 3)
    if folder is None:  # the processor is optional: looked up online only when it is not cached
        load["local_files_only"] = (hf_cached(ref, "preprocessor_config.json") is not None or offline()
                                    or not hf_reachable())
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(ref, **load)
    except Exception:  # no preprocessor_config.json
        processor = None
    if processor is not None:
        pre, note = preprocess_from_processor(processor, channels)
    else:
        size = getattr(model.config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else int(size)
        half = (0.5,) * channels
        pre = preprocess(resize=size, crop=size, mean=half, std=half, channels=channels)
        note = f"hf:{ref} has no image processor: resized to {size}, normalised with mean = std = 0.5"
    notes += [note] if note else []
    return SourceModel(model=model, preprocess=pre, labels=labels, labels_from=labels_from,
                       weights=weights_id, source="hf", channels=channels,
                       description=f"Hugging Face {ref}", notes=notes)


def clip_source(ref: str, folder, config, weights, load: dict) -> SourceModel:
    """A CLIP-like model (CLIP, SigLIP) as a zero-shot classifier whose labels are prompts
    (``load_model("hf:openai/clip-vit-base-patch32", labels=["a dog", "a cat"])``): the vision tower
    is explained, the text tower encodes each prompt once (:mod:`vislib.models.zeroshot`)."""
    from .zeroshot import ZeroShot, hf_tokenizer, output_kind

    transformers = _transformers()
    what = f"hf:{ref}"
    auto = transformers.AutoModel
    notes: list[str] = []
    if weights == "default":
        model = _call(what, auto.from_pretrained, ref, config=config, **load)
        weights_id = f"hf:{ref}"
    else:
        def build(num_classes: int | None = None):  # noqa: ARG001  (no class head to resize)
            return _seeded(lambda: _call(what, auto.from_config, config))

        model, weights_id, note = random_or_file(build(), weights, build, what)
        notes += [note] if note else []
    if folder is None:
        load["local_files_only"] = (hf_cached(ref, "tokenizer_config.json") is not None or offline()
                                    or not hf_reachable())
    tokenizer = _call(f"{what} tokenizer", transformers.AutoTokenizer.from_pretrained, ref, **load)
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(ref, **load)
    except Exception:  # noqa: BLE001  (no preprocessor_config.json)
        processor = None
    vision = getattr(config, "vision_config", config)
    channels = int(getattr(vision, "num_channels", 3) or 3)
    if processor is not None:
        pre, note = preprocess_from_processor(processor, channels)
    else:
        size = int(getattr(vision, "image_size", 224))
        half = (0.5,) * channels
        pre, note = (preprocess(resize=size, crop=size, mean=half, std=half, channels=channels),
                     f"{what} has no image processor: resized to {size}, normalised with mean = std = 0.5")
    notes += [note] if note else []
    wrapped = ZeroShot(model, hf_tokenizer(tokenizer))
    return SourceModel(model=wrapped, preprocess=pre, labels=None, labels_from="prompts",
                       weights=weights_id, source="hf", channels=channels, scores=output_kind(wrapped),
                       description=f"Hugging Face {ref} (zero-shot: the labels are prompts)", notes=notes)


def pretrained_available(name: str) -> bool:
    ref, folder = _split(name)
    if folder is not None:
        return any((folder / f).is_file() for f in WEIGHT_FILES)
    return (hf_cached(ref, "config.json") is not None
            and any(hf_cached(ref, f) is not None for f in WEIGHT_FILES))


def hf_spec(name: str) -> ModelSpec:
    ref, folder = _split(name)
    if folder is not None:  # absolute, so that another process (a Ray worker) finds it too
        ref = str(folder.resolve())
    return source_spec(PREFIX + ref, "hf", f"Hugging Face {ref}",
                       lambda weights, kwargs: hf_source(ref, weights, kwargs),
                       available=lambda: pretrained_available(ref))


def cached_repos() -> list[str]:
    """``hf:<repo>`` for every image classifier in the local Hugging Face cache (no network)."""
    found = []
    root = hf_cache_dir()
    for repo_dir in sorted(root.glob("models--*")) if root.is_dir() else []:
        for config in repo_dir.glob("snapshots/*/config.json"):
            try:
                architectures = json.loads(config.read_text()).get("architectures") or []
            except (OSError, ValueError):
                continue
            if any(a.endswith("ForImageClassification") or a in ZERO_SHOT_ARCHITECTURES
                   for a in architectures):
                found.append(PREFIX + repo_dir.name[len("models--"):].replace("--", "/"))
                break
    return found
