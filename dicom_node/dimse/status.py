"""Every DIMSE status code synthmrf sends or interprets, named once (pynetdicom ``status.py`` style) with its
PS3 source: storage (the node's SCP, the folder receivers), query/retrieve (retro), and their names for logs."""

from __future__ import annotations

# C-STORE response statuses: PS3.4 Annex B.2.3 (Storage Service Class), Table B.2-1
SUCCESS = 0x0000  # also Q/R (C.4): matching or sub-operations complete
OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (storage; also C-FIND refused, C.4.1.1.4)
DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: required attributes absent, invalid or contradicting
CANNOT_UNDERSTAND = 0xC000  # Error: the data set cannot be parsed (truncated, garbage)
STORE_WARNINGS = frozenset({0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})  # stored, with a warning
# General statuses: PS3.7 Annex C
PROCESSING_FAILURE = 0x0110  # an unexpected error inside the node (logged with a traceback)

# -- DIMSE statuses of the Query/Retrieve service class (PS3.4 Annex C.4), general ones from PS3.7 Annex C --
PENDING = 0xFF00  # C.4.1.1.4: matches are continuing; C.4.2.1.5: sub-operations are continuing
PENDING_OPTIONAL_KEYS = 0xFF01  # C.4.1.1.4: matches continuing, one or more optional keys not supported
CANCELLED = 0xFE00  # C.4.1.1.4 / C.4.2.1.5: terminated by a C-CANCEL
SUBOPERATIONS_WARNING = 0xB000  # C.4.2.1.5 / C.4.3.1.4: sub-operations complete, one or more failures or warnings
OUT_OF_RESOURCES_MATCHES = 0xA701  # C.4.2.1.5: refused, unable to calculate the number of matches
OUT_OF_RESOURCES_SUBOPERATIONS = 0xA702  # C.4.2.1.5: refused, unable to perform sub-operations
MOVE_DESTINATION_UNKNOWN = 0xA801  # C.4.2.1.5: refused, move destination unknown
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # C.4.1.1.4 / C.4.2.1.5: identifier does not match SOP class
SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.7 C: refused, SOP class not supported
UNABLE_TO_PROCESS_FIRST, UNABLE_TO_PROCESS_LAST = 0xC000, 0xCFFF  # C.4.1.1.4 / C.4.2.1.5: failed, unable to process

STATUS_NAMES = {
    SUCCESS: "success",
    PENDING: "pending",
    PENDING_OPTIONAL_KEYS: "pending (optional keys not supported)",
    CANCELLED: "cancelled",
    SUBOPERATIONS_WARNING: "warning: some sub-operations failed",
    OUT_OF_RESOURCES: "refused: out of resources",
    OUT_OF_RESOURCES_MATCHES: "refused: out of resources (cannot count matches)",
    OUT_OF_RESOURCES_SUBOPERATIONS: "refused: out of resources (cannot perform sub-operations)",
    MOVE_DESTINATION_UNKNOWN: "refused: move destination unknown",
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS: "failed: identifier does not match SOP class",
    SOP_CLASS_NOT_SUPPORTED: "refused: SOP class not supported",
}
