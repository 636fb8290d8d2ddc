"""The dashboard as a person (or a class) uses it: a ``streamlit run`` server on a free loopback port,
Debian's Chromium driven by playwright, and what the server process costs (RSS, CPU time).

Shared by the browser tests (``tests/test_e2e_*.py``) and the load test
(``python -m benchmarks.dashboard_load``). Chromium is the system's (``/usr/bin/chromium``): never
``playwright install``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
#: A panel's caption: "Grad-CAM · 2.1 ms".
PANEL = r"^{} · [\d.]+ m?s( · flat map)?$"
ANY_PANEL = re.compile(r"^.+ · [\d.]+ m?s( · flat map)?$")
IDLE = '[data-testid="stApp"][data-test-script-state="notRunning"]'


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if not Path(CHROMIUM).is_file():
        return f"Chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install playwright)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not become healthy within {timeout:.0f} s")


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.is_file() else ""


@contextlib.contextmanager
def run_server(log: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Iterator[Server]:
    """``streamlit run app.py`` on a free loopback port (offline), stopped in ``finally``."""
    port = free_port()
    environment = {**os.environ, "VISLIB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    log.parent.mkdir(parents=True, exist_ok=True)
    handle = open(log, "w")  # noqa: SIM115  (closed in finally)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.port", str(port), "--server.address", "127.0.0.1", "--server.fileWatcherType", "none",
         "--browser.gatherUsageStats", "false", *args],
        cwd=ROOT, env=environment, stdout=handle, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield Server(url, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        handle.close()


@contextlib.contextmanager
def launch_chromium(extra_args: tuple[str, ...] | list[str] = ()) -> Iterator:
    """The system's Chromium through playwright's sync API (``CHROMIUM_ARGS`` plus ``extra_args``),
    closed in ``finally``."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args])
        try:
            yield chromium
        finally:
            chromium.close()


# --------------------------------------------------------------------------------------------------
# The server process: memory and CPU


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in bytes, from /proc (Linux)."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values.get("VmRSS", 0), values.get("VmHWM", 0)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) in seconds, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class MemorySampler:
    """Samples a process's RSS every ``interval`` seconds in a thread (and reads its peak at the end)."""

    pid: int
    interval: float = 0.2
    samples: list[tuple[float, int]] = field(default_factory=list)
    peak: int = 0

    def __enter__(self) -> MemorySampler:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                self.samples.append((time.monotonic() - start, rss_bytes(self.pid)[0]))

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(OSError):
            self.peak = rss_bytes(self.pid)[1]
        self.peak = max([self.peak] + [rss for _, rss in self.samples])


# --------------------------------------------------------------------------------------------------
# Files a user brings


def picture(seed: int = 0, size: tuple[int, int] = (240, 180)) -> bytes:
    """A PNG with a few coloured shapes on a soft background (each seed a different picture)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([90 + xx * 80 // w, 120 + yy * 60 // h, 160 - xx * 60 // w], -1).astype(np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x, y = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
        s = int(rng.integers(30, 70))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x, y, x + s, y + s), fill=colour)
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# Pages (playwright's sync API)


def open_page(browser, url: str, height: int = 1600):
    """A new 1500-pixel-wide page (downloads accepted, 120 s timeout) at ``url``."""
    page = browser.new_page(viewport={"width": 1500, "height": height}, accept_downloads=True)
    page.set_default_timeout(120_000)
    page.goto(url)
    return page


def settle(page) -> None:
    """Wait until the script run triggered by the last action has finished."""
    page.wait_for_timeout(300)
    page.locator(IDLE).wait_for()


def panel_count(page) -> int:
    """Result panels shown (captions "<method> · <time>")."""
    return page.get_by_text(ANY_PANEL).count()


def sidebar(page):
    return page.locator('[data-testid="stSidebar"]')


def choose(page, key: str, option: str, attempts: int = 3) -> None:
    """Pick ``option`` in the selectbox with widget key ``key`` (by typing, as a person does).

    Waits for the page to be idle first; a dropdown that a late rerun closed before the option showed
    is opened again (up to ``attempts`` times)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.locator(f".st-key-{key}").locator('[data-testid="stSelectbox"]').first
    wanted = page.get_by_role("option", name=option, exact=True).first
    for attempt in range(attempts):
        settle(page)
        box.click()
        page.keyboard.type(option)
        try:
            wanted.click(timeout=20_000 if attempt < attempts - 1 else None)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise
            page.keyboard.press("Escape")


def upload_model(page, architecture: str, weights: tuple[str, bytes],
                 labels: tuple[str, bytes] | None) -> None:
    """Upload a model through the sidebar: architecture, weights file, labels file, Add model."""
    side = sidebar(page)
    expander = side.locator('[data-testid="stExpander"]').filter(has_text="Upload a model").first
    if not expander.locator('[data-testid="stFileUploader"]').first.is_visible():
        expander.locator("summary").first.click()
    choose(page, "upload_arch", architecture)
    inputs = expander.locator('input[type="file"]')
    inputs.nth(0).set_input_files(files=[{"name": weights[0], "mimeType": "application/octet-stream",
                                          "buffer": weights[1]}])
    if labels is not None:
        inputs.nth(1).set_input_files(files=[{"name": labels[0], "mimeType": "text/plain",
                                              "buffer": labels[1]}])
    settle(page)
    expander.get_by_role("button", name=re.compile("Add model")).click()
    settle(page)


def wait_for_model(page, name: str) -> None:
    """Wait until the sidebar's model picker shows ``name``."""
    page.wait_for_function(
        "name => [...document.querySelectorAll('.st-key-model_pick input')].some(i => i.value === name)",
        arg=name)


def download_npz(page) -> dict[str, np.ndarray]:
    """The "All maps (.npz)" download of the current view, as arrays."""
    with page.expect_download() as info:
        page.get_by_role("button", name=re.compile(r"All maps \(\.npz\)")).click()
    path = info.value.path()
    with np.load(path) as data:
        return {k: data[k] for k in data.files}
