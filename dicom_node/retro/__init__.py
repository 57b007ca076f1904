"""Query/retrieve from archives: retrospective passes, their schedules, and training-data harvests.

``config`` (the ``[[sources]]`` and ``[retro]`` models), ``query`` (C-FIND SCU), ``retrieve`` (C-MOVE
and C-GET SCU), ``progress`` (per-series progress and run history, SQLite), ``runner`` (one pass),
``schedules`` (APScheduler with a persistent job store), ``mrf_dicom`` (the archive form of MRF SVD
coefficients) and ``harvest`` (MPRAGE + MRF pairs into a training dataset). Nothing here runs at import.
"""
