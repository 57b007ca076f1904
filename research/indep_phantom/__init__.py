"""Independent MPRAGE phantom generator (Colin27-based evaluation datasets); see README.md."""
