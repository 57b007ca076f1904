"""pynetdicom 3.0's reactor can take the response a send_* call waits for; ours cannot."""

from __future__ import annotations

import threading

import pynetdicom.ae
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.dimse.reactor_pause import PauseSafeAssociation, use_for_requestors


def race(assoc: Association) -> tuple[threading.Thread, list[object], C_STORE]:
    """The interleaving, step by step: the reactor passes its checkpoint; a sender pauses it and sees the flag
    still set, so it goes on; the peer's response arrives; then the reactor resets the flag and looks at the
    DIMSE queue (on its own thread: the fixed one must wait there)."""
    assoc._is_paused = True  # reactor, before waiting
    assert assoc._reactor_checkpoint.wait(1)  # reactor: not paused, goes through
    assoc._reactor_checkpoint.clear()  # sender: pause the reactor ...
    assert assoc._is_paused  # ... it looks paused: send the request
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 1
    response.Status = 0x0000
    assoc.dimse.msg_queue.put((1, response))  # the peer answers
    taken: list[object] = []

    def reactor_goes_on() -> None:
        assoc._is_paused = False
        taken.append(assoc.dimse.get_msg(block=False)[1])

    thread = threading.Thread(target=reactor_goes_on, daemon=True)
    thread.start()
    thread.join(0.5)
    return thread, taken, response


def test_stock_reactor_steals_the_response() -> None:
    # the failure mode itself, so that a pynetdicom release that fixes it shows up here
    thread, taken, response = race(Association(AE(), "requestor"))
    assert not thread.is_alive()
    assert taken == [response]


def test_pause_safe_reactor_waits_and_the_sender_gets_its_response() -> None:
    assoc = PauseSafeAssociation(AE(), "requestor")
    thread, taken, response = race(assoc)
    assert thread.is_alive() and taken == []  # the reactor stayed paused
    assert assoc.dimse.get_msg(block=False) == (1, response)  # the sender reads its response
    assoc._reactor_checkpoint.set()  # and resumes the reactor
    thread.join(2)
    assert not thread.is_alive() and taken == [None]


def test_requestors_are_pause_safe() -> None:
    use_for_requestors()
    assert pynetdicom.ae.Association is PauseSafeAssociation
