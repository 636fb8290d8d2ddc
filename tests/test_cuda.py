"""CUDA checks, run by ``scripts/gpu-check.sh`` on a machine with a CUDA GPU (``pytest -m cuda``);
skipped without one.

* every registered method on CUDA gives the CPU's result (same weights, same inputs, TF32 off);
* the out-of-memory fallbacks: explain's (halves, then a CPU copy) and Score-CAM's own (its masked
  batches halved), simulated and under a real memory cap;
* the GPU slots bound the explanations running at once;
* the frozen copy stays off on CUDA (it is a CPU optimisation) and builds nothing;
* Score-CAM's CUDA options: batches of 256 by default, bf16 / fp16 autocast labelled and close to fp32.

``VISLIB_CUDA_DRY_RUN=1`` runs the tests that can run on the CPU with the CPU standing in for the GPU
(the script's ``--dry-run``): it checks the test code, not CUDA.
"""

from __future__ import annotations

import copy
import importlib
import os
import threading
import time

import numpy as np
import pytest
import torch
import torchvision

import vislib
from vislib.methods import frozen

DRY_RUN = os.environ.get("VISLIB_CUDA_DRY_RUN") == "1"
HAVE_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAVE_CUDA and not DRY_RUN else "cpu")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not (HAVE_CUDA or DRY_RUN), reason="needs a CUDA device (scripts/gpu-check.sh)")]
real_cuda = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a real CUDA device, not the dry run")
explain_module = importlib.import_module("vislib.explain")

SIDE = 64
PRE = vislib.Preprocess(resize=SIDE, crop=SIDE)
# Settings that keep each method short; everything else runs at its defaults. SmoothGrad draws its noise
# on the device (CUDA's generator is not the CPU's), so it is compared without noise.
FAST = {
    "smoothgrad": {"n_samples": 3, "level": 0.0},
    "integrated_gradients": {"steps": 4},
    "occlusion": {"patch": 16, "stride": 16},
    "sscam": {"n_samples": 2},
    "iscam": {"n_samples": 2},
}


@pytest.fixture(autouse=True)
def exact_float32():
    """TF32 off (cuDNN convolutions use it by default): CUDA and CPU then compute in float32 alike."""
    if DEVICE.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def resnet(depth: int = 18, classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return getattr(torchvision.models, f"resnet{depth}")(weights=None, num_classes=classes).eval()


def pair(model: torch.nn.Module, layer: str = "layer4"):
    """The same weights as a CPU bundle and a bundle on the device under test."""
    cpu = vislib.load_model(copy.deepcopy(model), preprocess=PRE, default_layer=layer, device="cpu")
    dev = vislib.load_model(copy.deepcopy(model), preprocess=PRE, default_layer=layer, device=DEVICE)
    return cpu, dev


def batch(n: int = 2, side: int = SIDE) -> torch.Tensor:
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1


def close(a, b, rel: float = 1e-3) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and float(np.abs(a - b).max()) <= rel * max(1.0, float(np.abs(b).max()))


def run_or_error(bundle, x, method: str):
    try:
        return vislib.explain(bundle, x, [method], target=[3, 7], options={method: FAST.get(method, {})})
    except vislib.VislibError as exc:
        return exc


# --------------------------------------------------------------------------------------------------
# Every method: CUDA = CPU


@pytest.mark.parametrize("method", list(vislib.METHODS))
def test_every_method_on_cuda_equals_the_cpu(method):
    cpu, dev = pair(resnet())
    x = batch()
    expected, got = run_or_error(cpu, x, method), run_or_error(dev, x, method)
    if isinstance(expected, Exception):  # a refusal (e.g. an architecture a method cannot explain) ...
        assert type(got) is type(expected), f"CPU refused ({expected}), the device gave {got!r}"
        return  # ... must be the same refusal on the device
    assert not isinstance(got, Exception), f"the device failed where the CPU did not: {got}"
    assert got.target == expected.target
    np.testing.assert_array_equal(got.flat[method], expected.flat[method])
    assert close(got.raw[method], expected.raw[method]), \
        f"{method}: raw differs by {np.abs(got.raw[method] - expected.raw[method]).max():.3g}"
    assert close(got.maps[method], expected.maps[method], rel=5e-3)


# --------------------------------------------------------------------------------------------------
# Out of memory


@real_cuda
def test_simulated_oom_retries_in_halves_then_on_a_cpu_copy(monkeypatch):
    cpu, dev = pair(resnet())
    x = batch(4)
    expected = vislib.explain(cpu, x, ["gradcam", "scorecam"], target=[1, 2, 3, 4])
    real = explain_module._compute
    seen = []

    def compute(bundle, inputs, target, job):
        seen.append((bundle.device.type, len(inputs)))
        if bundle.device.type == "cuda" and (len(inputs) > 1 or target in (3, [3])):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(bundle, inputs, target, job)

    monkeypatch.setattr(explain_module, "_compute", compute)
    got = vislib.explain(dev, x, ["gradcam", "scorecam"], target=[1, 2, 3, 4])
    assert ("cpu", 1) in seen and any("two halves" in n for n in got.notes)
    assert any("on the CPU" in n for n in got.notes)  # the sample with target 3
    for m in ("gradcam", "scorecam"):
        assert close(got.raw[m], expected.raw[m])
    assert dev.model.fc.weight.device.type == "cuda"  # the shared model never moved


@real_cuda
def test_real_oom_under_a_memory_cap_still_gives_the_cpu_result():
    """The caching allocator capped at 512 MiB: the gradient of 8 images at 448 px through resnet50 does
    not fit; explain halves the batch (and falls back to a CPU copy if even one image does not fit)."""
    model = resnet(50)
    cpu, dev = pair(model)
    x = batch(8, 448)
    expected = vislib.explain(cpu, x, ["gradient"], target=0)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (512 << 20) / total))
    try:
        got = vislib.explain(dev, x, ["gradient"], target=0)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert any("out of GPU memory" in n for n in got.notes), got.notes
    assert close(got.raw["gradient"], expected.raw["gradient"], rel=1e-3)


@real_cuda
def test_scorecam_halves_its_masked_batches_under_a_memory_cap():
    """Batches of 256 masked inputs at 224 px through resnet50 need several GiB: under a 1 GiB cap the
    loop halves the batch until it fits, and the map is the uncapped one."""
    _, dev = pair(resnet(50))
    x = batch(1, 224)
    expected = vislib.explain(dev, x, ["scorecam"], target=0, options={"scorecam": {"top_k": 300}})
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (1 << 30) / total))
    try:
        got = vislib.explain(dev, x, ["scorecam"], target=0, options={"scorecam": {"top_k": 300}})
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert "halved" in got.extras["scorecam"].get("out_of_memory", ""), got.extras["scorecam"]
    assert close(got.raw["scorecam"], expected.raw["scorecam"], rel=1e-4)


# --------------------------------------------------------------------------------------------------
# GPU slots


@real_cuda
def test_gpu_slots_bound_the_explanations_running_at_once(monkeypatch):
    _, dev = pair(resnet())
    x = batch(1)
    real = explain_module._compute
    lock, state = threading.Lock(), {"now": 0, "most": 0}

    def compute(*args, **kwargs):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        try:
            time.sleep(0.3)  # long enough for every thread to arrive
            return real(*args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(explain_module, "_compute", compute)
    slots = explain_module.GPU_SLOTS._initial_value
    waited, results = [], [None] * (slots + 2)

    def work(i):
        results[i] = vislib.explain(dev, x, ["gradcam"], target=i, on_wait=lambda: waited.append(i))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(slots + 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state["most"] <= slots and len(waited) >= 2
    assert [r.target for r in results] == list(range(slots + 2))


# --------------------------------------------------------------------------------------------------
# The frozen copy and Score-CAM's CUDA options


@real_cuda
@pytest.mark.parametrize("mode", ["auto", True])
def test_the_frozen_copy_stays_off_on_cuda(mode):
    frozen.clear_cache()
    _, dev = pair(resnet())
    result = vislib.explain(dev, batch(1), ["scorecam", "occlusion"], target=0,
                            options={m: {"fast_forward": mode} for m in ("scorecam", "occlusion")})
    for m in ("scorecam", "occlusion"):
        assert result.extras[m]["forward"] == "eager" and "CPU only" in result.extras[m]["forward_why"]
    assert frozen.cached_frozen(dev.model, batch(1).to(DEVICE), build=False) is None  # nothing was built


def test_scorecam_batches_on_the_device():
    _, dev = pair(resnet())
    result = vislib.explain(dev, batch(1), ["scorecam"], target=0)
    assert result.extras["scorecam"]["batch_size"] == (256 if DEVICE.type == "cuda" else 32)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_scorecam_autocast_is_labelled_and_close_to_fp32(precision):
    _, dev = pair(resnet())
    result = vislib.explain(dev, batch(1), ["scorecam"], target=0,
                            options={"scorecam": {"precision": precision, "compare_fp32": True}})
    extra = result.extras["scorecam"]
    assert extra["approximate"] is True and precision in extra["title"] and extra["precision"] == precision
    print(f"\nScore-CAM {precision} vs fp32 on {DEVICE.type}: r = {extra['fp32_pearson']:.6f}, "
          f"largest difference of the normalised maps {extra['fp32_max_abs_diff']:.4f}")
    assert extra["fp32_pearson"] > 0.99 and extra["fp32_max_abs_diff"] < 0.1
