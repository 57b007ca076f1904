"""The seven-U-Net ensemble that synthesises compressed MRF channels from MPRAGE slices."""
