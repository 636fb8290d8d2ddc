"""vislib dashboard, Learn: how each method works, step by step, live on the current image and model.

For a class: Grad-CAM one step at a time; CAM = Grad-CAM on a GAP + linear head (and why CAM cannot
run on a fully connected head); gradient, Deconvnet and guided backprop at one ReLU; Grad-CAM++ vs
Grad-CAM on several objects of one class; the sanity check of Adebayo et al. (2018); when to trust
which method. Every number is computed by :mod:`vislib.lessons` (no Streamlit there).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
import torch

import vislib
from pages.common import FAVICON, input_and_model, keep_state, load_bundle, show_error
from vislib import lessons, ui
from vislib.render import overlay, signed_rgb

st.set_page_config(page_title="vislib · Learn", page_icon=FAVICON, layout="wide")
keep_state()
state = st.session_state
TOP_CLASS = -1
GAP_MODEL, FC_MODEL = "shapes_resnet", "shapes_zf"  # the bundled ResNet-style and ZF-style models
PICTURE = 256  # pixels: feature-resolution pictures are enlarged to about this size
SHOWN = 340  # pixels: display width of a step's picture
SECTIONS = {
    "steps": "1 · Grad-CAM step by step",
    "cam": "2 · CAM and Grad-CAM",
    "relu": "3 · Gradient, Deconvnet, guided backprop",
    "multi": "4 · Several objects: Grad-CAM++ vs Grad-CAM",
    "sanity": "5 · Sanity check: randomise the network",
    "concepts": "6 · Concepts: what a layer has learned",
    "trust": "7 · When to trust which method",
    "two": "8 · Two models look differently",
}


def title(name: str) -> str:
    return ui.method_title(name)


# --------------------------------------------------------------------------------------------------
# Cached computations (keyed by the image digest and every parameter; unhashable objects as _args)


@st.cache_data(max_entries=16, ttl=3600, show_spinner=False)
def cached_steps(digest, model, weights, layer, target, top, _bundle, _data):
    return lessons.gradcam_steps(_bundle, _data, layer, target, top=top)


@st.cache_data(max_entries=16, ttl=3600, show_spinner=False)
def cached_gradcam_map(digest, model, weights, layer, target, _bundle, _data):
    return vislib.explain(_bundle, _data, ["gradcam"], layer=layer, target=target).maps["gradcam"]


@st.cache_data(max_entries=8, ttl=3600, show_spinner=False)
def cached_equality(digest, model, weights, _bundle, _data):
    return lessons.cam_equality(_bundle, _data)


@st.cache_data(max_entries=8, ttl=3600, show_spinner=False)
def cached_refusal(digest, model, weights, _bundle, _data):
    return lessons.cam_refusal(_bundle, _data)


@st.cache_data(max_entries=16, ttl=3600, show_spinner=False)
def cached_signals(digest, model, weights, target, _bundle, _data):
    return lessons.backprop_signals(_bundle, _data, target)


@st.cache_data(max_entries=8, ttl=3600, show_spinner=False)
def cached_study(model, weights, count, threshold, statistic, _bundle):
    return lessons.multi_instance_study(_bundle, range(count), threshold=threshold, statistic=statistic)


class _Miss(Exception):
    """Raised inside the cached lookup so that nothing is stored for an unknown key."""


@st.cache_data(max_entries=8, ttl=3600, show_spinner=False)
def _sanity_cache(key: str, _result: lessons.SanityCheck | None = None) -> lessons.SanityCheck:
    """Sanity checks keyed by SHA-256(image + parameters); called with ``_result`` to store one (the
    computation itself runs outside the cache so that it can draw its progress bar)."""
    if _result is None:
        raise _Miss
    return _result


def bundled(name: str):
    """A bundled model by name (cached like the sidebar's), or None when it is not installed."""
    if name not in vislib.list_models():
        return None
    return load_bundle(name, "pretrained")


def formula_step(column, heading: str, picture, sentence: str, formula: str, *, chart=None) -> None:
    """One step of a lesson: a heading, a picture (or a chart), one sentence and its formula."""
    with column:
        st.markdown(f"**{heading}**")
        if chart is not None:
            st.plotly_chart(chart, config={"displayModeBar": False})
        else:
            st.image(picture, width=SHOWN)
        st.markdown(sentence)
        st.latex(formula)


# --------------------------------------------------------------------------------------------------
# 1 · Grad-CAM step by step


def section_steps(bundle, digest, data, layer, target) -> None:
    st.header(SECTIONS["steps"], anchor="steps")
    top = st.slider("Channels shown", 3, 12, 6, key="learn_top",
                    help="The channels with the largest weights α_k.")
    s = cached_steps(digest, bundle.name, bundle.weights, layer, target, top, bundle, data)
    c, (h, w) = s.channels, s.relu.shape
    st.caption(f"Model **{bundle.name}**, layer `{s.layer}` ({c} channels of {h}×{w}), explaining class "
               f"**{s.label}** (logit S = {s.score:.3g}).")
    scale = max(1, PICTURE // (3 * max(h, w)))
    cols = st.columns(2, gap="large")
    tiles_a = lessons.activation_tiles(s.activation[s.top], scale=scale)
    formula_step(cols[0], "① The target layer's activations", tiles_a,
                 f"The layer outputs {c} feature maps; here the {len(s.top)} that Grad-CAM will weigh most "
                 f"(each on its own scale, dark = 0).",
                 r"A^k \in \mathbb{R}^{h \times w},\quad k = 1,\dots," + str(c))
    spread = lessons.gradient_spread(torch.from_numpy(s.gradient[None]))
    constant = (" Here every position of a channel gets the same gradient: the head above the layer is "
                "global average pooling + linear, so g = w_ck / Z (section 2).") if spread < 1e-4 else ""
    formula_step(cols[1], "② The gradients", lessons.signed_tiles(s.gradient[s.top], scale=scale),
                 "How much the class score would change if each activation grew a little (red > 0, "
                 "blue < 0, one scale for all)." + constant,
                 r"g^k_{ij} = \frac{\partial S^c}{\partial A^k_{ij}}")
    cols = st.columns(2, gap="large")
    formula_step(cols[0], "③ The channel weights: global average of the gradients", None,
                 f"One number per channel; {int((s.weights > 0).sum())} of {c} are positive. The top "
                 f"{len(s.top)} are highlighted.",
                 r"\alpha_k^c = \frac{1}{Z}\sum_i\sum_j \frac{\partial S^c}{\partial A^k_{ij}},"
                 r"\quad Z = h\,w = " + str(h * w), chart=lessons.weights_figure(s.weights, s.top))
    formula_step(cols[1], "④ The top weighted channel maps", lessons.signed_tiles(s.weighted, scale=scale),
                 f"Each map times its weight; these {len(s.top)} channels carry {s.top_share:.0%} of the "
                 f"positive evidence of all {c}.",
                 r"\alpha_k^c\,A^k")
    cols = st.columns(2, gap="large")
    negative = float((s.combination < 0).mean())
    formula_step(cols[0], "⑤ Their weighted sum (all channels)",
                 lessons.signed_image(s.combination, size=PICTURE),
                 "Adding all weighted maps: red regions speak for the class, blue ones against it.",
                 r"\sum_k \alpha_k^c A^k")
    formula_step(cols[1], "⑥ The ReLU", lessons.map_image(lessons.minmax(s.relu), size=PICTURE),
                 f"Only evidence *for* the class is kept: {negative:.0%} of the positions were negative and "
                 f"become 0." + (" Here nothing is positive: the map is flat." if s.flat else ""),
                 r"L^c_{\text{Grad-CAM}} = \mathrm{ReLU}\Big(\sum_k \alpha_k^c A^k\Big)")
    cols = st.columns(2, gap="large")
    H, W = s.normalised.shape
    formula_step(cols[0], "⑦ The upsampling", lessons.map_image(s.normalised),
                 f"Bilinear interpolation from {h}×{w} to the input's {H}×{W} pixels, then scaled to [0, 1].",
                 r"\hat L = \frac{\mathrm{up}(L) - \min \mathrm{up}(L)}"
                 r"{\max \mathrm{up}(L) - \min \mathrm{up}(L)}")
    final = cached_gradcam_map(digest, bundle.name, bundle.weights, layer, target, bundle, data)
    formula_step(cols[1], "⑧ The overlay", overlay(s.view, s.normalised),
                 f"The map over the image as the model sees it: `vislib.explain(…, \"gradcam\")` gives the "
                 f"same map (largest difference {float(np.abs(final - s.normalised).max()):.1g}).",
                 r"(1-a)\cdot\text{image} + a\cdot\text{colour}(\hat L),\quad a = 0.5")


# --------------------------------------------------------------------------------------------------
# 2 · CAM and Grad-CAM


def section_cam(bundle, digest, data) -> None:
    st.header(SECTIONS["cam"], anchor="cam")
    st.markdown(
        "CAM (Zhou et al. 2016) needs a network that ends in **global average pooling and one linear "
        "layer** (the Network-in-Network head of Lin et al.). Its weights are the linear layer's row "
        "for the class. Grad-CAM replaces them by the averaged gradients, so it works on any head; on "
        "a GAP + linear head the two are the same map:")
    st.latex(r"S^c = \sum_k w^c_k \frac{1}{Z}\sum_{ij} A^k_{ij} + b^c \;\Rightarrow\; "
             r"\frac{\partial S^c}{\partial A^k_{ij}} = \frac{w^c_k}{Z} \;\Rightarrow\; "
             r"\alpha^c_k = \frac{w^c_k}{Z} \;\Rightarrow\; Z\cdot\sum_k \alpha^c_k A^k = "
             r"\sum_k w^c_k A^k = M_c")
    gap_bundle = bundled(GAP_MODEL) or bundle
    fc_bundle = bundled(FC_MODEL)
    left, right = st.columns(2, gap="large")
    with left:
        st.subheader(f"GAP + linear head: {gap_bundle.name}")
        try:
            eq = cached_equality(digest, gap_bundle.name, gap_bundle.weights, gap_bundle, data)
        except vislib.VislibError as exc:
            st.warning(f"{gap_bundle.name} has no GAP + linear head ({exc}); install the bundled "
                       f"{GAP_MODEL} to see the equality.")
        else:
            show_equality(gap_bundle.input_view(vislib.load_image(data)), eq)
    with right:
        if fc_bundle is None:
            st.subheader("Fully connected head")
            st.info(f"The bundled ZF-style model ({FC_MODEL}) is not installed; it is the example of a "
                    f"head CAM cannot handle.")
        else:
            st.subheader(f"Fully connected head: {fc_bundle.name}")
            ref = cached_refusal(digest, fc_bundle.name, fc_bundle.weights, fc_bundle, data)
            show_refusal(fc_bundle.name, fc_bundle.input_view(vislib.load_image(data)), ref)


def show_equality(view, eq: lessons.CamEquality) -> None:
    a, b = st.columns(2)
    a.image(overlay(view, eq.cam_map), caption="CAM", width="stretch")
    b.image(overlay(view, eq.gradcam_map), caption="Grad-CAM", width="stretch")
    st.caption(f"Layer `{eq.layer}`, class **{eq.label}**, Z = {eq.Z} positions.")
    m1, m2 = st.columns(2)
    m1.metric("max |Z·Grad-CAM − CAM|", f"{eq.max_map_difference:.2e}",
              help=f"Before the ReLU; the largest |CAM| value is {np.abs(eq.cam).max():.3g}.")
    m2.metric("max |Z·α_k − w_ck|", f"{eq.max_weight_difference:.2e}",
              help="Over all channels: the averaged gradient times Z is the linear layer's weight.")
    st.metric("Gradient spread within a channel", f"{eq.gradient_spread:.2e}",
              help="max over channels of (max − min of ∂S/∂A^k over positions) / max |∂S/∂A|: 0 means "
                   "every position of a channel gets the same gradient, w_ck / Z.")
    st.markdown(f"The class score is the average of the CAM map plus the bias: "
                f"(1/Z)·Σ CAM + b = **{eq.logit_from_cam:.5g}**, the logit is **{eq.logit:.5g}**.")
    order = np.argsort(-np.abs(eq.class_weights))[:8]
    st.dataframe(pd.DataFrame({
        "channel k": order, "w_ck (linear layer)": eq.class_weights[order],
        "α_k (mean gradient)": eq.alpha[order], "Z·α_k": eq.Z * eq.alpha[order],
    }), hide_index=True, key="learn_cam_table")


def show_refusal(model: str, view, ref: lessons.CamRefusal) -> None:
    if ref.refused:
        st.error(ref.message, icon=":material/block:")
    else:
        st.success("CAM ran on this model: its head is GAP + linear after all.")
    st.markdown(
        f"Above layer `{ref.layer}` come: {', '.join(f'`{h}`' for h in ref.head)}. The first fully connected "
        f"layer has a separate weight for every channel **and position**, so there is no single w_ck per "
        f"channel for CAM to use. The gradient shows it: within one channel it varies over positions "
        f"(spread **{ref.gradient_spread:.2f}**, vs 0 on a GAP head). Grad-CAM simply averages it (step ③) "
        f"and runs; CAM would need the network rebuilt with a GAP head and retrained.")
    st.image(overlay(view, ref.gradcam_map), caption=f"Grad-CAM on {model} (layer {ref.layer})", width=300)


# --------------------------------------------------------------------------------------------------
# 3 · Gradient, Deconvnet, guided backprop


def section_relu(bundle, digest, data, target) -> None:
    st.header(SECTIONS["relu"], anchor="relu")
    st.markdown(
        "All three send the class score back to the pixels through the same network: max-pool "
        "backward is Zeiler & Fergus's unpooling with switches, convolution backward is the transposed "
        "filter. **They differ only at each ReLU**, in what they let through (f: the ReLU's input in "
        "the forward pass, R: the signal coming down from above):")
    st.latex(r"\text{gradient: } \mathbb{1}[f>0]\,R \qquad \text{Deconvnet: } \mathrm{ReLU}(R) \qquad "
             r"\text{guided backprop: } \mathbb{1}[f>0]\,\mathbb{1}[R>0]\,R")
    ex = lessons.relu_rules_example()
    st.dataframe(pd.DataFrame({
        "f (ReLU input)": lessons.RELU_EXAMPLE_F, "ReLU(f) (forward)": ex["forward"],
        "R (from above)": lessons.RELU_EXAMPLE_R, "gradient passes": ex["gradient"],
        "Deconvnet passes": ex["deconvnet"], "guided backprop passes": ex["guided"],
    }), hide_index=True, key="learn_relu_table")
    st.caption("Computed by vislib's own ReLU rules on four numbers. The gradient remembers where the "
               "forward was off (rows 3–4); Deconvnet forgets it and keeps only positive signals (row 3 "
               "passes); guided backprop needs both, so only row 1 passes.")
    expl = cached_signals(digest, bundle.name, bundle.weights, target, bundle, data)
    cols = st.columns(4)
    cols[0].image(expl.input_image, caption="Input", width="stretch")
    for column, name in zip(cols[1:], lessons.BACKPROP_METHODS, strict=True):
        column.image(signed_rgb(expl.raw[name]), caption=title(name), width="stretch")
    st.caption(f"Class **{expl.target_label()}**. Signed RGB: grey = 0, each colour channel's sign and size "
               f"around it. Fewer signs survive guided backprop, so its picture is the cleanest, and the "
               f"least tied to the class (section 5).")


# --------------------------------------------------------------------------------------------------
# 4 · Grad-CAM++ vs Grad-CAM on several objects


def shapes_bundle(bundle):
    from vislib.data.shapes import CLASSES

    if list(bundle.labels) == list(CLASSES):
        return bundle
    for name in (GAP_MODEL, FC_MODEL):
        candidate = bundled(name)
        if candidate is not None:
            return candidate
    return None


def section_multi(bundle) -> None:
    st.header(SECTIONS["multi"], anchor="multi")
    st.markdown(
        "Grad-CAM's weights are plain averages of the gradient, so one strong object can outweigh the "
        "others. Grad-CAM++ (Chattopadhay et al. 2018) weighs each position's positive gradient by "
        "a_ij, which gives smaller objects their share:")
    st.latex(r"w^c_k = \sum_{ij} a^{kc}_{ij}\,"
             r"\mathrm{ReLU}\!\left(\frac{\partial S^c}{\partial A^k_{ij}}\right),\quad "
             r"a^{kc}_{ij} = \frac{g_{ij}^2}{2 g_{ij}^2 + \sum_{ab} A^k_{ab}\, g_{ij}^3}")
    model = shapes_bundle(bundle)
    if model is None:
        st.info("This lesson uses generated images of the shapes classes: install the bundled shapes models.")
        return
    c1, c2, c3 = st.columns(3)
    count = c1.slider("Generated images", 8, 48, 24, step=8, key="learn_multi_count")
    statistic = c2.radio("Covered when the map's … inside the object", lessons.STATISTICS,
                         key="learn_multi_stat", horizontal=True,
                         format_func={"mean": "mean", "max": "maximum"}.get)
    threshold = c3.slider("… is at least this share of the map's maximum", 0.1, 0.9, 0.5, 0.05,
                          key="learn_multi_threshold")
    study = cached_study(model.name, model.weights, count, threshold, statistic, model)
    word = "mean" if statistic == "mean" else "maximum"
    st.markdown(f"**Covered**, precisely: an object is covered by a map when the map's {word} over the "
                f"object's pixels (its mask) is at least {threshold:.2f} × the map's maximum over the image. "
                f"Model **{model.name}**, layer `{study.layer}`, explaining the true class of each image; "
                f"{len(study.images)} images with 2 to 4 objects of one class, {study.instances} objects.")
    cols = st.columns(len(study.methods))
    for column, method in zip(cols, study.methods, strict=True):
        column.metric(f"{title(method)}: objects covered", f"{study.share(method):.0%}",
                      help=f"{study.covered(method)} of {study.instances}; every object covered in "
                           f"{study.all_covered(method)} of {len(study.images)} images; mean share per "
                           f"image {study.mean_share(method):.0%}.")
    st.markdown(lessons.coverage_sentence(study, titles=title))
    st.dataframe(pd.DataFrame({
        "method": [title(m) for m in study.methods],
        "objects covered": [study.covered(m) for m in study.methods],
        "objects": [study.instances] * len(study.methods),
        "share": [study.share(m) for m in study.methods],
        "mean share per image": [study.mean_share(m) for m in study.methods],
        "images fully covered": [study.all_covered(m) for m in study.methods],
    }), hide_index=True, key="learn_multi_table")
    pick = st.slider("Example image", 0, len(study.images) - 1, 0, key="learn_multi_pick")
    image = study.images[pick]
    cols = st.columns(1 + len(study.methods))
    cols[0].image(lessons.outline_overlay(image.view, image.masks), width="stretch",
                  caption=f"{len(image.masks)} × {model.labels[image.label]} (predicted "
                          f"{model.labels[image.predicted]})")
    for column, method in zip(cols[1:], study.methods, strict=True):
        marks = " ".join("●" if c else "○" for c in image.covered[method])
        column.image(lessons.outline_overlay(overlay(image.view, image.maps[method]), image.masks),
                     caption=f"{title(method)} · covered {marks}", width="stretch")


# --------------------------------------------------------------------------------------------------
# 5 · Sanity check


def section_sanity(bundle, digest, data, layer, target) -> None:
    st.header(SECTIONS["sanity"], anchor="sanity")
    st.markdown(
        "Adebayo et al. (2018): if a map explains what the network *learned*, destroying what it learned "
        "must change the map. Re-initialise the layers from the top, one more at a time (**cascading "
        "randomisation**), on a private copy of the model, and compare each map with the trained "
        "model's: Spearman rank correlation ρ (1 = same ranking of pixels) and SSIM (1 = same "
        "structure). The class explained stays the trained model's.")
    fast = [m for m in vislib.METHODS if m not in ui.SLOW_METHODS]
    default = [m for m in lessons.DEFAULT_SANITY_METHODS if m in fast]
    methods = st.multiselect("Methods", fast, default=default, key="learn_sanity_methods", format_func=title,
                             help="Methods that need one or two passes (the cascade explains the image once "
                                  "per re-initialised layer).")
    if not methods:
        st.info("Pick at least one method.")
        return
    key = ui.result_key(digest, lesson="sanity", model=bundle.name, weights=bundle.weights, layer=layer,
                        target=target, methods=methods)
    try:
        check = _sanity_cache(key)
    except _Miss:
        bar = st.progress(0.0, text="Re-initialising the network from the top…")
        check = lessons.cascading_randomisation(
            bundle, data, methods, layer=layer, target=target,
            progress=lambda done, total: bar.progress(done / max(total, 1),
                                                      text=f"Re-initialised {done} of {total} layers…"))
        bar.empty()
        _sanity_cache(key, _result=check)
    k_max = len(check.units)
    step = st.slider("Layers re-initialised (from the top)", 0, k_max, min(1, k_max), key="learn_sanity_step",
                     help="Step through the cascade: " + " → ".join(check.units))
    metric = st.radio("Similarity", list(lessons.SANITY_METRICS), key="learn_sanity_metric", horizontal=True,
                      format_func=lessons.SANITY_METRICS.get)
    done = ", ".join(f"`{u}`" for u in check.units[:step]) or "none"
    st.caption(f"Class **{check.label}**, layer `{check.layer}`. Re-initialised: {done}.")
    st.plotly_chart(lessons.sanity_figure(check, metric, step, titles=title), key="learn_sanity_chart",
                    config={"displayModeBar": False})
    cols = st.columns(len(methods))
    for column, method in zip(cols, methods, strict=True):
        now = check.steps[step]
        column.image(sanity_picture(check.view, check.steps[0].maps[method], method), width="stretch",
                     caption=f"{title(method)} · trained")
        column.image(sanity_picture(check.view, now.maps[method], method), width="stretch",
                     caption=f"after {step} re-initialised · ρ = {now.spearman[method]:.2f} · "
                             f"SSIM = {now.ssim[method]:.2f}" + (" · flat" if now.flat[method] else ""))
    rows = []
    for k, s in enumerate(check.steps):
        row = {"step": k, "re-initialised": "—" if k == 0 else check.units[k - 1]}
        for m in methods:
            row[f"{m} ρ"] = s.spearman[m]
            row[f"{m} ρ signed"] = s.spearman_signed[m]
            row[f"{m} SSIM"] = s.ssim[m]
        rows.append(row)
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="learn_sanity_table")
    st.caption("A map that becomes flat (e.g. all zero after Grad-CAM's ReLU) has no ranking left: its ρ "
               "counts as 0. A method whose curve stays near 1 shows the image, not the network.")
    st.markdown(lessons.sanity_sentence(check, titles=title))


# --------------------------------------------------------------------------------------------------
# 6 · Concepts of the bundled models


@st.cache_data(max_entries=4, ttl=3600, show_spinner=False)
def cached_concept_lesson(model, weights, count, k, _bundle):
    return lessons.concept_lesson(_bundle, count=count, k=k)


def section_concepts() -> None:
    from vislib.concepts import concept_image, legend_html

    st.header(SECTIONS["concepts"], anchor="concepts")
    st.markdown(
        "Deep Feature Factorization (Collins et al. 2018) asks what a layer has learned to detect, without "
        "a class to explain. The layer's activations over a set of images, each channel shifted to a "
        "minimum of 0, form a non-negative matrix V (channels × positions). Non-negative matrix "
        "factorization splits it into k **concepts**: column W_d is what concept d looks like in the "
        "channels, row H_d where it is in the images. The classifier, applied to a concept's vector, says "
        "which class it speaks for.")
    st.latex(r"V \approx W H,\qquad V \in \mathbb{R}_{\ge 0}^{C \times Z},\; W \in "
             r"\mathbb{R}_{\ge 0}^{C \times k},\; H \in \mathbb{R}_{\ge 0}^{k \times Z}")
    k = st.slider("Concepts", 3, 8, 5, key="learn_concepts_k")
    found = [(name, bundled(name)) for name in (GAP_MODEL, FC_MODEL)]
    found = [(name, b) for name, b in found if b is not None]
    if not found:
        st.info("This lesson uses the bundled shapes models: install them (assets/models).")
        return
    for tab, (name, model) in zip(st.tabs([name for name, _ in found]), found, strict=True):
        with tab:
            lesson = cached_concept_lesson(model.name, model.weights, 8, k, model)
            st.markdown(lesson.sentence())
            c = lesson.concepts
            numbers = ("share of the layer", "map mass on the objects", "× the objects' area")
            st.dataframe(pd.DataFrame({
                "concept": [f"{d + 1}" for d in range(c.k)],
                "share of the layer": c.share,
                "map mass on the objects": lesson.on_object,
                "× the objects' area": lesson.enrichment,
                "where": [lesson.kind(d) for d in range(c.k)],
                "top classes": [", ".join(f"{label} {p:.0%}" for _, label, p in c.top_classes[d][:3])
                                for d in range(c.k)],
            }), hide_index=True, key=f"learn_concepts_table_{name}",
                column_config={col: st.column_config.NumberColumn(format="%.2f") for col in numbers})
            cols = st.columns(5)
            for i, column in enumerate(cols[:4]):
                column.image(concept_image(c.input_image[i], c.maps[i]), width="stretch",
                             caption=f"true class: {model.labels[lesson.labels[i]]}")
            cols[4].markdown(legend_html(c, top=1), unsafe_allow_html=True)


# --------------------------------------------------------------------------------------------------
# 7 · When to trust which method


def sanity_picture(view, values, method: str):
    """A CAM-family map over the image; an input-space signal's magnitude on its own (grey scale)."""
    if vislib.METHODS[method].family == "backprop":
        return lessons.map_image(values, colormap="gray")
    return overlay(view, values)


def section_trust() -> None:
    st.header(SECTIONS["trust"], anchor="trust")
    st.markdown("\n".join(f"- **{name}**. *Use it when:* {good} *Careful:* {caveat}"
                          for name, good, caveat in lessons.TRUST))
    st.markdown("In short: a map is only as good as its sanity check. Prefer the CAM family to say "
                "*where* the evidence is; use Deconvnet and guided backprop to see *what pattern* the early "
                "layers react to, never alone to explain a decision.")
    st.subheader("Why the metrics of trust disagree", anchor="disagree")
    st.markdown("\n".join(f"- **{head}.** {body}" for head, body in lessons.METRICS_DISAGREE))
    st.markdown("**References**\n\n" + "\n".join(f"- {r.text}" for r in lessons.REFERENCES))


@st.cache_data(max_entries=4, ttl=3600, show_spinner=False)
def cached_shortcut(index: int, _clean, _shortcut):
    return lessons.shortcut_lesson(_clean, _shortcut, index)


def section_two_models(data: bytes, image_name: str) -> None:
    """The shortcut model against the clean one; a CNN against a vision transformer."""
    st.header(SECTIONS["two"], anchor="two")
    st.subheader("The shortcut model")
    clean, shortcut = bundled(GAP_MODEL), bundled("shapes_shortcut")
    if clean is None or shortcut is None:
        st.info("Needs the bundled models shapes_resnet and shapes_shortcut.")
        return
    st.markdown("`shapes_shortcut` is the same network as `shapes_resnet`, trained on the same shapes, "
                "except that every training **star** carried a small checkerboard in the top-left corner. "
                "It learned the mark, not the star. Stamp the mark on a shape that is not a star, and watch "
                "both models.")
    index = st.slider("Test image", 0, 9, 0, key="shortcut_index")
    lesson = cached_shortcut(index, clean, shortcut)
    columns = st.columns(4)
    for column, row in zip(columns, lesson.rows, strict=True):
        image = lesson.marked if row.marked else lesson.clean
        column.image(overlay(image, row.map), width="stretch", output_format="PNG",
                     caption=f"{row.model} · {'with' if row.marked else 'without'} the mark")
        column.markdown(f"predicts **{row.label}** ({row.probability:.0%})  \n"
                        f"Grad-CAM on the mark: {row.mark_share:.1%} (the mark is 0.2% of the image)")
    st.caption(f"The shape is a {lesson.true_label}. The card of shapes_shortcut: with the mark on every "
               "non-star test image, 99.2% of them are called star. Grad-CAM shows where the decision "
               "comes from: the shortcut model's evidence moves to the corner.")
    st.subheader("A CNN and a vision transformer")
    available = vislib.models.pretrained_available
    if not (available("vit_b_16") and available("resnet50")):
        st.info("This needs two ImageNet models with trained weights: resnet50 and vit_b_16 in the torch hub "
                "cache (`python -c \"import torchvision; torchvision.models.vit_b_16(weights='DEFAULT')\"` "
                "once, online). The bundled models are both CNNs. The **Compare** page puts any two models "
                "side by side.", icon=":material/info:")
        st.page_link("pages/5_Compare.py", label="Open Compare", icon=":material/compare:")
        return
    from vislib.compare import compare

    cnn, vit = load_bundle("resnet50", "pretrained"), load_bundle("vit_b_16", "pretrained")
    result = compare(cnn, vit, vislib.load_image(data, name=image_name), ["gradcam"])
    left, right = st.columns(2)
    for column, side in ((left, result.left), (right, result.right)):
        column.image(side.overlay("gradcam"), width="stretch", caption=f"{side.model}: {side.target_label()}")
    st.markdown("  \n".join(result.summary()))
    st.caption("A CNN's last convolution keeps a coarse grid of positions; a ViT's tokens each see the whole "
               "image from the first layer, so its Grad-CAM (on the last block's tokens) is often patchier.")


# --------------------------------------------------------------------------------------------------
# Page

with st.sidebar:
    picked, bundle = input_and_model()
    if bundle is not None:
        if state.get("layer") not in bundle.layers:
            state["layer"] = bundle.default_layer
        st.selectbox("Target layer", list(bundle.layers), key="layer",
                     format_func=lambda n: ui.bundle_layer_label(bundle, n))
        if not isinstance(state.get("learn_target"), int) or not TOP_CLASS <= state["learn_target"] < len(
                bundle.labels):
            state["learn_target"] = TOP_CLASS
        st.selectbox("Class to explain", [TOP_CLASS, *range(len(bundle.labels))], key="learn_target",
                     format_func=lambda i: "the predicted class" if i == TOP_CLASS else bundle.labels[i])

st.title("Learn: how each method works")
st.caption("Live, on the image and model in the sidebar: every picture and number below is computed now. "
           + " · ".join(f"[{t}](#{k})" for k, t in SECTIONS.items()))
if picked is None:
    st.info("Upload an image, take a photo, or pick a sample in the sidebar.", icon=":material/image:")
    st.stop()
if bundle is None:
    st.stop()
data, image_name = picked
digest = ui.image_digest(data)
layer = state["layer"]
target = None if state["learn_target"] == TOP_CLASS else state["learn_target"]

for _section, run in (
    ("steps", lambda: section_steps(bundle, digest, data, layer, target)),
    ("cam", lambda: section_cam(bundle, digest, data)),
    ("relu", lambda: section_relu(bundle, digest, data, target)),
    ("multi", lambda: section_multi(bundle)),
    ("sanity", lambda: section_sanity(bundle, digest, data, layer, target)),
    ("concepts", section_concepts),
    ("trust", section_trust),
    ("two", lambda: section_two_models(data, image_name)),
):
    try:
        run()
    except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
        show_error(exc)
    st.divider()
