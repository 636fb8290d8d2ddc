import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("VISLIB_OFFLINE", "1")  # tests never download
os.environ.setdefault("VISLIB_DEVICE", "cpu")


@pytest.fixture
def rand_image():
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8))


@pytest.fixture
def fresh_caches():
    """Streamlit's data cache emptied before the test (the AppTest modules use it for every test)."""
    import streamlit as st

    st.cache_data.clear()
    yield
