"""vislib dashboard, Compare page: one image, two models side by side, and where they disagree.

Thin: widgets in, one call into :func:`vislib.compare.compare`, two columns out.
"""

from __future__ import annotations

import streamlit as st

import vislib
from pages.common import Miss, default_weights, image_picker, keep_state, load_bundle, nav, show_error
from vislib import ui
from vislib.compare import compare

st.set_page_config(page_title="vislib · Compare", page_icon=":material/compare:", layout="wide")
keep_state()
state = st.session_state
PAIR = ("shapes_resnet", "shapes_shortcut")
COMPARE_METHODS = ("gradcam", "gradcam++", "layercam", "cam", "eigencam", "occlusion", "guided_backprop")


@st.cache_data(max_entries=16, ttl=3600, show_spinner=False)
def _cached(key: str, _result=None):
    """Comparisons keyed by SHA-256(image bytes + both models, layers, weights, methods, class)."""
    if _result is None:
        raise Miss
    return _result


def model_side(side: str, default: str):
    """A model, its weights and its layer for one column: (bundle, layer) or (None, None)."""
    models = [m for m in vislib.list_models() if ui.dashboard_refusal(m) is None]
    key = f"cmp_{side}_model"
    if state.get(key) not in models:
        state[key] = default if default in models else models[0]
    name = st.selectbox(f"Model {side}", models, key=key)
    weights_key = f"cmp_{side}_weights"
    if state.get(weights_key) not in ("pretrained", "random"):
        state[weights_key] = default_weights(name)
    weights = st.segmented_control(f"Weights {side}", ["pretrained", "random"], key=weights_key)
    try:
        with st.spinner(f"Loading {name}…"):
            bundle = load_bundle(name, weights or "pretrained")
    except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
        show_error(exc)
        return None, None
    layer_key = f"cmp_{side}_layer"
    if state.get(layer_key) not in bundle.layers:
        state[layer_key] = bundle.default_layer
    layer = st.selectbox(f"Layer {side}", list(bundle.layers), key=layer_key,
                         format_func=lambda n: ui.bundle_layer_label(bundle, n))
    return bundle, layer


def column(result, top_key: str) -> None:
    st.markdown(f"#### {result.model}")
    st.caption(f"weights {result.weights} · layer `{result.layer}` · explains **{result.target_label()}**")
    st.plotly_chart(ui.topk_figure(result.top_k(5), result.target), key=top_key,
                    config={"displayModeBar": False})
    for method in result.methods:
        st.image(result.overlay(method), width="stretch", output_format="JPEG",
                 caption=f"{ui.method_title(method)} · {ui.format_seconds(result.timings.get(method, 0.0))}")


with st.sidebar:
    nav()
    st.markdown("### :material/image: Input")
    picked = image_picker()
    st.markdown("### :material/neurology: Models")
    left_bundle, left_layer = model_side("A", PAIR[0])
    right_bundle, right_layer = model_side("B", PAIR[1])
    if "cmp_methods" not in state:
        state["cmp_methods"] = ["gradcam"]
    methods = st.multiselect("Methods", COMPARE_METHODS, key="cmp_methods", format_func=ui.method_title)
    both = left_bundle is not None and right_bundle is not None
    shared = [c for c in left_bundle.labels if c in set(right_bundle.labels)] if both else []
    target = st.selectbox("Class (both models)", ["Each model's top class", *shared], key="cmp_class")

st.title("Two models side by side")
st.caption("One image, two models with their own layer and weights, the same methods: where do they look, "
           "and do they agree?")
if picked is None or left_bundle is None or right_bundle is None:
    st.stop()
if not methods:
    st.info("Choose at least one method in the sidebar.", icon=":material/tune:")
    st.stop()
image_bytes, image_name = picked
wanted = None if target == "Each model's top class" else target
key = ui.result_key(ui.image_digest(image_bytes), a=[left_bundle.name, left_bundle.weights, left_layer],
                    b=[right_bundle.name, right_bundle.weights, right_layer], methods=methods, target=wanted)
try:
    result = _cached(key)
except Miss:
    try:
        with st.spinner("Explaining with both models…"):
            image = vislib.load_image(image_bytes, name=image_name)
            result = compare(left_bundle, right_bundle, image, methods, left_layer=left_layer,
                             right_layer=right_layer, target=wanted)
    except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
        show_error(exc)
        st.stop()
    _cached(key, _result=result)

st.markdown("### Where they disagree")
st.markdown("  \n".join(result.summary()))
for note in result.notes:
    st.caption(f":material/info: {note}")
left, right = st.columns(2, gap="large")
with left:
    column(result.left, "cmp_top_a")
with right:
    column(result.right, "cmp_top_b")
