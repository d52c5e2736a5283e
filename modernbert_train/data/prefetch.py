"""Prepare the next training steps on a background thread while the current one runs on the device.

Reading, re-splitting, packing and masking a step is host work (tens of ms at phase-1 shapes). Done between
steps, the device idles through it; here one thread keeps `depth` steps ready. The thread is the only
producer, so the steps come in exactly the order (and with exactly the bytes) a synchronous loop would give,
and with every step it hands over the loader state as it was right after producing that step: the state a
checkpoint taken after consuming the step must hold.

Each step's production holds a collective (the loader's all-reduce), so every rank's thread must produce the
same number of steps before it stops, or the last one waits forever for a peer whose thread stopped first.
Closing after `taken` steps therefore lets the thread finish exactly `taken + depth + 1` productions (the
most it can have started: `depth` queued and one in hand), a count every rank agrees on.
"""
from __future__ import annotations

import atexit
import math
import queue
import threading
import weakref
from typing import Any, Callable

_END = object()
# Prefetchers still running. At interpreter exit each is stopped and joined: a daemon thread left inside a
# collective (the loader's per-step all-reduce) while the process group is torn down aborts the process.
_LIVE: "weakref.WeakSet[StepPrefetcher]" = weakref.WeakSet()


@atexit.register
def _close_live_prefetchers() -> None:
    for prefetcher in list(_LIVE):
        prefetcher.close(timeout=30.0)  # bounded: a peer rank that died never joins the collective


class StepPrefetcher:
    """Runs `produce()` -> (step, state) on a daemon thread, at most `depth` results ahead of `get()`."""

    def __init__(self, produce: Callable[[], tuple[Any, Any]], depth: int):
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self._produce = produce
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._depth = depth
        self._taken = 0
        self._produced = 0
        self._limit: float = math.inf  # productions to finish before stopping; set by close()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlm-loader-prefetch", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    def _run(self) -> None:
        while self._produced < self._limit:
            try:
                item = self._produce()
            except BaseException as err:  # handed to the consumer, who raises it
                self._put((_END, err))
                return
            self._produced += 1
            if not self._put(item):
                return

    def _put(self, item) -> bool:
        while True:
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                if self._stop.is_set():
                    return False

    def get(self) -> tuple[Any, Any]:
        """The next (step, state); re-raises an error of the producer."""
        while True:
            try:
                item = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the loader's prefetch thread stopped without a result") from None
        if item[0] is _END:
            self.close()
            raise item[1]
        self._taken += 1
        return item

    def close(self, timeout: float | None = None) -> None:
        """Stop once `taken + depth + 1` steps are produced (the same on every rank); untaken ones are dropped."""
        self._limit = self._taken + self._depth + 1
        self._stop.set()
        _LIVE.discard(self)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        while not self._queue.empty():
            self._queue.get_nowait()
