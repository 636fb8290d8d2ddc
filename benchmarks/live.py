"""``python -m benchmarks.run --live``: frames per second of the live page's pipeline.

A synthetic camera (640×480, a square circling over a gradient, :func:`vislib.live.synthetic_frames`)
offers frames at ``--camera-fps`` to a :class:`vislib.live.LiveExplainer`; the worker explains the
newest frame with Grad-CAM and drops the rest. One row per model: explained frames per second over
``--seconds`` after a warm-up, frames dropped, mean step time, and the target (≥ 10 frames/s on the
bundled model, ≥ 4 on resnet18 at 224 on 2 CPU cores).
"""

from __future__ import annotations

import os
import time

import vislib
from vislib.live import LiveExplainer, synthetic_frames

# (model, input side or None for the model's own, frames/s promised on 2 CPU cores)
ROWS = [("shapes_resnet", None, 10.0), ("resnet18", 224, 4.0)]


def measure(name: str, size: int | None, *, seconds: float = 10.0, camera_fps: float = 30.0,
            method: str = "gradcam", warmup: int = 3) -> dict:
    bundle = vislib.load_model(name, weights="default" if name.startswith("shapes") else None)
    camera = synthetic_frames(10**9)
    steps: list[float] = []
    with LiveExplainer(bundle, method=method) as live:
        for _ in range(warmup):  # first calls build the hooks' caches
            live.submit(next(camera))
            while live.explained == 0 or len(live.slot):
                time.sleep(0.005)
        start_count, start_dropped = live.explained, live.slot.dropped
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            live.submit(next(camera))
            latest = live.latest()
            if latest is not None and (not steps or latest.seconds != steps[-1]):
                steps.append(latest.seconds)
            time.sleep(1.0 / camera_fps)
        elapsed = time.perf_counter() - started
        explained = live.explained - start_count
        dropped = live.slot.dropped - start_dropped
    side = bundle.input_hw[0] if size is None else size
    import torch

    return {"model": name, "method": method, "input": f"{side}×{side}",
            "torch threads": torch.get_num_threads(),
            "camera fps": camera_fps,
            "explained fps": round(explained / elapsed, 2), "dropped": dropped,
            "step ms": round(1000 * sum(steps) / max(len(steps), 1), 1)}


def run(seconds: float = 10.0, camera_fps: float = 30.0, log=print) -> list[dict]:
    rows = []
    for name, size, target in ROWS:
        row = measure(name, size, seconds=seconds, camera_fps=camera_fps)
        row["target fps"] = target
        row["met"] = row["explained fps"] >= target
        row["load average"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        log(str(row))
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[k]) for k in head) + " |" for r in rows]
    return "\n".join(lines)
