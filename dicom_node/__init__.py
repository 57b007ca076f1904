"""The running DICOM node and the ``synthmrf`` command line."""
