"""When is a series complete? Quiet period, or the expected count plus a short settle time.

The assembler keeps, per series still arriving, when its last instance came and how many instances
and frames came. A series is complete when

- no instance came for ``quiet_seconds``; or
- (``early_trigger``) the expected count is reached and no instance came for ``settle_seconds``:
  the frames received reach Images in Acquisition (0020,1002) when the instances carry it, or the
  series is a single multi-frame object (Enhanced / Legacy Converted MR: all frames in one instance).

A series some of whose instances the node refused for want of space (:meth:`SeriesAssembler.hold`) is not
complete at its quiet time: it waits up to ``hold_refused_s`` for the sender's retry, which lifts the
hold (:meth:`SeriesAssembler.release_hold`), so that a series cut short by a full disk is processed once,
whole, and not once cut and again complete.

The state is in memory only: the instances themselves are in the spool, and after a restart every
series with instances in ``incoming/`` is tracked again from the restart (a full quiet period).
The assembler calls ``on_complete(series_uid, why)`` from its own thread. The callback returns None
when it took the series, or a reason why the series is not complete after all (a retrospective
retrieval still under way, say): the series then waits another quiet period, as it does when the
callback fails (which is logged).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dicom_node.config import SeriesSection
from dicom_node.node.instances import InstanceInfo

logger = logging.getLogger(__name__)

CompletionHandler = Callable[[str, str], str | None]


@dataclass
class SeriesProgress:
    """Arrival bookkeeping of one series."""

    series_uid: str
    first_seen: float
    last_seen: float
    instances: int = 0
    frames: int = 0
    multiframe_instances: int = 0
    images_in_acquisition: int | None = None
    held_until: float = 0.0  # refused instances for space: not complete before this (unless all expected came)

    def add(self, info: InstanceInfo, now: float) -> None:
        self.last_seen = now
        self.instances += 1
        self.frames += info.frames
        if info.frames > 1:
            self.multiframe_instances += 1
        if info.images_in_acquisition:
            self.images_in_acquisition = info.images_in_acquisition

    def absorb(self, other: SeriesProgress) -> None:
        """Add the arrivals ``other`` counted for the same series."""
        self.last_seen = max(self.last_seen, other.last_seen)
        self.instances += other.instances
        self.frames += other.frames
        self.multiframe_instances += other.multiframe_instances
        self.images_in_acquisition = other.images_in_acquisition or self.images_in_acquisition
        self.held_until = max(self.held_until, other.held_until)

    def expected_reached(self) -> str | None:
        """Why the series holds everything expected, or None if that is unknown or not yet so."""
        if self.images_in_acquisition:
            if self.frames >= self.images_in_acquisition:
                return f"all {self.images_in_acquisition} images of the acquisition received"
            return None
        if self.instances == 1 and self.multiframe_instances == 1:
            return f"one multi-frame object with all {self.frames} frames received"
        return None


class SeriesAssembler:
    """Tracks arriving series; :meth:`due` says which are complete at a given time."""

    def __init__(self, cfg: SeriesSection, on_complete: CompletionHandler,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg = cfg
        self.on_complete = on_complete
        self.clock = clock
        self._series: dict[str, SeriesProgress] = {}
        self._handing_over: dict[str, SeriesProgress] = {}  # complete, with on_complete still running
        self._waited: set[str] = set()  # series told 'not complete yet' (logged once at INFO)
        self._cond = threading.Condition(threading.RLock())
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- fed by the listener (any thread) -------------------------------------------------------------------

    def instance_stored(self, info: InstanceInfo) -> None:
        now = self.clock()
        with self._cond:
            progress = self._series.get(info.series_instance_uid)
            if progress is None:
                progress = self._series[info.series_instance_uid] = SeriesProgress(info.series_instance_uid, now, now)
            progress.add(info, now)
            if self.cfg.early_trigger and progress.expected_reached():
                self._cond.notify()

    def instance_waiting(self, info: InstanceInfo) -> None:
        """A duplicate of an instance still in ``incoming/``: track its series if nothing does, so that what
        waits in the spool is claimed without waiting for a restart."""
        with self._cond:
            if info.series_instance_uid not in self._series and info.series_instance_uid not in self._handing_over:
                self.instance_stored(info)

    def hold(self, series_uid: str) -> None:
        """Instances of the series were refused for want of space: wait ``hold_refused_s`` for the resend."""
        with self._cond:
            progress = self._series.get(series_uid)
            if progress is not None:
                progress.held_until = self.clock() + self.cfg.hold_refused_s
                logger.info("series %s: instances refused for want of space; waiting up to %.0f s for the sender "
                            "to send them again", series_uid, self.cfg.hold_refused_s, extra={"series_uid": series_uid})

    def release_hold(self, series_uid: str) -> None:
        """The sender has sent the series again without refusals: its quiet period decides again."""
        with self._cond:
            progress = self._series.get(series_uid)
            if progress is not None and progress.held_until:
                progress.held_until = 0.0
                self._cond.notify()

    def track(self, series_uid: str, instances: list[InstanceInfo] | None = None) -> None:
        """Track a series found in the spool at start (its quiet period starts now)."""
        now = self.clock()
        with self._cond:
            progress = self._series.setdefault(series_uid, SeriesProgress(series_uid, now, now))
            for info in instances or []:
                progress.add(info, now)
            self._cond.notify()

    # -- decisions ------------------------------------------------------------------------------------------------

    def _deadline(self, p: SeriesProgress) -> float:
        deadline = max(p.last_seen + self.cfg.quiet_seconds, p.held_until)
        if self.cfg.early_trigger and p.expected_reached():
            deadline = min(deadline, p.last_seen + self.cfg.settle_seconds)
        return deadline

    def due(self, now: float | None = None) -> list[tuple[str, str]]:
        """Remove and return the series complete at ``now`` with the reason.

        They stay :meth:`pending` until their completion has been handled, so that nobody sees the node
        idle between a series leaving the assembler and its job existing.
        """
        now = self.clock() if now is None else now
        out = []
        with self._cond:
            for uid, p in list(self._series.items()):
                if now < self._deadline(p):
                    continue
                early = self.cfg.early_trigger and p.expected_reached()
                quiet = now - p.last_seen
                why = (f"{early}, settled {quiet:.1f} s" if early and quiet < self.cfg.quiet_seconds
                       else f"quiet for {quiet:.1f} s")
                if p.held_until and not early:
                    why += "; instances refused for space were not sent again"
                out.append((uid, f"{p.instances} new instances; {why}"))
                self._handing_over[uid] = self._series.pop(uid)
        return out

    def next_deadline(self) -> float | None:
        with self._cond:
            return min((self._deadline(p) for p in self._series.values()), default=None)

    def _wait_again(self, series_uid: str) -> None:
        """A series :meth:`due` gave out is not complete after all: another quiet period from now."""
        now = self.clock()
        with self._cond:
            progress = self._handing_over.pop(series_uid, None) or SeriesProgress(series_uid, now, now)
            arrived = self._series.pop(series_uid, None)  # instances that came during the hand-over
            if arrived is not None:
                progress.absorb(arrived)
            progress.last_seen = now
            self._series[series_uid] = progress
            self._cond.notify()

    def _handed_over(self, series_uid: str) -> None:
        with self._cond:
            self._handing_over.pop(series_uid, None)
            self._waited.discard(series_uid)

    def not_complete(self) -> list[str]:
        """Series that were quiet but not complete after all (see ``on_complete``), waiting again."""
        with self._cond:
            return sorted(self._waited)

    def pending(self) -> list[str]:
        """Series still arriving, or complete and not yet handed over."""
        with self._cond:
            return sorted(self._series.keys() | self._handing_over)

    # -- thread ------------------------------------------------------------------------------------------------------

    def run_once(self, now: float | None = None) -> int:
        """Hand every complete series to ``on_complete``; return how many were handed over."""
        done = 0
        for uid, why in self.due(now):
            try:
                not_yet = self.on_complete(uid, why)
            except Exception:
                logger.exception("series %s: completion failed; trying again after the quiet period", uid,
                                 extra={"series_uid": uid})
                self._wait_again(uid)
                continue
            if not_yet is None:
                self._handed_over(uid)
                done += 1
            else:
                with self._cond:
                    first = uid not in self._waited
                    self._waited.add(uid)
                logger.log(logging.INFO if first else logging.DEBUG, "series %s: not complete yet: %s; waiting",
                           uid, not_yet, extra={"series_uid": uid})
                self._wait_again(uid)
        return done

    def _loop(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                deadline = self.next_deadline()
                timeout = 1.0 if deadline is None else max(0.0, min(1.0, deadline - self.clock()))
                if timeout > 0:
                    self._cond.wait(timeout)
                if self._stopping:
                    return
            self.run_once()

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="series-assembler", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
