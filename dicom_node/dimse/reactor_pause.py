"""Associations whose reactor cannot steal the response a ``send_*`` call waits for (pynetdicom 3.0).

A ``send_*`` method (C-STORE, C-ECHO, C-FIND, ...) pauses the association's reactor before it reads the
peer's response: it clears ``_reactor_checkpoint`` and spins until ``_is_paused`` is true. The reactor
sets ``_is_paused`` before it waits on the checkpoint and resets it after. A pause asked just after the
reactor passed the checkpoint but before it reset the flag sees the stale ``True`` and goes on; the reactor
then takes the response off the DIMSE queue ("Received unexpected C-STORE service message"), and the sender
waits out its DIMSE timeout and aborts the association. Seen here: ``synthmrf demo`` on a loaded machine
lost the association after 22 of 150 instances and the node got a 22-slice series.

:class:`PauseSafeAssociation` turns ``_is_paused`` into a property whose reset re-checks the checkpoint: if a
pause was asked since the reactor passed it, the reactor stays paused until the checkpoint is set again.
:func:`use_for_requestors` makes ``AE.associate`` create them (pynetdicom builds the requestor inside
``associate`` from its module's ``Association`` name); the listener's reactor subclasses it.
"""

from __future__ import annotations

from typing import Any

import pynetdicom
import pynetdicom.ae
from pynetdicom.association import Association


class PauseSafeAssociation(Association):
    """An association whose reactor leaves its pause only while no pause is asked."""

    def __init__(self, ae: Any, mode: str) -> None:
        self._paused_flag = False
        super().__init__(ae, mode)

    @property
    def _is_paused(self) -> bool:
        return self._paused_flag

    @_is_paused.setter
    def _is_paused(self, value: bool) -> None:
        self._paused_flag = value
        if value:
            return
        # The reactor leaves its checkpoint. A pause asked between its wait and here may already have seen
        # the flag true and be reading the response: stay paused until the pauser sets the checkpoint again.
        while not self._reactor_checkpoint.is_set():
            self._paused_flag = True
            self._reactor_checkpoint.wait()
            self._paused_flag = False


def supported() -> bool:
    """True for the pynetdicom versions whose pause protocol this mirrors."""
    return pynetdicom.__version__.startswith("3.0.")


def use_for_requestors() -> None:
    """Make ``AE.associate`` build :class:`PauseSafeAssociation` requestors (idempotent; no-op on other
    pynetdicom versions)."""
    if supported():
        pynetdicom.ae.Association = PauseSafeAssociation  # type: ignore[misc]
