"""The Explain page's classroom pieces: "Erase and watch" (a brush over the image, the score and the
map recomputed) and "Download report" (one self-contained HTML file). Widgets only: the work is in
:mod:`vislib.edit` and :mod:`vislib.report`."""

from __future__ import annotations

import streamlit as st

import vislib
from vislib import ui
from vislib.edit import erase_and_watch
from vislib.report import explanation_report

BRUSHES = {"grey": "#808080", "black": "#000000", "white": "#ffffff"}
CANVAS_SIDE = 320


def report_button(bundle, image_bytes: bytes, image_name: str, methods: list[str], layer: str, target,
                  score: str, cache) -> None:
    """ "Download report": the view's methods at its main layer, as one HTML file (built on click; the
    passes come from the server's pass cache, so this is cheap)."""
    def build() -> bytes:
        result = vislib.explain(bundle, vislib.load_image(image_bytes, name=image_name), methods=methods,
                                layer=layer, target=target, score=score, cache=cache)
        return explanation_report(result, image_name=image_name).encode("utf-8")

    st.download_button("Download report", data=build, on_click="ignore", mime="text/html",
                       file_name=ui.safe_filename(bundle.name, image_name, "report") + ".html",
                       icon=":material/description:", key="dl_report",
                       help="One HTML file with the image, the maps, the scores and the versions, "
                            "and the link and command line that reproduce this view.")


@st.cache_data(max_entries=16, ttl=3600, show_spinner=False)
def _occlusion(key: str, _bundle, _view, layer: str, target: int, _cache):
    """The occlusion map of the input view (keyed by the image digest, model, layer and class)."""
    result = vislib.explain(_bundle, _view, methods=["occlusion"], layer=layer, target=target, cache=_cache)
    return result.overlay("occlusion")


def erase_panel(bundle, image_bytes: bytes, image_name: str, methods: list[str], layer: str, target,
                cache) -> None:
    """Paint over the image; the class score and the map on the edited image; occlusion beside it."""
    from streamlit_drawable_canvas import st_canvas

    st.subheader("Erase and watch")
    if not st.toggle("Paint over the image and watch the class score", key="erase_on",
                     help="Cover what you think the model looks at: the score and the map are computed "
                          "again on the edited image. Occlusion (right) does the same systematically."):
        return
    state = st.session_state
    usable = [m for m in methods if vislib.METHODS[m].family == "cam"] or ["gradcam"]
    tools = st.columns([2, 2, 1, 1], vertical_alignment="bottom")
    if state.get("erase_method") not in usable:
        state["erase_method"] = "gradcam" if "gradcam" in usable else usable[0]
    method = tools[0].selectbox("Map", usable, key="erase_method", format_func=ui.method_title)
    brush = tools[1].segmented_control("Brush", list(BRUSHES), default="grey", key="erase_brush")
    width = tools[2].slider("Size", 5, 60, 25, key="erase_size")
    if tools[3].button("Reset", icon=":material/restart_alt:", key="erase_reset"):
        state["erase_round"] = state.get("erase_round", 0) + 1  # a new canvas: the strokes are gone
    view = bundle.input_view(vislib.load_image(image_bytes, name=image_name))
    digest = ui.image_digest(image_bytes)
    side = CANVAS_SIDE
    height = round(side * view.height / view.width)
    paint, edited, systematic = st.columns(3, gap="medium")
    with paint, st.container(key="erase_canvas"):
        canvas = st_canvas(background_image=view, stroke_width=width, stroke_color=BRUSHES[brush or "grey"],
                           drawing_mode="freedraw", width=side, height=height, return_image_data=True,
                           key=f"erase_canvas_{digest[:12]}_{state.get('erase_round', 0)}")
        st.caption("Paint here (the model's input view).")
    try:
        found = erase_and_watch(bundle, view, canvas.image_data, method, layer, target, cache=cache)
    except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
        from pages.common import show_error

        show_error(exc)
        return
    label = found.before.target_label()
    before, after = found.before.probs[found.target], found.after.probs[found.target]
    with edited, st.container(key="erase_result"):
        st.image(found.after.overlay(method), width=side, output_format="JPEG",
                 caption=f"{ui.method_title(method)} on the edited image")
        st.metric(f"p({label})", f"{after:.1%}", delta=f"{after - before:+.1%}")
        st.caption(f"{found.painted:.0%} of the image painted · was {before:.1%}")
    with systematic:
        key = ui.result_key(digest, model=bundle.name, weights=bundle.weights, layer=layer,
                            target=found.target)
        with st.spinner("Occlusion…"):
            occlusion = _occlusion(key, bundle, view, layer, found.target, cache)
        st.image(occlusion, width=side, output_format="JPEG",
                 caption="Occlusion: the score drop for a grey patch at each place")
