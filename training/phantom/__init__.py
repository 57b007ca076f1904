"""The digital brain world: phantom subjects with known T1/T2/PD, simulated MPRAGE and MRF, DICOM studies.

Entry point: :func:`training.phantom.dataset.make_dataset`. The layout it writes and the physics
choices are documented in ``training/phantom/README.md``.
"""
