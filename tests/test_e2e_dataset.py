"""The Layer explorer's "Across the dataset" view in a real browser (see test_e2e_browser.py for the
set-up): the first visit builds the index with a progress bar that shows images/s, then the nine
strongest activations of a channel appear as patch / projection pairs."""

from __future__ import annotations

import re

import pytest
from test_e2e_browser import OUT, browser_server

from benchmarks.dashboard_harness import launch_chromium, settle

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {"VISLIB_CACHE": str(tmp_path_factory.mktemp("cache"))}
    with browser_server("e2e-dataset-streamlit.log", env=env) as srv:
        yield srv.url


def test_across_the_dataset_in_the_browser(server):
    with launch_chromium() as browser:
        page = browser.new_page(viewport={"width": 1500, "height": 1600})
        page.set_default_timeout(240_000)
        page.goto(server + "/?layer=stem")  # the bundled model's first stage: 16 channels
        page.locator('[data-testid="stSidebar"]').get_by_text("Layer explorer").click()
        page.get_by_text(re.compile(r"channels, \d+×\d+ each, one colour scale")).wait_for()
        page.get_by_role("tab", name="Across the dataset").click()
        bar = page.locator('[data-testid="stProgress"]')
        bar.wait_for()
        page.wait_for_function(  # the bar's text: images (or projections) per second
            "() => [...document.querySelectorAll('[data-testid=\"stProgress\"]')]"
            ".some(e => / at [\\d.]+\\/s/.test(e.innerText))")
        page.get_by_text(re.compile(r"^#9 · test/\d{5} · activation")).wait_for()
        settle(page)
        assert page.get_by_text(re.compile(r"^#\d · test/\d{5} · activation")).count() == 9
        assert page.get_by_text(re.compile(r"strongest activations of channel \d+ of stem over 2000 "
                                           r"images")).count() == 1
        page.screenshot(path=str(OUT / "e2e-across-the-dataset.png"), full_page=True)
        assert not page.get_by_text("Traceback").count()
