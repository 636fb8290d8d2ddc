"""The Compare page under streamlit.testing.v1.AppTest: two models side by side, the disagreement
lines equal vislib.compare's, and a class both models know."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import vislib
from vislib.compare import compare

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif("shapes_shortcut" not in vislib.list_models(),
                                reason="bundled models not installed (assets/models)")


def open_compare() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=180)
    at.run()
    at.switch_page("pages/5_Compare.py").run()
    return at


def test_compare_page_matches_the_library():
    at = open_compare()
    assert not at.exception and not at.error
    sample = at.session_state["sample"]
    image = vislib.load_image(vislib.ui.sample_choices()[sample])
    expected = compare("shapes_resnet", "shapes_shortcut", image, ["gradcam"])
    summary = next(m.value for m in at.markdown if m.value.startswith("Both predict")
                   or " predicts " in m.value)
    assert summary == "  \n".join(expected.summary())
    assert [m.value for m in at.markdown if m.value.startswith("#### ")] == ["#### shapes_resnet",
                                                                              "#### shapes_shortcut"]
    at.selectbox(key="cmp_class").set_value("star").run()
    assert not at.exception
    captions = [m.value for m in at.caption if "explains" in m.value]
    assert len(captions) == 2 and all("explains **star**" in c for c in captions)
