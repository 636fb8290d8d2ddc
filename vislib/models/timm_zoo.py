"""timm models: ``timm:<name>`` for any architecture, ``timm:<name>.<tag>`` for a pretrained tag.

- preprocessing from timm's data config (``resolve_data_config``) turned into a :class:`Preprocess`
  that computes what timm's evaluation transform computes (``crop_pct``, ``crop_mode``,
  interpolation, mean / std); a config it cannot express (``crop_mode="border"``, a non-square
  centre crop, a trimmed border) keeps timm's own transform, with a note;
- labels from timm's ImageNet info (1k, 12k, 21k/22k variants, by the number of classes) or the
  pretrained config's own label names; other class counts get "class i";
- pretrained weights through the Hugging Face hub cache (most tags) or the torch hub cache (tags
  given by URL): read from the cache, downloaded when online, otherwise one clear line.
"""

from __future__ import annotations

import math

from ..errors import ModelError, WeightsError
from .cache import fetch_hf, fetch_url, hf_cached, torch_checkpoint_path
from .registry import ModelSpec, _seeded, source_spec
from .source import SourceModel, fit_stats, interpolation_mode, preprocess, random_or_file

PREFIX = "timm:"
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def timm_names() -> list[str]:
    """Every timm architecture, as ``timm:<name>`` (pretrained tags are accepted too)."""
    import timm

    return [PREFIX + n for n in timm.list_models()]


def timm_tags() -> dict[str, list[str]]:
    """Each architecture's pretrained tags (``{"resnet50": ["a1_in1k", ...]}``)."""
    import timm

    tags: dict[str, list[str]] = {}
    for full in timm.list_pretrained():
        arch, _, tag = full.partition(".")
        tags.setdefault(arch, []).append(tag)
    return tags


def _parse(name: str) -> str:
    """The timm name (``arch`` or ``arch.tag``) of ``timm:<name>``, checked against timm's registry."""
    import timm

    model_name = name[len(PREFIX):] if name.startswith(PREFIX) else name
    arch = model_name.split(".")[0]
    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise ModelError(f"timm has no model {arch!r}{hint} (`python -m vislib models --source timm` "
                         f"lists them)")
    if "." in model_name and _pretrained_cfg(model_name) is None:
        tags = timm_tags().get(arch, [])
        raise ModelError(f"timm model {arch!r} has no pretrained tag {model_name.split('.', 1)[1]!r}; "
                         f"its tags: {', '.join(tags) or 'none'}")
    return model_name


def _pretrained_cfg(model_name: str):
    from timm.models import get_pretrained_cfg

    try:
        return get_pretrained_cfg(model_name)
    except RuntimeError:  # an unknown tag
        return None


def _weights_location(model_name: str):
    """("hf", repo, filenames) or ("url", url) where ``model_name``'s pretrained weights come from."""
    cfg = _pretrained_cfg(model_name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise WeightsError(f"timm:{model_name} has no pretrained weights; use weights=None (--weights none) "
                           f"or a tag with weights (`python -m vislib models --source timm --filter "
                           f"{model_name.split('.')[0]}`)")
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_WEIGHT_FILES
        return ("hf", repo, files)
    return ("url", cfg.url)


def pretrained_available(model_name: str) -> bool:
    try:
        location = _weights_location(model_name)
    except WeightsError:
        return False
    if location[0] == "hf":
        return any(hf_cached(location[1], f) is not None for f in location[2])
    return torch_checkpoint_path(location[1]).is_file()


def _fetch_weights(model_name: str):
    location = _weights_location(model_name)
    what = f"pretrained weights for timm:{model_name}"
    if location[0] == "hf":
        return fetch_hf(location[1], location[2], what)
    return fetch_url(location[1], f"timm:{model_name}")


def preprocess_from_timm(config: dict, model=None):
    """(preprocess, note): a :class:`Preprocess` that computes what timm's evaluation transform
    (``create_transform(**config)``) computes, or timm's own transform and a note saying why.

    timm: ``scale = floor(size / crop_pct)``; ``center`` resizes the shorter side to ``scale`` and
    centre-crops ``size``; ``squash`` resizes to (scale_h, scale_w) exactly, then crops.
    """
    channels, h, w = (int(v) for v in config["input_size"])
    crop_pct = config.get("crop_pct") or 0.875
    mode = config.get("crop_mode") or "center"
    mean, std = fit_stats(config["mean"], config["std"], channels)
    interpolation = interpolation_mode(config.get("interpolation") or "bilinear")
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    crop = h if h == w else (h, w)
    resize: int | tuple[int, int] | None = None
    if mode == "squash":
        resize = scale
    elif mode == "center" and scale[0] == scale[1]:
        resize = scale[0]
    if resize is not None and not config.get("crop_border_pixels"):
        try:
            return preprocess(resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation,
                              channels=channels), None
        except ModelError:
            pass
    from timm.data import create_transform

    transform = create_transform(**config, is_training=False)
    return transform, (f"timm's preprocessing (crop_mode={mode!r}, input {h}×{w}) is kept as its own "
                       f"transform: the overlay is drawn on the image as that transform leaves it")


def imagenet_labels(num_classes: int, cfg=None) -> tuple[list[str] | None, str]:
    """(labels, where from) for a timm classifier with ``num_classes`` outputs."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    if cfg is not None and cfg.label_descriptions and len(cfg.label_descriptions) == num_classes:
        return [str(v) for v in cfg.label_descriptions], "timm pretrained config"
    if cfg is not None and cfg.label_names and len(cfg.label_names) == num_classes:
        return [str(v) for v in cfg.label_names], "timm pretrained config"
    offset = int(getattr(cfg, "label_offset", None) or 0) if cfg is not None else 0
    subset = infer_imagenet_subset({"num_classes": num_classes - offset})
    if subset is None:
        return None, "class indices"
    names = [d.split(",")[0].strip() for d in ImageNetInfo(subset).label_descriptions()]
    return ["background"] * offset + names, f"timm ImageNet info ({subset})"


def timm_source(name: str, weights, kwargs: dict) -> SourceModel:
    import timm
    from timm.data import resolve_data_config

    model_name = _parse(name)
    cfg = _pretrained_cfg(model_name)
    notes: list[str] = []

    def build(num_classes: int | None = None, **extra):
        args = {**kwargs, **extra, **({"num_classes": num_classes} if num_classes else {})}
        try:
            return _seeded(lambda: timm.create_model(model_name, **args))
        except (TypeError, ValueError, AssertionError) as exc:
            raise ModelError(f"timm:{model_name}: {type(exc).__name__}: {exc}") from None

    if weights == "default":
        path = _fetch_weights(model_name)
        try:
            model = build(pretrained=True, pretrained_cfg_overlay={"file": str(path), "source": None})
        except ModelError:
            raise
        except Exception as exc:
            raise WeightsError(f"could not load the cached weights of timm:{model_name} ({path}): "
                               f"{exc}") from None
        weights_id = f"timm:{model.pretrained_cfg.get('architecture', model_name)}." \
                     f"{model.pretrained_cfg.get('tag') or ''}".rstrip(".")
    else:
        model, weights_id, note = random_or_file(build(), weights, build, f"timm:{model_name}")
        notes += [note] if note else []
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    if num_classes <= 0:
        raise ModelError(f"timm:{model_name} has no classifier head (num_classes=0): it gives features, not "
                         f"class scores; pick a tag trained for classification or give kwargs num_classes")
    own_head = weights in ("default", None) and "num_classes" not in kwargs
    labels, labels_from = imagenet_labels(num_classes, cfg if own_head else None)
    config = resolve_data_config({}, model=model)
    pre, note = preprocess_from_timm(config, model)
    notes += [note] if note else []
    return SourceModel(
        model=model, preprocess=pre, labels=labels, labels_from=labels_from, weights=weights_id,
        source="timm", channels=int(config["input_size"][0]), description=f"timm {model_name}", notes=notes,
    )


def timm_spec(name: str) -> ModelSpec:
    model_name = _parse(name)
    return source_spec(PREFIX + model_name, "timm", f"timm {model_name}",
                       lambda weights, kwargs: timm_source(model_name, weights, kwargs),
                       available=lambda: pretrained_available(model_name))
