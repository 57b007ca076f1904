"""The kinds of result objects, as destinations choose them (``[[destinations]] outputs``), named by the
writer's file names (no DICOM is read to tell them apart)."""

from __future__ import annotations

import re

PARAMETRIC_MAPS = "parametric_maps"  # T1/T2(/PD) Parametric Map objects
DERIVED_MAPS = "derived_maps"  # the same maps as classic MR image series
QUALITY = "quality"  # the dictionary-match quality series
SYNTHETIC_CONTRASTS = "synthetic_contrasts"  # T1w, T2w, PDw, FLAIR, DIR ("not acquired")
SEGMENTATION = "segmentation"  # the anatomical regions (DICOM Segmentation)
SR = "sr"  # their regional measurement report (TID 1500 SR)
SUMMARY = "summary"  # one Secondary Capture page (QC panels and the regional table)
OTHER = "other"  # anything a custom processor writes: always sent
KINDS = (PARAMETRIC_MAPS, DERIVED_MAPS, QUALITY, SYNTHETIC_CONTRASTS, SEGMENTATION, SR, SUMMARY)
DEFAULT_OUTPUTS = tuple(k for k in KINDS if k != SUMMARY)

_MAP = re.compile(r"(T1|T2|PD)_map\.dcm")
_SERIES = re.compile(r"(\w+?)_mr_\d{4}\.dcm")
SEGMENTATION_FILE_NAME = "SEG_regions.dcm"  # the writer's names of the two region results
REGION_REPORT_FILE_NAME = "SR_regions.dcm"
SUMMARY_FILE_NAME = "SC_summary.dcm"
_BY_NAME = {SEGMENTATION_FILE_NAME: SEGMENTATION, REGION_REPORT_FILE_NAME: SR, SUMMARY_FILE_NAME: SUMMARY}


def kind_of(file_name: str) -> str:
    """The kind of a result file, from its name (``T1_map.dcm``, ``T2_mr_0001.dcm``, ``FLAIR_mr_0001.dcm``,
    ``SEG_regions.dcm``...)."""
    if file_name in _BY_NAME:
        return _BY_NAME[file_name]
    if _MAP.fullmatch(file_name):
        return PARAMETRIC_MAPS
    m = _SERIES.fullmatch(file_name)
    if m is None:
        return OTHER
    stem = m.group(1)
    if stem in ("T1", "T2", "PD"):
        return DERIVED_MAPS
    return QUALITY if stem == "Q" else SYNTHETIC_CONTRASTS
