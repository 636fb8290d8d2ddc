"""Explanation methods: small classes in one registry, grouped in families.

Each family has one runner that computes every requested method of the family from shared passes
(the CAM family: one forward and one backward for all of its methods).
"""

from .base import METHODS, Method, method_names, register_method  # noqa: F401
from . import cam  # noqa: F401  (registers the CAM family)
from . import backprop  # noqa: F401  (registers the backprop family)
from . import perturbation  # noqa: F401  (registers the perturbation family)
