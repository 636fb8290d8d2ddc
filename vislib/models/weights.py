"""Weights files: state dicts read without ever unpickling arbitrary objects, checked against the model."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError

MAX_WEIGHTS_BYTES = 2 * 1024**3


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict without ever unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise WeightsError(f"{path.name}: larger than {MAX_WEIGHTS_BYTES // 2**30} GB")
    suffix = path.suffix.lower()
    state: object  # whatever the file holds, checked below
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
            state = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise WeightsError(f"{path.name}: use a .safetensors file (or .pt/.pth state dict)")
    except WeightsError:
        raise
    except Exception as exc:
        raise WeightsError(f"{path.name}: not a loadable state dict ({type(exc).__name__}: {exc})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path.name}: expected a mapping of parameter names to tensors")
    return state


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise a WeightsError naming missing/unexpected keys and shape mismatches."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_few(shapes)}")
    if problems:
        raise WeightsError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_state_dict_file(model: nn.Module, path: str | os.PathLike) -> None:
    state = read_state_dict(path)
    check_state_dict(model, state, Path(path).name)
    model.load_state_dict(state)



def head_classes(model: nn.Module, state: dict[str, torch.Tensor]) -> int | None:
    """The number of classes of a state dict whose only difference from ``model`` is the size of its
    classifier head: every key present in both, and the keys whose shapes differ all differ only in
    their first dimension, from the same model size to the same file size. None otherwise."""
    own = model.state_dict()
    if set(own) != set(state):
        return None
    differing = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    if not differing or any(own[k].dim() == 0 or state[k].dim() != own[k].dim()
                            or tuple(own[k].shape[1:]) != tuple(state[k].shape[1:]) for k in differing):
        return None
    pairs = {(own[k].shape[0], state[k].shape[0]) for k in differing}
    return int(state[differing[0]].shape[0]) if len(pairs) == 1 else None


def load_weights(
    model: nn.Module,
    path: str | os.PathLike,
    rebuild: Callable[[int], nn.Module] | None = None,
) -> tuple[nn.Module, str | None]:
    """Load the state dict at ``path`` into ``model``; returns (model, note).

    Where the file's classifier head has another number of classes and ``rebuild(n)`` can build the
    architecture with ``n`` classes, the model is rebuilt with that number and the note says so.
    Any other difference stays a :class:`WeightsError` naming the keys and shapes.
    """
    state = read_state_dict(path)
    name = Path(path).name
    note = None
    n = head_classes(model, state) if rebuild is not None else None
    if n is not None and rebuild is not None:
        try:
            rebuilt = rebuild(n)
        except Exception:
            rebuilt = None
        if rebuilt is not None and head_classes(rebuilt, state) is None:
            model = rebuilt
            note = f"{name} has a {n}-class head: the model was built with {n} classes"
    check_state_dict(model, state, name)
    model.load_state_dict(state)
    return model, note
