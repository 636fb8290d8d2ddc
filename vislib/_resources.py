"""Where the files vislib reads at run time live: the one place that builds those paths.

Two layouts, one answer:

* installed from a wheel: the wheel maps the checkout's ``assets/`` to ``vislib/_assets`` and its
  dashboard (``app.py``, ``pages/``, ``.streamlit/``) to ``vislib/_dashboard`` (see pyproject.toml),
  found with :mod:`importlib.resources`;
* a plain checkout or an editable install (``pip install -e .``): the checkout's own folders, next to
  the ``vislib`` package.

Everything else asks :func:`resource` (``resource("assets", "models")``, ``resource("dashboard",
"app.py")``), so that a new bundled model (any ``assets/models/*.json``) travels with the package
without a list to update.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: resource root → (folder inside the installed package, folder in the checkout relative to its root)
ROOTS = {"assets": ("_assets", "assets"), "dashboard": ("_dashboard", ".")}


def resource(root: str, *parts: str) -> Path:
    """The path of ``parts`` under a resource root (``"assets"`` or ``"dashboard"``); it may not exist
    (a bundled model someone removed): callers check and say what is missing."""
    if root not in ROOTS:
        raise KeyError(f"unknown resource root {root!r}; one of {', '.join(ROOTS)}")
    installed, checkout = ROOTS[root]
    package = Path(str(files("vislib")))  # wheels install unpacked, so this is a real folder
    base = package / installed
    if not base.is_dir():
        base = (package.parent / checkout).resolve()
    return base.joinpath(*parts)
