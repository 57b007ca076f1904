"""Log output for ``synthmrf serve``: text or one JSON object per line, with the identifiers passed in ``extra``.

Messages carry UIDs, AE titles and job ids, never patient names or other patient data.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings

IDENTIFIERS = ("study_uid", "series_uid", "sop_uid", "job_id", "destination", "calling_aet")


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", <identifiers>, "exception"}`` per record."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in IDENTIFIERS:
            value = getattr(record, key, None)
            if value:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


# Libraries whose INFO/DEBUG records are per-PDU or per-module chatter (pynetdicom: every PDU, the node logs
# associations itself; highdicom: about nine "copy attributes of module" lines per result series, 90 per study;
# dicom2nifti: each conversion step): warnings and errors only.
CHATTY_LIBRARIES = ("pynetdicom", "highdicom", "dicom2nifti")


def configure_logging(level: str, fmt: str) -> None:
    """Root logging to stderr in ``fmt`` ('text' or 'json') at ``level`` (called by ``serve``, not at import)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    quiet = max(logging.getLevelNamesMapping()[level], logging.WARNING)
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(quiet)
    # pydicom's validation messages quote element values (birth dates, names): neither its log records nor
    # the copies it issues as warnings (printed to stderr, the log of a service) may reach the output
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
