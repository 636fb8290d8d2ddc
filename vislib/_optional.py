"""Optional packages: one :func:`require` for every import of a package that an extra installs.

A missing package is a :class:`~vislib.errors.MissingDependency` (or the caller's own
:class:`~vislib.errors.VislibError` subclass) whose message names the extra to install::

    transformers = require("transformers", "hf", feature="hf: models")
    # ModelError: hf: models need transformers, which is not installed: pip install "vislib[hf]"
    # (in a checkout: .venv/bin/pip install -r requirements-extras.txt)
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependency, VislibError

#: extra → (what it installs, the pinned requirements file that installs it in a checkout)
EXTRAS = {
    "hf": ("transformers", "requirements-extras.txt"),
    "ray": ("ray[data]", "requirements-extras.txt"),
    "lrp": ("zennit", "requirements-extras.txt"),
    "dashboard": ("streamlit, plotly", "requirements.txt"),
    "video": ("av", "requirements.txt"),
    "bench": ("grad-cam, torchcam, captum", "requirements-bench.txt"),
}


def install_hint(extra: str) -> str:
    """``pip install "vislib[extra]"`` and the checkout's equivalent."""
    if extra not in EXTRAS:
        raise KeyError(f"unknown extra {extra!r}; one of {', '.join(EXTRAS)}")
    return f'pip install "vislib[{extra}]" (in a checkout: .venv/bin/pip install -r {EXTRAS[extra][1]})'


def require(module: str, extra: str, *, feature: str | None = None, otherwise: str | None = None,
            error: type[VislibError] = MissingDependency) -> ModuleType:
    """``module`` imported, or ``error`` saying that ``feature`` (default: the module) needs the extra
    (and ``otherwise``, what the user can do instead: ``"leave out --parquet"``).

    The message names the package that is missing: the module's own, or one of its dependencies
    (``ray.data`` without ``pyarrow``): installing the extra brings both."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (exc.name or module).split(".")[0]
        what, instead = feature or module, f"; or {otherwise}" if otherwise else ""
        raise error(f"{what} needs {missing}, which is not installed: {install_hint(extra)}{instead}") \
            from None
