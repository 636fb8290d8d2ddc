"""Runs that start, reach and stop Ray themselves (no Ray is running in this process between tests):
vislib's own local Ray listens on the loopback only and leaves no process behind, after a run, a
cancel, and Ctrl-C in the command line; a simulated two-node cluster (``ray.cluster_utils.Cluster``)
reached by its address gives the local engine's answers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is an optional extra: .venv/bin/pip install -r requirements-extras.txt")

import ray_procs  # noqa: E402
from test_ray_engine import assert_same  # noqa: E402

import vislib  # noqa: E402
from vislib import datasets, evaluate  # noqa: E402
from vislib.errors import Cancelled  # noqa: E402

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(scope="module", autouse=True)
def environment(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("VISLIB_CACHE", str(tmp_path_factory.mktemp("ray-cache")))
    mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    import ray_models  # noqa: F401  (registers the test models)

    yield
    mp.undo()


@pytest.fixture(autouse=True)
def no_ray_running():
    assert not ray.is_initialized()
    yield
    assert not ray.is_initialized(), "a run left Ray initialised in this process"


def watch_first_batch(stop: threading.Event | None = None):
    """A progress callback that, at the first counted batch, records the Ray processes below this
    process and their listening sockets (and sets ``stop``)."""
    seen: dict = {}

    def progress(done, total, text):
        if total and "pids" not in seen:
            seen["pids"] = ray_procs.ray_processes()
            seen["names"] = {ray_procs._cmdline(p).split(" ")[0] for p in seen["pids"]}
            seen["listening"] = ray_procs.listening(seen["pids"])
            if stop is not None:
                stop.set()

    return progress, seen


def test_vislib_started_ray_listens_on_the_loopback_only_and_leaves_nothing():
    model = vislib.load_model("tiny_ray", device="cpu")
    images = datasets.open_dataset("shapes", model.labels, limit=48)
    progress, seen = watch_first_batch()
    result = evaluate.evaluate(model, images, ["gradcam"], batch_size=8, engine="ray", workers=1,
                               progress=progress, confidence=False)
    assert len(result) == len(images) and result.timings["ray_init"] > 0
    names = seen["names"]
    assert any("raylet" in n for n in names) and any("gcs_server" in n for n in names), names
    assert seen["listening"], "no listening socket found"
    exposed = [(pid, address) for pid, address in seen["listening"] if not ray_procs.is_loopback(address)]
    assert not exposed, exposed
    assert not ray_procs.wait_gone(seen["pids"])


def test_cancel_shuts_ray_down():
    model = vislib.load_model("tiny_ray", device="cpu")
    images = datasets.open_dataset("shapes", model.labels, limit=96)
    stop = threading.Event()
    progress, seen = watch_first_batch(stop)
    start = time.perf_counter()
    with pytest.raises(Cancelled):
        evaluate.evaluate(model, images, ["gradcam"], batch_size=4, engine="ray", workers=1, progress=progress,
                          cancel=stop)
    print(f"cancelled and shut down in {time.perf_counter() - start:.1f} s")
    assert seen["pids"] and not ray_procs.wait_gone(seen["pids"])


def test_ctrl_c_in_the_command_line_stops_ray(tmp_path):
    """SIGINT once the bar shows the first images: exit code 130, one line, no process of the run's
    session left (Ray's processes stay in the session of the command that started them)."""
    env = {**os.environ, "VISLIB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "vislib", "evaluate", "shapes", "--model", "shapes_resnet", "--weights", "none",
           "--limit", "200", "--batch-size", "4", "--curves", "0", "--engine", "ray", "--workers", "1",
           "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            start_new_session=True, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 300
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("evaluating [") or time.monotonic() > deadline:
                break
        assert any(line.startswith("evaluating [") for line in lines), "".join(lines)
        assert ray_procs.session_processes(proc.pid), "the run's Ray is not in its session"
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole foreground group
        rest = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert code == 130, rest
    assert "error: interrupted" in rest
    assert not ray_procs.wait_gone(ray_procs.session_processes(proc.pid)), "processes of the run are left"


def test_a_simulated_two_node_cluster_gives_the_local_answers():
    """Two nodes of one CPU each (so the two workers run on different nodes), reached by address:
    the run connects, computes, disconnects; the cluster stays the operator's."""
    from ray.cluster_utils import Cluster

    from vislib.evaluate.ray_engine import _loopback_only

    with _loopback_only():  # the test's cluster, too, on the loopback only
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1"})
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    try:
        model = vislib.load_model("tiny_ray", device="cpu")
        images = datasets.open_dataset("shapes", model.labels, limit=64)
        local = evaluate.evaluate(model, images, ["gradcam"], batch_size=8, curves=4, curve_steps=4)
        remote = evaluate.evaluate(model, images, ["gradcam"], batch_size=8, curves=4, curve_steps=4,
                                   engine="ray", address=cluster.address, workers=2)
        assert remote.engine == "ray (2 workers)"
        assert_same(local, remote)
        assert len(cluster.list_all_nodes()) == 2
    finally:
        cluster.shutdown()


def test_an_address_where_no_cluster_listens_fails_at_once():
    model = vislib.load_model("tiny_ray", device="cpu")
    images = datasets.open_dataset("shapes", model.labels, limit=8)
    start = time.perf_counter()
    with pytest.raises(evaluate.EngineError, match="no Ray cluster answers at 127.0.0.1:9"):
        evaluate.evaluate(model, images, engine="ray", address="127.0.0.1:9")
    assert time.perf_counter() - start < 30
