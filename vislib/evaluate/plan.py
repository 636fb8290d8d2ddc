"""What a worker needs to do its share of a run, in picklable form: the model as a *spec* (never a
pickled ``nn.Module``) and the image set as a *recipe* (paths or zip members, never decoded pixels).

:class:`ModelRef` carries the library's recipe of the model (:func:`vislib.model_ref`) and, for a
model registered by the caller's own code, the module whose import registers it; a worker builds the
model from it once and checks it against the driver's by a fingerprint of the weights. :func:`reopen`
opens the same image set in the worker from ``ImageSet.reopen`` and checks that it is the same set
(same ids, same digest).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..datasets import ImageSet, open_folder, open_zip, subset
from ..errors import InputError, ModelError
from ..models import ModelBundle
from ..models import ModelRef as LibraryRef


def weights_fingerprint(model: torch.nn.Module) -> tuple[float, ...]:
    """Σ w and Σ |w| of every parameter and buffer (float64): equal for equal weights, on any device."""
    sums = []
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                d = t.detach().double()
                sums += [float(d.sum()), float(d.abs().sum())]
    return tuple(sums)


@dataclass(frozen=True)
class ModelRef:
    """How a worker builds the driver's model: the library's recipe (:func:`vislib.model_ref`: the
    name, weights, spec files and the overrides given to ``load_model``), the module whose import
    registers a name registered by the caller's own code, the driver's labels, and a fingerprint of
    the driver's weights that the worker's copy must match."""

    ref: LibraryRef
    module: str | None = None
    labels: tuple[str, ...] | None = None
    fingerprint: tuple[float, ...] | None = None

    @property
    def name(self) -> str:
        return self.ref.name

    @property
    def spec_file(self) -> str | None:
        return self.ref.spec_files[0] if self.ref.spec_files else None

    @classmethod
    def of(cls, bundle: ModelBundle) -> ModelRef:
        """The recipe of a bundle loaded by name; a bare ``nn.Module`` cannot travel and is refused."""
        from ..models import model_ref, model_spec

        try:
            ref = model_ref(bundle)
        except ModelError as exc:
            raise ModelError(f"the Ray engine builds the model in every worker: {exc}; or use "
                             f"engine='local'") from None
        module = getattr(model_spec(ref.name).build, "__module__", None)
        own = module is None or module == "vislib" or module.startswith("vislib.")  # registered on import
        return cls(ref=ref, module=None if own else module, labels=tuple(bundle.labels),
                   fingerprint=weights_fingerprint(bundle.model))

    def build(self, device: str | torch.device | None = None) -> ModelBundle:
        """The model, built in this process (a worker), checked against the driver's weights."""
        import vislib

        if self.module and self.name not in vislib.list_models():
            try:
                importlib.import_module(self.module)
            except ImportError as exc:
                raise ModelError(f"a worker cannot import {self.module!r}, which registers the model "
                                 f"{self.name!r} ({exc}); put it on the workers' Python path") from None
        bundle = self.ref.load(device)
        if self.labels is not None:
            bundle.labels = list(self.labels)
        if self.fingerprint is not None:
            mine = weights_fingerprint(bundle.model)
            if len(mine) != len(self.fingerprint) or not np.allclose(mine, self.fingerprint, rtol=1e-9,
                                                                       atol=1e-12):
                raise ModelError(
                    f"the model {self.name!r} built in a worker (weights {self.ref.weights or 'random'}) has "
                    "other weights than yours: load it by name with its weights file (on storage the "
                    "workers see), or use engine='local'")
        return bundle


# --------------------------------------------------------------------------------------------------
# Image sets


def recipe_of(images: ImageSet) -> dict:
    """The image set's recipe plus what identifies it (ids, digest, labels): checked by :func:`reopen`."""
    if images.reopen is None:
        raise InputError(f"{images.name}: the Ray engine's workers read the images themselves, and this "
                         "image set has no recipe for that: open it with vislib.datasets.open_dataset "
                         "(a folder, a zip or the shapes split)")
    return {**images.reopen, "labels": list(images.labels), "digest": images.digest, "n": len(images),
            "ids_hash": ids_hash(images.ids), "cache": os.environ.get("VISLIB_CACHE")}


def ids_hash(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def reopen(recipe: dict) -> ImageSet:
    """The same image set, opened in this process from its recipe (a zip's bytes may come as a Ray
    object reference); raises when the data changed since the driver listed it."""
    from ..datasets import ShapesImages

    kind, labels = recipe["kind"], recipe["labels"]
    if kind == "shapes":
        if recipe.get("cache"):  # the driver's rendering of the split, where this machine can see it
            os.environ.setdefault("VISLIB_CACHE", recipe["cache"])
        images: ImageSet = ShapesImages(labels, split=recipe["split"], limit=recipe["limit"],
                                        mark=recipe["mark"])
    elif kind == "zip":
        data = recipe["data"]
        if not isinstance(data, (bytes, str)):  # an object reference to the bytes
            import ray

            data = ray.get(data)
        images = subset(open_zip(data, labels, name=recipe.get("name")), recipe.get("limit"))
    elif kind == "folder":
        images = subset(open_folder(recipe["path"], labels), recipe.get("limit"))
    else:
        raise InputError(f"unknown image set recipe {kind!r}")
    found = (len(images), images.digest, ids_hash(images.ids))
    same = found == (recipe["n"], recipe["digest"], recipe["ids_hash"])
    if not same:
        raise InputError(f"{images.name}: the images a worker sees are not those the run listed (they "
                         "changed on disk, or the workers do not share the driver's storage)")
    return images
