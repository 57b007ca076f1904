"""The mapped quantities (T1, T2, PD), the quality map and the synthetic contrasts: their codes, units, display
windows and integer encodings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from highdicom.pm import RealWorldValueMapping
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pipeline.contrasts import MAX_CONTRASTS, Contrast
from pipeline.dicom_series import DicomSeries, SeriesGrid

IS_MAX = 2**31 - 1  # DICOM Integer String
FALLBACK_SERIES_BASE = 9000  # series numbers when the source has none (or a huge one)
DERIVED_SERIES_OFFSET = 10  # derived series k + 10, parametric maps k


@dataclass(frozen=True)
class QuantitySpec:
    """How one quantity is described and displayed in the DICOM results."""

    name: str  # "T1": also the LUT label and the file name stem
    concept: Code  # Quantity Definition (CID 7180)
    unit: Code  # UCUM, Measurement Units (CID 7181)
    unit_label: str  # for descriptions
    window_center: float  # in the quantity's unit
    window_width: float
    derived_slope: float  # unit per stored integer of the derived (classic MR) series
    mr_image_type: str  # MR Image Type value 3 (PS3.3 C.8.3.1.1.1): the derived series
    pixel_contrast: str  # MR Derived Pixel Contrast, Image/Frame Type value 4 (PS3.3 C.8.13.1.1.4): the map
    series_offset: int  # 1, 2, 3: the k of the new series numbers

    @property
    def derived_max(self) -> float:
        """Largest value the derived series' 16-bit unsigned pixels hold."""
        return float(np.iinfo(np.uint16).max) * self.derived_slope


QUANTITIES: Mapping[str, QuantitySpec] = {
    # T1 stored in whole ms (slope 1: viewers that ignore Rescale Slope on MR still show ms), up to 65535 ms.
    "T1": QuantitySpec("T1", codes.DCM.T1, codes.UCUM.Millisecond, "ms", 1000.0, 2000.0, 1.0, "T1 MAP", "T1_MAP", 1),
    # T2 stored in 0.1 ms (whole ms would be 1-2 % of white matter T2), up to 6553.5 ms.
    "T2": QuantitySpec("T2", codes.DCM.T2, codes.UCUM.Millisecond, "ms", 60.0, 120.0, 0.1, "T2 MAP", "T2_MAP", 2),
    # PD: DCM 113058 "Proton Density"; a projection scale of arbitrary magnitude (about 1 for CSF), so UCUM
    # [arb'U] (dimensionless, CID 7181); stored in steps of 1e-4, up to 6.5535. RHO is the proton density map.
    "PD": QuantitySpec("PD", codes.DCM.ProtonDensity, codes.UCUM.ArbitraryUnit, "a.u.", 0.5, 1.0, 1e-4,
                       "DENSITY MAP", "RHO", 3),
}

# Q (pipeline.quality): how well the synthesised signal fits the dictionary, dimensionless in [0, 1], stored per
# mille (slope 0.001), as a derived MR series only. No standard code names it: a local code (99 prefix) and UCUM 1.
QUALITY = QuantitySpec("Q", Code("MATCHQ", "99SYNTHMRF", "MRF dictionary match quality"), codes.UCUM.NoUnits, "0-1",
                       0.5, 1.0, 1e-3, "OTHER", "OTHER", 4)


CONTRAST_OFFSET = 5  # synthetic contrast i: series offset 5 + i (derived series source x 100 + 15 + i)
CONTRAST_SCALE = 1000.0  # a synthetic image's pixel value: signal x 1000 (PD 1, fully relaxed, no T2 decay: 1000)
# The regions: Segmentation source x 100 + 30, its SR report + 31 (past the contrasts' 15..22: MAX_CONTRASTS 8)
REGIONS_SEG_OFFSET, REGIONS_SR_OFFSET, SUMMARY_OFFSET = 30, 31, 32


def contrast_spec(contrast: Contrast, index: int, values: np.ndarray) -> QuantitySpec:
    """A synthetic contrast (arbitrary units, no standard code: a local one) shown as a derived MR series, with a
    display window from the 2nd to the 98th percentile of its non-zero ``values`` (already x CONTRAST_SCALE)."""
    if not 0 <= index < MAX_CONTRASTS:
        raise ValueError(f"index: at most {MAX_CONTRASTS} synthetic contrasts, got index {index}")
    values = np.asarray(values)
    inside = values[values > 0]
    lo, hi = (np.percentile(inside, [2, 98]) if inside.size else (0.0, 1.0))
    hi = max(float(hi), float(lo) + 1.0)
    concept = Code(f"SYN{contrast.name.upper()}"[:16], "99SYNTHMRF", f"synthetic {contrast.description}"[:64])
    return QuantitySpec(contrast.name, concept, codes.UCUM.ArbitraryUnit, "a.u.", (float(lo) + hi) / 2,
                        hi - float(lo), 0.1, "OTHER", "OTHER", CONTRAST_OFFSET + index)


def quantity_spec(name: object, argument: str = "quantity") -> QuantitySpec:
    """The spec of ``name``; ValueError naming ``argument`` for an unknown quantity."""
    spec = QUANTITIES.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"{argument}: unknown quantity {name!r}; expected one of {sorted(QUANTITIES)}")
    return spec


def map_frames(values: object, grid: SeriesGrid, argument: str = "values") -> np.ndarray:
    """A finite real (i, j, k) volume on ``grid`` as float32 frames (frames, rows, columns)."""
    if not isinstance(values, np.ndarray):
        raise TypeError(f"{argument}: expected a numpy array, got {type(values).__name__}")
    if values.dtype.kind not in "fiu":
        raise TypeError(f"{argument}: expected real numbers, got dtype {values.dtype}")
    if values.shape != grid.shape:
        raise ValueError(f"{argument}: expected shape {grid.shape} (columns, rows, frames of the source grid), "
                         f"got {values.shape}")
    frames = grid.to_frames(values.astype(np.float32, copy=False))
    bad = int(np.count_nonzero(~np.isfinite(frames)))
    if bad:
        raise ValueError(f"{argument}: {bad} voxels are NaN or infinite (as float32); a map must be finite everywhere")
    return frames


def result_series_number(series: DicomSeries, spec: QuantitySpec, *, derived: bool) -> int:
    """Source SeriesNumber x 100 + k (+ 10 for the derived series): T1 of series 3 is 301 and 311."""
    return offset_series_number(series, spec.series_offset + (DERIVED_SERIES_OFFSET if derived else 0))


def offset_series_number(series: DicomSeries, k: int) -> int:
    """Source SeriesNumber x 100 + ``k``; FALLBACK_SERIES_BASE + ``k`` where the source has no (or a huge) one."""
    source = series.header.get("SeriesNumber")
    if source not in (None, "") and 0 < int(source) * 100 + k <= IS_MAX:
        return int(source) * 100 + k
    return FALLBACK_SERIES_BASE + k


def check_series_number(series_number: object, series: DicomSeries, argument: str = "series_number") -> None:
    """A positive DICOM IS that differs from the source's SeriesNumber."""
    if not isinstance(series_number, int) or isinstance(series_number, bool):
        raise TypeError(f"{argument}: expected int, got {type(series_number).__name__}")
    if not 0 < series_number <= IS_MAX:
        raise ValueError(f"{argument}: must be in 1..{IS_MAX}, got {series_number}")
    source = series.header.get("SeriesNumber")
    if source not in (None, "") and int(source) == series_number:
        raise ValueError(f"{argument}: {series_number} is the source series' own number")


def real_world_value_mapping(spec: QuantitySpec, value_range: tuple[float, float] | tuple[int, int],
                             slope: float = 1.0) -> RealWorldValueMapping:
    """Stored values to ``spec``'s quantity and unit (intercept 0); a float ``value_range`` for float pixels."""
    return RealWorldValueMapping(
        lut_label=spec.name, lut_explanation=f"{spec.name} [{spec.unit_label}]", unit=spec.unit,
        value_range=value_range, slope=slope, intercept=0.0, quantity_definition=spec.concept)
