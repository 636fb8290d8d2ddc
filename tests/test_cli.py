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
    assert set(rows) == set(vislib.METHODS) | {"name"}
    paper_column = {line.index(vislib.METHODS[name].paper) for name, line in rows.items() if name != "name"}
    assert paper_column == {rows["name"].index("paper")}  # one column, however long a cost
    for name, cls in vislib.METHODS.items():
        assert cls.passes, name  # every method says what one call costs
        assert cls.family in rows[name] and cls.passes in rows[name] and cls.paper in rows[name]
    proc = run_cli("models")
    assert proc.returncode == 0 and "resnet50" in proc.stdout


# --------------------------------------------------------------------------------------------------
# every naming scheme, spec files, the models listing (in-process: main() is the CLI minus the interpreter)


def cli(capsys, *args):
    from vislib.cli import main

    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def spec_file(tmp_path):
    from vislib.models import unregister_models

    (tmp_path / "clinets.py").write_text(
        "from torch import nn\n\n"
        "def build(num_classes=3):\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, stride=2), nn.ReLU(),\n"
        "                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, num_classes))\n")
    path = tmp_path / "models.toml"
    path.write_text('[models.cli_net]\nsource = "clinets:build"\nlabels = ["red", "green", "blue"]\n'
                    'input_size = 40\ndescription = "a spec model"\n')
    yield path
    unregister_models(path)


def test_explain_with_a_spec_file_before_or_after_the_command(capsys, tmp_path, image_file, spec_file):
    for args in (["--models", spec_file, "explain", image_file], ["explain", image_file, "--models", spec_file]):
        out = tmp_path / "out"
        code, stdout, err = cli(capsys, *args, "--model", "cli_net", "--methods", "gradcam", "--out", out)
        assert code == 0, err
        scores = json.loads((out / "scores.json").read_text())
        assert scores["model"] == "cli_net" and scores["target"]["label"] in ("red", "green", "blue")
        with np.load(out / "maps.npz") as maps:
            assert maps["gradcam"].shape == (40, 40)


def test_explain_a_timm_model_with_random_weights(capsys, tmp_path, image_file):
    pytest.importorskip("timm")
    code, stdout, err = cli(capsys, "explain", image_file, "--model", "timm:resnet18", "--weights", "none",
                            "--out", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "scores.json").read_text())["model"] == "timm:resnet18"


def test_explain_a_factory_name(capsys, tmp_path, image_file, monkeypatch, spec_file):
    monkeypatch.syspath_prepend(str(spec_file.parent))
    code, stdout, err = cli(capsys, "explain", image_file, "--model", "clinets:build", "--out", tmp_path / "o")
    assert code == 0, err


def test_models_listing_by_source_and_filter(capsys, spec_file):
    code, out, _ = cli(capsys, "models", "--models", spec_file, "--source", "spec")
    assert code == 0 and out.split()[:3] == ["cli_net", "spec", "a"]
    code, out, _ = cli(capsys, "models", "--source", "torchvision", "--filter", "VIT_B")
    assert code == 0 and out.split("\n")[0].startswith("vit_b_16") and len(out.strip().splitlines()) == 2
    pytest.importorskip("timm")
    code, out, _ = cli(capsys, "models", "--source", "timm", "--filter", "vit_tiny_patch16_2*")
    assert code == 0 and out.startswith("timm:vit_tiny_patch16_224 ") and "augreg_in21k_ft_in1k" in out


@pytest.mark.parametrize("args, fragment", [
    (["explain", "{img}", "--model", "timm:resnt18", "--weights", "none", "--out", "o"], "did you mean timm:resnet18"),
    (["explain", "{img}", "--model", "timm:resnet18", "--out", "o"], "are not cached"),
    (["explain", "{img}", "--model", "hf:acme/nothing-here", "--out", "o"], "not cached"),
    (["explain", "{img}", "--model", "no_such_module_x:build", "--out", "o"], "cannot import no_such_module_x"),
    (["--models", "{missing}", "models"], "spec file not found"),
    (["--models", "{bad}", "models"], "[models.m]: unknown key 'size'"),
])
def test_bad_model_input_exits_2_with_one_line(capsys, tmp_path, image_file, monkeypatch, args, fragment):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    bad = tmp_path / "bad.toml"
    bad.write_text('[models.m]\nsource = "resnet18"\nsize = 3\n')
    args = [a.format(img=image_file, missing=tmp_path / "missing.toml", bad=bad) for a in args]
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], err


def test_models_lists_the_valid_tables_and_reports_each_broken_one(capsys, spec_file):
    text = spec_file.read_text()
    spec_file.write_text(text + '\n[models.broken_one]\nsource = "resnet18"\nsize = 3\n'
                         '\n[models.broken_two]\nsource = "resnet18"\nlayer = 4\n')
    code, out, err = cli(capsys, "models", "--models", spec_file, "--source", "spec")
    assert code == 2 and out.split()[:2] == ["cli_net", "spec"]
    lines = err.strip().splitlines()
    assert len(lines) == 2 and "[models.broken_one]: unknown key 'size'" in lines[0], err
    assert f"{spec_file} [models.broken_two] layer: must be a string" in lines[1], err
