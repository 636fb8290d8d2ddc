"""The single-explanation HTML report: self-contained, images decode, every field needed to reproduce."""

from __future__ import annotations

import base64
import io
import shlex
from html.parser import HTMLParser
from urllib.parse import parse_qs

import numpy as np
import pytest
from PIL import Image

import vislib
from vislib.cli import main
from vislib.models.bundled import MODELS_DIR
from vislib.report import explanation_report, file_sha256, weights_identity


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images: list[tuple[str, str]] = []  # (alt, src)
        self.urls: list[str] = []
        self.text: list[str] = []
        self.pre: dict[str, str] = {}
        self._pre: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append((attrs.get("alt", ""), attrs["src"]))
        for name in ("href", "src"):
            if name in attrs and not attrs[name].startswith("data:"):
                self.urls.append(attrs[name])
        if tag == "pre":
            self._pre = attrs.get("id")

    def handle_endtag(self, tag):
        if tag == "pre":
            self._pre = None

    def handle_data(self, data):
        self.text.append(data)
        if self._pre:
            self.pre[self._pre] = self.pre.get(self._pre, "") + data


def _parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    return page


def _decode(src: str) -> Image.Image:
    head, data = src.split(",", 1)
    assert head == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.fixture(scope="module")
def bundle():
    return vislib.load_model("shapes_resnet")


@pytest.fixture(scope="module")
def sample():
    return vislib.load_image(vislib.sample_images()[0])


def test_report_is_self_contained_and_complete(bundle, sample):
    result = vislib.explain(bundle, sample, methods=["gradcam", "occlusion"], target=2)
    page = _parse(explanation_report(result, image_name="shape.png"))
    assert page.urls == []  # no outside URL: everything inline
    alts = [alt for alt, _ in page.images]
    assert alts == ["input", "gradcam overlay", "gradcam map", "occlusion overlay", "occlusion map"]
    decoded = [_decode(src) for _, src in page.images]
    assert all(img.size == result.input_image.size for img in decoded)
    # the input is the model's input view, pixel for pixel
    assert np.array_equal(np.asarray(decoded[0].convert("RGB")), np.asarray(result.input_image))
    text = " ".join(page.text)
    for field in ("shapes_resnet", result.layer, result.labels[2], "logit", "torch", "torchvision",
                  vislib.__version__, "shape.png", result.weights):
        assert field in text, field
    # the weights' file is identified by its SHA-256
    assert file_sha256(MODELS_DIR / "shapes_resnet.safetensors") in text
    # probabilities of the top classes, as numbers in the page
    top = result.top_k(1)[0]
    assert f"{top[2]:.3f}" in text
    query = parse_qs(page.pre["query"].lstrip("?"))
    assert query["model"] == ["shapes_resnet"] and query["layer"] == [result.layer]
    assert query["class"] == ["2"] and query["methods"] == ["gradcam,occlusion"]
    cli = shlex.split(page.pre["cli"])
    assert cli[:4] == ["python", "-m", "vislib", "explain"]
    assert cli[cli.index("--methods") + 1] == "gradcam,occlusion"


def test_report_cli_line_reproduces_the_maps(tmp_path, bundle, sample, capsys):
    """Run the report's own command line: the same maps come back."""
    image = tmp_path / "in.png"
    sample.save(image)
    result = vislib.explain(bundle, sample, methods=["gradcam"], target=1)
    page = _parse(explanation_report(result, image_name=str(image)))
    args = shlex.split(page.pre["cli"])[3:]
    args[args.index("--out") + 1] = str(tmp_path / "out")
    assert main(args) == 0
    again = np.load(tmp_path / "out" / "maps.npz")["gradcam"]
    np.testing.assert_allclose(again, result.maps["gradcam"], atol=1e-5)


def test_weights_identity():
    assert weights_identity("random") == {"weights": "random"}
    found = weights_identity("assets/models/shapes_zf.safetensors")
    assert found["sha256"] == file_sha256(MODELS_DIR / "shapes_zf.safetensors")
    assert "sha256" not in weights_identity("ResNet18_Weights.IMAGENET1K_V1")


def test_cli_report_flag(tmp_path, sample, capsys):
    image = tmp_path / "in.png"
    sample.save(image)
    out = tmp_path / "r.html"
    assert main(["explain", str(image), "--methods", "gradcam,cam", "--report", str(out)]) == 0
    page = _parse(out.read_text(encoding="utf-8"))
    assert len(page.images) == 5
    assert len({_decode(src).size for _, src in page.images}) == 1
    assert main(["explain", str(image)]) == 2
    assert "--report" in capsys.readouterr().err
    assert main(["explain", str(image), "--report", str(tmp_path / "no" / "dir" / "r.html")]) == 2
    assert "cannot write the report" in capsys.readouterr().err
