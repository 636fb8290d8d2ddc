"""User-facing errors.

Every error a user can cause (a broken image, a wrong layer name, a method that does not apply to a
model, missing weights) is a :class:`VislibError` with a message written for that user. The CLI turns
them into one line on stderr and exit code 2; the dashboard shows them in the page.
"""

from __future__ import annotations


class VislibError(Exception):
    """Base class: a problem with the user's input, not a bug in vislib."""


class InputError(VislibError, ValueError):
    """An image (or batch) that cannot be used."""


class ModelError(VislibError, ValueError):
    """An unknown model name or a model that cannot be prepared."""


class WeightsError(VislibError, ValueError):
    """A weights file that is missing, unsafe, or does not fit the architecture."""


class LayerError(VislibError, ValueError):
    """A target layer that does not exist or cannot be used."""


class MethodError(VislibError, ValueError):
    """An unknown method, or a method that does not apply to this model / layer / input."""


class TargetError(VislibError, ValueError):
    """A target class that does not exist."""


class MissingDependency(VislibError, ImportError):
    """An optional package that this feature needs is not installed (the message names the extra)."""


class Cancelled(VislibError):
    """The caller cancelled a long computation; the model is left clean."""
