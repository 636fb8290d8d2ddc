"""The command line: outputs on success, exit code 2 and one line on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import vislib

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "vislib", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


@pytest.fixture
def image_file(tmp_path, rand_image):
    path = tmp_path / "in.png"
    rand_image.save(path)
    return path


def test_explain_writes_overlays_maps_and_scores(tmp_path, image_file):
    out = tmp_path / "out"
    proc = run_cli("explain", str(image_file), "--model", "resnet18", "--weights", "none",
                   "--methods", "cam,gradcam,gradcam++", "--target", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for method in ("cam", "gradcam", "gradcam++"):
        assert (out / f"{method}.png").is_file()
    with np.load(out / "maps.npz") as maps:
        assert set(maps.files) == {"cam", "cam_raw", "gradcam", "gradcam_raw", "gradcam++", "gradcam++_raw"}
        assert maps["gradcam"].shape == (224, 224) and maps["gradcam_raw"].shape == (7, 7)
        assert 0 <= maps["gradcam"].min() and maps["gradcam"].max() <= 1
    scores = json.loads((out / "scores.json").read_text())
    assert scores["target"] == {"index": 3, "label": "tiger shark"}
    assert len(scores["top5"]) == 5
    probs = [t["probability"] for t in scores["top5"]]
    assert probs == sorted(probs, reverse=True)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["explain", "missing.png", "--out", "o"], "no such image file"),
        (["explain", "{img}", "--model", "nope", "--out", "o"], "unknown model"),
        (["explain", "{img}", "--model", "resnet18", "--weights", "none", "--layer", "layer9", "--out", "o"],
         "no layer 'layer9'"),
        (["explain", "{img}", "--model", "resnet18", "--weights", "none", "--methods", "magic", "--out", "o"],
         "unknown method"),
        (["explain", "{img}", "--model", "vgg16", "--weights", "none", "--methods", "cam", "--out", "o"],
         "global-average-pool"),
        (["explain", "{img}", "--model", "resnet18", "--weights", "none", "--target", "unicorn",
          "--out", "o"], "unknown class"),
        (["explain", "{broken}", "--model", "resnet18", "--weights", "none", "--out", "o"],
         "broken or truncated"),
        (["explain", "{img}", "--out"], "expected one argument"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, image_file, args, fragment):
    broken = tmp_path / "broken.png"
    broken.write_bytes(image_file.read_bytes()[:200])
    args = [a.format(img=image_file, broken=broken) for a in args]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert fragment in lines[0] and "Traceback" not in proc.stderr


def test_models_and_methods_listings():
    proc = run_cli("methods")
    assert proc.returncode == 0 and "gradcam++" in proc.stdout
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()}
    for name in ("gradcam_elementwise", "eigengradcam", "kpcacam", "shapleycam", "finercam"):
        cls = vislib.METHODS[name]
        assert cls.family in rows[name] and cls.passes in rows[name] and cls.paper in rows[name]
    proc = run_cli("models")
    assert proc.returncode == 0 and "resnet50" in proc.stdout
