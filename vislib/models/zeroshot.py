"""Zero-shot image-text models (CLIP, SigLIP) as classifiers whose labels are prompts.

:class:`ZeroShot` wraps a CLIP-like model (``get_image_features`` / ``get_text_features``,
``logit_scale``, SigLIP's ``logit_bias``): its forward takes the images alone and returns, per
prompt, ``logit_scale · cos(f_img(x), f_txt(prompt)) (+ logit_bias)`` -- CLIP's ``logits_per_image``
(Radford et al. 2021; SigLIP, Zhai et al. 2023). The text embeddings are computed once per prompt and
cached (shared by every prompt list of the same model), so an explanation costs one image forward and
backward; any method then explains a prompt like a class. CLIP's prompts compete (a softmax over them:
output kind "logits"), SigLIP's are independent yes / no (a sigmoid each: "sigmoid").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

NEEDS_PROMPTS = ("a zero-shot (CLIP-like) model needs prompts, its labels: "
                 "load_model(..., labels=[\"a dog\", \"a cat\"]), the spec key prompts, or --prompts")
CLIP_TYPES = ("clip", "siglip", "siglip2", "chinese_clip", "altclip")


def _pooled(out) -> torch.Tensor:
    """Features from ``get_*_features`` (a tensor in transformers 4, an output object in 5)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise ModelError(f"the model's features are a {type(out).__name__} without pooler_output")
    return pooled


class TextCache:
    """Normalised text embeddings by prompt, computed once (under a lock) and kept on the CPU."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor]):
        self.encode = encode
        self.vectors: dict[str, torch.Tensor] = {}
        self.lock = threading.Lock()
        self.computed = 0  # prompts encoded so far (for tests and the benchmark)

    def get(self, prompts: Sequence[str]) -> torch.Tensor:
        with self.lock:
            missing = [p for p in dict.fromkeys(prompts) if p not in self.vectors]
            if missing:
                with torch.no_grad():
                    vectors = F.normalize(self.encode(missing).detach().float(), dim=-1).cpu()
                self.vectors.update(zip(missing, vectors, strict=True))
                self.computed += len(missing)
            return torch.stack([self.vectors[p] for p in prompts])


class ZeroShot(nn.Module):
    """A CLIP-like ``model`` as an N × prompts classifier of images (see the module docstring).

    ``tokenizer(prompts)`` returns the text model's keyword inputs (a Hugging Face tokenizer called
    with padding, or any callable giving ``input_ids`` and ``attention_mask``)."""

    def __init__(self, model: nn.Module, tokenizer: Callable, prompts: Sequence[str] | None = None, *,
                 cache: TextCache | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.cache = cache or TextCache(self._encode)
        self.prompts: list[str] | None = None
        self.register_buffer("text_embeds", torch.zeros(0), persistent=False)
        if prompts:
            self.use_labels(prompts)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts)
        device = next(self.model.parameters()).device
        tokens = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in dict(tokens).items()}
        clip: Any = self.model
        return _pooled(clip.get_text_features(**tokens))

    def use_labels(self, prompts: Sequence[str]) -> None:
        """Make ``prompts`` the classes (their embeddings from the cache)."""
        prompts = [str(p) for p in prompts]
        if not prompts or any(not p.strip() for p in prompts):
            raise ModelError("a zero-shot model needs a non-empty list of non-empty prompts")
        device = next(self.model.parameters()).device
        self.text_embeds = self.cache.get(prompts).to(device)
        self.prompts = prompts

    def with_prompts(self, prompts: Sequence[str]) -> ZeroShot:
        """Another classifier over the same model and text cache, with ``prompts`` as its classes."""
        other = ZeroShot(self.model, self.tokenizer, prompts, cache=self.cache)
        other.training = self.training
        return other

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        clip: Any = self.model
        return _pooled(clip.get_image_features(pixel_values=pixel_values))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.prompts is None:
            raise ModelError(NEEDS_PROMPTS)
        image = F.normalize(self.image_features(pixel_values), dim=-1)
        clip: Any = self.model
        logits = clip.logit_scale.exp() * image @ self.text_embeds.to(image.dtype).t()
        bias = getattr(self.model, "logit_bias", None)
        return logits + bias if bias is not None else logits


def output_kind(model: nn.Module) -> str:
    """"sigmoid" for SigLIP (independent prompts, trained with a sigmoid loss), "logits" for CLIP."""
    inner = model.model if isinstance(model, ZeroShot) else model
    return "sigmoid" if getattr(inner, "logit_bias", None) is not None else "logits"


def hf_tokenizer(tokenizer) -> Callable[[list[str]], dict]:
    """A Hugging Face tokenizer as ``prompts → tensors`` (padded to the longest, or to the model's
    length for SigLIP, which was trained on max-length padding)."""
    name = type(tokenizer).__name__.lower()
    padding = "max_length" if "siglip" in name else True

    def tokenize(prompts: list[str]) -> dict:
        return tokenizer(prompts, padding=padding, truncation=True, return_tensors="pt")

    return tokenize
