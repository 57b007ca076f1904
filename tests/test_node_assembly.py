"""Series completion: quiet period, early trigger on the expected count, retry of a failed hand-over."""

from __future__ import annotations

import pytest

from dicom_node.config import SeriesSection
from dicom_node.node.instances import InstanceInfo
from dicom_node.node.series_assembly import SeriesAssembler

SERIES = "1.2.3.4"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def info(n: int, frames: int = 1, images: int | None = None, series: str = SERIES) -> InstanceInfo:
    return InstanceInfo(f"1.2.3.4.{n}", "1.2.840.10008.5.1.4.1.1.4", "1.2.3", series, frames, images,
                        "1.2.840.10008.1.2.1")


def assembler(clock: Clock, handed: list[tuple[str, str]], **cfg: object) -> SeriesAssembler:
    settings = SeriesSection(**{"quiet_seconds": 10.0, "settle_seconds": 1.0, **cfg})  # type: ignore[arg-type]
    return SeriesAssembler(settings, lambda uid, why: handed.append((uid, why)), clock=clock)


def test_quiet_period_completes_a_series() -> None:
    clock, handed = Clock(), []
    a = assembler(clock, handed)
    for n in range(5):
        a.instance_stored(info(n))
        clock.now += 2.0
    assert a.run_once() == 0
    assert a.next_deadline() == pytest.approx(clock.now - 2.0 + 10.0)
    clock.now += 7.9
    assert a.run_once() == 0
    clock.now += 0.2
    assert a.run_once() == 1
    assert handed == [(SERIES, "5 new instances; quiet for 10.1 s")]
    assert a.pending() == []


def test_images_in_acquisition_triggers_after_the_settle_time() -> None:
    clock, handed = Clock(), []
    a = assembler(clock, handed)
    for n in range(3):
        a.instance_stored(info(n, images=3))
    clock.now += 0.5
    assert a.run_once() == 0
    clock.now += 0.6
    assert a.run_once() == 1
    assert handed[0][1] == "3 new instances; all 3 images of the acquisition received, settled 1.1 s"


def test_incomplete_count_waits_for_the_quiet_period() -> None:
    clock, handed = Clock(), []
    a = assembler(clock, handed)
    a.instance_stored(info(0, images=3))
    clock.now += 5.0
    assert a.run_once() == 0
    clock.now += 5.0
    assert a.run_once() == 1
    assert handed[0][1].endswith("quiet for 10.0 s")


def test_one_multiframe_object_is_a_whole_series() -> None:
    clock, handed = Clock(), []
    a = assembler(clock, handed)
    a.instance_stored(info(0, frames=176))
    clock.now += 1.0
    assert a.run_once() == 1
    assert handed[0][1] == "1 new instances; one multi-frame object with all 176 frames received, settled 1.0 s"


def test_early_trigger_can_be_switched_off() -> None:
    clock, handed = Clock(), []
    a = assembler(clock, handed, early_trigger=False)
    a.instance_stored(info(0, frames=176))
    clock.now += 9.0
    assert a.run_once() == 0
    clock.now += 1.0
    assert a.run_once() == 1


def test_series_are_independent() -> None:
    clock, handed = Clock(), []
    a = assembler(clock, handed)
    a.instance_stored(info(0, series="1.1"))
    clock.now += 6.0
    a.instance_stored(info(0, series="2.2"))
    clock.now += 4.0
    assert a.run_once() == 1
    assert [uid for uid, _ in handed] == ["1.1"]
    assert a.pending() == ["2.2"]


def test_failed_hand_over_is_retried_after_another_quiet_period() -> None:
    clock, calls = Clock(), []

    def flaky(uid: str, why: str) -> None:
        calls.append(uid)
        if len(calls) == 1:
            raise OSError("disk hiccup")

    a = SeriesAssembler(SeriesSection(quiet_seconds=10.0), flaky, clock=clock)
    a.instance_stored(info(0))
    clock.now += 10.0
    assert a.run_once() == 0
    assert a.pending() == [SERIES]
    clock.now += 10.0
    assert a.run_once() == 1
    assert calls == [SERIES, SERIES]


def test_a_series_stays_pending_until_its_hand_over_returns() -> None:
    """Nobody may see the node idle between a series leaving the assembler and its job existing."""
    clock, seen = Clock(), []
    a: SeriesAssembler

    def hand_over(uid: str, why: str) -> None:
        seen.append(a.pending())

    a = SeriesAssembler(SeriesSection(quiet_seconds=10.0), hand_over, clock=clock)
    a.instance_stored(info(0))
    clock.now += 10.0
    assert a.run_once() == 1
    assert seen == [[SERIES]]
    assert a.pending() == []


def test_a_series_not_complete_after_all_waits_another_quiet_period_with_its_counts() -> None:
    clock, calls = Clock(), []

    def hand_over(uid: str, why: str) -> str | None:
        calls.append(why)
        return "retrieval under way" if len(calls) == 1 else None

    a = SeriesAssembler(SeriesSection(quiet_seconds=10.0), hand_over, clock=clock)
    for n in range(3):
        a.instance_stored(info(n))
    clock.now += 10.0
    assert a.run_once() == 0
    assert a.pending() == [SERIES] and a.not_complete() == [SERIES]
    a.instance_stored(info(3))
    clock.now += 9.9
    assert a.run_once() == 0
    clock.now += 0.2
    assert a.run_once() == 1
    assert calls[1].startswith("4 new instances")
    assert a.pending() == [] and a.not_complete() == []
