"""The check that finds what a new user would meet: every page in Chromium, a real photograph, three
kinds of model (the bundled one, a torchvision and a timm model on random weights).

It fails on any exception shown on a page (Streamlit's exception element), any "flat map" panel
without a reason in the main area, any widget whose shown value disagrees with the content (the
layer slider and the heading; the class picker and "Explaining …"), a second Stop beside the
page's own, and any request to a host other than the dashboard's own server (issue 25).

The photograph is matplotlib's ``grace_hopper.jpg`` (a portrait photo, shipped with matplotlib,
which the benchmark requirements install); without matplotlib, a synthesised photo-like picture
(smooth lighting, texture noise and soft-edged objects).
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter
from test_e2e_browser import OUT, browser_server

from benchmarks.dashboard_harness import ANY_PANEL, launch_chromium, open_page, settle, sidebar
from vislib.models import DEFAULT_MODEL

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # about a minute per model on 2 cores

MODELS = [DEFAULT_MODEL, "resnet18", "timm:vit_tiny_patch16_224"]  # bundled, torchvision, timm (a ViT)
PAGES = ("Layer explorer", "Error analysis", "Learn")  # after Explain, through the sidebar's links
EXCEPTION = '[data-testid="stException"]'


def photograph() -> tuple[str, bytes]:
    """(file name, JPEG bytes) of a real photograph, or of a photo-like picture when none is at hand."""
    try:
        from matplotlib import cbook

        path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
        return path.name, path.read_bytes()
    except Exception:  # noqa: BLE001  (matplotlib missing or without its sample data)
        pass
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:360, 0:480] / 360.0
    light = 0.55 + 0.35 * np.exp(-((xx - 0.9) ** 2 + (yy - 0.3) ** 2) / 0.3)
    base = np.stack([0.45 + 0.2 * yy, 0.55 + 0.1 * xx, 0.35 + 0.25 * (1 - yy)], -1) * light[..., None]
    noise = rng.normal(0, 0.04, (90, 120, 3)).repeat(4, 0).repeat(4, 1)  # texture, not pixel noise
    img = Image.fromarray((np.clip(base + noise, 0, 1) * 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse((70, 120, 230, 300), fill=(150, 90, 50))  # a brown animal-ish blob
    draw.ellipse((110, 80, 190, 160), fill=(130, 80, 45))
    draw.rectangle((300, 180, 420, 320), fill=(60, 90, 140))  # a blue box
    img = img.filter(ImageFilter.GaussianBlur(2))
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90)
    return "photo-like.jpg", buffer.getvalue()


@pytest.fixture(scope="module")
def server():
    with browser_server("walk-streamlit.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(server):
    with launch_chromium() as chromium:
        yield chromium


def main(page):
    return page.locator('[data-testid="stMain"]')


def check_page(page, where: str) -> None:
    """What every page must satisfy once it is idle."""
    settle(page)
    shown = page.locator(EXCEPTION)
    assert not shown.count(), f"{where}: exception on the page: {shown.first.inner_text()[:500]}"
    flat = main(page).get_by_text(re.compile(r" · flat map$")).count()
    reasons = main(page).locator("strong", has_text=re.compile(r"^Flat map$")).count()
    assert not flat or reasons, f"{where}: {flat} flat-map panels and no reason on the page"


def check_explain(page, where: str) -> None:
    check_page(page, where)
    picker = page.locator(".st-key-target input").input_value()
    explaining = main(page).get_by_text(re.compile(r"^Explaining ")).first.inner_text()
    label = re.match(r"Explaining (.+?) \(the ", explaining).group(1)
    assert label in picker, f"{where}: the class picker shows {picker!r} while the page explains {label!r}"


def check_explorer(page, where: str) -> str:
    """The layer slider shows the layer that the heading and the content are about; returns it."""
    check_page(page, where)
    shown = page.locator(".st-key-walk_layer [data-testid='stSliderThumbValue']").inner_text().strip()
    heading = main(page).locator("h4").first.inner_text().strip()
    assert heading.startswith(f"{shown} ·"), f"{where}: the slider shows {shown!r}, the heading {heading!r}"
    return shown


def upload(page, name: str, data: bytes) -> None:
    side = sidebar(page)
    side.locator("button").filter(has_text=re.compile(r"^Upload$")).click()
    side.locator('[data-testid="stFileUploader"]').filter(has_text="Upload an image").locator(
        'input[type="file"]').set_input_files(files=[{"name": name, "mimeType": "image/jpeg", "buffer": data}])
    settle(page)


def one_stop(page) -> None:
    """A long method (Score-CAM on resnet18): one Stop on the page, and it stops the work."""
    side = sidebar(page)
    side.locator("button").filter(has_text=re.compile(r"^Score-CAM")).click()
    page.locator('[data-testid="stProgress"]').wait_for()
    stops = [b for b in page.get_by_role("button", name=re.compile(r"Stop")).all() if b.is_visible()]
    assert len(stops) == 1, f"{len(stops)} Stop buttons while Score-CAM runs"
    page.wait_for_function("() => [...document.querySelectorAll('[data-testid=\"stProgress\"]')]"
                           ".some(p => / left/.test(p.innerText))")  # the bar says the time left
    page.locator(".st-key-stop button").click()
    page.get_by_text("Stopped before it finished").wait_for()
    settle(page)
    side.locator("button").filter(has_text=re.compile(r"^Score-CAM")).click()  # off again
    settle(page)


@pytest.mark.parametrize("model", MODELS)
def test_walk_every_page_with_a_photograph(server, browser, model):
    started = time.perf_counter()
    name, data = photograph()
    weights = "" if model == DEFAULT_MODEL else "&weights=random"
    page = open_page(browser, f"{server.url}/?model={model}{weights}", height=1400)
    outside: list[str] = []
    page.on("request", lambda r: outside.append(r.url) if urlparse(r.url).scheme in ("http", "https", "ws", "wss")
            and urlparse(r.url).netloc != urlparse(server.url).netloc else None)
    try:
        page.locator(".st-key-model_pick").wait_for()
        upload(page, name, data)
        page.get_by_text(re.compile(rf"Model input \(\d+×\d+\) · {re.escape(name)}")).wait_for()
        page.get_by_text(ANY_PANEL).first.wait_for()
        check_explain(page, f"Explain · {model}")
        if model == "resnet18":
            one_stop(page)
            check_explain(page, f"Explain after Stop · {model}")
        for title in PAGES:
            sidebar(page).get_by_text(title, exact=True).click()
            page.get_by_role("heading", name=title).first.wait_for()
            where = f"{title} · {model}"
            print(f"walk {model}: {title} at {time.perf_counter() - started:.1f} s")
            if title == "Error analysis":  # 100 images are enough to walk the page
                slider = page.locator(".st-key-ea_limit").get_by_role("slider")
                slider.wait_for()  # drawn before the evaluation starts: the change restarts it
                slider.focus()
                page.keyboard.press("Home")
                check_page(page, where)
            elif title == "Layer explorer":
                settle(page)
                before = check_explorer(page, where)
                step = page.locator(".st-key-walk_prev button").first  # towards the input…
                if step.is_disabled():
                    step = page.locator(".st-key-walk_next button").first  # …or the output
                step.click()
                chosen = check_explorer(page, where)
                assert chosen != before, f"{where}: the layer buttons did not move the slider"
                # a run without an image (the page stops before the slider), then the upload again
                sources = sidebar(page).locator('[data-testid="stButtonGroup"]').first
                sources.locator("button").filter(has_text=re.compile(r"^Camera$")).click()
                main(page).get_by_text("Upload an image, take a photo").wait_for()
                settle(page)
                sources.locator("button").filter(has_text=re.compile(r"^Upload$")).click()
                assert check_explorer(page, f"{where}, after a run without the image") == chosen
            else:
                check_page(page, where)
        assert not outside, f"requests to other hosts than the dashboard's: {sorted(set(outside))[:5]}"
    finally:
        OUT.mkdir(exist_ok=True)
        page.screenshot(path=str(OUT / f"walk-{model.replace(':', '_')}.png"), full_page=True)
        page.close()
        print(f"walk {model}: {time.perf_counter() - started:.1f} s")
