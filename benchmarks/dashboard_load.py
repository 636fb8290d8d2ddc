"""Many users at once: N browser sessions on one dashboard server, each explaining its own images
with its own model, against the same requests made one at a time on a fresh server.

    python -m benchmarks.dashboard_load                      # 8 sessions × 3 timed views (about 15 minutes)
    python -m benchmarks.dashboard_load --sessions 4 --rounds 1
    python -m benchmarks.dashboard_load --class 30            # a class: 30 pages, one sample, one model

Each session (a Chromium page: its own Streamlit session) opens the Explain page with its model
(bundled, torchvision random, a timm transformer, models uploaded through the sidebar), computes a
first view (model loading, not timed), then ``--rounds`` timed views: it picks another sample image
and waits until every panel of the new image is shown. A view's time is what the user waits: from
the pick to the last panel. Phase 1 runs all sessions at once (each round starts in every session
at the same moment); phase 2 runs the same sessions one at a time on a fresh server (fresh caches).
Every view's maps are downloaded (the page's "All maps (.npz)") and phase 1 must equal phase 2.
The server's RSS is sampled every 0.2 s (and its peak read from /proc). Results: a JSON and a
markdown table in ``--out``.

``--class N``: a classroom. The teacher's page opens the Explain page on one sample and the bundled
model (computing the view once); then N pupils' pages (N Streamlit sessions) open the same link at the
same moment. Each pupil's time runs from opening the page to its last panel; the results come from the
server's caches (``st.cache_data`` keyed by the image's SHA-256 and the parameters, and the pass
cache), never from another session's upload. Promise: p95 ≤ 3 s for 30 pages on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.dashboard_harness import (
    ANY_PANEL,
    CHROMIUM,
    CHROMIUM_ARGS,
    IDLE,
    ROOT,
    MemorySampler,
    cpu_seconds,
    run_server,
)
from vislib._resources import resource

SAMPLES = sorted(p.stem for p in resource("assets", "samples").glob("*.png"))


@dataclass
class Session:
    """One simulated user: a model (a catalogue name, or an upload) and the images it explains."""

    label: str
    model: str | None = None  # catalogue name (None: an upload)
    weights: str = "pretrained"
    upload: tuple[str, str, int] | None = None  # (architecture, file name, classes)


SESSIONS = [
    Session("bundled shapes_resnet", "shapes_resnet"),
    Session("bundled shapes_zf", "shapes_zf"),
    Session("torchvision resnet50 (random)", "resnet50", "random"),
    Session("timm deit_tiny_patch16_224 (random)", "timm:deit_tiny_patch16_224", "random"),
    Session("upload: shapes_resnet, 5 classes + labels", upload=("shapes_resnet", "teacher5.safetensors", 5)),
    Session("upload: resnet18, 10 classes", upload=("resnet18", "team10.safetensors", 10)),
    Session("torchvision convnext_tiny (random)", "convnext_tiny", "random"),
    Session("torchvision mobilenet_v3_large (random)", "mobilenet_v3_large", "random"),
]


@dataclass
class View:
    session: str
    round: int
    image: str
    seconds: float
    panels: int
    arrays: dict = field(repr=False, default_factory=dict)


def weights_file(architecture: str, classes: int, seed: int) -> bytes:
    """A state dict for ``architecture`` with a ``classes``-way head (random weights, seeded)."""
    import torch
    from safetensors.torch import save

    import vislib

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = vislib.load_model(architecture, weights=None, device="cpu").model.state_dict()
        head = [k for k, v in state.items() if k.endswith("weight") and v.dim() == 2][-1]
        bias = head[: -len("weight")] + "bias"
        state = {**state, head: torch.randn(classes, state[head].shape[1]) * 0.05}
        if bias in state:
            state[bias] = torch.zeros(classes)
    return save({k: v.contiguous() for k, v in state.items()})


# --------------------------------------------------------------------------------------------------
# One page (playwright's async API)


async def settle(page) -> None:
    await page.wait_for_timeout(300)
    await page.locator(IDLE).wait_for()


async def choose(page, key: str, option: str) -> float:
    """Pick ``option`` in the selectbox ``key`` by typing; returns the time of the committing click."""
    await page.locator(f".st-key-{key}").locator('[data-testid="stSelectbox"]').first.click()
    await page.keyboard.type(option)
    item = page.get_by_role("option", name=option, exact=True).first
    await item.wait_for()
    start = time.perf_counter()
    await item.click()
    return start


async def upload(page, session: Session, files: dict[str, bytes]) -> None:
    architecture, name, classes = session.upload
    side = page.locator('[data-testid="stSidebar"]')
    expander = side.locator('[data-testid="stExpander"]').filter(has_text="Upload a model").first
    if not await expander.locator('[data-testid="stFileUploader"]').first.is_visible():
        await expander.locator("summary").first.click()
    await choose(page, "upload_arch", architecture)
    inputs = expander.locator('input[type="file"]')
    await inputs.nth(0).set_input_files(files=[{"name": name, "mimeType": "application/octet-stream",
                                                "buffer": files[name]}])
    labels = f"{name}.txt"
    if labels in files:
        await inputs.nth(1).set_input_files(files=[{"name": labels, "mimeType": "text/plain",
                                                    "buffer": files[labels]}])
    await settle(page)
    await expander.get_by_role("button", name=re.compile("Add model")).click()
    stem = Path(name).stem
    await page.wait_for_function(
        "name => [...document.querySelectorAll('.st-key-model_pick input')].some(i => i.value === name)",
        arg=f"upload:{stem}")


async def wait_view(page, image: str, panels: int | None) -> int:
    """Wait until the view of ``image`` is complete: its input caption, every panel, the run done."""
    await page.get_by_text(re.compile(rf"Model input \(\d+×\d+\) · {re.escape(image)}$")).wait_for()
    while True:
        await page.locator(IDLE).wait_for()
        shown = await page.get_by_text(ANY_PANEL).count()
        if shown and (panels is None or shown >= panels):
            return shown
        await page.wait_for_timeout(100)


async def download(page) -> dict[str, np.ndarray]:
    async with page.expect_download() as info:
        await page.get_by_role("button", name=re.compile(r"All maps \(\.npz\)")).click()
    path = await (await info.value).path()
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


class User:
    """A session's page and its state between rounds."""

    def __init__(self, index: int, session: Session, page, url: str, files: dict[str, bytes]):
        self.index, self.session, self.page, self.url, self.files = index, session, page, url, files
        self.panels: int | None = None

    def image(self, round_: int) -> str:
        return SAMPLES[(self.index * 3 + round_) % len(SAMPLES)]

    async def open(self) -> None:
        """The first view (model loading, not timed)."""
        query = f"/?sample={self.image(0)}"
        if self.session.model:
            query += f"&model={self.session.model}&weights={self.session.weights}"
        await self.page.goto(self.url + query)
        if self.session.upload:
            await self.page.get_by_text(re.compile(r"^Model input")).wait_for()
            await upload(self.page, self.session, self.files)
        self.panels = await wait_view(self.page, self.image(0), None)

    async def view(self, round_: int) -> View:
        image = self.image(round_)
        start = await choose(self.page, "sample", image)
        panels = await wait_view(self.page, image, self.panels)
        seconds = time.perf_counter() - start
        arrays = await download(self.page)
        return View(self.session.label, round_, image, seconds, panels, arrays)


async def run_phase(url: str, sessions: list[Session], rounds: int, files, *, together: bool) -> list[View]:
    from playwright.async_api import async_playwright

    views: list[View] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            users = []
            for i, session in enumerate(sessions):
                context = await browser.new_context(viewport={"width": 1400, "height": 1400},
                                                    accept_downloads=True)
                page = await context.new_page()
                page.set_default_timeout(600_000)
                users.append(User(i, session, page, url, files))
            if together:
                await asyncio.gather(*(u.open() for u in users))
                for r in range(1, rounds + 1):
                    views += await asyncio.gather(*(u.view(r) for u in users))
            else:
                for u in users:
                    await u.open()
                    for r in range(1, rounds + 1):
                        views.append(await u.view(r))
                    await u.page.close()
            for u in users:
                errors = await u.page.get_by_text("Traceback").count() if not u.page.is_closed() else 0
                if errors:
                    raise RuntimeError(f"{u.session.label}: a traceback in the page")
        finally:
            await browser.close()
    return views


# --------------------------------------------------------------------------------------------------
# A class: N pages on the same sample and model

CLASS_SAMPLE, CLASS_MODEL = SAMPLES[0] if SAMPLES else "", "shapes_resnet"


async def pupil(context, url: str) -> tuple[float, int, bool, float]:
    """Open ``url`` in a new page (its own Streamlit session); (seconds to the last panel, panels,
    served from the cache, the server's script time in seconds)."""
    page = await context.new_page()
    page.set_default_timeout(600_000)
    start = time.perf_counter()
    await page.goto(url)
    panels = await wait_view(page, CLASS_SAMPLE, None)
    seconds = time.perf_counter() - start
    if await page.get_by_text("Traceback").count():
        raise RuntimeError("a traceback in a pupil's page")
    cached = await page.get_by_text(re.compile(r"^Computed in .* \(cached\)")).count() > 0
    built = await page.get_by_text(re.compile(r"^Page built in")).all_inner_texts()
    match = re.search(r"([\d.]+) (m?s)", built[0]) if built else None
    server = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1) if match else float("nan")
    await page.close()
    return seconds, panels, cached, server


async def run_class(url: str, pupils: int,
                    pid: int) -> tuple[float, list[tuple[float, int, bool, float]], float]:
    """The teacher's first view (seconds), then ``pupils`` pages at once. The pages share one browser
    context (its HTTP cache holds the dashboard's scripts, as each pupil's own browser would after
    a first visit); each page is its own Streamlit session."""
    from playwright.async_api import async_playwright

    link = f"{url}/?sample={CLASS_SAMPLE}&model={CLASS_MODEL}&weights=pretrained"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1400, "height": 1400})
            teacher = (await pupil(context, link))[0]
            cpu = cpu_seconds(pid)
            found = await asyncio.gather(*(pupil(context, link) for _ in range(pupils)))
            cpu = cpu_seconds(pid) - cpu
        finally:
            await browser.close()
    return teacher, list(found), cpu


async def protocol_pupil(url: str, query: str) -> tuple[float, int, bool, float]:
    """A pupil without a browser: Streamlit's own websocket protocol (``/_stcore/stream``, protobuf
    messages), as the page's script would speak it. Runs the page, fetches each panel's image as the
    browser would, and times the last panel (image downloaded) and the script's end."""
    import urllib.request

    import websockets
    from streamlit.proto.BackMsg_pb2 import BackMsg
    from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

    def fetch(path: str) -> None:
        with urllib.request.urlopen(url + path if path.startswith("/") else path, timeout=600) as response:
            response.read()

    stream = url.replace("http", "ws", 1) + "/_stcore/stream"
    async with websockets.connect(stream, subprotocols=["streamlit"], max_size=None, open_timeout=600) as ws:
        message = BackMsg()
        message.rerun_script.query_string = query
        start = time.perf_counter()
        await ws.send(message.SerializeToString())
        panels, last, cached = 0, float("nan"), False
        while True:
            forward = ForwardMsg()
            forward.ParseFromString(await ws.recv())
            kind = forward.WhichOneof("type")
            if kind == "delta" and forward.delta.WhichOneof("type") == "new_element":
                element = forward.delta.new_element
                if element.WhichOneof("type") == "imgs":
                    for image in element.imgs.imgs:
                        if ANY_PANEL.match(image.caption):
                            await asyncio.to_thread(fetch, image.url)
                            panels, last = panels + 1, time.perf_counter() - start
                elif element.WhichOneof("type") == "markdown" and "(cached)" in element.markdown.body:
                    cached = True
            if kind == "script_finished" and panels:
                return last, panels, cached, time.perf_counter() - start


async def run_protocol_class(url: str, pupils: int,
                             pid: int) -> tuple[float, list[tuple[float, int, bool, float]], float]:
    query = f"sample={CLASS_SAMPLE}&model={CLASS_MODEL}&weights=pretrained"
    teacher = (await protocol_pupil(url, query))[0]
    cpu = cpu_seconds(pid)
    found = list(await asyncio.gather(*(protocol_pupil(url, query) for _ in range(pupils))))
    return teacher, found, cpu_seconds(pid) - cpu


def main_class(pupils: int, out: Path, env: dict, protocol: bool = False) -> int:
    import os

    with run_server(out / "server-class.log", env=env) as server, MemorySampler(server.proc.pid) as memory:
        run = run_protocol_class if protocol else run_class
        teacher, found, cpu = asyncio.run(run(server.url, pupils, server.proc.pid))
    seconds = [s for s, _, _, _ in found]
    panels = {p for _, p, _, _ in found}
    shared = sum(c for _, _, c, _ in found)
    server = [t for _, _, _, t in found]
    row = {"pupils": pupils, "clients": "protocol" if protocol else "chromium", "sample": CLASS_SAMPLE,
           "model": CLASS_MODEL, "teacher_first_view_s": teacher, "server_cpu_s": cpu,
           "p50": percentile(seconds, 50), "p95": percentile(seconds, 95), "max": max(seconds),
           "panels": sorted(panels), "from_cache": shared, "peak_rss_bytes": memory.peak,
           "met": percentile(seconds, 95) <= 3.0,
           "server_script_p50": percentile(server, 50), "server_script_p95": percentile(server, 95),
           "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()), "seconds": seconds}
    (out / "dashboard_class.json").write_text(json.dumps(row, indent=1))
    print(f"| pupils | teacher's first view | p50 to the last panel | p95 | max | peak server RSS | load |\n"
          f"|---|---|---|---|---|---|---|\n| {pupils} | {teacher:.2f} s | {row['p50']:.2f} s | "
          f"{row['p95']:.2f} s | {row['max']:.2f} s | {memory.peak / 2**20:.0f} MiB | "
          f"{row['load_average']} |")
    print(f"server CPU for the {pupils} pages: {cpu:.1f} s ({cpu / pupils:.2f} s a page)")
    what = "the script's end" if protocol else "the server's script time per page"
    print(f"{shared} of {pupils} pages served from the server's cache; {what}: "
          f"p50 {row['server_script_p50']:.2f} s, p95 {row['server_script_p95']:.2f} s; results in {out}")
    return 0 if len(panels) == 1 else 1


# --------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def compare(together: list[View], alone: list[View]) -> tuple[float, int]:
    """(largest relative difference over every array of every view, number of arrays compared):
    |a − b| / max(|b|) per array (the raw signals are not normalised)."""
    index = {(v.session, v.round): v for v in alone}
    if len(index) != len(alone):
        raise ValueError("two sessions with the same label")
    worst, count = 0.0, 0
    for view in together:
        other = index[(view.session, view.round)]
        if set(view.arrays) != set(other.arrays):
            raise AssertionError(f"{view.session} round {view.round}: different maps "
                                 f"{sorted(view.arrays)} vs {sorted(other.arrays)}")
        for key, value in view.arrays.items():
            a, b = np.asarray(value, dtype=np.float64), np.asarray(other.arrays[key], dtype=np.float64)
            if a.shape != b.shape:
                raise AssertionError(f"{view.session} round {view.round} {key}: shape {a.shape} vs {b.shape}")
            scale = max(float(np.abs(b).max()), 1e-30) if b.size else 1.0
            difference = float(np.abs(a - b).max()) / scale if a.size else 0.0
            if difference > 1e-6:
                print(f"  differs: {view.session} round {view.round} {key}: {difference:.3g} "
                      f"of max {scale:.3g}")
            worst = max(worst, difference)
            count += 1
    return worst, count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="timed views per session")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", default=None, help="VISLIB_THREADS for the server (default: its own)")
    parser.add_argument("--class", type=int, default=None, dest="pupils", metavar="N",
                        help="a class: N pages at once on one sample and the bundled model (p95 ≤ 3 s at 30)")
    parser.add_argument("--protocol", action="store_true",
                        help="with --class: the pupils speak Streamlit's websocket protocol instead of "
                             "running Chromium pages on the server's cores")
    args = parser.parse_args(argv)
    sessions = SESSIONS[: args.sessions]
    out = args.out or ROOT / "results" / f"dashboard-load-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    if args.pupils:
        return main_class(args.pupils, out, {"VISLIB_THREADS": args.threads} if args.threads else {},
                          protocol=args.protocol)
    files: dict[str, bytes] = {}
    for i, s in enumerate(sessions):
        if s.upload:
            architecture, name, classes = s.upload
            files[name] = weights_file(architecture, classes, seed=100 + i)
            if classes <= 8:
                files[f"{name}.txt"] = "\n".join(f"kind {chr(65 + c)}" for c in range(classes)).encode()
    env = {"VISLIB_THREADS": args.threads} if args.threads else {}
    results = {}
    for phase, together in (("together", True), ("alone", False)):
        with run_server(out / f"server-{phase}.log", env=env) as server, \
                MemorySampler(server.proc.pid) as memory:
            start = time.perf_counter()
            views = asyncio.run(run_phase(server.url, sessions, args.rounds, files, together=together))
            wall = time.perf_counter() - start
        for view in views:
            label = re.sub(r"[^A-Za-z0-9]+", "_", view.session)
            np.savez_compressed(out / f"{phase}-{label}-{view.round}.npz", **view.arrays)
        results[phase] = dict(views=views, peak_rss=memory.peak, wall=wall,
                              rss=[(round(t, 1), r) for t, r in memory.samples])
        seconds = [v.seconds for v in views]
        print(f"{phase}: {len(views)} views, p50 {percentile(seconds, 50):.2f} s, p95 "
              f"{percentile(seconds, 95):.2f} s, peak RSS {memory.peak / 2**20:.0f} MiB, {wall:.0f} s in all",
              flush=True)
    worst, count = compare(results["together"]["views"], results["alone"]["views"])
    summary = {
        "sessions": [asdict(s) for s in sessions], "rounds": args.rounds,
        "max_abs_difference": worst, "arrays_compared": count,
    }
    lines = ["| phase | views | p50 per view | p95 per view | max | peak server RSS | wall |",
             "|---|---|---|---|---|---|---|"]
    for phase, data in results.items():
        seconds = [v.seconds for v in data["views"]]
        summary[phase] = {
            "p50": percentile(seconds, 50), "p95": percentile(seconds, 95), "max": max(seconds),
            "mean": statistics.fmean(seconds), "peak_rss_bytes": data["peak_rss"],
            "wall_seconds": data["wall"],
            "views": [{k: v for k, v in asdict(view).items() if k != "arrays"} for view in data["views"]],
            "rss_samples": data["rss"],
        }
        row = summary[phase]
        lines.append(f"| {phase} | {len(seconds)} | {row['p50']:.2f} s | {row['p95']:.2f} s | "
                     f"{row['max']:.2f} s | {data['peak_rss'] / 2**20:.0f} MiB | {data['wall']:.0f} s |")
    per_session = ["", "| session | together: mean per view | alone: mean per view |", "|---|---|---|"]
    for s in sessions:
        t = [v.seconds for v in results["together"]["views"] if v.session == s.label]
        a = [v.seconds for v in results["alone"]["views"] if v.session == s.label]
        per_session.append(f"| {s.label} | {statistics.fmean(t):.2f} s | {statistics.fmean(a):.2f} s |")
    lines += per_session + ["", f"Maps of every view together = alone: largest relative difference "
                                f"{worst:.3g} over {count} arrays."]
    (out / "dashboard_load.json").write_text(json.dumps(summary, indent=1))
    (out / "dashboard_load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results in {out}")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
