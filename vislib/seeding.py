"""Seeded random initialisations that are the same in every thread and every process.

``torch.manual_seed`` and the initialisers of ``nn.Module`` constructors use the *process-wide*
random generator. Two threads that build seeded models at the same time (two dashboard sessions
opening ``resnet50`` and ``convnext_tiny`` with random weights) would interleave their draws and
each get weights that depend on the timing. :func:`seeded` holds one process-wide lock while it
forks the generator, seeds it and builds, so a seeded build always draws the same numbers.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

#: Held while the global random generator is seeded and drawn from (re-entrant: builds nest).
SEED_LOCK = threading.RLock()


@contextmanager
def seeded(seed: int = 0, devices: Sequence[int] = ()) -> Iterator[None]:
    """Inside the block, the global generator starts from ``seed`` and no other thread draws from it
    through :func:`seeded`; the caller's random state is restored afterwards."""
    with SEED_LOCK, torch.random.fork_rng(devices=list(devices)):
        torch.manual_seed(seed)
        yield
