"""Family runners: one function per method family computes all of its requested methods."""

from __future__ import annotations

from collections.abc import Callable

FAMILY_RUNNERS: dict[str, Callable] = {}
FAMILY_ORDER = ("cam", "backprop", "perturbation")  # later families may reuse earlier passes


def register_family(family: str):
    def decorator(runner: Callable) -> Callable:
        if family in FAMILY_RUNNERS:
            raise ValueError(f"family {family!r} already has a runner")
        FAMILY_RUNNERS[family] = runner
        return runner

    return decorator
