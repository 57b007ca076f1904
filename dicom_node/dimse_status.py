"""DIMSE status codes the node returns, named (pynetdicom ``status.py`` style) with their PS3 source."""

from __future__ import annotations

# C-STORE response statuses: PS3.4 Annex B.2.3 (Storage Service Class), Table B.2-1
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (the spool would pass its free-space floor)
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: required attributes absent, invalid or contradicting
CANNOT_UNDERSTAND = 0xC000  # Error: the data set cannot be parsed (truncated, garbage)
# General statuses: PS3.7 Annex C
PROCESSING_FAILURE = 0x0110  # an unexpected error inside the node (logged with a traceback)
