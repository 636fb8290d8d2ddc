"""vislib dashboard, Explain page: what does the network look at?

Run with ``streamlit run app.py`` (settings in ``.streamlit/config.toml``). The page is thin: widgets
in, one call into :mod:`vislib.ui` (which calls :func:`vislib.explain`), render out.
"""

from __future__ import annotations

import time

import pandas as pd
import streamlit as st

import vislib
from pages.common import (
    FAVICON,
    Miss,
    cached_or_run,
    input_and_model,
    keep_state,
    show_error,
    show_unavailable,
    unavailable_methods,
    uploaded_model_note,
)
from pages.common.classroom import erase_panel, report_button
from pages.common.models import spec_reports
from vislib import ui
from vislib.concepts import concept_image, concepts_or_maps, legend_html
from vislib.metrics import trust
from vislib.render import COLORMAPS, to_png_bytes

STARTED = time.perf_counter()
st.set_page_config(page_title="vislib · Explain", page_icon=FAVICON, layout="wide")
keep_state("target", "concepts_on", "concepts_k")  # drawn only with a result: kept while an upload is awaited
state = st.session_state
TOP_CLASS = -1  # the class picker's "explain the predicted class" entry


@st.cache_data(max_entries=24, ttl=3600, show_spinner=False)
def _view_cache(key: str, _result: ui.ViewResult | None = None) -> ui.ViewResult:
    """Results keyed by SHA-256(image bytes + every parameter); called with ``_result`` to store."""
    if _result is None:
        raise Miss
    return _result


@st.cache_data(max_entries=16, ttl=3600, show_spinner=False)
def _concepts(key: str, layer: str, k: int, _bundle, _data: bytes):
    """Deep Feature Factorization of the image at ``layer`` (keyed by the image digest and the model)."""
    return concepts_or_maps(_bundle, _data, k, layer)


def _family_key(family: str) -> str:
    return f"methods_{family}"


def _wanted_key(family: str) -> str:
    """The family's chosen methods, kept apart from the pills' own key: the pills offer only the
    methods that apply here, and a choice that does not apply comes back where it does."""
    return f"_wanted_{family}"


def _keep_wanted(family: str, usable: tuple[str, ...]) -> None:
    """The pills changed: the new choice, plus the chosen methods that the pills could not show."""
    wanted = state.get(_wanted_key(family), [])
    chosen = list(state.get(_family_key(family)) or [])
    state[_wanted_key(family)] = [m for m in wanted if m not in usable] + chosen


def load_url_state() -> None:
    """Once per session: the link's model, layer, class, methods, score and sample become the state."""
    if state.get("_url_loaded"):
        return
    state["_url_loaded"] = True
    spec_reports()  # a link may name a spec file's model: register them before reading it
    parsed, notes = ui.parse_query(st.query_params, models=vislib.list_models(), methods=list(vislib.METHODS),
                                   check_model=ui.dashboard_refusal)
    state["_url_notes"] = notes
    # A refused model's layers belong to it: the default model starts at its own default layer (the
    # note on the model says why; a second warning about its layer would only follow from it).
    refused = parsed.model is None and bool(st.query_params.get("model"))
    for name in ("model", "weights", "score") if refused else ("model", "weights", "layer", "score"):
        if getattr(parsed, name):
            state[name] = getattr(parsed, name)
    if parsed.layers and not refused:
        state["layers"] = parsed.layers
    if parsed.target is not None:
        state["target"] = parsed.target
    if parsed.methods is not None:
        for family, names in ui.methods_by_family().items():
            state[_family_key(family)] = [m for m in parsed.methods if m in names]
            state[_wanted_key(family)] = list(state[_family_key(family)])
    if parsed.sample:
        state["source"], state["sample"] = "Sample", parsed.sample


def _pick_bar(classes: list[int]) -> None:
    chosen = ui.class_from_selection(state.get("topk_chart"), classes)
    if chosen is not None:
        state["target"] = chosen


def _method_label(name: str) -> str:
    return ui.method_title(name) + (" :material/hourglass_top:" if ui.is_slow(name) else "")


def sidebar_controls(bundle) -> tuple[str | None, list[str], list[str], dict[str, str]]:
    """Layer, comparison layers and methods pickers: (layer, extra layers, methods, the chosen
    methods that do not apply here → why)."""
    layer, extra_layers, methods, off = None, [], [], {}
    if bundle is not None:
        layers = list(bundle.layers)
        if state.get("layer") not in bundle.layers:
            if state.get("layer"):
                st.warning(f"Layer {state['layer']!r} is not in {bundle.name}; using {bundle.default_layer}.")
            state["layer"] = bundle.default_layer
        st.selectbox(
            "Target layer", layers, key="layer",
            format_func=lambda n: ui.bundle_layer_label(bundle, n) + (
                "  (default)" if n == bundle.default_layer else ""),
            help="The layer whose activations the CAM family weighs, with its map as the methods see it "
                 "(channels×height×width; transformer tokens on their patch grid): later layers are more "
                 "semantic and coarser, earlier ones finer.",
        )
        layer = state["layer"]
        state["layers"] = [x for x in state.get("layers", []) if x in bundle.layers and x != layer]
        st.multiselect("Compare layers (extra rows)", [n for n in layers if n != layer], key="layers",
                       format_func=lambda n: ui.bundle_layer_label(bundle, n),
                       placeholder="Add layers to compare…")
        extra_layers = list(state["layers"])
    st.markdown("### :material/tune: Methods")
    unavailable = unavailable_methods(bundle, layer)
    for family, names in ui.methods_by_family().items():
        key, wanted_key = _family_key(family), _wanted_key(family)
        if wanted_key not in state:
            state[wanted_key] = list(state[key]) if key in state else [
                m for m in ui.default_methods() if m in names]
        usable = [m for m in names if m not in unavailable]
        state[key] = [m for m in state[wanted_key] if m in usable]
        st.pills(ui.family_title(family), usable, selection_mode="multi", key=key,
                 format_func=_method_label, on_change=_keep_wanted, args=(family, tuple(usable)),
                 help=":material/hourglass_top: methods need many passes: they show a progress bar and "
                      "can be stopped.")
        methods += list(state[key])
        off.update({m: unavailable[m] for m in state[wanted_key] if m in unavailable})
        show_unavailable({m: unavailable[m] for m in names if m in unavailable}, key=f"{key}_off")
    return layer, extra_layers, ui.display_order(methods), off


def display_controls() -> tuple[float, str, str, int]:
    st.markdown("### :material/palette: Display")
    alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="alpha")
    colormap = st.selectbox("Colormap", list(COLORMAPS), key="cmap")
    signal_view = st.radio(
        "Input-space signals", ui.SIGNAL_VIEWS, key="signal_view", horizontal=True,
        help="Deconvnet, guided backprop, gradients: the signal as a signed RGB image (grey = 0), its "
             "magnitude (black = 0), or the magnitude as a heatmap over the image.",
    )
    ncols = st.slider("Panels per line", 2, 8, 4, key="ncols")
    return alpha, colormap, signal_view, ncols


def class_picker_and_chart(result: ui.ViewResult, score: str) -> None:
    probs, labels = result.probs, result.labels
    names = list(labels)
    if len(set(labels)) != len(labels):  # ImageNet has a few duplicate names
        names = [f"{lab} (#{i})" if labels.count(lab) > 1 else lab for i, lab in enumerate(labels)]
    top_index = int(probs.argmax())
    st.selectbox(
        "Class to explain", [TOP_CLASS, *range(len(labels))], key="target",
        format_func=lambda i: (f"Top class: {names[top_index]} · {probs[top_index]:.1%}" if i == TOP_CLASS
                               else f"{names[i]} · {probs[i]:.1%}"),
        help="Type to search any class. Default: the predicted (top-1) class.",
    )
    top = result.top_k(5)
    classes = [i for i, _, _ in top]
    st.caption(ui.chart_title(bundle.scores))
    st.plotly_chart(ui.topk_figure(top, result.target), key="topk_chart",
                    on_select=lambda: _pick_bar(classes), selection_mode="points",
                    config={"displayModeBar": False})
    st.markdown(f"Explaining **{names[result.target]}** (the {score} of class {result.target}) · "
                f"click a bar to explain another class.")
    if result.weights == "random":
        st.warning("**Random weights**: these scores and maps come from a randomly initialised network "
                   "(seeded): they show the architecture, not anything learned.", icon=":material/casino:")


def greyed_panels(off: dict[str, str], ncols: int) -> None:
    """The chosen methods that do not apply to this model or layer: a grey panel each, with why."""
    names = ui.display_order(list(off))
    for start in range(0, len(names), ncols):
        for name, column in zip(names[start:start + ncols], st.columns(ncols), strict=False):
            with column, st.container(border=True, key=f"off_{name}"):
                st.markdown(f"**:gray[{ui.method_title(name)}]** · :gray[does not apply]")
                st.caption(f":material/block: {off[name]}")


def results_grid(result: ui.ViewResult, bundle, image_name: str, *, alpha, colormap, signal_view,
                 ncols) -> None:
    for row, line in zip(result.rows, ui.panels(result), strict=True):
        if len(result.rows) > 1:
            shape = "×".join(str(s) for s in bundle.layers[row.layer])
            st.markdown(f"**Layer `{row.layer}`** · {shape}")
        for start in range(0, len(line), ncols):
            for panel, column in zip(line[start:start + ncols], st.columns(ncols), strict=False):
                with column:
                    if panel.error:
                        st.markdown(f"**{panel.title}**")
                        st.error(panel.error, icon=":material/block:")
                        continue
                    image = ui.panel_image(row, panel.method, alpha=alpha, colormap=colormap,
                                           signal_view=signal_view)
                    # JPEG (quality 90): ten times faster to encode than PNG, so a re-render stays
                    # well under 100 ms; the PNG download is encoded only when clicked.
                    st.image(image, caption=panel.caption, width="stretch", output_format="JPEG")
                    st.download_button(
                        "PNG", data=lambda image=image: to_png_bytes(image), on_click="ignore",
                        file_name=ui.safe_filename(panel.method, row.layer, image_name) + ".png",
                        mime="image/png", key=f"dl_{row.layer}_{panel.method}", icon=":material/download:",
                        type="tertiary",
                    )


# ---------------------------------------------------------------------------------------------------
# Sidebar

load_url_state()
with st.sidebar:
    picked, bundle = input_and_model()
    if bundle is not None and bundle.prompts is not None:  # a CLIP-like model: its labels are prompts
        typed = ui.parse_prompts(st.text_area(
            "Prompts (one per line)", value="\n".join(bundle.labels), key="prompts",
            help="A zero-shot model's classes: each prompt's text embedding is computed once."))
        bundle = bundle.with_prompts(typed) if typed else bundle
    layer, extra_layers, methods, off_methods = sidebar_controls(bundle)
    if state.get("score") not in ui.SCORES:
        state["score"] = "logit"
    score = st.radio("Score to explain", ui.SCORES, key="score", horizontal=True,
                     help="The class logit (default, as in the papers) or its softmax probability.")
    alpha, colormap, signal_view, ncols = display_controls()
    st.caption(f"vislib {vislib.__version__} · device: {bundle.device if bundle else '–'}")

# The link reproduces the view: model, weights, layer(s), class, methods, score, sample.
target = state.get("target", TOP_CLASS)
if bundle is not None and (not isinstance(target, int) or not TOP_CLASS <= target < len(bundle.labels)):
    target = state["target"] = TOP_CLASS
explain_target = None if target == TOP_CLASS else target
st.query_params.from_dict(ui.to_query(ui.ViewState(
    model=state.get("model"), weights=state.get("weights"), layer=layer, layers=extra_layers,
    target=explain_target, methods=methods, score=score,
    sample=state.get("sample") if state.get("source") == "Sample" else None,
)))

# ---------------------------------------------------------------------------------------------------
# Main area

st.title("What does the network see?")
st.caption("Class activation maps, backprop signals and perturbation maps for one image, side by side. "
           "Pick the image, model, layer and methods on the left.")
for note in state.pop("_url_notes", []):
    st.warning(note)
link_note = uploaded_model_note(state.get("model"))
if link_note:
    st.caption(f":material/link_off: {link_note}")
if picked is None:
    st.info("Upload an image, take a photo, or pick a sample in the sidebar.", icon=":material/image:")
    st.stop()
if bundle is None:
    st.stop()
if not methods:
    st.info("Choose at least one method in the sidebar.", icon=":material/tune:")
    greyed_panels(off_methods, ncols)
    st.stop()

image_bytes, image_name = picked
key = ui.result_key(ui.image_digest(image_bytes), model=bundle.name, weights=bundle.weights, layer=layer,
                    layers=extra_layers, target=explain_target, score=score, methods=methods,
                    labels=bundle.labels if bundle.prompts is not None else None)


@st.cache_resource(show_spinner=False)
def _pass_cache() -> vislib.PassCache:
    """Recorded passes and method results, shared by the sessions of this server (keyed by the model
    object and its weights, so an uploaded model's entries are never another session's)."""
    return vislib.PassCache(max_entries=32)


def job(progress, cancel):
    return ui.compute_view(bundle, image_bytes, methods, layer=layer, extra_layers=extra_layers,
                           target=explain_target, score=score, progress=ui.with_time_left(progress),
                           cancel=cancel, image_name=image_name, cache=_pass_cache())


try:
    result, cached = cached_or_run(key, job, _view_cache, name="stop")
except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
    show_error(exc)
    st.stop()
if result is None:
    st.stop()

left, right = st.columns([1, 2], gap="large")
with left:
    width, height = result.input_image.size
    st.image(result.input_image, caption=f"Model input ({width}×{height}) · {image_name}", width="stretch",
             output_format="JPEG")
with right:
    class_picker_and_chart(result, score)

head, scale, download, report = st.columns([3, 2, 1.2, 1.2], vertical_alignment="center")
with head:
    st.subheader("Maps")
    passes = " · ".join(f"{k.replace('_', ' ')} {ui.format_seconds(v)}"
                        for k, v in result.pass_timings.items())
    reused = f" · reused: {', '.join(ui.method_title(m) for m in result.reused)}" if result.reused else ""
    st.caption(f"Computed in {ui.format_seconds(result.seconds)}" + (" (cached)" if cached else "")
               + (f" · shared passes: {passes}" if passes else "") + reused)
with scale:
    st.image(ui.colorbar(colormap, width=240, height=12), width="stretch")
    st.caption("low → high · one colour scale, each map min–max normalised")
with download:
    st.download_button("All maps (.npz)", data=lambda: ui.maps_npz(result), on_click="ignore",
                       file_name=ui.safe_filename(bundle.name, image_name, "maps") + ".npz",
                       mime="application/octet-stream", icon=":material/download:", key="dl_npz")
ran = [m for m in methods if m not in result.rows[0].errors]
with report:
    report_button(bundle, image_bytes, image_name, ran, layer, result.target, score, _pass_cache())
results_grid(result, bundle, image_name, alpha=alpha, colormap=colormap, signal_view=signal_view, ncols=ncols)
for note in ui.flat_notes(result, bundle):
    st.info(note, icon=":material/info:")
greyed_panels(off_methods, ncols)
try:
    erase_panel(bundle, image_bytes, image_name, ran, layer, result.target, _pass_cache())
except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
    show_error(exc)


def concepts_panel(bundle, image_bytes: bytes, layer: str) -> None:
    """Deep Feature Factorization of the target layer: concept colours over the image and their classes."""
    st.subheader("Concepts")
    if not st.toggle("Find the concepts of this layer (Deep Feature Factorization)", key="concepts_on",
                     help="Non-negative matrix factorization of the layer's activations into k concepts: "
                          "where each one is in the image, and which classes the classifier sees in it."):
        return
    channels, h, w = bundle.layers[layer]
    most = max(2, min(8, channels, h * w))  # NMF: at most as many concepts as channels and positions
    if state.get("concepts_k", 5) > most:
        state["concepts_k"] = most
    state.setdefault("concepts_k", min(5, most))
    k = st.slider("Concepts", 2, most, key="concepts_k")
    key = ui.result_key(ui.image_digest(image_bytes), model=bundle.name, weights=bundle.weights, layer=layer)
    with st.spinner("Factorizing…"):
        found, note = _concepts(key, layer, k, bundle, image_bytes)
    picture, legend = st.columns([1, 1], gap="large")
    picture.image(concept_image(found.input_image, found.maps), width="stretch", output_format="JPEG",
                  caption=f"{found.k} concepts of {found.layer} (reconstruction error "
                          f"{found.relative_error:.0%}); each pixel in the colour of its strongest concept")
    legend.markdown(legend_html(found, top=3), unsafe_allow_html=True)
    if note:
        legend.info(note, icon=":material/info:")


@st.cache_data(max_entries=24, ttl=3600, show_spinner=False)
def _trust_cache(key: str, _result=None):
    """Trust reports keyed by the view's key and the metrics; called with ``_result`` to store."""
    if _result is None:
        raise Miss
    return _result


def trust_panel(bundle, result: ui.ViewResult, view_key: str) -> None:
    """The fast metrics of trust for the methods shown, on demand, beside a random map."""
    explanations = dict(result.rows[0].explanations) if result.rows else {}
    with st.expander("How much can I trust these maps?", icon=":material/verified:"):
        st.caption("The fast metrics of trust (ROAD, Faithfulness Correlation, Region Perturbation, Random "
                   "Logit, Sparseness, Complexity) for the maps above, each beside the same metric on a "
                   "random map. One image: a hint, not a verdict; use Error analysis for a dataset.")
        if not explanations:
            st.info("No map to measure.", icon=":material/info:")
            return
        key = ui.result_key(view_key, trust=list(trust.FAST), methods=sorted(explanations))
        if state.get("trust_asked") != key:
            if st.button("Measure", key="trust_run", icon=":material/speed:"):
                state["trust_asked"] = key
            else:
                return

        def measure(progress, cancel):
            def report(done, total):
                progress(done, total, "metric runs")

            return trust.trust_for_explanations(bundle, explanations, trust.FAST, progress=report,
                                                cancel=cancel)

        report, _ = cached_or_run(key, measure, _trust_cache, name="trust_stop", verb="Measuring",
                                  again="Measure again")
        if report is not None:
            st.dataframe(pd.DataFrame(trust.display_rows(report, ui.method_title)), hide_index=True,
                         width="stretch", key="trust_table")


try:
    trust_panel(bundle, result, key)
except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
    show_error(exc)

try:
    concepts_panel(bundle, image_bytes, layer)
except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
    show_error(exc)


def labels_panel(bundle, image_bytes: bytes, layer: str, methods: list[str]) -> None:
    """A multi-label model: every label whose sigmoid reaches the threshold, one row of maps each."""
    st.subheader("Every label above the threshold")
    threshold = st.slider("Threshold (sigmoid)", 0.05, 0.95, 0.5, 0.05, key="label_threshold")
    with st.spinner("Explaining the labels (one forward)…"):
        found = ui.label_rows(bundle, image_bytes, methods, layer, threshold)
    for note in found.notes:
        st.info(note, icon=":material/info:")
    for _, label, sigmoid, expl in found.rows:
        st.markdown(f"**{label}** · σ = {sigmoid:.1%}")
        for name, column in zip(expl.methods, st.columns(max(1, len(expl.methods))), strict=False):
            column.image(expl.overlay(name, alpha=alpha, colormap=colormap), caption=ui.method_title(name),
                         width="stretch", output_format="JPEG")


def similar_panel(bundle, image_bytes: bytes, layer: str, methods: list[str]) -> None:
    """Why similar? A second image, the cosine similarity of the two embeddings, both maps side by side."""
    other = st.file_uploader("A second image to compare with", type=None, key="similar_upload",
                             help="Both images are explained by the cosine similarity of their features at "
                                  "the model's penultimate layer (the input of its head).")
    if other is None:
        return
    with st.spinner("Explaining the similarity…"):
        found = ui.compare_images(bundle, image_bytes, other.getvalue(), methods, layer)
    st.caption(f"cos = {found.similarity:.3f} on {found.embedding}")
    for name in found.first.methods:
        left_map, right_map = st.columns(2)
        left_map.image(found.first.overlay(name, alpha=alpha, colormap=colormap), output_format="JPEG",
                       caption=f"{ui.method_title(name)} · this image", width="stretch")
        right_map.image(found.second.overlay(name, alpha=alpha, colormap=colormap), output_format="JPEG",
                        caption=f"{ui.method_title(name)} · the second image", width="stretch")
    for name, why in found.refused.items():
        st.caption(f"{ui.method_title(name)}: {why}")


try:
    if bundle.scores == "sigmoid":
        labels_panel(bundle, image_bytes, layer, methods)
    if bundle.scores in ("logits", "probabilities", "sigmoid") and bundle.prompts is None:
        with st.expander("Why similar? Compare with a second image", icon=":material/compare:",
                         expanded=state.get("similar_upload") is not None):
            similar_panel(bundle, image_bytes, layer, methods)
except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
    show_error(exc)

with st.expander("About these methods", icon=":material/school:"):
    for name in methods:
        cls = vislib.METHODS[name]
        st.markdown(f"**{ui.method_title(name)}** ({ui.family_title(cls.family)}) — {cls.paper}  \n"
                    f"{ui.method_summary(name)}")

# Server-side time of this script run (compute + render); shown for engineers, read by the benchmarks.
state["_script_seconds"] = time.perf_counter() - STARTED
st.caption(f"Page built in {ui.format_seconds(state['_script_seconds'])} on the server.")
