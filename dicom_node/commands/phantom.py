"""``synthmrf phantom ...``: the digital brain world."""

from __future__ import annotations

import click


@click.group()
def phantom() -> None:
    """Synthetic subjects with known T1/T2/PD, MPRAGE DICOM studies and simulated MRF."""
