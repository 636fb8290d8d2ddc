"""The classroom pages in a real browser (one server, one Chromium with a fake camera playing a
generated clip): Live shows maps that change with the frames and pauses into Explain; the brush edit
changes the score; Compare renders two models; a generated video is explained and downloaded; the
report opens and shows its images; hostile videos get a clear error and the server stays up.
"""

from __future__ import annotations

import base64
import io
import re
import urllib.request

import pytest
from PIL import Image
from test_e2e_browser import OUT, browser_server
from videos import clip, encode, moving_square, y4m

from benchmarks.dashboard_harness import launch_chromium, open_page, settle, sidebar

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server():
    with browser_server("e2e-classroom.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(server, tmp_path_factory):
    camera = tmp_path_factory.mktemp("camera") / "clip.y4m"
    y4m(camera, frames=40, size=(160, 120))
    args = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-video-capture={camera}"]
    with launch_chromium(args) as chromium:
        yield chromium


def _healthy(server) -> bool:
    with urllib.request.urlopen(f"{server.url}/_stcore/health", timeout=5) as response:
        return response.status == 200


def _captions(page, pattern: str) -> list[str]:
    return page.get_by_text(re.compile(pattern)).all_inner_texts()


def test_live_maps_change_and_pause_freezes_into_explain(server, browser):
    page = open_page(browser, f"{server.url}/Live")
    settle(page)
    frame = page.frame_locator('iframe[title*="streamlit_webrtc"]').first
    frame.get_by_role("button", name=re.compile("start", re.I)).click()
    first = page.get_by_text(re.compile(r"^frame \d+$")).first
    first.wait_for(timeout=90_000)
    seen = {first.inner_text()}
    for _ in range(40):
        page.wait_for_timeout(500)
        seen.update(_captions(page, r"^frame \d+$"))
        if len(seen) >= 3:
            break
    assert len(seen) >= 3, seen  # new frames keep being explained
    page.screenshot(path=str(OUT / "e2e-live.png"))
    page.get_by_role("button", name=re.compile("Pause: explain this frame")).click()
    page.wait_for_url(re.compile(r"/(\?.*)?$"), timeout=60_000)
    settle(page)
    assert page.get_by_text(re.compile(r"live frame \d+")).count() >= 1
    page.close()


def test_brush_edit_changes_the_score_and_report_shows_images(server, browser):
    page = open_page(browser, server.url)
    settle(page)
    page.get_by_text("Paint over the image and watch the class score").click()
    settle(page)
    result = page.locator(".st-key-erase_result")
    before = result.locator('[data-testid="stMetricValue"]').inner_text()
    canvas = page.locator(".st-key-erase_canvas canvas").last
    canvas.wait_for()
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + 5, box["y"] + 5)
    page.mouse.down()
    for step in range(12):  # scribble over the whole image
        y = box["y"] + 5 + step * (box["height"] - 10) / 11
        page.mouse.move(box["x"] + box["width"] - 5, y, steps=4)
        page.mouse.move(box["x"] + 5, y + 8, steps=4)
    page.mouse.up()
    page.wait_for_function(
        "old => { const el = document.querySelector('.st-key-erase_result [data-testid=stMetricValue]');"
        " return el && el.innerText !== old; }", arg=before, timeout=60_000)
    assert result.locator('[data-testid="stMetricDelta"]').inner_text().startswith("-")
    page.screenshot(path=str(OUT / "e2e-erase.png"))
    with page.expect_download() as info:
        page.get_by_role("button", name=re.compile("Download report")).click()
    html = open(info.value.path(), encoding="utf-8").read()
    report = browser.new_page()
    report.set_content(html)
    images = report.locator("img")
    assert images.count() >= 3
    for i in range(images.count()):  # every image decoded by the browser
        assert images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0")
    src = images.first.get_attribute("src")
    Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    report.close()
    page.close()


def test_compare_renders_two_models(server, browser):
    page = open_page(browser, f"{server.url}/Compare")
    settle(page)
    page.get_by_text("Where they disagree").wait_for()
    page.locator('[data-testid="stImage"]').nth(1).wait_for()  # one map per model
    settle(page)
    page.screenshot(path=str(OUT / "e2e-compare.png"))
    for model in ("shapes_resnet", "shapes_shortcut"):
        assert page.get_by_role("heading", name=model).count() == 1
    assert page.get_by_text(re.compile(r"top 20% IoU \d\.\d\d, rank correlation -?\d\.\d\d")).count() == 1
    page.close()


def _video_page(browser, server):
    page = open_page(browser, f"{server.url}/Live")
    settle(page)
    page.get_by_role("tab", name="Video file").click()
    return page


def _upload_video(page, name: str, data: bytes) -> None:
    page.locator('.st-key-video_upload input[type="file"]').set_input_files(
        files=[{"name": name, "mimeType": "application/octet-stream", "buffer": data}])
    settle(page)


def test_video_explained_and_downloaded(server, browser):
    page = _video_page(browser, server)
    _upload_video(page, "moving.mp4", clip("mp4", frames=10, size=(96, 96)))
    page.get_by_text(re.compile(r"10 frames explained")).wait_for(timeout=300_000)
    settle(page)
    for label, kind in (("Download MP4", "mp4"), ("Download GIF", "gif")):
        with page.expect_download() as info:
            page.get_by_role("button", name=label).click()
        data = open(info.value.path(), "rb").read()
        if kind == "gif":
            assert Image.open(io.BytesIO(data)).n_frames == 10
        else:
            from vislib.video import probe

            assert probe(data, "out.mp4").frames == 10
    page.close()


@pytest.mark.parametrize("name,make,fragment", [
    ("cut.mp4", lambda: clip("mp4")[:300], "not a video PyAV can read"),
    ("wide.mp4", lambda: encode(moving_square(2, (4096, 16), 4)), "4096×16"),
    ("renamed.webm", lambda: b"GIF89a" + bytes(200), "not a video"),
])
def test_hostile_videos_get_a_clear_error(server, browser, name, make, fragment):
    page = _video_page(browser, server)
    _upload_video(page, name, make())
    alert = page.locator('[data-testid="stAlertContentError"]').filter(has_text=fragment)
    alert.wait_for(timeout=180_000)
    assert name in alert.inner_text()
    assert _healthy(server)
    assert sidebar(page).count() == 1
    page.close()
