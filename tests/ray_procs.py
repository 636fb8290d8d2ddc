"""Processes and listening sockets of a Ray run, read from /proc (Linux): what the Ray tests check."""

from __future__ import annotations

import os
import time
from pathlib import Path

RAY_NAMES = ("ray::", "raylet", "gcs_server", "ray/dashboard", "ray/_private", "ray/autoscaler", "default_worker")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def descendants(root: int) -> set[int]:
    """Every living process below ``root`` (children, their children, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            info = _stat(int(entry.name))
            if info is not None:
                parents[int(entry.name)] = info[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def ray_processes(root: int | None = None) -> set[int]:
    """Ray's processes below ``root`` (default: this process)."""
    root = os.getpid() if root is None else root
    return {pid for pid in descendants(root) if any(n in _cmdline(pid) for n in RAY_NAMES)}


def alive(pids: set[int]) -> set[int]:
    """Those of ``pids`` that still run (a zombie has ended: only its parent has not collected it)."""
    out = set()
    for pid in pids:
        info = _stat(pid)
        if info is not None and info[0] != "Z":
            out.add(pid)
    return out


def wait_gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    """Wait until none of ``pids`` runs; returns those still running after ``timeout``."""
    deadline = time.monotonic() + timeout
    left = alive(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = alive(left)
    return left


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def _address(hex_address: str) -> str:
    host, port = hex_address.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return ".".join(str(b) for b in raw[::-1]) + f":{int(port, 16)}"
    words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]  # each 32-bit word is little-endian
    data = b"".join(words)
    if data[:12] == b"\0" * 10 + b"\xff\xff":  # an IPv4-mapped IPv6 address
        return "::ffff:" + ".".join(str(b) for b in data[12:]) + f":{int(port, 16)}"
    return ":".join(data[i:i + 2].hex() for i in range(0, 16, 2)) + f":{int(port, 16)}"


def listening(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, local address) of every listening TCP socket that one of ``pids`` holds."""
    owner = {inode: pid for pid in pids for inode in _socket_inodes(pid)}
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # 0A: LISTEN
                out.append((owner[fields[9]], _address(fields[1])))
    return out


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    return host.startswith("127.") or host in ("::ffff:127.0.0.1", "0000:0000:0000:0000:0000:0000:0000:0001")


def session_processes(sid: int) -> set[int]:
    """Every process of the session ``sid`` (as ``start_new_session`` makes for a command)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[3]) == sid:
            found.add(int(entry.name))
    return found
