"""Models uploaded in a browser session: an architecture from the catalogue plus the user's weights
file (and optionally a labels file), held by that session only. No Streamlit in here.

- **Safe reading.** ``.safetensors`` files hold tensors only; ``.pt`` / ``.pth`` files are read with
  ``torch.load(weights_only=True)``, whose unpickler refuses every Python object that is not a tensor
  or a plain container, *before* building it: a pickle that would run code is refused and never
  executed.
- **Classes from the file.** Where the file's classifier head has another number of classes than the
  architecture's default, the model is built with the file's number (the library's head-size
  adaptation in :func:`vislib.load_model`); keys, shapes and labels that do not fit are
  :class:`WeightsError` / :class:`ModelError` messages naming them.
- **Per session.** A :class:`SessionUploads` lives in the session's own state (never in a cache that
  another session could reach). Its bundles are named ``upload:<name>`` and their weights string
  carries an id salted with the session id, so that results cached by model name and weights can
  only be found again by the same session. :class:`UploadLedger` counts the bytes that all
  sessions' uploads hold (no models: numbers only), so the server refuses an upload that would pass
  its budget, and :meth:`UploadLedger.sweep` empties the uploads of sessions that have been gone
  longer than a grace period (a closed tab: Streamlit keeps a disconnected session for a reconnect).
- **Caps.** A weights file may be at most :data:`MAX_MODEL_MB` (``VISLIB_MAX_MODEL_MB``, default
  300 MB), all uploaded models of the server together :data:`UPLOADS_BUDGET_MB`
  (``VISLIB_UPLOADS_BUDGET_MB``, default 2048 MB); images keep their own 20 MB cap
  (:data:`MAX_IMAGE_MB`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import tempfile
import threading
import time
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ModelError, VislibError, WeightsError

MB = 1024 * 1024


def _env_mb(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() and int(value) > 0 else default


#: Largest weights file a browser may upload, in MB.
MAX_MODEL_MB = _env_mb("VISLIB_MAX_MODEL_MB", 300)
#: All uploaded models of all sessions together, in MB (their tensors, as held in memory).
UPLOADS_BUDGET_MB = _env_mb("VISLIB_UPLOADS_BUDGET_MB", 2048)
#: Largest image upload, in MB (checked by the image path itself, whatever the server allows).
MAX_IMAGE_MB = 20
#: At most this many uploaded models per session (the oldest goes when another comes).
MAX_PER_SESSION = 3
WEIGHTS_TYPES = ("safetensors", "pt", "pth")
LABELS_TYPES = ("txt", "json")
MAX_LABELS_BYTES = 4 * MB


def check_size(nbytes: int, cap_mb: int, what: str) -> None:
    """Refuse ``nbytes`` above ``cap_mb`` with a message naming the cap."""
    if nbytes > cap_mb * MB:
        raise WeightsError(f"{what} is {nbytes / MB:.1f} MB; the limit is {cap_mb} MB")


def check_image_size(nbytes: int) -> None:
    """The image path's own 20 MB cap (the server's upload limit is larger, for weights files)."""
    from .errors import InputError

    if nbytes > MAX_IMAGE_MB * MB:
        raise InputError(f"the image is {nbytes / MB:.1f} MB; images are limited to {MAX_IMAGE_MB} MB")


# --------------------------------------------------------------------------------------------------
# Reading the files


def read_weights(data: bytes, filename: str) -> dict[str, torch.Tensor]:
    """A state dict from an uploaded file's bytes, without ever running code from it.

    ``.safetensors``: tensors only by construction. ``.pt`` / ``.pth``: ``torch.load`` with
    ``weights_only=True``; a pickle that names anything but tensors and plain containers (a class, a
    function: what a ``__reduce__`` exploit needs) is refused before it is built.
    """
    check_size(len(data), MAX_MODEL_MB, filename)
    suffix = Path(filename).suffix.lower().lstrip(".")
    if suffix not in WEIGHTS_TYPES:
        raise WeightsError(f"{filename}: upload a .safetensors file, or a .pt / .pth state dict")
    state: object  # whatever the file holds, checked below
    if suffix == "safetensors":
        from safetensors.torch import load

        try:
            state = load(data)
        except Exception as exc:  # noqa: BLE001  (a damaged or foreign file)
            raise WeightsError(f"{filename}: not a readable .safetensors file ({type(exc).__name__}: "
                               f"{str(exc)[:200]})") from None
    else:
        state = _load_pickled_state(data, filename)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise WeightsError(f"{filename}: expected a state dict (parameter names → tensors), e.g. "
                           f"torch.save(model.state_dict(), path)")
    return state


def _load_pickled_state(data: bytes, filename: str):
    if not zipfile.is_zipfile(io.BytesIO(data)) and not data[:2] == b"\x80\x02":
        raise WeightsError(f"{filename}: not a PyTorch file (torch.save writes a zip archive)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        what = f" ({name})" if (name := _refused_global(str(exc))) else ""
        raise WeightsError(
            f"{filename} was refused without running it: besides tensors it holds Python objects{what} "
            f"that would run code when loaded. Upload a plain state dict (torch.save(model.state_dict(), "
            f"path)) or, better, a .safetensors file") from None
    except Exception as exc:  # noqa: BLE001  (a damaged file)
        raise WeightsError(f"{filename}: not a readable PyTorch file ({type(exc).__name__}: "
                           f"{str(exc)[:200]})") from None


#: The global a refused pickle names, in torch's messages ("GLOBAL posix.system whose module…",
#: "Unsupported global: GLOBAL posix.system was not…") or pickle's own ("GLOBAL posix system").
_GLOBAL = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)(?: (?!(?:whose|was|is|not)\b)([A-Za-z_][\w.]*))?")


def _refused_global(message: str) -> str | None:
    """The refused global as ``module.name`` (e.g. ``posix.system``), or None when not named."""
    found = _GLOBAL.search(message)
    if not found:
        return None
    return ".".join(part for part in found.groups() if part)


def read_labels(data: bytes, filename: str) -> list[str]:
    """Class labels from an uploaded file: one label per line (``.txt``), or JSON: a list of strings
    or an ``{"0": "cat", "1": "dog"}`` mapping (as Hugging Face's ``id2label``) covering 0…n−1."""
    if len(data) > MAX_LABELS_BYTES:
        raise ModelError(f"{filename}: a labels file is limited to {MAX_LABELS_BYTES // MB} MB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ModelError(f"{filename}: a labels file must be UTF-8 text") from None
    if Path(filename).suffix.lower() == ".json":
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise ModelError(f"{filename}: not valid JSON ({exc})") from None
        if isinstance(value, dict):
            try:
                index = {int(k): v for k, v in value.items()}
            except (TypeError, ValueError):
                raise ModelError(f"{filename}: a JSON mapping must map class indices (0, 1, …) to "
                                 f"labels") from None
            if sorted(index) != list(range(len(index))):
                raise ModelError(f"{filename}: the JSON mapping must cover the indices 0…{len(index) - 1} "
                                 f"exactly once")
            value = [index[i] for i in range(len(index))]
        labels = value
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(labels, list) or not labels or not all(isinstance(v, str) for v in labels):
        raise ModelError(f"{filename}: need a non-empty list of labels (one per line, or a JSON list of "
                         f"strings)")
    return [v.strip() for v in labels]


# --------------------------------------------------------------------------------------------------
# Building an uploaded model


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by a model's parameters and buffers."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def upload_name(filename: str, taken: set[str] | frozenset[str] = frozenset()) -> str:
    """``upload:<file stem>`` (letters, digits, ``_ - .``), made unique among ``taken``."""
    stem = re.sub(r"[^A-Za-z0-9_.\-]+", "_", Path(filename).stem).strip("._-") or "model"
    name, n = f"upload:{stem[:48]}", 2
    while name in taken:
        name, n = f"upload:{stem[:48]}-{n}", n + 1
    return name


def upload_id(session_id: str, digest: str) -> str:
    """A short id of one file in one session: SHA-256 of the session id and the file's digest."""
    return hashlib.sha256(f"{session_id}\0{digest}".encode()).hexdigest()[:12]


@dataclass
class UploadedModel:
    """One uploaded model: the bundle and where it came from."""

    name: str  # "upload:<stem>"
    architecture: str
    weights_file: str
    labels_file: str | None
    digest: str  # SHA-256 of the weights file
    nbytes: int  # tensors held in memory
    bundle: object = field(repr=False)
    created: float = field(default_factory=time.time)


def build_upload(
    architecture: str,
    weights: bytes,
    weights_file: str,
    *,
    labels: bytes | None = None,
    labels_file: str | None = None,
    session_id: str = "",
    taken: set[str] | frozenset[str] = frozenset(),
    device: str | torch.device | None = None,
    check: Callable[[int], None] | None = None,
) -> UploadedModel:
    """Build ``architecture`` (a catalogue name) with the uploaded weights (and labels).

    The file is checked without running code (:func:`read_weights`), written to a private temporary
    folder for :func:`vislib.load_model` (which builds the architecture with the file's number of
    classes) and removed at once. ``check(nbytes)`` may refuse the model's size (the server's
    budget). The bundle's name is ``upload:<file stem>``; its ``weights`` carries the file name and an
    id salted with ``session_id``.
    """
    from .models import load_model
    from .ui import dashboard_refusal

    refusal = dashboard_refusal(architecture)
    if refusal is not None or architecture.startswith("upload:"):
        raise ModelError(refusal or f"pick an architecture from the catalogue, not {architecture!r}")
    state = read_weights(weights, weights_file)
    names = read_labels(labels, labels_file or "labels.txt") if labels is not None else None
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    if check is not None:
        check(nbytes)
    del state
    suffix = Path(weights_file).suffix.lower()
    with tempfile.TemporaryDirectory(prefix="vislib-upload-") as folder:
        path = Path(folder) / f"weights{suffix}"
        path.write_bytes(weights)
        try:
            bundle = load_model(architecture, weights=path, device=device)
        except VislibError as exc:
            text = _without(str(exc), str(path), weights_file)
            raise type(exc)(f"{weights_file} on {architecture}: {text}") from None
    classes = len(bundle.labels)
    if names is not None:
        if len(names) != classes:
            raise ModelError(f"{labels_file}: {len(names)} labels, but {weights_file} gives {architecture} "
                             f"{classes} classes")
        bundle.labels, bundle.labels_from = names, f"your file {labels_file}"
    elif getattr(bundle, "labels_from", "") in ("", "given", "numbered", "class indices"):
        bundle.labels_from = "class numbers (no labels file)"
    digest = hashlib.sha256(weights).hexdigest()
    name = upload_name(weights_file, taken)
    bundle.name = name
    bundle.weights = f"{weights_file} (upload {upload_id(session_id, digest)})"
    bundle.source = "upload"
    bundle.upload_architecture = architecture
    bundle.notes = [_without(n, str(path), weights_file) for n in bundle.notes]
    bundle.ref = None  # cannot be rebuilt elsewhere: its file is gone
    return UploadedModel(name=name, architecture=architecture, weights_file=weights_file,
                         labels_file=labels_file if names is not None else None, digest=digest,
                         nbytes=model_bytes(bundle.model), bundle=bundle)


def _without(text: str, path: str, filename: str) -> str:
    """``text`` with the user's file name instead of the private temporary copy's path or name."""
    return text.replace(path, filename).replace(Path(path).name, filename)


# --------------------------------------------------------------------------------------------------
# Who holds what


class UploadLedger:
    """Bytes held by all sessions' uploaded models, and the sessions' upload holders (weakly).

    Numbers only: no session can reach another's models through it. A model's bytes are released
    when its bundle is freed (a ``weakref.finalize``), whoever drops it.
    """

    def __init__(self, budget_mb: int | None = None):
        self.budget = (budget_mb or UPLOADS_BUDGET_MB) * MB
        self._lock = threading.Lock()
        self._held: dict[int, int] = {}  # token → bytes
        self._next = 0
        self._sessions: dict[str, weakref.ref] = {}  # session id → its SessionUploads
        self._gone_since: dict[str, float] = {}

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return sum(self._held.values())

    @property
    def held_models(self) -> int:
        with self._lock:
            return len(self._held)

    def check(self, nbytes: int) -> None:
        """Refuse a model of ``nbytes`` that would pass the server's budget."""
        held = self.held_bytes
        if held + nbytes > self.budget:
            raise WeightsError(
                f"the server holds {held / MB:.0f} MB of uploaded models (all sessions) and this one needs "
                f"{nbytes / MB:.0f} MB more than its budget of {self.budget // MB} MB allows; remove one of "
                f"your uploads or try again later")

    def hold(self, uploaded: UploadedModel) -> None:
        with self._lock:
            token, self._next = self._next, self._next + 1
            self._held[token] = uploaded.nbytes
        weakref.finalize(uploaded.bundle, self._release, token)

    def _release(self, token: int) -> None:
        with self._lock:
            self._held.pop(token, None)

    def register(self, session_id: str, holder: SessionUploads) -> None:
        with self._lock:
            self._sessions[session_id] = weakref.ref(holder)
            self._gone_since.pop(session_id, None)

    def sweep(self, alive: Callable[[str], bool], grace: float, now: float | None = None) -> list[str]:
        """Empty the uploads of sessions that ``alive`` has said are gone for longer than ``grace``
        seconds; returns their ids. Sessions whose holder was already freed are forgotten."""
        now = time.monotonic() if now is None else now
        emptied = []
        with self._lock:
            sessions = list(self._sessions.items())
        for session_id, ref in sessions:
            holder = ref()
            if holder is None:
                with self._lock:
                    self._sessions.pop(session_id, None)
                    self._gone_since.pop(session_id, None)
                continue
            if alive(session_id):
                self._gone_since.pop(session_id, None)
                continue
            since = self._gone_since.setdefault(session_id, now)
            if now - since >= grace:
                holder.clear("the browser session ended")
                with self._lock:
                    self._sessions.pop(session_id, None)
                    self._gone_since.pop(session_id, None)
                emptied.append(session_id)
        return emptied


#: The process's ledger (the dashboard's server).
LEDGER = UploadLedger()


class SessionUploads:
    """The uploaded models of one browser session, kept in that session's own state."""

    def __init__(self, session_id: str, ledger: UploadLedger | None = None):
        self.session_id = session_id
        self.ledger = ledger or LEDGER
        self._models: dict[str, UploadedModel] = {}
        self.cleared: str | None = None  # why the uploads were emptied, if they were
        self.ledger.register(session_id, self)

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str) -> UploadedModel | None:
        return self._models.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def __len__(self) -> int:
        return len(self._models)

    def add(self, architecture: str, weights: bytes, weights_file: str, *, labels: bytes | None = None,
            labels_file: str | None = None, device=None) -> UploadedModel:
        """Build and keep an uploaded model (the oldest goes beyond :data:`MAX_PER_SESSION`)."""
        uploaded = build_upload(
            architecture, weights, weights_file, labels=labels, labels_file=labels_file,
            session_id=self.session_id, taken=set(self._models), device=device, check=self.ledger.check)
        while len(self._models) >= MAX_PER_SESSION:
            self._models.pop(next(iter(self._models)))
        self._models[uploaded.name] = uploaded
        self.ledger.hold(uploaded)
        self.cleared = None
        return uploaded

    def remove(self, name: str) -> None:
        self._models.pop(name, None)

    def clear(self, reason: str = "") -> None:
        self._models.clear()
        self.cleared = reason or None
