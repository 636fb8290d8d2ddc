"""The sidebar's model section, shared by every page: the catalogue (source + filter + model), the
weights, the model's card, the operator's spec files and this session's uploaded models.

Widgets and caching only; the logic is in :mod:`vislib.ui` (catalogue, search, card, refusals) and
:mod:`vislib.uploads` (reading and holding uploaded models), both tested without Streamlit.

- Registered, timm and Hugging Face models are cached once per process (``load_bundle``); uploaded
  models never are: they live in the session's own state (:class:`vislib.uploads.SessionUploads`).
- Spec files come from ``VISLIB_MODELS`` (``scripts/dashboard.sh --models FILE``); a broken one shows
  its error (file, table, key) and the others keep working.
"""

from __future__ import annotations

import os
import sys
import threading

import streamlit as st

import vislib
from vislib import ui, uploads
from vislib.errors import VislibError
from vislib.models import DEFAULT_MODEL, model_spec
from vislib.seeding import seeded

#: Models kept loaded per process (``VISLIB_MODEL_CACHE``): the server's memory is about this many
#: of the largest models in use, plus the uploads' budget.
MODEL_CACHE = int(os.environ.get("VISLIB_MODEL_CACHE", "6")) if os.environ.get(
    "VISLIB_MODEL_CACHE", "").isdigit() else 6
#: A catalogue group longer than this gets a filter box above its model list.
FILTER_FROM = 12
WEIGHTS = ("pretrained", "random")


# --------------------------------------------------------------------------------------------------
# The browser session


def session_id() -> str:
    """This browser session's id (Streamlit's own, never taken from the client's input)."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return ctx.session_id if ctx is not None else "no-session"


def session_alive(sid: str | None = None) -> bool:
    """Whether the browser session still has its websocket (True outside a server, e.g. AppTest).

    Streamlit 1.67: ``Runtime.is_active_session``; a closed tab leaves the active sessions at once
    (its state is kept ``server.disconnectedSessionTTL`` seconds for a reconnect).
    """
    from streamlit import runtime

    if not runtime.exists():
        return True
    return runtime.get_instance().is_active_session(sid or session_id())


def _grace() -> float:
    try:
        return float(st.get_option("server.disconnectedSessionTTL"))
    except Exception:  # noqa: BLE001  (an older Streamlit)
        return 120.0


_SWEEPER_LOCK = threading.Lock()


def start_sweeper() -> None:
    """Once per process: a daemon thread that empties, every ``VISLIB_UPLOAD_SWEEP`` seconds (default
    15), the uploads of sessions gone for longer than ``server.disconnectedSessionTTL`` (so a closed
    tab frees its models even when nobody else uses the server)."""
    with _SWEEPER_LOCK:
        if getattr(start_sweeper, "thread", None) is not None:
            return
        grace = _grace()
        wanted = os.environ.get("VISLIB_UPLOAD_SWEEP", "")
        interval = float(wanted) if wanted.replace(".", "", 1).isdigit() and float(wanted) > 0 else 15.0

        def loop() -> None:
            while True:
                threading.Event().wait(interval)
                try:
                    uploads.LEDGER.sweep(session_alive, grace)
                except Exception as exc:  # noqa: BLE001  (never let the sweeper die)
                    print(f"vislib: upload sweep failed: {exc}", file=sys.stderr)

        start_sweeper.thread = threading.Thread(target=loop, name="vislib-upload-sweeper", daemon=True)
        start_sweeper.thread.start()


def session_uploads() -> uploads.SessionUploads:
    """This session's uploaded models (created on first use, kept in its own session state)."""
    state = st.session_state
    holder = state.get("_uploads")
    if not isinstance(holder, uploads.SessionUploads):
        holder = state["_uploads"] = uploads.SessionUploads(session_id())
    return holder


# --------------------------------------------------------------------------------------------------
# Spec files and loading


def _spec_files() -> tuple[tuple[str, float], ...]:
    """(path, mtime) of each spec file in ``VISLIB_MODELS`` (an edited file is read again)."""
    from vislib.models import spec_files_from_env

    out = []
    for path in spec_files_from_env():
        try:
            out.append((path, os.path.getmtime(path)))
        except OSError:
            out.append((path, -1.0))
    return tuple(out)


@st.cache_resource(max_entries=4, show_spinner=False)
def _register_specs(files: tuple[tuple[str, float], ...]) -> list:
    from vislib.models import register_spec_files

    return register_spec_files([path for path, _ in files])


def spec_reports() -> list:
    """One report per spec file of ``VISLIB_MODELS`` (names added, or the error), registered once per
    process and again when a file changes."""
    files = _spec_files()
    return _register_specs(files) if files else []


def _version(name: str) -> str:
    """What makes a cached model stale: a spec model's file and its modification time."""
    try:
        origin = getattr(model_spec(name), "origin", None)
    except VislibError:
        return ""
    if not origin:
        return ""
    try:
        return f"{origin}@{os.path.getmtime(origin)}"
    except OSError:
        return origin


@st.cache_resource(max_entries=MODEL_CACHE, show_spinner=False)
def _load(name: str, weights: str, version: str):  # noqa: ARG001  (version: part of the key)
    if weights != "random":
        return vislib.load_model(name, weights="default")
    with seeded(0):  # process-wide: another session's build in another thread cannot interleave
        return vislib.load_model(name, weights=None)


def load_bundle(name: str, weights: str):
    """One model per (name, weights) per process; the bundle carries its own lock for hooked passes.

    A random initialisation is seeded (without touching the global RNG), so a link reproduces it.
    Never for uploaded models: they live in their session (:func:`session_uploads`).
    """
    if name.startswith(ui.UPLOAD_PREFIX):
        raise ValueError("uploaded models are not cached per process")
    return _load(name, weights, _version(name))


def default_model(models: list[str]) -> str:
    if DEFAULT_MODEL in models:
        return DEFAULT_MODEL
    bundled = [m for m in models if ui.model_source(m) == "bundled"]
    if bundled:
        return bundled[0]
    return "resnet18" if "resnet18" in models else models[0]


def default_weights(name: str) -> str:
    """Pretrained when the source's weights are at hand (bundled, cached, a spec's file), else random."""
    if ui.model_source(name) in ("torchvision", "timm", "hf"):
        from vislib.models import pretrained_available

        try:
            return "pretrained" if pretrained_available(name) else "random"
        except VislibError:
            return "random"
    return "pretrained"


# --------------------------------------------------------------------------------------------------
# The picker


def _groups(holder: uploads.SessionUploads) -> list[str]:
    """The catalogue groups worth showing: those with models, plus timm, Hugging Face and uploads."""
    shown = [source for source in ui.CATALOGUE_SOURCES
             if source in ("timm", "hf", "upload") or ui.catalogue(source)]
    others = {ui.model_source(name) for name in vislib.list_models()} - set(shown)
    return shown + sorted(others)  # models registered from Python under a source of their own


def _group_title(group: str) -> str:
    return ui.SOURCE_TITLES.get(group, group)


def _names(group: str, holder: uploads.SessionUploads) -> list[str]:
    return holder.names() if group == "upload" else ui.catalogue(group)


def _forget_view() -> None:
    """A new model: its default layer and its top class. The class is *set* (not dropped) so that the
    class picker shows the new model's label: a selectbox whose options change under the same key
    and index keeps its old text otherwise (Streamlit 1.67)."""
    for key in ("layer", "layers"):
        st.session_state.pop(key, None)
    st.session_state["target"] = -1  # app.py's TOP_CLASS: explain the predicted class


def _on_group_change() -> None:
    st.session_state["model_filter"] = ""  # the model stays until one of the group's is picked


def _on_model_change() -> None:
    state = st.session_state
    name = str(state.get("model_pick") or "").strip()
    group = state.get("model_group")
    if not name:
        return
    if group in ("timm", "hf") and not name.startswith(f"{group}:"):
        name = f"{group}:{name}"  # typed without its prefix
    refusal = ui.dashboard_refusal(name) if not name.startswith(ui.UPLOAD_PREFIX) else None
    if refusal:
        state["_model_refused"] = refusal
        return
    state["model"] = name
    state["weights"] = default_weights(name) if not name.startswith(ui.UPLOAD_PREFIX) else "pretrained"
    _forget_view()


def _catalogue_picker(holder: uploads.SessionUploads) -> str:
    """Source, filter and model widgets; returns the chosen model's name.

    Changing the source does not load anything: the model changes when one of the group's is picked.
    """
    state = st.session_state
    groups = _groups(holder)
    if state.get("model") is None or (state["model"].startswith(ui.UPLOAD_PREFIX)
                                      and state["model"] not in holder):
        if state.get("model"):
            why = holder.cleared or "it was uploaded in another browser session, or removed"
            st.warning(f"The uploaded model {state['model']!r} is not in this session any more ({why}); "
                       f"upload it again under Upload a model.", icon=":material/upload_file:")
        state["model"] = default_model(vislib.list_models())
        state["weights"] = default_weights(state["model"])
    current = state["model"]
    if state.get("model_group") not in groups or state.get("_model_seen") != current:
        group = ui.model_source(current)
        state["model_group"] = group if group in groups else groups[0]
    state["_model_seen"] = current
    st.selectbox("Source", groups, key="model_group", format_func=_group_title,
                 on_change=_on_group_change, help="Where the model comes from: the bundled models, the "
                 "operator's spec files, torchvision, timm, Hugging Face, or a model you uploaded.")
    group = state["model_group"]
    names = _names(group, holder)
    query = ""
    if len(names) > FILTER_FROM:
        query = st.text_input("Filter", key="model_filter", live=True, placeholder=f"Filter {len(names):,} "
                              f"{_group_title(group)} models…", label_visibility="collapsed")
    matches, total = ui.search_models(names, query or "")
    mine = ui.model_source(current) == group or (group == "upload" and current in holder)
    options = ([current] if mine and current not in matches else []) + matches
    typed = group in ("timm", "hf")
    if not options and not typed:
        st.caption("No uploaded model yet: add one with Upload a model." if group == "upload"
                   else f"No {_group_title(group)} model matches {query!r}.")
        return current
    state["model_pick"] = current if mine else None
    st.selectbox(
        "Model", options, key="model_pick", on_change=_on_model_change, accept_new_options=typed,
        placeholder=f"Choose a {_group_title(group)} model…" + (" (or type a name)" if typed else ""),
        help=("Type a full name to load it, e.g. a pretrained tag (timm:convnext_tiny.fb_in22k_ft_in1k) "
              "or a Hugging Face repo (hf:org/name)") if typed else None,
    )
    if total > len(matches):
        st.caption(f"{len(matches)} of {total:,} shown: type in the filter to find the others.")
    elif query and not total:
        st.caption(f"No {_group_title(group)} model matches {query!r}.")
    refused = state.pop("_model_refused", None)
    if refused:
        st.error(refused, icon=":material/block:")
    if not mine:
        st.caption(f"Showing **{current}** until you choose a {_group_title(group)} model.")
    return current


def _weights_picker(name: str) -> None:
    state = st.session_state
    source = ui.model_source(name)
    if source == "upload":
        state["weights"] = "pretrained"
        return
    if state.get("weights") not in WEIGHTS:
        state["weights"] = default_weights(name)
    st.radio("Weights", WEIGHTS, key="weights", horizontal=True, format_func=ui.weights_choices(source).get)
    if state["weights"] == "pretrained":
        note = ui.offline_note(name)
        if note:
            st.caption(note)


def model_card(bundle) -> None:
    """The chosen model's card: source, weights, classes and labels, input, default layer and why."""
    origin = None
    if getattr(bundle, "source", None) == "spec" or ui.model_source(bundle.name) == "spec":
        try:
            origin = getattr(model_spec(bundle.name), "origin", None)
        except VislibError:
            origin = None
    source = "upload" if bundle.name.startswith(ui.UPLOAD_PREFIX) else ui.model_source(bundle.name)
    with st.expander("Model card", icon=":material/badge:", expanded=True):
        for label, text in ui.model_card(bundle, source=source if source != "unknown" else None,
                                         origin=origin):
            st.caption(f"**{label}** · {text}")


def _add_upload(holder: uploads.SessionUploads, n: int) -> None:
    """The Add model button (a callback: it runs before the widgets, so it may choose the model)."""
    state = st.session_state
    weights, labels = state.get(f"upload_w{n}"), state.get(f"upload_l{n}")
    if weights is None:
        return
    try:
        added = holder.add(str(state.get("upload_arch") or "").strip(), weights.getvalue(), weights.name,
                           labels=labels.getvalue() if labels is not None else None,
                           labels_file=labels.name if labels is not None else None)
    except VislibError as exc:
        state["_upload_error"] = str(exc)
        return
    state["_upload_round"] = n + 1  # new file widgets: the old ones (and their bytes) go
    state["model"], state["weights"], state["model_group"] = added.name, "pretrained", "upload"
    _forget_view()


def upload_panel(holder: uploads.SessionUploads) -> None:
    """Upload a model: an architecture from the catalogue, a weights file, optionally labels."""
    state = st.session_state
    with st.expander("Upload a model", icon=":material/upload_file:",
                     expanded=state.get("model_group") == "upload" and not len(holder)):
        ledger = uploads.LEDGER
        st.caption(f"Weights: .safetensors, or a .pt / .pth state dict (read with weights_only: a file "
                   f"that would run code is refused), at most {uploads.MAX_MODEL_MB} MB. Labels: one per "
                   f"line, or JSON. The model stays in this browser session only, and is freed when the "
                   f"session ends. This server holds {ledger.held_models} uploaded models "
                   f"({ledger.held_bytes / uploads.MB:.0f} of {ledger.budget // uploads.MB} MB).")
        archs = vislib.list_models()  # the registered ones (bundled, spec files, torchvision, ...)
        if state.get("upload_arch") is None:
            state["upload_arch"] = "resnet18" if "resnet18" in archs else archs[0]
        st.selectbox("Architecture", archs, key="upload_arch", accept_new_options=True,
                     help="A model of the catalogue; for timm type timm:<name> (e.g. timm:resnet18).")
        n = state.setdefault("_upload_round", 0)  # a new round clears the file widgets (and their bytes)
        weights = st.file_uploader("Weights file", type=list(uploads.WEIGHTS_TYPES), key=f"upload_w{n}",
                                   max_upload_size=uploads.MAX_MODEL_MB)
        st.file_uploader("Labels file (optional)", type=list(uploads.LABELS_TYPES),
                                  key=f"upload_l{n}", max_upload_size=1)
        st.button("Add model", icon=":material/add:", disabled=weights is None, key="upload_add",
                  on_click=_add_upload, args=(holder, n))
        failed = state.pop("_upload_error", None)
        if failed:
            st.error(failed, icon=":material/error:")
        if len(holder):
            for name in holder.names():
                item = holder.get(name)
                left, right = st.columns([4, 1], vertical_alignment="center")
                left.caption(f"`{name}` · {item.architecture} · {item.nbytes / uploads.MB:.1f} MB")
                right.button("", icon=":material/delete:", key=f"upload_rm_{name}", help=f"Remove {name}",
                             on_click=holder.remove, args=(name,))


def spec_errors() -> None:
    """The spec-file tables that could not be read, each with its error (file, table, key), in one
    foldable box under the model picker: open the first time a session sees it, folded afterwards."""
    problems = [e for report in spec_reports() for e in report.errors]
    if not problems:
        return
    state = st.session_state
    seen = state.get("_spec_errors_seen") == problems
    state["_spec_errors_seen"] = problems
    title = (f"Spec files: {len(problems)} table{'s' if len(problems) > 1 else ''} not loaded "
             f"(the others work)")
    with st.expander(title, icon=":material/description:", expanded=not seen):
        for problem in problems:
            st.error(problem, icon=":material/error:")


def model_picker():
    """The model section of the sidebar (in the current container): catalogue, weights, upload
    panel, the card and the spec-file tables that could not be read. Returns the bundle, or None
    after an error (shown)."""
    start_sweeper()
    uploads.LEDGER.sweep(session_alive, _grace())
    spec_reports()
    holder = session_uploads()
    name = _catalogue_picker(holder)
    _weights_picker(name)
    upload_panel(holder)
    state = st.session_state
    try:
        if name.startswith(ui.UPLOAD_PREFIX):
            item = holder.get(name)
            if item is None:
                return None
            bundle = item.bundle
        else:
            with st.spinner(f"Loading {name}…"):
                bundle = load_bundle(name, state["weights"])
    except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
        from pages.common import show_error

        show_error(exc)
        spec_errors()
        return None
    model_card(bundle)
    spec_errors()
    return bundle


def uploaded_model_note(name: str | None) -> str | None:
    """What the page says instead of a link when the model is an upload."""
    if name and name.startswith(ui.UPLOAD_PREFIX):
        return (f"This view uses {name}, a model uploaded in this browser session: a link cannot carry "
                f"it. The link holds everything else; whoever opens it uploads the model again.")
    return None


def is_upload(name: str | None) -> bool:
    return bool(name) and str(name).startswith(ui.UPLOAD_PREFIX)


