"""The gateway's one notion of time where time decides behaviour (alias-cache TTLs, idle
unload, the memory budget's least recently used, rate-limit buckets).

A clock is any function returning seconds on a monotonic scale; `create_app` takes one and hands
it to every collaborator, so tests advance a fake clock instead of sleeping past a TTL.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Clock = Callable[[], float]  # seconds; only differences between readings mean anything

monotonic: Clock = time.monotonic
