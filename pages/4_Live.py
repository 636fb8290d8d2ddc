"""vislib dashboard, Live page: the map over a camera stream, and a video file explained frame by frame.

Camera: streamlit-webrtc sends the frames to this server (no outside STUN server: ICE on the local
network only, unless ``VISLIB_ICE_SERVERS`` gives some as JSON); its callback thread only offers each
frame to a :class:`vislib.live.LiveExplainer`, which explains the newest one and drops the rest.
Video: :func:`vislib.video.explain_video` in a worker with a progress bar and a Stop button.
"""

from __future__ import annotations

import time

import numpy as np
import streamlit as st

import vislib
from pages.common import Miss, cached_or_run, keep_state, model_picker, nav, show_error
from vislib import ui
from vislib.live import LiveExplainer, rtc_configuration
from vislib.render import to_png_bytes

st.set_page_config(page_title="vislib · Live", page_icon=":material/videocam:", layout="wide")
keep_state()
state = st.session_state
LIVE_METHODS = ("gradcam", "gradcam++", "layercam", "xgradcam", "cam", "eigencam")


def explainer(bundle, method: str, layer: str, alpha: float) -> LiveExplainer:
    """This session's worker for ``bundle`` (the bundle itself is the server's one cached model)."""
    live = state.get("_live")
    if live is None or live.bundle is not bundle:
        if live is not None:
            live.stop()
        live = state["_live"] = LiveExplainer(bundle, method=method, layer=layer, alpha=alpha)
    live.update(method=method, layer=layer, alpha=alpha)
    return live


def freeze(live: LiveExplainer) -> None:
    """Hand the last explained camera frame to the Explain page (as if it were uploaded)."""
    latest = live.latest()
    if latest is None or latest.source is None:
        state["_live_note"] = "No frame explained yet: start the camera first."
        return
    state["image_bytes"] = to_png_bytes(vislib.load_image(latest.source))
    state["image_name"] = f"live frame {latest.number}"
    state["image_from"] = state["source"] = "Upload"
    state["_frozen"] = True


def camera_tab(bundle, method: str, layer: str, alpha: float) -> None:
    from streamlit_webrtc import WebRtcMode, webrtc_streamer

    live = explainer(bundle, method, layer, alpha)

    def on_frame(frame):
        import av

        live.submit(frame.to_ndarray(format="rgb24"))  # never waits for the model
        latest = live.latest()
        if latest is None:
            return frame
        side = max(frame.height, 224)
        shown = latest.overlay.resize((side, side))
        return av.VideoFrame.from_ndarray(np.asarray(shown), format="rgb24")

    stream, info = st.columns([3, 2], gap="large")
    with stream:
        ctx = webrtc_streamer(
            key="live", mode=WebRtcMode.SENDRECV, rtc_configuration=rtc_configuration(),
            media_stream_constraints={"video": True, "audio": False}, video_frame_callback=on_frame,
            async_processing=True)
        st.caption("The map of the newest frame over the model's input view; frames that arrive while the "
                   "model is busy are dropped, never queued.")
    with info:
        st.button("Pause: explain this frame", icon=":material/pause_circle:", key="freeze",
                  on_click=freeze, args=(live,), help="Freeze the current frame into the Explain page.")
        if state.pop("_frozen", False):
            st.switch_page("app.py")
        if note := state.pop("_live_note", None):
            st.info(note)
        picture, text = st.empty(), st.empty()
        while ctx.state.playing:
            latest = live.latest()
            if latest is not None:
                picture.image(latest.overlay, width=224, caption=f"frame {latest.number}")
                text.markdown("  \n".join(f"**{label}** {p:.1%}" for _, label, p in latest.top)
                              + f"  \n:gray[{latest.seconds * 1000:.0f} ms a frame · {live.slot.dropped} "
                                "dropped]" + (f"  \n:red[{live.error}]" if live.error else ""))
            time.sleep(0.2)


@st.cache_data(max_entries=8, ttl=3600, show_spinner=False)
def _video_cache(key: str, _result=None):
    if _result is None:
        raise Miss
    return _result


def video_tab(bundle, method: str, layer: str, alpha: float) -> None:
    from vislib.video import LIMITS, VIDEO_EXTENSIONS, encode_gif, encode_mp4, explain_video

    upload = st.file_uploader(
        "A short video (MP4, WebM, MOV, MKV or GIF)", type=[e.lstrip(".") for e in VIDEO_EXTENSIONS],
        key="video_upload", max_upload_size=LIMITS.max_bytes // 2**20)
    st.caption(f"Up to {LIMITS.max_seconds:.0f} s, {LIMITS.max_bytes // 2**20} MB, "
               f"{LIMITS.max_pixels / 1e6:.1f} megapixels a frame; at most {LIMITS.max_explained} frames "
               "are explained (longer videos are sampled).")
    if upload is None:
        return
    smoothing = st.slider("Temporal smoothing β", 0.0, 0.9, 0.6, 0.1, key="video_smoothing",
                          help="Exponential moving average of the maps: s_t = β·s_(t−1) + (1 − β)·m_t.")
    data = upload.getvalue()
    key = ui.result_key(ui.image_digest(data), model=bundle.name, weights=bundle.weights, layer=layer,
                        method=method, smoothing=smoothing)

    def job(progress, cancel):
        return explain_video(bundle, data, method, layer, name=upload.name, smoothing=smoothing,
                             progress=progress, cancel=cancel)

    try:
        result, _ = cached_or_run(key, job, _video_cache, name="video_stop", verb="Explaining frames")
    except Exception as exc:  # Streamlit's rerun/stop signals are BaseExceptions and pass through
        show_error(exc)
        return
    if result is None:
        return
    frame = st.slider("Frame", 0, len(result) - 1, 0, key="video_frame") if len(result) > 1 else 0
    left, right = st.columns([1, 1], gap="large")
    left.image(result.overlay(frame, alpha=alpha), width="stretch",
               caption=f"frame {frame * result.every} of {result.info.frames} · {result.method} (smoothed)")
    right.markdown("  \n".join(f"**{label}** {p:.1%}" for _, label, p in result.top_k(frame, 3)))
    right.caption(f"{len(result)} frames explained in {ui.format_seconds(result.seconds)} · "
                  + " · ".join(result.notes))
    overlays = lambda: result.overlays(alpha=alpha)  # noqa: E731  (encoded only when clicked)
    name = ui.safe_filename(bundle.name, method, upload.name)
    right.download_button("Download MP4", data=lambda: encode_mp4(overlays(), result.fps), on_click="ignore",
                          file_name=f"{name}.mp4", mime="video/mp4", icon=":material/download:", key="dl_mp4")
    right.download_button("Download GIF", data=lambda: encode_gif(overlays(), result.fps), on_click="ignore",
                          file_name=f"{name}.gif", mime="image/gif", icon=":material/download:", key="dl_gif")


with st.sidebar:
    nav()
    st.markdown("### :material/neurology: Model")
    bundle = model_picker()
    method = st.selectbox("Method", LIVE_METHODS, key="live_method", format_func=ui.method_title)
    layer = None
    if bundle is not None:
        if state.get("layer") not in bundle.layers:
            state["layer"] = bundle.default_layer
        layer = st.selectbox("Target layer", list(bundle.layers), key="layer",
                             format_func=lambda n: ui.bundle_layer_label(bundle, n))
    alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.5, 0.05, key="live_alpha")

st.title("Live")
if bundle is None:
    st.stop()
camera, video = st.tabs(["Camera", "Video file"])
with video:
    video_tab(bundle, method, layer, alpha)
with camera:
    camera_tab(bundle, method, layer, alpha)
