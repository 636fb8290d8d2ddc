"""The dashboard's dataset-scale parts under streamlit.testing.v1.AppTest: the Layer explorer's
"Across the dataset" view (the top-9 of a channel over the shapes test split, built once with a
progress bar, then read from the cache folder) and the Error analysis page on the Ray engine.

The tiny models of ``ray_models`` are used: the Ray workers build them from that module.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
APP = str(ROOT / "app.py")
EXPLORER = "pages/1_Layer_explorer.py"
ERRORS = "pages/2_Error_analysis.py"
TIMEOUT = 300


@pytest.fixture(scope="module", autouse=True)
def environment(tmp_path_factory):
    threads = torch.get_num_threads()
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("cache")
    mp.setenv("VISLIB_CACHE", str(cache))
    mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    import ray_models  # noqa: F401  (registers tiny_ray)

    yield cache
    mp.undo()
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def fresh_caches():
    st.cache_data.clear()
    st.cache_resource.clear()
    yield


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def explorer(**state) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["model"] = "tiny_ray"
    at.run()
    at.switch_page(EXPLORER).run()
    for key, value in state.items():
        at.session_state[key] = value
    return at.run()


UNIT = re.compile(r"^#(\d) · (test/\d{5}) · activation ([-\d.e+]+) at \((\d+), (\d+)\)$")


def units(at: AppTest) -> list[re.Match]:
    return [m for m in map(UNIT.match, [c.value for c in at.caption]) if m]


def test_across_the_dataset_shows_the_top_nine_of_a_channel_and_caches_them(environment):
    at = explorer(explorer_tab="Across the dataset")
    assert_clean(at)
    channel = at.selectbox(key="zf_channel")
    assert len(channel.options) == 6  # tiny_ray's `features` layer: 6 channels, strongest first
    shown = units(at)
    assert [int(m.group(1)) for m in shown] == list(range(1, 10))
    values = [float(m.group(3)) for m in shown]
    assert values == sorted(values, reverse=True) and len({m.group(2) for m in shown}) == 9  # nine images
    assert len(at.image) >= 18  # a patch and a projection per unit, in the Top-N tab's order
    pairs = [c for image in at.image for c in image.captions if c in ("image patch", "projection")]
    assert pairs == ["image patch", "projection"] * 9
    assert any("over 2000 images of shapes test" in c.value for c in at.caption)
    built = list((environment / "features").iterdir())
    assert len(built) == 1 and (built[0] / "meta.json").is_file()
    before = {m.group(2) for m in shown}
    channel.set_value(channel.options[-1]).run()  # the weakest channel: other images
    assert_clean(at)
    assert {m.group(2) for m in units(at)} != before
    st.cache_data.clear()  # a new session: read from the cache folder, not built again
    again = explorer(explorer_tab="Across the dataset")
    assert_clean(again)
    assert len(units(again)) == 9 and list((environment / "features").iterdir()) == built


def test_error_analysis_on_ray_workers_gives_the_local_numbers():
    pytest.importorskip("ray")
    import ray
    import ray_procs

    def page(**state) -> AppTest:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.query_params["model"] = "tiny_ray"
        at.query_params["methods"] = "gradcam"
        at.run()
        at.session_state["ea_limit"] = 100
        at.session_state["ea_curves"] = 8
        for key, value in state.items():
            at.session_state[key] = value
        return at.switch_page(ERRORS).run()

    local = page()
    assert_clean(local)
    assert at_metric(local, "Images") == "50"
    st.cache_data.clear()
    before = ray_procs.ray_processes()
    remote = page(ea_engine="ray", ea_workers=1)
    assert_clean(remote)
    assert remote.radio(key="ea_engine").value == "ray"
    assert any("on ray (1 worker)" in c.value for c in remote.caption)
    for label in ("Accuracy", "Images", "Misclassified"):
        assert at_metric(remote, label) == at_metric(local, label)
    assert not ray.is_initialized()  # the page's run started its own Ray and stopped it
    assert not ray_procs.wait_gone(ray_procs.ray_processes() - before)


def test_without_ray_the_page_offers_no_engine_choice(monkeypatch):
    from vislib import evaluate

    monkeypatch.setattr(evaluate, "ray_available", lambda: False)
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.query_params["model"] = "tiny_ray"
    at.run()
    at.session_state["ea_limit"] = 100
    at.switch_page(ERRORS).run()
    assert_clean(at)
    assert not [r for r in at.radio if r.key == "ea_engine"]
    assert any("on local" in c.value for c in at.caption)


def at_metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


def test_across_the_dataset_shows_the_generation_and_a_count_from_the_start(monkeypatch, tmp_path):
    # issue 25 item 10: the bar said nothing for seconds while the split was generated
    from streamlit.delta_generator import DeltaGenerator

    from vislib import datasets

    monkeypatch.setenv("VISLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(datasets, "_RENDERED", {})
    texts = []
    real = DeltaGenerator.progress
    monkeypatch.setattr(DeltaGenerator, "progress", lambda self, value, text=None, **kw: texts.append(text)
                        or real(self, value, text=text, **kw))
    at = explorer(explorer_tab="Across the dataset")
    assert_clean(at)
    assert any(t and t.startswith("Generating the shapes test split… ") for t in texts), texts
    counts = [t for t in texts if t and t.startswith("Finding the strongest activations… ")]
    assert all(re.search(r"\d+/\d+", t) for t in counts), counts
