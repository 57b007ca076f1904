"""dicom_node.stop_signals: SIGTERM sets the stop event, however many come and whenever they come; the main
thread's in-handler hook can interrupt its work. (A handler calling ``Event.set()`` itself hung the process
in 6 of 6 runs of the signal storm below.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STORM_CHILD = """
import threading, time
from dicom_node.stop_signals import stop_on_signals
stop = threading.Event()
stop_on_signals(stop)
print("ready", flush=True)
start = time.monotonic()
while time.monotonic() - start < 2.0:
    stop.wait(0.0001)  # the main thread in and out of the event's lock, as serve's main loop
print("stopped" if stop.is_set() else "not stopped", flush=True)
"""

INTERRUPT_CHILD = """
import threading, time
from dicom_node.stop_signals import stop_on_signals
class Interrupted(BaseException):
    pass
def in_handler(signum):
    raise Interrupted(signum)
stop = threading.Event()
stop_on_signals(stop, in_handler)
try:
    print("ready", flush=True)  # inside the try: the signal may come while print returns
    time.sleep(60)
except Interrupted as exc:
    print("interrupted by", exc.args[0], "stop set:", stop.wait(5), flush=True)
"""


def start(code: str) -> subprocess.Popen[str]:
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout is not None and child.stdout.readline().strip() == "ready"
    return child


def test_a_storm_of_sigterms_stops_the_process_and_never_deadlocks_it() -> None:
    child = start(STORM_CHILD)
    sent = 0
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # signals arriving inside the previous handler, over and over
        os.kill(child.pid, signal.SIGTERM)
        sent += 1
    try:
        out, _ = child.communicate(timeout=15)
    finally:
        child.kill()
    assert child.returncode == 0 and out.strip() == "stopped", (child.returncode, out, sent)


def test_the_in_handler_hook_interrupts_the_main_thread_and_stop_is_set() -> None:
    child = start(INTERRUPT_CHILD)
    child.send_signal(signal.SIGINT)
    try:
        out, _ = child.communicate(timeout=15)
    finally:
        child.kill()
    assert out.strip() == f"interrupted by {int(signal.SIGINT)} stop set: True"
