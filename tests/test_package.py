"""vislib as an installed package: the wheel, installed into a fresh virtual environment where the
checkout is not on the path, runs ``vislib explain`` on its own bundled sample from a folder outside
the checkout; the library and the CLI work without streamlit; ``vislib dashboard`` runs the packaged
app.

The fresh environment reuses the dependencies already installed here (a ``.pth`` file naming this
interpreter's site-packages: nothing is downloaded) and gets only the wheel, installed with
``--no-deps --no-index``. Building needs the build backend (hatchling, requirements-dev.txt)."""

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

import vislib
from vislib import cli
from vislib._resources import resource

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(importlib.util.find_spec("hatchling") is None,
                                reason="the build backend is not installed: .venv/bin/pip install -r "
                                       "requirements-dev.txt")


def run(*args, cwd, check=True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VISLIB_MODELS", "PYTHONHOME")}
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    if check:
        assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, vislib command, an empty folder outside the checkout) of a fresh venv with the wheel."""
    base = tmp_path_factory.mktemp("package")
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", base / "dist",
        ROOT, cwd=base)
    wheels = list((base / "dist").glob("vislib-*.whl"))
    assert len(wheels) == 1, wheels
    venv = base / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=base)
    python = venv / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=base).stdout.strip()
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}  # torch & co, reused
    (Path(purelib) / "vislib_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheels[0],
        cwd=base)
    work = base / "work"
    work.mkdir()
    return python, venv / "bin" / "vislib", work, Path(purelib)


def test_the_installed_command_explains_a_bundled_sample_outside_the_checkout(installed):
    python, command, work, purelib = installed
    star = purelib / "vislib" / "_assets" / "samples" / "star_01.png"  # package data
    assert sorted(p.name for p in star.parent.iterdir()) == sorted(p.name for p in vislib.sample_images())

    done = run(command, "explain", star, "--methods", "gradcam,gradcam++", "--out", "out", cwd=work)
    out = work / "out"
    assert "predicted star" in done.stdout
    assert {p.name for p in out.iterdir()} == {"input.png", "gradcam.png", "gradcam++.png", "maps.npz",
                                               "scores.json"}
    scores = json.loads((out / "scores.json").read_text())
    assert scores["model"] == "shapes_resnet" and scores["target"]["label"] == "star"
    assert scores["vislib_version"] == vislib.__version__
    assert scores["weights"] == "assets/models/shapes_resnet.safetensors"
    with np.load(out / "maps.npz") as maps:
        packaged = maps["gradcam"]
    assert packaged.shape == (128, 128) and 0 <= packaged.min() <= packaged.max() <= 1
    # the same map as the checkout's library computes: the packaged weights are the bundled ones
    mine = vislib.explain(vislib.load_model("shapes_resnet", device="cpu"), vislib.load_image(star),
                          methods=["gradcam"])
    assert np.allclose(mine.maps["gradcam"], packaged, atol=1e-5)
    # python -m vislib too; every card of assets/models travelled
    listed = run(python, "-m", "vislib", "models", "--source", "bundled", cwd=work).stdout.split()
    assert [name for name in listed if name in vislib.list_models()] == vislib.list_models("bundled")


def test_vislib_imports_and_runs_without_streamlit(installed):
    python, _, work, purelib = installed
    script = f"""
import sys
from pathlib import Path
sys.modules["streamlit"] = None  # import streamlit fails as if it were not installed
sys.modules["plotly"] = None
import vislib
from vislib import cli
assert Path(vislib.__file__).is_relative_to({str(purelib)!r}), vislib.__file__  # the installed package
assert vislib.__version__ == {vislib.__version__!r}
bundle = vislib.load_model("shapes_zf", weights=None, device="cpu")
result = vislib.explain(bundle, vislib.sample_images()[0], methods=["gradcam", "guided_backprop"])
assert result.maps["gradcam"].shape == (bundle.input_size, bundle.input_size)
assert cli.main(["models", "--source", "bundled"]) == 0
assert not [m for m in sys.modules if m.startswith(("streamlit.", "plotly."))]
sys.exit(cli.main(["dashboard", "--port", "8599"]))
"""
    done = run(python, "-c", script, cwd=work, check=False)
    assert done.returncode == 2, done.stderr
    assert "shapes_zf" in done.stdout
    assert done.stderr.strip() == ('error: vislib dashboard needs streamlit, which is not installed: pip install '
                                   '"vislib[dashboard]" (in a checkout: .venv/bin/pip install -r requirements.txt)')


def test_the_dashboard_command_runs_the_packaged_app(tmp_path, monkeypatch):
    spec = tmp_path / "models.toml"
    spec.write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VISLIB_MODELS", "other.toml")
    command, env, folder = cli.dashboard_command(8502, ["models.toml"], address="127.0.0.1")
    assert command[:4] == [sys.executable, "-m", "streamlit", "run"]
    assert Path(command[4]) == resource("dashboard", "app.py") and Path(command[4]).is_file()
    assert command[5:] == ["--server.port", "8502", "--server.fileWatcherType", "none",
                           "--server.address", "127.0.0.1"]
    assert (folder / ".streamlit" / "config.toml").is_file() and (folder / "pages").is_dir()
    assert env["VISLIB_MODELS"].split(os.pathsep) == [str(tmp_path / "other.toml"), str(spec)]


def test_a_missing_extra_names_it():
    from vislib._optional import require
    from vislib.errors import MethodError, MissingDependency

    with pytest.raises(MissingDependency, match=r'^the thing needs no_such_package_x, which is not installed: '
                                                r'pip install "vislib\[ray\]"'):
        require("no_such_package_x.sub", "ray", feature="the thing")
    with pytest.raises(MethodError, match=r'vislib\[lrp\]'):
        require("no_such_package_x", "lrp", error=MethodError)
    assert require("json", "hf").dumps([1]) == "[1]"
