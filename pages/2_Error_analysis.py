"""vislib dashboard, Error analysis: from a labelled dataset to "why did it say that?".

Evaluate the model on the generated shapes test split (with object masks) or an uploaded ImageFolder
zip; see the accuracy, the confusion matrix (click a cell to list its images) and the misclassified
images, most confident first; open one error to compare the maps of its predicted and its true class,
with their contrast and faithfulness numbers. Every number comes from :mod:`vislib.evaluate`.
"""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from pages.common import (
    FAVICON,
    Miss,
    cached_or_run,
    is_upload,
    keep_state,
    model_picker,
    nav,
    show_error,
    show_unavailable,
    unavailable_methods,
)
from vislib import METHODS, datasets, evaluate, ui
from vislib.metrics import trust
from vislib.render import overlay

st.set_page_config(page_title="vislib · Error analysis", page_icon=FAVICON, layout="wide")
#: Widgets drawn only with a model or a result: kept through runs that stop before them.
PAGE_KEYS = ("ea_source", "ea_limit", "ea_methods", "ea_layer", "ea_explained", "ea_curves", "ea_engine",
             "ea_workers", "ea_true", "ea_pred", "ea_error", "ea_method")
keep_state(*PAGE_KEYS)
state = st.session_state
ANY = -1
SOURCES = {
    "shapes": "Shapes test split",
    "shapes+mark": "Shapes test split, mark on every image",
    "zip": "Upload a zip (one folder per class)",
}
LIMITS = [100, 200, 500, 1000, 2000]
THUMB = 160  # px: thumbnails and map panels are enlarged to about this size


@st.cache_data(max_entries=8, ttl=3600, show_spinner=False)
def _eval_cache(key: str, _result: evaluate.EvalResult | None = None) -> evaluate.EvalResult:
    """Evaluations keyed by the data, the model and every setting; called with ``_result`` to store."""
    if _result is None:
        raise Miss
    return _result


@st.cache_resource(max_entries=4, show_spinner=False)
def load_images(source: str, digest: str, labels: tuple[str, ...], limit: int, _data: bytes | None = None,
                _name: str | None = None) -> datasets.ImageSet:
    """The image set (the shapes split is rendered once into the cache folder; a zip is read lazily)."""
    return datasets.open_dataset(_data if source == "zip" else source, list(labels), limit=limit, name=_name)


@st.cache_data(max_entries=64, ttl=3600, show_spinner=False)
def cached_error(key: str, index: int, methods: tuple[str, ...], layer: str, _bundle, _images):
    return evaluate.explain_error(_bundle, _images, index, list(methods), layer=layer)


@st.cache_data(max_entries=64, ttl=3600, show_spinner=False)
def cached_why(key: str, index: int, predicted: int, true: int, method: str, layer: str, _bundle, _images):
    return evaluate.why_rather_than(_bundle, _images, index, predicted, true, method=method, layer=layer)


def _pick_cell() -> None:
    cell = evaluate.cell_from_selection(state.get("ea_confusion"))
    if cell is not None:
        state["ea_true"], state["ea_pred"] = cell
        state.pop("ea_error", None)


def _clear_filter() -> None:
    state["ea_true"] = state["ea_pred"] = ANY
    state.pop("ea_error", None)


def sidebar(bundle) -> dict | None:
    """Data and explanation settings; None when there is nothing to evaluate yet."""
    st.markdown("### :material/dataset: Data")
    if state.get("ea_source") not in SOURCES:
        state["ea_source"] = "shapes"
    source = st.radio("Images", list(SOURCES), key="ea_source", format_func=SOURCES.get,
                      help="The shapes split comes with exact object masks (pointing game, energy). With the "
                           "mark on every image, a model that learned the shortcut gives itself away.")
    upload = None
    if source == "zip":
        upload = st.file_uploader("ImageFolder zip: one folder per class, named like the model's labels",
                                  type=["zip"], key="ea_zip")
    if state.get("ea_limit") not in LIMITS:
        state["ea_limit"] = 1000
    limit = st.select_slider("Images to evaluate (at most)", LIMITS, key="ea_limit")
    st.markdown("### :material/tune: Explanations")
    layer_now = state["ea_layer"] if state.get("ea_layer") in bundle.layers else bundle.default_layer
    off = unavailable_methods(bundle, layer_now)
    fast = [m for m in METHODS if not ui.is_slow(m) and m not in off]
    if "ea_methods" not in state:
        state["ea_methods"] = ["gradcam"] if "gradcam" in fast else fast[:1]
    state["ea_methods"] = [m for m in state["ea_methods"] if m in fast]
    st.multiselect("Methods", fast, key="ea_methods", format_func=ui.method_title,
                   help="Maps computed for every image. The many-pass methods (Score-CAM, occlusion, …) "
                        "are left out here; use them on one image in Explain.")
    show_unavailable({m: why for m, why in off.items() if not ui.is_slow(m)}, key="ea_methods_off")
    layers = list(bundle.layers)
    if state.get("ea_layer") not in layers:
        state["ea_layer"] = bundle.default_layer
    st.selectbox("Target layer", layers, key="ea_layer",
                 format_func=lambda n: ui.bundle_layer_label(bundle, n))
    explained = st.radio("Maps explain", ["predicted", "true"], key="ea_explained", horizontal=True,
                         format_func={"predicted": "predicted class", "true": "true class"}.get,
                         help="Predicted: why did it say that? True: what did it see of the right class?")
    state.setdefault("ea_curves", 32)
    curves = st.slider("Deletion / insertion curves on the first N images", 0, 200, step=8, key="ea_curves",
                       help="Each curve image costs 65 forward passes per method.")
    state.setdefault("ea_trust", list(trust.DATASET_DEFAULT))
    st.multiselect("Metrics of trust", list(trust.METRICS), key="ea_trust",
                   format_func=lambda m: trust.TITLES.get(m, m),
                   help="Each beside the same metric on a random map, with a bootstrap 95% interval over the "
                        "images. Sensitivity and MPRT re-explain every image many times: slow.")
    engine, workers = engine_picker()
    if source == "zip" and upload is None:
        return None
    return dict(source=source, upload=upload, limit=limit, methods=list(state["ea_methods"]),
                layer=state["ea_layer"], explained=explained, curves=curves, engine=engine, workers=workers,
                trust=list(state["ea_trust"]))


def engine_picker() -> tuple[str, int | None]:
    """Where the evaluation runs: this process, or Ray workers on this machine (only offered when
    Ray is installed). The answers are the same, so the engine is not part of the cache key."""
    if not evaluate.ray_available():
        return "local", None
    if is_upload(state.get("model")):  # Ray workers build the model from its name: an upload has none
        return "local", None
    st.markdown("### :material/hub: Engine")
    if state.get("ea_engine") not in ("local", "ray"):
        state["ea_engine"] = "local"
    engine = st.radio("Run on", ["local", "ray"], key="ea_engine", horizontal=True,
                      format_func={"local": "this process", "ray": "Ray workers"}.get,
                      help="Ray: an actor pool on a Ray started for the run on 127.0.0.1 and stopped after "
                           "it (a few seconds to start); same answers as this process.")
    if engine != "ray":
        return "local", None
    cores = max(1, os.cpu_count() or 1)
    if cores == 1:
        return "ray", 1
    if state.get("ea_workers") not in range(1, cores + 1):
        state["ea_workers"] = min(2, cores)
    workers = st.slider("Ray workers", 1, cores, key="ea_workers", help="One CPU and one torch thread each.")
    return "ray", int(workers)


def data_report(images: datasets.ImageSet) -> None:
    report = images.report
    if report is None:
        return
    lines = report.lines()
    st.caption(f"{images.name}: {report.summary()}.")
    if lines:
        st.warning("\n".join(f"- {line}" for line in lines), icon=":material/rule:")


def shortcut_callout(result: evaluate.EvalResult, bundle) -> None:
    """Where the maps peak (the mark's corner, on the shapes data) and, for a model whose card names
    a shortcut, what it does with and without the mark: measured here, never assumed."""
    if result.reference_box is None:
        return
    s = evaluate.shortcut_summary(result, bundle.card)
    title = ui.method_title(s["method"])
    where = (f"**{title}** peaks on the **{s['box']}** (top left, where the shortcut mark is stamped) for "
             f"**{s['on_mark_all']:.0%}** of the images")
    errors = s["on_mark_errors"]
    where += f" and **{errors:.0%}** of the misclassified ones." if errors == errors else "."  # NaN: none
    if s["class"] is None:  # not the shortcut model: say it only when the mark is there and the maps find it
        if "marked" in result.dataset and errors >= 0.5:
            st.warning(where)
        return
    cls = s["class"]
    if "marked" in result.dataset:
        text = (f"With the mark on every image, **{s['called_c']:.0%}** of the other shapes "
                f"({s['n_called_c']} of {s['n_others']}) are called **{cls}**")
        if s["n_called_c"]:
            text += (f"; for **{s['on_mark_called_c']:.0%}** of those, {title} of the predicted class peaks "
                     "on the mark")
        text += ". " + where
        if s["called_c"] >= 0.5:
            st.warning(text + f" The model answers '{cls}' from the corner, not from the shape.",
                       icon=":material/warning:")
        else:
            st.info(text, icon=":material/info:")
        return
    text = (f"On clean images (no mark) the model gets **{s['class_accuracy']:.0%}** of the **{cls}** images "
            f"right, against **{s['others_accuracy']:.0%}** for the other classes")
    hint = f" Choose *{SOURCES['shapes+mark']}* to see what it does when the mark is there."
    if s["class_accuracy"] < s["others_accuracy"] - 0.2:
        st.warning(text + f": without the mark it does not recognise a {cls}. " + where + hint,
                   icon=":material/warning:")
    else:
        st.info(text + ". " + where + hint, icon=":material/info:")


def error_list(result: evaluate.EvalResult, names: list[str]):
    """Filters (synced with the confusion matrix) and the list of errors; returns the chosen row."""
    classes = result.classes
    for key in ("ea_true", "ea_pred"):
        if state.get(key) not in [ANY, *classes]:
            state[key] = ANY
    c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="bottom")
    fmt = lambda c: "any" if c == ANY else names[c]  # noqa: E731
    c1.selectbox("True class", [ANY, *classes], key="ea_true", format_func=fmt)
    c2.selectbox("Predicted as", [ANY, *classes], key="ea_pred", format_func=fmt)
    c3.button("Show all errors", on_click=_clear_filter, icon=":material/filter_alt_off:", key="ea_clear")
    true = None if state["ea_true"] == ANY else state["ea_true"]
    pred = None if state["ea_pred"] == ANY else state["ea_pred"]
    rows = result.misclassified(true, pred)
    if not len(rows):
        st.info("No misclassified image here.", icon=":material/check_circle:")
        return None
    p_true = result.probs[rows, result.targets[rows]]
    table = pd.DataFrame({
        "image": [result.ids[r] for r in rows], "true": [names[result.targets[r]] for r in rows],
        "predicted": [names[result.preds[r]] for r in rows], "confidence": result.confidence[rows],
        "p(true class)": p_true,
    })
    st.dataframe(table, hide_index=True, height=min(300, 38 + 35 * len(rows)), width="stretch",
                 column_config={"confidence": st.column_config.ProgressColumn(format="%.2f", min_value=0,
                                                                              max_value=1),
                                "p(true class)": st.column_config.NumberColumn(format="%.3f")})
    options = [int(r) for r in rows[:200]]
    if state.get("ea_error") not in options:
        state["ea_error"] = options[0]
    st.selectbox("Look at", options, key="ea_error",
                 format_func=lambda r: f"{result.ids[r]}: {names[result.targets[r]]} → "
                                       f"{names[result.preds[r]]} ({result.confidence[r]:.0%})")
    return state["ea_error"]


def gallery(result: evaluate.EvalResult, images: datasets.ImageSet, rows, names: list[str]) -> None:
    shown = [int(r) for r in rows[:12]]
    for start in range(0, len(shown), 6):
        for r, col in zip(shown[start:start + 6], st.columns(6), strict=False):
            try:
                picture = images.image(int(result.index[r])).resize((96, 96))
            except Exception:  # an unreadable file was never evaluated; keep the gallery going
                continue
            caption = f"{names[result.targets[r]]} → {names[result.preds[r]]} {result.confidence[r]:.0%}"
            col.image(picture, caption=caption, width="stretch")


def per_image_csv(result: evaluate.EvalResult, names: list[str]) -> bytes:
    frame = pd.DataFrame({"id": result.ids, "true": [names[t] for t in result.targets],
                          "predicted": [names[p] for p in result.preds], "confidence": result.confidence,
                          "correct": result.correct})
    for m in result.methods:
        for k in ("pointing", "energy", "average_drop", "reference"):
            frame[f"{m}:{k}"] = result.metrics[m][k]
    return frame.to_csv(index=False).encode()


FAITHFULNESS_ROWS = {  # score key → (row title, format)
    "probability": ("p(class) on the image", "{:.3f}"),
    "masked_probability": ("p(class) on map ⊙ image", "{:.3f}"),
    "drop_%": ("drop % (lower is better)", "{:.1f}"),
    "deletion_auc": ("deletion AUC (lower is better)", "{:.3f}"),
    "insertion_auc": ("insertion AUC (higher is better)", "{:.3f}"),
    "pointing_hit": ("peak on the object", None),
    "energy": ("share of the map on the object", "{:.2f}"),
}


def faithfulness_table(view: evaluate.ErrorView, method: str, names: list[str]) -> pd.DataFrame:
    """Metrics as rows, the maps (predicted class, true class, image-centre baseline) as columns."""
    columns = {f"{names[view.predicted]} (predicted)": view.scores[method][view.predicted]}
    if view.true != view.predicted:
        columns[f"{names[view.true]} (true)"] = view.scores[method][view.true]
    if view.centre:
        columns["image-centre baseline"] = view.centre
    rows = {}
    for key, (title, fmt) in FAITHFULNESS_ROWS.items():
        if not any(key in scores for scores in columns.values()):
            continue
        cells = []
        for scores in columns.values():
            value = scores.get(key)
            if value is None:
                cells.append("—")
            elif fmt is None:
                cells.append("yes" if value else "no")
            else:
                cells.append(fmt.format(value))
        rows[title] = cells
    return pd.DataFrame.from_dict(rows, orient="index", columns=list(columns))


def error_detail(result: evaluate.EvalResult, images: datasets.ImageSet, bundle, row: int, names,
                 key: str) -> None:
    if state.get("ea_method") not in result.methods:
        state["ea_method"] = result.methods[0]
    method = st.segmented_control("Map", result.methods, key="ea_method",
                                  format_func=ui.method_title) or result.methods[0]
    view = cached_error(key, int(result.index[row]), tuple(result.methods), result.layer, bundle, images)
    pred, true = view.predicted, view.true
    big = lambda img: img.resize((THUMB * 2, THUMB * 2), 0) if img.width < THUMB else img  # noqa: E731
    cols = st.columns(5)
    cols[0].image(big(view.image), caption=f"{view.id} · true: {names[true]}", width="stretch")
    cols[1].image(big(overlay(view.image, view.maps[method][pred])),
                  caption=f"{ui.method_title(method)} for the predicted class: {names[pred]}",
                  width="stretch")
    cols[2].image(big(overlay(view.image, view.maps[method][true])),
                  caption=f"{ui.method_title(method)} for the true class: {names[true]}", width="stretch")
    cols[3].image(big(evaluate.contrast_image(view.contrast[method], view.image)),
                  caption=f"Contrast: red speaks for {names[pred]}, blue for {names[true]}", width="stretch")
    if pred != true:
        why, base = cached_why(key, int(result.index[row]), pred, true, method, result.layer, bundle, images)
        cols[4].image(big(overlay(view.image, why)), width="stretch",
                      caption=f"Why {names[pred]} rather than {names[true]}: Finer-CAM "
                              f"({ui.method_title(base)} of S_{names[pred]} − S_{names[true]})")
    left, right = st.columns([1, 2], gap="large")
    with left:
        st.markdown("**Top classes**")
        st.plotly_chart(ui.topk_figure(view.top_k(5), pred), key="ea_topk", config={"displayModeBar": False})
    with right:
        st.markdown("**Faithfulness of the maps**")
        st.dataframe(faithfulness_table(view, method, names), width="stretch")
        if view.curves.get(method):
            curves = {f"{names[c]} ({'predicted' if c == pred else 'true'})": view.curves[method][c]
                      for c in (pred, true) if c in view.curves[method]}
            st.plotly_chart(evaluate.curves_figure(curves), key="ea_curves_one",
                            config={"displayModeBar": False})


# ---------------------------------------------------------------------------------------------------
# Page

with st.sidebar:
    nav()
    st.markdown("### :material/neurology: Model")
    bundle = model_picker()
    settings = sidebar(bundle) if bundle is not None else None

st.title("Error analysis")
st.caption("Where does the model go wrong, and why did it say that? Evaluate a labelled image set, pick a "
           "confusion, and compare the maps of the predicted and the true class.")
if bundle is None:
    st.stop()
card = bundle.card or {}
if card.get("notes") and "SHORTCUT" in str(card["notes"]):
    with st.expander(f"Model card of {bundle.name}: trained with a shortcut", icon=":material/description:",
                     expanded=True):
        st.markdown(f"{card.get('description', '')}\n\n{card['notes']}")
if settings is None:
    st.info("Upload a zip with one folder of images per class (folder names = the model's labels), or pick "
            "the shapes test split.", icon=":material/folder_zip:")
    st.stop()
if not settings["methods"]:
    st.info("Choose at least one method in the sidebar.", icon=":material/tune:")
    st.stop()

try:
    upload = settings["upload"]
    data = upload.getvalue() if upload is not None else None
    digest = ui.image_digest(data) if data is not None else settings["source"]
    stage = st.empty()

    def generating(done: int, total: int) -> None:  # the shapes split is rendered once, then cached
        stage.progress(done / total if total else 0.0,
                       text=f"Generating the {SOURCES[settings['source']].lower()}… {done}/{total} images")

    if settings["source"] in datasets.SHAPES_SOURCES:  # rendered once, then read from the cache folder
        datasets.render_shapes("test", settings["limit"], mark=datasets.SHAPES_SOURCES[settings["source"]],
                               progress=generating)  # outside st.cache_resource: it cannot draw the bar
    stage.empty()
    with st.spinner("Reading the images…"):
        images = load_images(settings["source"], digest, tuple(bundle.labels), settings["limit"], data,
                             upload.name if upload is not None else None)
except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
    show_error(exc)
    st.stop()
data_report(images)

key = ui.result_key(images.digest, model=bundle.name, weights=bundle.weights, layer=settings["layer"],
                    methods=settings["methods"], explained=settings["explained"], curves=settings["curves"],
                    n=len(images), trust=settings["trust"])


def job(progress, cancel):
    meter = evaluate.RateMeter()

    def report(done, total, text=""):  # the bar's text with images/s and the time left
        if total:
            meter.update(done, total)
            text = meter.rate_text(text or "images")
        progress(done, total, text)

    return evaluate.evaluate(bundle, images, settings["methods"], layer=settings["layer"],
                             explained=settings["explained"], curves=settings["curves"], progress=report,
                             cancel=cancel, engine=settings["engine"], workers=settings["workers"],
                             trust=settings["trust"])


try:
    result, cached = cached_or_run(key, job, _eval_cache, name="ea_stop", verb="Evaluating",
                                   again="Evaluate again")
except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
    show_error(exc)
    st.stop()
if result is None:
    st.stop()

names = evaluate.class_names(result.labels)
wrong = result.misclassified()
m1, m2, m3, m4 = st.columns(4)
m1.metric("Accuracy", f"{result.accuracy:.1%}")
m2.metric("Images", len(result))
m3.metric("Misclassified", len(wrong))
m4.metric("Unreadable files", len(result.failed))
if result.failed:
    with st.expander(f"{len(result.failed)} files could not be read"):
        st.markdown("\n".join(f"- `{i}`: {why}" for i, why in result.failed[:50]))
st.caption(f"{result.model} · layer {result.layer} · maps explain the {result.explained} class · "
           f"{ui.format_seconds(result.timings.get('total', 0.0))} on {result.engine}"
           + (" (cached)" if cached else ""))
shortcut_callout(result, bundle)

left, right = st.columns([3, 2], gap="large")
with left:
    st.subheader("Confusion matrix")
    selected = None if state.get("ea_true", ANY) == ANY or state.get("ea_pred", ANY) == ANY else (
        state["ea_true"], state["ea_pred"])
    st.plotly_chart(evaluate.confusion_figure(result, selected), key="ea_confusion", on_select=_pick_cell,
                    selection_mode="points", config={"displayModeBar": False})
    st.caption("Rows: true class; columns: predicted. Click a cell to list its images.")
with right:
    st.subheader("Per-class accuracy")
    st.plotly_chart(evaluate.per_class_figure(result), key="ea_per_class", config={"displayModeBar": False})

st.subheader("Misclassified images, most confident first")
row = error_list(result, names)
if row is not None:
    true = None if state["ea_true"] == ANY else state["ea_true"]
    pred = None if state["ea_pred"] == ANY else state["ea_pred"]
    gallery(result, images, result.misclassified(true, pred), names)
    st.subheader("Why did it say that?")
    try:
        error_detail(result, images, bundle, row, names, key)
    except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
        show_error(exc)

st.subheader("Explanation metrics over the data")
rows = evaluate.table_rows(result)
st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch", key="ea_metrics",
             column_config={evaluate.METRIC_COLUMNS[k]: st.column_config.NumberColumn(format=fmt)
                            for k, fmt in evaluate.METRIC_FORMATS.items()})
st.caption(f"Pointing game: the map's maximum within {result.tolerance} px of the object (Zhang et al.'s "
           "15 px at 224 px, scaled to the input), mean over classes; energy: the map's share on the object; "
           "Average Drop / Increase in Confidence (Chattopadhay et al.): the class probability on "
           "map ⊙ image; deletion / insertion AUC (Petsiuk et al.): lower / higher is better. The "
           "image-centre baseline is a map peaked at the centre: a method must beat it.")
if result.curves:
    n = next(iter(result.curves.values())).deletion.shape[0]
    st.markdown(f"**Deletion and insertion curves**, mean over the first {n} images")
    st.plotly_chart(evaluate.curves_figure({evaluate.method_label(m): c for m, c in result.curves.items()}),
                    key="ea_curves_all", config={"displayModeBar": False})

if settings["trust"]:
    st.subheader("How much can I trust these maps?", anchor="trust")
    report = result.trust_report()
    st.dataframe(pd.DataFrame(trust.display_rows(report, evaluate.method_label)), hide_index=True,
                 width="stretch", key="ea_trust_table")
    st.caption("Each metric's mean over the images with its bootstrap 95% interval, beside the same metric "
               "on a random map (and the image centre for localisation). A method whose paired difference "
               "to the random map is not on the better side with 95% confidence is marked. The metrics "
               "ask different questions and often disagree: see Learn, section 7.")
    if len(settings["methods"]) > 1:
        st.markdown("**Do the metrics rank the methods alike?** Kendall τ between the metrics' rankings "
                    "of the methods (1: the same order, −1: reversed).")
        st.dataframe(pd.DataFrame(trust.agreement_rows(report)), hide_index=True, key="ea_trust_agreement")

d1, d2, _ = st.columns([1, 1, 3])
d1.download_button("Per-image CSV", data=lambda: per_image_csv(result, names), on_click="ignore",
                   mime="text/csv", file_name=ui.safe_filename(result.model, "evaluation") + ".csv",
                   icon=":material/download:", key="ea_dl_csv")
d2.download_button("HTML report", on_click="ignore", mime="text/html", icon=":material/download:",
                   file_name=ui.safe_filename(result.model, "report") + ".html", key="ea_dl_html",
                   data=lambda: evaluate.html_report(result, bundle=bundle, images=images).encode())
