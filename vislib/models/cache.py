"""Pretrained weights through the standard caches, and one clear line when they are missing.

- torchvision and timm checkpoints given by URL live in the torch hub cache,
  ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``);
- Hugging Face repos (``hf:`` models and most timm weights) live in the Hugging Face hub cache,
  ``$HF_HUB_CACHE`` (default ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``).

A file that is cached is read from there, also offline. One that is not is downloaded when the
machine is online; offline (``VISLIB_OFFLINE``, ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE`` set)
or when the download fails, the error is one line naming the file or repo and the folder it
belongs in. The cache is always checked before any network call.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import WeightsError

OFFLINE_VARIABLES = ("VISLIB_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
RANDOM_HINT = "or use weights=None (--weights none) for a randomly initialised model"


def offline() -> bool:
    """Whether downloads are off (any of ``OFFLINE_VARIABLES`` set to a true value)."""
    return any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no")
               for v in OFFLINE_VARIABLES)


def torch_checkpoint_path(url: str) -> Path:
    """Where the torch hub cache keeps (or would download) the checkpoint at ``url``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url.split("?")[0])


def fetch_url(url: str, what: str) -> Path:
    """The cached checkpoint at ``url``, downloaded into the torch hub cache when online."""
    path = torch_checkpoint_path(url)
    if path.is_file():
        return path
    hint = (f"pretrained weights for {what} are not cached: put {path.name} in {path.parent} "
            f"(download it from {url}), or run once with internet access, {RANDOM_HINT}")
    if offline():
        raise WeightsError(hint)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(path), progress=False)
    except Exception as exc:
        path.unlink(missing_ok=True)
        raise WeightsError(f"{hint} [download failed: {type(exc).__name__}]") from None
    return path


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, from the environment at call time."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME")
    if not home:
        home = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hf_cached(repo: str, filename: str) -> Path | None:
    """The cached copy of ``filename`` from the Hugging Face ``repo``, or None (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=str(hf_cache_dir()))
    return Path(found) if isinstance(found, str) else None


def hf_missing(repo: str, filenames: Sequence[str], what: str) -> str:
    """One line: ``what`` is not cached, which repo and files it needs, and the folder they belong in."""
    names = " or ".join(filenames)
    folder = hf_cache_dir() / ("models--" + repo.replace("/", "--"))
    return (f"{what} are not cached: Hugging Face repo {repo} ({names}) belongs in {folder}; "
            f"run once with internet access (or copy the cache there), {RANDOM_HINT}")


def hf_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (so that an offline machine that did not
    say so fails in seconds, not after the hub client's minute of retries)."""
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def fetch_hf(repo: str, filenames: Sequence[str], what: str) -> Path:
    """The first of ``filenames`` in ``repo``: from the cache, else downloaded when online.
    ``what`` names the thing for the error ("pretrained weights for timm:resnet50")."""
    for filename in filenames:
        path = hf_cached(repo, filename)
        if path is not None:
            return path
    if offline():
        raise WeightsError(hf_missing(repo, filenames, what))
    if not hf_reachable():
        raise WeightsError(f"{hf_missing(repo, filenames, what)} [no network: the hub is unreachable]")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    failure: Exception
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename, cache_dir=str(hf_cache_dir())))
        except LocalEntryNotFoundError as exc:  # a connection problem (a subclass of the next one)
            failure = exc
        except EntryNotFoundError:
            continue
        except Exception as exc:
            failure = exc
        raise WeightsError(f"{hf_missing(repo, filenames, what)} [download failed: {type(failure).__name__}]")
    raise WeightsError(f"{what}: Hugging Face repo {repo} has none of {', '.join(filenames)}")
