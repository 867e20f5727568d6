"""Top layer: the bundle as a whole (bundle root, options, the one model definition), export and tracking glue."""
