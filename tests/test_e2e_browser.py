"""The dashboard in a real browser: ``streamlit run app.py`` on a free loopback port, driven by
Debian's Chromium through playwright. Upload an image, choose methods, click a bar of the chart, and
check what a person would see; screenshots go to ``test-output/`` (git-ignored).

Without Chromium or playwright the test is skipped with the reason, except in CI (``CI=true``), where
that is a failure. Install: ``apt-get install -y chromium`` and ``pip install playwright`` (never
``playwright install``: the system Chromium is used).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "test-output"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing() -> str | None:
    if not Path(CHROMIUM).is_file():
        return f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    return None


def _require_browser() -> None:
    reason = _missing()
    if reason and IN_CI:
        pytest.fail(f"CI=true but the browser test cannot run: {reason}")
    if reason:
        pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not become healthy within {timeout:.0f} s")


@pytest.fixture(scope="module")
def server():
    _require_browser()
    port = _free_port()
    env = {**os.environ, "VISLIB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log = open(OUT.mkdir(exist_ok=True) or OUT / "e2e-streamlit.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
         "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _photo() -> bytes:
    """A picture with two objects, so the maps have something to find."""
    yy, xx = np.mgrid[0:180, 0:240]
    img = Image.fromarray(np.stack([90 + xx // 3, 120 + yy // 4, 160 - xx // 4], -1).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.ellipse((30, 40, 110, 120), fill=(220, 50, 40))
    draw.rectangle((140, 70, 210, 150), fill=(30, 80, 200))
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


PANEL = r"^{} · [\d.]+ m?s$"
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'


def _settle(page) -> None:
    """Wait until the script run triggered by the last action has finished."""
    page.wait_for_timeout(300)
    page.locator(IDLE).wait_for()


def test_upload_choose_methods_and_click_a_bar(server, browser):
    page = browser.new_page(viewport={"width": 1500, "height": 2000})
    page.set_default_timeout(120_000)
    page.goto(server)
    sidebar = page.locator('[data-testid="stSidebar"]')
    # the default view appears for the sample image
    page.get_by_text(re.compile(PANEL.format("Grad-CAM"))).wait_for()
    # upload an image
    sidebar.locator("button").filter(has_text=re.compile(r"^Upload$")).click()
    page.locator('input[type="file"]').set_input_files(
        files=[{"name": "e2e-photo.png", "mimeType": "image/png", "buffer": _photo()}])
    page.get_by_text(re.compile(r"Model input \(\d+×\d+\) · e2e-photo\.png")).wait_for()
    # add a method: its panel appears beside the others
    sidebar.locator("button").filter(has_text=re.compile(r"^Gradient \(saliency\)")).click()
    page.get_by_text(re.compile(PANEL.format(re.escape("Gradient (saliency)")))).wait_for()
    for title in ("Grad-CAM", "HiResCAM", "Guided backprop", "Deconvnet"):
        assert page.get_by_text(re.compile(PANEL.format(title))).count() == 1, title
    assert page.locator('[data-testid="stImage"]').count() >= 10  # input + 9 panels (+ colour bar)
    # the chart: five bars, each on a full-width clickable track; clicking one explains that class
    chart = page.locator('[data-testid="stPlotlyChart"]')
    bars = chart.locator("g.trace.bars").first.locator(".point path")  # the tracks (trace 0)
    bars.first.wait_for()
    assert bars.count() == 5 and chart.locator("g.trace.bars").count() == 2
    explaining = page.get_by_text(re.compile(r"^Explaining "))
    before = explaining.inner_text()
    label = (chart.locator(".ytick text").first.text_content() or "").strip()  # the bottom bar's class
    box = bars.first.bounding_box()  # the bottom track: the fifth most probable class
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)  # as a person does: plotly picks the bar under the pointer
    page.mouse.click(x, y)
    page.wait_for_function(
        "before => [...document.querySelectorAll('p')].some(p => p.innerText.startsWith('Explaining ')"
        " && p.innerText !== before)", arg=before)
    assert label in explaining.inner_text()
    assert "class=" in page.url
    _settle(page)
    page.get_by_text(re.compile(PANEL.format("Grad-CAM"))).wait_for()
    OUT.mkdir(exist_ok=True)
    page.screenshot(path=str(OUT / "e2e-explain.png"), full_page=True)
    assert not page.get_by_text("Traceback").count()
    page.close()


def test_a_long_method_can_be_stopped(server, browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1400})
    page.set_default_timeout(120_000)
    # resnet18's Score-CAM (512 channels at 224 px) runs long enough to be stopped by hand; the
    # bundled model finishes it in a blink. The link itself sets the model (URL state).
    page.goto(server + "/?model=resnet18&weights=random")
    sidebar = page.locator('[data-testid="stSidebar"]')
    page.get_by_text(re.compile(PANEL.format("Grad-CAM"))).wait_for()
    sidebar.locator("button").filter(has_text=re.compile(r"^Score-CAM")).click()
    page.locator('[data-testid="stProgress"]').wait_for()
    page.locator(".st-key-stop button").click()  # our Stop button (not the toolbar's)
    page.get_by_text("Stopped before it finished").wait_for()
    _settle(page)
    # the model was left clean: the next view computes normally
    sidebar.locator("button").filter(has_text=re.compile(r"^Score-CAM")).click()
    _settle(page)
    page.get_by_text(re.compile(PANEL.format("HiResCAM"))).wait_for()
    assert not page.get_by_text("Stopped before it finished").count()
    page.close()


def test_layer_explorer_page(server, browser):
    page = browser.new_page(viewport={"width": 1500, "height": 1400})
    page.set_default_timeout(120_000)
    page.goto(server)
    page.locator('[data-testid="stSidebar"]').get_by_text("Layer explorer").click()
    page.get_by_text(re.compile(r"channels, \d+×\d+ each, one colour scale")).wait_for()
    page.get_by_role("tab", name="First-layer filters").click()
    page.get_by_text(re.compile(r"filters of")).wait_for()
    _settle(page)
    page.screenshot(path=str(OUT / "e2e-layer-explorer.png"), full_page=True)
    page.close()
