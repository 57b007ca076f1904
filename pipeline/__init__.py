"""Everything that turns pixels into maps: physics, geometry, model inference, result writing."""
