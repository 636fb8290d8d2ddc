"""Many users at once, in one process (the dashboard's server): seeded random initialisations that
do not depend on other threads, and views computed in parallel threads equal to the same views
computed one at a time. (The browser version of this is in test_e2e_browser.py; the 8-session
figures come from benchmarks/dashboard_load.py.)"""

from __future__ import annotations

import threading

import numpy as np
import torch
from helpers import FlatNet, GapNet, tiny_bundle
from PIL import Image

import vislib
from vislib import ui
from vislib.seeding import seeded


def test_a_seeded_build_draws_the_same_numbers_whatever_another_thread_does():
    """Thread A draws, pauses, draws again inside ``seeded``; thread B tries a seeded draw in between.
    Without the process-wide lock, B's draw lands between A's two and changes A's second number."""
    with seeded(0):
        reference = (torch.rand(1).item(), torch.rand(1).item())
    paused, got = threading.Event(), []

    def first() -> None:
        with seeded(0):
            a = torch.rand(1).item()
            paused.set()
            threading.Event().wait(0.3)  # time for the other thread to draw, if it could
            got.append((a, torch.rand(1).item()))

    def second() -> None:
        paused.wait()
        with seeded(1):
            torch.rand(1000)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [reference]


def test_random_models_built_in_parallel_equal_one_at_a_time():
    names = ["shapes_resnet", "shapes_zf", "shapes_shortcut"]
    alone = {n: vislib.load_model(n, weights=None, device="cpu").model.state_dict() for n in names}
    together: dict[str, dict] = {}

    def build(name: str) -> None:
        together[name] = vislib.load_model(name, weights=None, device="cpu").model.state_dict()

    threads = [threading.Thread(target=build, args=(n,)) for n in names * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in names:
        assert all(torch.equal(together[name][k], v) for k, v in alone[name].items()), name


def test_views_computed_in_parallel_threads_equal_one_at_a_time():
    """Four "sessions" (threads), two models shared between them, different images and methods."""
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)) for _ in range(4)]
    gap = tiny_bundle(GapNet(channels=6, classes=4), labels=list("abcd"))
    flat = tiny_bundle(FlatNet(), labels=list("abc"))
    jobs = [(gap, images[0], ["gradcam", "cam", "guided_backprop"]), (flat, images[1], ["gradcam", "deconvnet"]),
            (gap, images[2], ["layercam", "gradient"]), (flat, images[3], ["hirescam", "guided_backprop"])]
    alone = [ui.compute_view(b, img, methods) for b, img, methods in jobs]
    together: list = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        b, img, methods = jobs[i]
        start.wait()
        for _ in range(3):  # overlap as much as possible
            together[i] = ui.compute_view(b, img, methods)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (_, _, methods), a, b in zip(jobs, alone, together, strict=True):
        assert a.target == b.target
        np.testing.assert_array_equal(a.probs, b.probs)
        for m in methods:
            np.testing.assert_array_equal(a.rows[0].explanations[m].raw[m], b.rows[0].explanations[m].raw[m])
