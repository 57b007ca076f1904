"""MR fingerprinting physics: sequence files, EPG simulation, dictionary, SVD basis, matching."""
