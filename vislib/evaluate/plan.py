"""What a worker needs to do its share of a run, in picklable form: the model as a *spec* (never a
pickled ``nn.Module``) and the image set as a *recipe* (paths or zip members, never decoded pixels).

:class:`ModelRef` names a registered model, its weights and, for a model registered by the caller's
own code, the module whose import registers it; a worker builds the model from it once and checks it
against the driver's by a fingerprint of the weights. :func:`reopen` opens the same image set in the
worker from ``ImageSet.reopen`` and checks that it is the same set (same ids, same digest).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..datasets import ImageSet, open_folder, open_zip, subset
from ..errors import InputError, ModelError
from ..models import ModelBundle


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
    """How a worker builds the driver's model: ``load_model(name, weights)``.

    ``weights``: "default", None (the seeded random initialisation) or a file path (on a cluster:
    on storage every node sees). ``module``: imported first when ``name`` was registered by code
    outside vislib (``register_model`` in the caller's module). ``spec_file``: a model spec file
    that registers ``name`` (read with ``vislib.register_models`` where that exists).
    """

    name: str
    weights: str | None = "default"
    module: str | None = None
    spec_file: str | None = None
    labels: tuple[str, ...] | None = None
    fingerprint: tuple[float, ...] | None = None

    @classmethod
    def of(cls, bundle: ModelBundle) -> ModelRef:
        """The spec of a bundle loaded by name; a bare ``nn.Module`` cannot travel and is refused."""
        from ..models import model_spec

        try:
            spec = model_spec(bundle.name)
        except ModelError:
            raise ModelError(
                f"the Ray engine builds the model in every worker from its registered name, and "
                f"{bundle.name!r} is not registered: register it (vislib.models.register_model in an "
                f"importable module) or use engine='local'") from None
        weights: str | None = "default"
        bundled_default = f"assets/models/{bundle.name}.safetensors"
        if bundle.weights == "random":
            weights = None
        elif bundle.weights != bundled_default and Path(bundle.weights).is_file():
            weights = str(Path(bundle.weights).resolve())
        module = getattr(spec.build, "__module__", None)
        spec_file = getattr(spec, "spec_file", None) or getattr(spec, "path", None)
        own = module is None or module == "vislib" or module.startswith("vislib.")  # registered on import
        return cls(name=bundle.name, weights=weights, module=None if own else module,
                   spec_file=str(spec_file) if spec_file else None, labels=tuple(bundle.labels),
                   fingerprint=weights_fingerprint(bundle.model))

    def build(self, device: str | torch.device | None = None) -> ModelBundle:
        """The model, built in this process (a worker), checked against the driver's weights."""
        import vislib

        if self.spec_file:
            register = getattr(vislib, "register_models", None)
            if register is None:
                raise ModelError(f"{self.spec_file}: this vislib cannot read model spec files")
            if self.name not in vislib.list_models():
                register(self.spec_file)
        if self.module and self.name not in vislib.list_models():
            try:
                importlib.import_module(self.module)
            except ImportError as exc:
                raise ModelError(f"a worker cannot import {self.module!r}, which registers the model "
                                 f"{self.name!r} ({exc}); put it on the workers' Python path") from None
        bundle = vislib.load_model(self.name, weights=self.weights, device=device)
        if self.labels is not None:
            bundle.labels = list(self.labels)
        if self.fingerprint is not None:
            mine = weights_fingerprint(bundle.model)
            if len(mine) != len(self.fingerprint) or not np.allclose(mine, self.fingerprint, rtol=1e-9,
                                                                       atol=1e-12):
                raise ModelError(
                    f"the model {self.name!r} built in a worker (weights {self.weights or 'random'}) has "
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
