"""Explanation methods: small classes in one registry, grouped in families.

Each family has one runner that computes every requested method of the family from shared passes
(the CAM family: one forward and one backward for all of its methods). Importing a family's module
registers its methods and its runner.
"""

from . import backprop, cam, perturbation, perturbation_drise  # noqa: F401
from .base import METHODS, Method, method_names, register_method  # noqa: F401
