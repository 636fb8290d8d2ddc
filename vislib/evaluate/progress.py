"""Progress of a long run for people: images per second and the time left, for the command line's bar
(on stderr) and the dashboard's."""

from __future__ import annotations

import sys
import time
from collections import deque


def format_duration(seconds: float) -> str:
    """``7 s``, ``2 min 05 s``, ``1 h 04 min``."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def format_bytes(count: float) -> str:
    """``512 B``, ``3.4 MB``, ``1.2 GB`` (powers of 1024)."""
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"


class RateMeter:
    """Rate and time left from ``update(done, total)`` calls.

    The rate is measured over the last ``window`` seconds of updates (so a slow start, e.g. Ray's
    workers starting, stops counting once work flows): rate = Δdone / Δt between the oldest update
    in the window and the newest; ETA = (total − done) / rate. ``clock`` is for tests.
    """

    def __init__(self, window: float = 20.0, clock=time.monotonic):
        self.window = window
        self.clock = clock
        self.start = clock()
        self.points: deque[tuple[float, int]] = deque()
        self.done = 0
        self.total = 0

    def update(self, done: int, total: int) -> None:
        now = self.clock()
        self.done, self.total = done, total
        self.points.append((now, done))
        while len(self.points) > 2 and now - self.points[1][0] >= self.window:
            self.points.popleft()

    @property
    def rate(self) -> float:
        """Items per second (NaN until two updates are apart in time)."""
        if len(self.points) < 2:
            return float("nan")
        (t0, d0), (t1, d1) = self.points[0], self.points[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else float("nan")

    @property
    def eta(self) -> float:
        """Seconds left (NaN while the rate is unknown, 0 when done)."""
        if self.total and self.done >= self.total:
            return 0.0
        rate = self.rate
        return (self.total - self.done) / rate if rate == rate and rate > 0 else float("nan")

    def text(self, unit: str = "images") -> str:
        """``480/2000 images · 123 images/s · 12 s left`` (rate and time left once known)."""
        parts = [f"{self.done}/{self.total} {unit}"]
        if self.rate == self.rate:
            parts.append(f"{self.rate:.3g} {unit}/s")
        if self.eta == self.eta and self.done < self.total:
            parts.append(f"{format_duration(self.eta)} left")
        return " · ".join(parts)

    def rate_text(self, unit: str = "images") -> str:
        """``images at 123/s, 12 s left`` (what is known so far) for a bar that shows done/total."""
        rate = self.rate
        if rate != rate:
            return unit
        text = f"{unit} at {rate:.3g}/s"
        if self.eta == self.eta and self.done < self.total:
            text += f", {format_duration(self.eta)} left"
        return text

    def bar(self, width: int = 24, unit: str = "images") -> str:
        """A text bar: ``[██████······] 480/2000 images · 123 images/s · 12 s left``."""
        frac = min(1.0, self.done / self.total) if self.total else 0.0
        filled = int(round(frac * width))
        return "[" + "█" * filled + "·" * (width - filled) + "] " + self.text(unit)


class StderrBar:
    """A progress bar on stderr for the command line: redrawn in place on a terminal, one line at most
    every ``every`` seconds otherwise (logs stay short). Status messages (total 0) print as they come."""

    def __init__(self, label: str, unit: str = "images", stream=None, every: float = 10.0):
        self.label, self.unit = label, unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.meter = RateMeter()
        self.every = every
        self.last = -float("inf")
        self.drawn = False

    def __call__(self, done: int, total: int, text: str = "") -> None:
        if not total:  # a status message, not a count
            self._line(f"{self.label}: {text}…", final=True)
            return
        self.meter.update(done, total)
        now = time.monotonic()
        finished = done >= total
        if self.tty or finished or now - self.last >= self.every:
            self.last = now
            self._line(f"{self.label} {self.meter.bar(unit=self.unit)}", final=finished)

    def _line(self, text: str, final: bool) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End an unfinished bar's line (after Ctrl-C or an error)."""
        if self.tty and self.meter.total and self.meter.done < self.meter.total:
            self.stream.write("\n")
            self.stream.flush()
