"""vislib's version, defined once: ``version`` in pyproject.toml.

An installed package reads it from its metadata (:mod:`importlib.metadata`); a checkout (plain, or an
editable install, whose metadata may be older than the file) reads the checkout's pyproject.toml.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _metadata_version
from pathlib import Path


def _checkout_version() -> str | None:
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        return None
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]  # same API, the backport
    project = tomllib.loads(pyproject.read_text()).get("project", {})
    return project.get("version") if project.get("name") == "vislib" else None


def _version() -> str:
    found = _checkout_version()
    if found:
        return found
    try:
        return _metadata_version("vislib")
    except PackageNotFoundError:  # neither installed nor a checkout (copied files)
        return "0+unknown"


__version__ = _version()
