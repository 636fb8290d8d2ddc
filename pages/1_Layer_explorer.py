"""vislib dashboard, Layer explorer: walk through the network from input to output.

For the chosen model, image and layer: the feature maps, the Zeiler & Fergus top-N Deconvnet
reconstructions with their receptive-field patches, the first-layer filters, and, across a whole
dataset, each unit's nine strongest activations beside their projections (Zeiler & Fergus, Fig. 2).
"""

from __future__ import annotations

import streamlit as st
from PIL import Image

from pages.common import FAVICON, Miss, cached_or_run, input_and_model, keep_state, show_error
from vislib import dataset_features, datasets, features, ui
from vislib.evaluate import RateMeter
from vislib.imageio import load_image
from vislib.render import COLORMAPS

st.set_page_config(page_title="vislib · Layer explorer", page_icon=FAVICON, layout="wide")
#: Widgets drawn only once there is an image: kept through runs that stop before them.
PAGE_KEYS = ("walk_layer", "walk_all", "fm_count", "fm_order", "fm_cmap", "zf_n", "zf_source", "zf_channel",
             "filters_norm", "explorer_tab")
keep_state(*PAGE_KEYS)
state = st.session_state


TABS = ("Feature maps", "Top-N Deconvnet reconstructions", "First-layer filters", "Across the dataset")
ZF_SOURCES = {"shapes": "Shapes test split", "zip": "Upload an ImageFolder zip"}


@st.cache_data(max_entries=32, ttl=3600, show_spinner=False)
def cached_view(digest: str, model: str, _bundle, _data: bytes):
    """The image as the model sees it (decoded once per image and model)."""
    return _bundle.input_view(load_image(_data))


@st.cache_data(max_entries=32, ttl=3600, show_spinner=False)
def cached_feature_maps(digest: str, model: str, weights: str, layer: str, _bundle, _data: bytes):
    return features.feature_maps(_bundle, _data, layer)


@st.cache_data(max_entries=16, ttl=3600, show_spinner=False)
def cached_top_channels(digest: str, model: str, weights: str, layer: str, n: int, _bundle, _data: bytes):
    return features.top_channels(_bundle, _data, layer, n=n)


@st.cache_data(max_entries=8, ttl=3600, show_spinner=False)
def cached_filters(model: str, weights: str, normalize: str, _bundle):
    return features.filters_grid(_bundle, normalize=normalize, scale=8)


@st.cache_data(max_entries=16, ttl=3600, show_spinner=False)
def _index_cache(key: str, _result: dataset_features.TopIndex | None = None) -> dataset_features.TopIndex:
    """Dataset indexes by key (they live on disk; this keeps the loaded table); ``_result`` stores."""
    if _result is None:
        raise Miss
    return _result


@st.cache_resource(max_entries=4, show_spinner=False)
def dataset_images(source: str, digest: str, labels: tuple[str, ...], _data: bytes | None = None,
                   _name: str | None = None) -> datasets.ImageSet:
    """The shapes test split (every class: the top activations need no labels) or an uploaded zip."""
    if source == "shapes":
        from vislib.data import shapes

        return datasets.open_dataset("shapes", list(shapes.CLASSES))
    return datasets.open_dataset(_data, list(labels), name=_name)


def _step(walk: list[str], delta: int) -> None:
    index = walk.index(state["walk_layer"]) if state.get("walk_layer") in walk else 0
    state["walk_layer"] = walk[max(0, min(len(walk) - 1, index + delta))]


def layer_walker(bundle) -> str:
    """A select slider over the layers in forward order, with previous/next buttons."""
    everything = st.toggle("Every module", key="walk_all",
                           help="Off: stages and blocks only. On: every module with a spatial output "
                                "(convolutions, batch norms, activations…).")
    walk = ui.walk_layers(bundle, everything=everything)
    if state.get("walk_layer") not in walk:
        start = state.get("layer") if state.get("layer") in walk else None
        state["walk_layer"] = start or (bundle.default_layer if bundle.default_layer in walk else walk[0])
    prev_col, slider_col, next_col = st.columns([1, 12, 1], vertical_alignment="bottom")
    with prev_col:
        st.button("", icon=":material/chevron_left:", key="walk_prev", on_click=_step, args=(walk, -1),
                  disabled=state["walk_layer"] == walk[0], help="Previous layer (towards the input)")
    with slider_col:
        st.select_slider("Layer (input → output)", walk, key="walk_layer")
    with next_col:
        st.button("", icon=":material/chevron_right:", key="walk_next", on_click=_step, args=(walk, 1),
                  disabled=state["walk_layer"] == walk[-1], help="Next layer (towards the output)")
    return state["walk_layer"]


def feature_map_tab(bundle, digest, data, layer) -> None:
    c1, c2, c3 = st.columns(3)
    state.setdefault("fm_count", 32)
    state.setdefault("fm_cmap", "viridis")
    count = c1.select_slider("Channels shown", [16, 32, 64, 128, 256], key="fm_count")
    order = c2.radio("Order", ("strongest first", "channel index"), key="fm_order", horizontal=True)
    colormap = c3.selectbox("Colormap", list(COLORMAPS), key="fm_cmap")
    maps = cached_feature_maps(digest, bundle.name, bundle.weights, layer, bundle, data)
    channels, size = maps.shape[0], maps.shape[1:]
    if order == "strongest first":
        picked = maps.reshape(channels, -1).max(axis=1).argsort()[::-1][:count]
    else:
        picked = list(range(min(count, channels)))
    scale = max(1, 48 // max(size))
    grid = features.tile_maps(maps[list(picked)], columns=16 if len(picked) > 32 else 8, normalize="all",
                              colormap=colormap, scale=scale)
    st.image(grid, width="stretch",
             caption=f"{len(picked)} of {channels} channels, {size[0]}×{size[1]} each, one colour scale "
                     f"for all ({'strongest first' if order == 'strongest first' else 'in channel order'})")
    active = float((maps > 0).mean())
    st.caption(f"{active:.0%} of the layer's activations are positive; strongest: {float(maps.max()):.3g}.")


#: The captions of a unit's pair, in the one order both tabs show it (Zeiler & Fergus, Fig. 2).
PAIR = ("image patch", "projection")


def show_pair(patch: Image.Image, projection: Image.Image) -> None:
    """A unit's image patch beside its Deconvnet projection (in the current container)."""
    for column, picture, caption in zip(st.columns(2, gap="small"), (patch, projection), PAIR, strict=True):
        column.image(picture, width="stretch", caption=caption)


def deconvnet_tab(bundle, digest, data, layer) -> None:
    state.setdefault("zf_n", 9)
    n = st.slider("Top channels", 1, 16, key="zf_n",
                  help="The channels with the strongest single activation on this image.")
    with st.spinner("Projecting the strongest activations back to pixels…"):
        projections = cached_top_channels(digest, bundle.name, bundle.weights, layer, n, bundle, data)
    if not projections:
        st.info("No channel of this layer is positive on this image: nothing to project.")
        return
    st.caption("Each pair: the image patch one channel's strongest activation sees (its receptive field), "
               "beside the Deconvnet projection of that activation alone (every other activation of the "
               "layer set to zero), cropped to the same field (Zeiler & Fergus 2014, Fig. 2).")
    per_line = 3
    for start in range(0, len(projections), per_line):
        for proj, column in zip(projections[start:start + per_line], st.columns(per_line), strict=False):
            top, left, bottom, right = proj.box
            with column:
                size = rec_size(proj)
                show_pair(proj.patch.resize(size, Image.NEAREST), proj.render().resize(size, Image.NEAREST))
                st.caption(f"channel {proj.channel} · activation {proj.value:.3g} · at {proj.position} · "
                           f"field {right - left}×{bottom - top} px")


def rec_size(proj) -> tuple[int, int]:
    top, left, bottom, right = proj.box
    w, h = max(1, right - left), max(1, bottom - top)
    return 128, max(1, round(128 * h / w))


def dataset_tab(bundle, layer: str) -> None:
    """For any channel of the layer, its strongest activations over a whole image set, each image patch
    under the unit's receptive field beside the Deconvnet projection of that activation alone."""
    if state.get("zf_source") not in ZF_SOURCES:
        state["zf_source"] = "shapes"
    source = st.radio("Images", list(ZF_SOURCES), key="zf_source", format_func=ZF_SOURCES.get,
                      horizontal=True)
    data = name = None
    if source == "zip":
        upload = st.file_uploader("ImageFolder zip: one folder per class, named like the model's labels",
                                  type=["zip"], key="zf_zip")
        if upload is None:
            st.info("Upload a zip of images to find the strongest activations in them.",
                    icon=":material/folder_zip:")
            return
        data, name = upload.getvalue(), upload.name
    stage = st.empty()

    def generating(done: int, total: int) -> None:
        stage.progress(done / total if total else 0.0,
                       text=f"Generating the shapes test split… {done}/{total} images")

    if source == "shapes":  # rendered once, then read from the cache folder (outside st.cache_resource:
        datasets.render_shapes("test", progress=generating)  # a cached function cannot draw the bar)
    stage.empty()
    with st.spinner("Reading the images…"):
        images = dataset_images(source, ui.image_digest(data) if data else source, tuple(bundle.labels), data,
                                name)
    key = dataset_features.index_key(bundle, images, layer, 9)

    def job(progress, cancel):
        meter = RateMeter()

        def report(done, total, text=""):
            if total:
                meter.update(done, total)
                text = meter.rate_text(text or "images")
            progress(done, total, text)

        report(0, len(images))  # a count from the start (the first batch takes seconds on a large model)
        return dataset_features.cached_index(bundle, images, layer, top=9, progress=report, cancel=cancel)

    index, _ = cached_or_run(key, job, _index_cache, name="zf_stop", verb="Finding the strongest activations",
                             again="Build again")
    if index is None:
        return
    order = index.strongest_channels()
    if not order:
        st.info("No image could be read.")
        return
    if state.get("zf_channel") not in order:
        state["zf_channel"] = order[0]
    top1 = dict(zip(index.channel[index.rank == 1].tolist(), index.activation[index.rank == 1].tolist(),
                    strict=True))
    channel = st.selectbox("Channel (strongest first)", order, key="zf_channel",
                           format_func=lambda c: f"channel {c} · top activation {top1[c]:.3g}")
    views = dataset_features.unit_views(index, int(channel))
    st.caption(f"The {len(views)} strongest activations of channel {channel} of `{layer}` over "
               f"{index.n_images} images of {index.dataset} (one per image): each image patch under the "
               "unit's receptive field beside the Deconvnet projection of that activation alone (Zeiler & "
               "Fergus 2014, Fig. 2). Computed once, then read from the cache folder.")
    if index.failed:
        st.caption(f"{len(index.failed)} images could not be read and were left out.")
    for start in range(0, len(views), 3):
        for view, column in zip(views[start:start + 3], st.columns(3), strict=False):
            with column:
                show_pair(dataset_features.fit(view.patch, 128), dataset_features.fit(view.render(), 128))
                st.caption(f"#{view.rank} · {view.image} · activation {view.activation:.3g} at "
                           f"{view.position}")


def filters_tab(bundle) -> None:
    name, conv = features.first_conv(bundle.model)
    normalize = st.radio("Scale", ("each", "all"), key="filters_norm", horizontal=True,
                         format_func={"each": "each filter min–max", "all": "one scale (grey = 0)"}.get)
    st.image(cached_filters(bundle.name, bundle.weights, normalize, bundle),
             caption=f"{conv.out_channels} filters of `{name}` ({conv.kernel_size[0]}×{conv.kernel_size[1]}, "
                     f"RGB)", width=640)
    if bundle.weights == "random":
        st.caption("Random weights: the filters are noise. Trained first layers show oriented edges and "
                   "colour blobs.")


with st.sidebar:
    picked, bundle = input_and_model()

st.title("Layer explorer")
st.caption("Walk through the network from the input to the output: what each layer computes on your image.")
if picked is None:
    st.info("Upload an image, take a photo, or pick a sample in the sidebar.", icon=":material/image:")
    st.stop()
if bundle is None:
    st.stop()
data, image_name = picked
digest = ui.image_digest(data)

try:
    layer = layer_walker(bundle)
    shape = bundle.layers[layer]
    walk = ui.walk_layers(bundle, everything=bool(state.get("walk_all")))
    kind = type(bundle.model.get_submodule(layer)).__name__
    view, info = st.columns([1, 5], vertical_alignment="center")
    view.image(cached_view(digest, bundle.name, bundle, data), width="stretch")
    info.markdown(f"#### `{layer}` · {kind}")
    layout = bundle.view(layer).describe()
    info.caption(f"Output: {shape[0]} channels of {shape[1]}×{shape[2]} ({layout}) · step "
                 f"{walk.index(layer) + 1} of {len(walk)} from the input"
                 + (" · the Explain page's default target layer" if layer == bundle.default_layer else ""))
    st.caption(" → ".join(f"**{n}**" if n == layer else n for n in walk))
    tabs = st.tabs(TABS, key="explorer_tab", on_change="rerun")
    for tab, name in zip(tabs, TABS, strict=True):
        if tab.open:
            with tab:
                if name == TABS[0]:
                    feature_map_tab(bundle, digest, data, layer)
                elif name == TABS[1]:
                    deconvnet_tab(bundle, digest, data, layer)
                elif name == TABS[2]:
                    filters_tab(bundle)
                else:
                    dataset_tab(bundle, layer)
except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
    show_error(exc)
