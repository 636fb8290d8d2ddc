"""Streamlit pieces shared by the dashboard's pages (``app.py`` and ``pages/*.py``).

Only widgets and caching live here; the logic is in :mod:`vislib.ui` (pure, tested without
Streamlit). This folder is not a page: Streamlit only lists the ``*.py`` files directly in ``pages/``.
"""

from __future__ import annotations

import os

import streamlit as st
import torch

import vislib
from vislib import ui
from vislib.errors import VislibError
from vislib.models import DEFAULT_MODEL, model_spec, pretrained_available

#: Session keys that must survive a switch between pages (widget state alone does not).
PERSISTENT = ("model", "weights", "source", "sample", "layer")
SOURCES = ("Sample", "Upload", "Camera")
UPLOAD_TYPES = ["jpg", "jpeg", "png", "webp", "bmp"]


def configure_threads() -> None:
    """Bound torch's intra-op threads once per process (``VISLIB_THREADS``; default: half the cores).

    The server computes each session in its own worker thread; with every call also spreading over
    all cores, a small shared CPU oversubscribes badly (measured on 2 busy cores: the default view on
    resnet50 took 1.4–2.3 s with 2 threads and 0.37–0.64 s with 1).
    """
    if getattr(configure_threads, "done", False):
        return
    configure_threads.done = True
    wanted = os.environ.get("VISLIB_THREADS", "")
    threads = int(wanted) if wanted.isdigit() and int(wanted) > 0 else max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)


def keep_state() -> None:
    """Re-assign persistent keys so Streamlit keeps them when their widgets are not on this page."""
    configure_threads()
    for key in PERSISTENT:
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]


@st.cache_resource(max_entries=3, show_spinner=False)
def load_bundle(name: str, weights: str):
    """One model per (name, weights) per process; the bundle carries its own lock for hooked passes.

    A random initialisation is seeded (without touching the global RNG), so a link reproduces it.
    """
    if weights != "random":
        return vislib.load_model(name, weights="default")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return vislib.load_model(name, weights=None)


def default_model(models: list[str]) -> str:
    if DEFAULT_MODEL in models:
        return DEFAULT_MODEL
    bundled = [m for m in models if model_spec(m).source == "bundled"]
    if bundled:
        return bundled[0]
    return "resnet18" if "resnet18" in models else models[0]


def default_weights(name: str) -> str:
    spec = model_spec(name)
    if spec.source == "torchvision" and not pretrained_available(name):
        return "random"
    return "pretrained"


def _model_label(name: str) -> str:
    spec = model_spec(name)
    return f"{name} · bundled" if spec.source == "bundled" else f"{name} · torchvision"


def _weights_label(source: str):
    return {"pretrained": "Trained (bundled)" if source == "bundled" else "Pretrained (ImageNet)",
            "random": "Random init"}.get


def _on_model_change() -> None:
    st.session_state["weights"] = default_weights(st.session_state["model"])
    for key in ("layer", "layers", "target"):
        st.session_state.pop(key, None)


def missing_weights_note(name: str) -> str:
    import torchvision

    from vislib.models import pretrained_cache_path

    weights = torchvision.models.get_model_weights(name).DEFAULT
    path = pretrained_cache_path(weights)
    return (
        f"ImageNet weights for **{name}** are not on this machine. To use them, download "
        f"[{path.name}]({weights.url}) into `{path.parent}` (or start the app once with internet "
        f"access). Meanwhile you can explore the randomly initialised network: its maps show the "
        f"architecture's bias, not what it learned."
    )


def model_picker():
    """Model and weights pickers (in the current container); the loaded bundle, or None after an error."""
    models = vislib.list_models()
    state = st.session_state
    if state.get("model") not in models:
        state["model"] = default_model(models)
    st.selectbox("Model", models, key="model", format_func=_model_label, on_change=_on_model_change)
    name = state["model"]
    spec = model_spec(name)
    if state.get("weights") not in ("pretrained", "random"):
        state["weights"] = default_weights(name)
    st.radio("Weights", ("pretrained", "random"), key="weights", horizontal=True,
             format_func=_weights_label(spec.source))
    if spec.source == "torchvision" and not pretrained_available(name):
        st.caption(missing_weights_note(name))
    try:
        with st.spinner(f"Loading {name}…"):
            return load_bundle(name, state["weights"])
    except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
        show_error(exc)
        return None


def _forget_image(key: str) -> None:
    """The user removed the upload or the photo: forget the stored copy too."""
    if st.session_state.get(key) is None:
        st.session_state.pop("image_bytes", None)
        st.session_state.pop("image_from", None)


def _remember(data: bytes, name: str) -> None:
    st.session_state["image_bytes"] = data
    st.session_state["image_name"] = name


@st.cache_data(max_entries=16, show_spinner=False)
def _sample_bytes(name: str) -> bytes:
    path = ui.sample_choices().get(name)
    return path.read_bytes() if path is not None else ui.generated_sample()


def image_picker() -> tuple[bytes, str] | None:
    """Sample / upload / camera; returns (file bytes, name) or None while there is no image yet."""
    state = st.session_state
    if state.get("source") not in SOURCES:
        state["source"] = SOURCES[0]
    st.segmented_control("Image", SOURCES, key="source", width="stretch")
    source = state.get("source") or SOURCES[0]
    if source == "Sample":
        samples = ui.sample_choices()
        if state.get("sample") not in samples:
            state["sample"] = next(iter(samples))
        st.selectbox("Sample image", list(samples), key="sample", label_visibility="collapsed")
        return _sample_bytes(state["sample"]), state["sample"]
    if source == "Upload":
        upload = st.file_uploader("Upload an image (JPEG, PNG, WebP, BMP)", type=UPLOAD_TYPES, key="upload",
                                  on_change=_forget_image, args=("upload",))
        if upload is not None:
            _remember(upload.getvalue(), upload.name)
            state["image_from"] = "Upload"
    else:
        photo = st.camera_input("Take a photo", key="camera", on_change=_forget_image, args=("camera",))
        if photo is not None:
            _remember(photo.getvalue(), "camera photo")
            state["image_from"] = "Camera"
    if state.get("image_from") == source and state.get("image_bytes"):
        return state["image_bytes"], state["image_name"]
    return None


def input_and_model():
    """The top of every image page's sidebar (call inside ``with st.sidebar``): navigation, the image
    picker and the model picker. Returns (picked image or None, bundle or None)."""
    nav()
    st.markdown("### :material/image: Input")
    picked = image_picker()
    st.markdown("### :material/neurology: Model")
    return picked, model_picker()


def nav() -> None:
    """Page links at the top of the sidebar (the default page list is hidden in config.toml)."""
    st.page_link("app.py", label="Explain", icon=":material/visibility:")
    st.page_link("pages/1_Layer_explorer.py", label="Layer explorer", icon=":material/layers:")
    st.page_link("pages/2_Error_analysis.py", label="Error analysis", icon=":material/troubleshoot:")
    st.page_link("pages/3_Learn.py", label="Learn", icon=":material/school:")
    st.divider()


def show_error(exc: Exception) -> None:
    """A problem as one short message in the page, never a traceback: a :class:`VislibError`'s text
    (written for the user), or the type and message of anything unexpected."""
    if isinstance(exc, VislibError):
        st.error(str(exc), icon=":material/error:")
    else:
        st.error(f"Something went wrong ({type(exc).__name__}: {exc}).", icon=":material/error:")


class Miss(Exception):
    """Raised inside a page's cached lookup (``store(key)``) so that nothing is stored for an unknown
    key; the page stores a result with ``store(key, _result=result)``."""


def cached_or_run(key: str, job_fn, store, *, name: str, verb: str = "Computing",
                  again: str = "Compute again"):
    """(result, from cache): ``store``'s result for ``key``, or ``job_fn`` run in a worker with a
    progress bar and a Stop button (``name`` keys the button and the session's stopped flag; ``verb``
    and ``again`` label the bar and the button that restarts a stopped run).

    When the script is interrupted (a widget changed, Stop pressed), ``finally`` cancels the job and
    waits for it: vislib unwinds its hooks, so the next run finds the model clean.
    """
    try:
        return store(key), True
    except Miss:
        pass
    stopped = f"_{name}_pressed"
    if st.session_state.get(stopped) == key:
        st.warning("Stopped before it finished. Change a setting, or run it again.",
                   icon=":material/stop_circle:")
        if not st.button(again, icon=":material/refresh:"):
            return None, False
        st.session_state.pop(stopped, None)
    job = ui.BackgroundJob(job_fn).start()
    slot, bar = st.empty(), None
    try:
        while not job.wait(0.05):
            if bar is None and job.elapsed > 0.3:
                with slot.container():
                    bar = st.progress(0.0, text=f"{verb}…")
                    st.button("Stop", key=name, icon=":material/stop_circle:", on_click=_mark_stopped,
                              args=(stopped, key))
            if bar is not None:
                bar.progress(job.fraction, text=f"{verb}… {job.text}")
    finally:
        if not job.done:
            job.cancel()
    slot.empty()
    result = job.result()
    store(key, _result=result)
    return result, False


def _mark_stopped(flag: str, key: str) -> None:
    st.session_state[flag] = key
