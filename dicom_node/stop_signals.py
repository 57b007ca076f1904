"""SIGTERM and SIGINT as a :class:`threading.Event`, without taking a lock inside a signal handler.

A Python signal handler runs in the main thread between two bytecodes, wherever that thread is, and a second
signal can run it again inside the first. ``Event.set()`` takes the event's lock: called from a handler it
deadlocks the main thread when that thread already holds the lock (inside ``Event.wait`` or inside the first
handler's ``set``, as happens when a worker process gets SIGTERM twice: from its supervisor and from the
parent-death signal). Here the handler only records the signal (the interpreter writes its number to a wakeup
pipe) and a thread sets the event.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals(stop: threading.Event, in_handler: Callable[[int], None] = lambda signum: None) -> None:
    """From now on SIGTERM or SIGINT sets ``stop`` (soon after, from a thread). ``in_handler(signum)`` runs in
    the main thread at each signal: it must not take locks (it may raise to interrupt the main thread's work).
    Call from the main thread, once per process."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)

    def handler(signum: int, frame: FrameType | None) -> None:
        in_handler(signum)

    for signum in STOP_SIGNALS:
        signal.signal(signum, handler)

    def watch() -> None:
        while not any(b in STOP_SIGNALS for b in os.read(read_end, 512)):
            pass
        stop.set()

    threading.Thread(target=watch, name="stop-signals", daemon=True).start()
