"""Streamlit pieces shared by the dashboard's pages (``app.py`` and ``pages/*.py``).

Only widgets and caching live here; the logic is in :mod:`vislib.ui` (pure, tested without
Streamlit). This folder is not a page: Streamlit only lists the ``*.py`` files directly in ``pages/``.
"""

from __future__ import annotations

import os
import sys

import streamlit as st
import torch

from vislib import ui, uploads
from vislib._resources import resource
from vislib.errors import VislibError

#: Session keys that must survive a switch between pages (widget state alone does not).
PERSISTENT = ("model", "weights", "source", "sample", "layer", "model_group", "model_filter", "upload_arch")
SOURCES = ("Sample", "Upload", "Camera")
#: The Stop button in Streamlit's toolbar status widget (Streamlit 1.67's markup).
TOOLBAR_STOP = '[data-testid="stStatusWidget"] button'
#: Every page's favicon: a file this server sends (a ``:material/…:`` icon would make the browser fetch
#: it from a public font host on every visit, which a classroom or a lab without internet must not need).
FAVICON = str(resource("assets", "favicon.png"))
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


def keep_state(*page_keys: str) -> None:
    """Re-assign persistent keys so Streamlit keeps them when their widgets are not drawn: on another
    page (``PERSISTENT``), or on a run of this page that stops early (``page_keys``: e.g. the layer
    slider while an upload is awaited). Streamlit drops a widget's value after a run that does not
    draw it; a value set through ``st.session_state`` stays. The widgets of ``page_keys`` take their
    default from the session state (``setdefault``), not from a ``value=`` argument."""
    configure_threads()
    for key in (*PERSISTENT, *page_keys):
        if key in st.session_state:
            st.session_state[key] = st.session_state[key]
    # One Stop per computation: the page's own, beside its progress bar. Streamlit's toolbar shows a
    # second one while a script runs (it stops the run, not the worker; the page's cancels the work).
    st.html(f"<style>{TOOLBAR_STOP} {{ display: none; }}</style>")


def _forget_image(key: str) -> None:
    """The user removed the upload or the photo: forget the stored copy too."""
    if st.session_state.get(key) is None:
        st.session_state.pop("image_bytes", None)
        st.session_state.pop("image_from", None)


def _image_fits(nbytes: int) -> bool:
    """The image path's own 20 MB cap (the server accepts larger files, for weights uploads)."""
    try:
        uploads.check_image_size(nbytes)
    except VislibError as exc:
        st.error(str(exc), icon=":material/error:")
        return False
    return True


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
                                  on_change=_forget_image, args=("upload",),
                                  max_upload_size=uploads.MAX_IMAGE_MB)
        if upload is not None and _image_fits(upload.size):
            _remember(upload.getvalue(), upload.name)
            state["image_from"] = "Upload"
    else:
        photo = st.camera_input("Take a photo", key="camera", on_change=_forget_image, args=("camera",))
        if photo is not None and _image_fits(photo.size):
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


from pages.common.models import (  # noqa: E402  (the model section uses show_error from above)
    default_model,
    default_weights,
    is_upload,
    load_bundle,
    model_picker,
    session_alive,
    session_id,
    session_uploads,
    uploaded_model_note,
)

__all__ = ["FAVICON", "Miss", "cached_or_run", "default_model", "default_weights", "input_and_model",
           "is_upload", "keep_state", "load_bundle", "model_picker", "nav", "session_alive", "session_id",
           "session_uploads", "show_error", "show_unavailable", "unavailable_methods", "uploaded_model_note"]


def nav() -> None:
    """Page links at the top of the sidebar (the default page list is hidden in config.toml)."""
    st.page_link("app.py", label="Explain", icon=":material/visibility:")
    st.page_link("pages/1_Layer_explorer.py", label="Layer explorer", icon=":material/layers:")
    st.page_link("pages/2_Error_analysis.py", label="Error analysis", icon=":material/troubleshoot:")
    st.page_link("pages/3_Learn.py", label="Learn", icon=":material/school:")
    st.page_link("pages/4_Live.py", label="Live", icon=":material/videocam:")
    st.page_link("pages/5_Compare.py", label="Compare", icon=":material/compare:")
    st.divider()


def show_error(exc: Exception) -> None:
    """A problem as one short message in the page, never a traceback: a :class:`VislibError`'s text
    (written for the user), or the type and message of anything unexpected."""
    if isinstance(exc, VislibError):
        st.error(str(exc), icon=":material/error:")
    else:
        st.error(f"Something went wrong ({type(exc).__name__}: {exc}).", icon=":material/error:")


def unavailable_methods(bundle, layer: str | None) -> dict[str, str]:
    """Methods that cannot run on this model and layer, with the reason (one cheap probe, cached)."""
    if bundle is None or layer is None:
        return {}
    try:
        found = ui.method_availability(bundle, layer)
    except Exception as exc:  # the probe itself failed: the methods say why when they run
        print(f"vislib: method availability probe failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return {}
    return {m: why for m, why in found.items() if why}


def show_unavailable(reasons: dict[str, str], *, key: str) -> None:
    """Methods that do not apply, shown disabled with the reason (never an error after the fact)."""
    if not reasons:
        return
    st.pills("Not for this model", list(reasons), selection_mode="multi", key=key, disabled=True,
             format_func=ui.method_title, label_visibility="collapsed")
    st.caption("  \n".join(f":material/block: **{ui.method_title(m)}**: {why}" for m, why in reasons.items()))


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
    sid = session_id()
    try:
        while not job.wait(0.05):
            if not session_alive(sid):  # the tab was closed: stop the work now (finally cancels it)
                print(f"vislib: browser session {sid[:8]} closed during {name!r}: cancelling it",
                      file=sys.stderr, flush=True)
                break
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
            if not session_alive(sid):
                print(f"vislib: browser session {sid[:8]} closed: {name!r} stopped after "
                      f"{job.elapsed:.1f} s", file=sys.stderr, flush=True)
    if not job.done or not session_alive(sid):
        st.stop()
    slot.empty()
    result = job.result()
    store(key, _result=result)
    return result, False


def _mark_stopped(flag: str, key: str) -> None:
    st.session_state[flag] = key
